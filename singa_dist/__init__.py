"""singa_dist: SINGA's distributed training frameworks as a Horovod-style plugin for any PyTorch model.

    import singa_dist as sd
    sd.init()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
"""
import sys as _sys

from . import runtime
from .runtime import (NotInitializedError, cross_rank, cross_size, device, group_process_group, init,
                      is_distributed, is_initialized, local_rank, local_size, on_shutdown, proc_rank, proc_size, rank,
                      role, shutdown, size, start_timeline, stop_timeline, strategy_name, topology, worker_group,
                      workers_process_group)
from .topology import STRATEGIES, ClusterTopology, ProcessRole, StrategyKind, TopologyError
from .primitives import CollectiveError
from .coordinator import (CollectiveMismatchError, ProcessSet, add_process_set, global_process_set,
                          remove_process_set)
from .collectives import (Adasum, Average, Max, Min, Product, ReduceOp, Sum, allgather, allgather_async,
                          allgather_object, allreduce, allreduce_, allreduce_async, allreduce_async_, alltoall,
                          alltoall_async, barrier, broadcast, broadcast_, broadcast_async, broadcast_async_,
                          broadcast_object, grouped_allgather, grouped_allgather_async, grouped_allreduce,
                          grouped_allreduce_, grouped_allreduce_async, grouped_allreduce_async_,
                          grouped_reducescatter, grouped_reducescatter_async, poll, reducescatter,
                          reducescatter_async, sparse_allreduce_async, synchronize)
from .functions import Join, broadcast_optimizer_state, broadcast_parameters, join
from .compression import Compression
from .optimizer import DistributedOptimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .strategies import Strategy
from .strategies.allreduce import AllReduce
from .strategies.partial_update import PartialUpdate
from .runner import RunError, run, run_elastic
from . import elastic, partition

__version__ = "0.1.0"

# The parameter-server strategies bring the RPC transport and the server loop with them: imported on first use.
_LAZY_STRATEGIES = {kind.class_name: name for name, kind in STRATEGIES.items() if kind.parameter_servers}


def __getattr__(name: str):
    if name in _LAZY_STRATEGIES:
        from .strategies import strategy_class
        cls = globals()[name] = strategy_class(_LAZY_STRATEGIES[name])
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_STRATEGIES))


def _release_parameter_servers() -> None:
    """shutdown()'s "release" phase, for the transport that may not be imported yet: separate parameter servers
    wait for every worker's goodbye, whether or not the worker ever used them."""
    if "singa_dist.ps.transport" in _sys.modules or (
            is_initialized() and is_distributed() and role().is_worker and topology().server_worker_separate
            and topology().nservers > 0):
        from .ps import transport
        transport.leave_job()


on_shutdown(_release_parameter_servers, phase="release", persistent=True)


def _serve_parameters() -> None:
    """What a separate server process does between init() and shutdown() (see runtime.init)."""
    from .ps.server import serve
    serve()


runtime.on_server_role(_serve_parameters)
