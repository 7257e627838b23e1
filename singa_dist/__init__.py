"""singa_dist: SINGA's distributed training frameworks as a Horovod-style plugin for any PyTorch model.

    import singa_dist as sd
    sd.init()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
"""
from .runtime import (cross_rank, cross_size, device, group_process_group, init, is_distributed, is_initialized,
                      local_rank, local_size, proc_rank, proc_size, rank, role, shutdown, size,
                      strategy_name, topology, worker_group, workers_process_group)
from .topology import ClusterTopology, ProcessRole, TopologyError
from .strategies import Strategy

__version__ = "0.1.0"
from .collectives import Average, ReduceOp, Sum
from .optimizer import DistributedOptimizer
from .strategies.sandblaster import Sandblaster
from .strategies.downpour import Downpour
from .strategies.hogwild import Hogwild
from .strategies.hybrid import Hybrid
