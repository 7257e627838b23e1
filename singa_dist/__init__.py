"""singa_dist: SINGA's distributed training frameworks as a Horovod-style plugin for any PyTorch model.

    import singa_dist as sd
    sd.init()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
"""
from .runtime import (cross_rank, cross_size, device, group_process_group, init, is_distributed, is_initialized,
                      local_rank, local_size, on_shutdown, proc_rank, proc_size, rank, role, shutdown, size,
                      strategy_name, topology, worker_group, workers_process_group)
from .topology import ClusterTopology, ProcessRole, TopologyError
from .collectives import (Average, Max, Min, Product, ReduceOp, Sum, allgather, allgather_async, allgather_object,
                          allreduce, allreduce_, allreduce_async, allreduce_async_, barrier, broadcast, broadcast_,
                          broadcast_async, broadcast_async_, broadcast_object, broadcast_optimizer_state,
                          broadcast_parameters, poll, synchronize)
from .compression import Compression
from .optimizer import DistributedOptimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .strategies import Strategy
from .strategies.allreduce import AllReduce
from .runner import RunError, run
from . import partition

__version__ = "0.1.0"

# The parameter-server strategies bring the RPC transport and the server loop with them: imported on first use.
_PARAMETER_SERVER_STRATEGIES = {"Sandblaster": "sandblaster", "Downpour": "downpour", "Hogwild": "hogwild",
                                "Hybrid": "hybrid"}


def __getattr__(name: str):
    if name in _PARAMETER_SERVER_STRATEGIES:
        from .strategies import strategy_class
        cls = globals()[name] = strategy_class(_PARAMETER_SERVER_STRATEGIES[name])
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PARAMETER_SERVER_STRATEGIES))

