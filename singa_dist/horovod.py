"""horovod.torch's names on top of singa_dist: a Horovod PyTorch script runs by changing its import.

    import singa_dist.horovod as hvd     # instead of: import horovod.torch as hvd
    hvd.init()
    torch.cuda.set_device(hvd.local_rank())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=hvd.Compression.fp16, op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

Start it with `singa-launch -np N python train.py` (or torchrun / mpirun) instead of `horovodrun`.
What Horovod offers beyond this (Adasum, process sets other than the global one, elastic training, the
timeline, join for uneven inputs) is absent or raises a clear error rather than silently doing something else.
"""
from __future__ import annotations

import torch

from . import runtime
from .collectives import (Average, Max, Min, Product, Sum, allgather, allgather_async, allgather_object, allreduce,
                          allreduce_, allreduce_async, allreduce_async_, barrier, broadcast, broadcast_,
                          broadcast_async, broadcast_async_, broadcast_object, poll, synchronize)
from .compression import Compression, Compressor
from .functions import broadcast_optimizer_state, broadcast_parameters
from .optimizer import DistributedOptimizer as _DistributedOptimizer
from .runtime import (cross_rank, cross_size, is_initialized, local_rank, local_size, rank, shutdown, size)
from .strategies.allreduce import AllReduce


class _Adasum:
    name = "Adasum"

    def __repr__(self) -> str:
        return "singa_dist.horovod.Adasum"


Adasum = _Adasum()  # accepted as a name so scripts import cleanly; using it raises (see DistributedOptimizer)


class ProcessSet:
    """Only the global process set (all workers) exists here."""

    process_set_id = 0

    def __init__(self, ranks=None):
        if ranks is not None:
            raise ValueError("singa_dist.horovod supports only the global process set (all workers)")

    def size(self) -> int:
        return size()

    def rank(self) -> int:
        return rank()

    def included(self) -> bool:
        return True


global_process_set = ProcessSet()


def init(comm=None, process_sets=None) -> None:
    """Join the job (from singa-launch, torchrun, mpirun or SLURM; a single process otherwise)."""
    if comm is not None:
        raise ValueError("singa_dist.horovod.init() takes its ranks from the launcher, not from an MPI communicator")
    if process_sets not in (None, [], [global_process_set]):
        raise ValueError("singa_dist.horovod supports only the global process set")
    runtime.init()


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step: int = 1, op=Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups=None, sparse_as_dense: bool = False,
                         process_set=global_process_set):
    """horovod.torch.DistributedOptimizer: gradients averaged (or summed) with fused, overlapped all-reduce.

    gradient_predivide_factor f divides the gradients by f before the sum and multiplies by f/size after
    (with op=Average), as Horovod does; num_groups cuts the parameters into that many fused buckets. Sparse
    gradients are always communicated as dense ones (sparse_as_dense is accepted for that reason).
    """
    if op is Adasum:
        raise ValueError("Adasum is not available in singa_dist; use hvd.Average or hvd.Sum")
    if process_set is not global_process_set and getattr(process_set, "process_set_id", 0) != 0:
        raise ValueError("singa_dist.horovod supports only the global process set")
    if groups is not None:
        raise ValueError("explicit parameter groups are not supported; use num_groups (or sd.AllReduce(bucket_mb=))")
    if gradient_predivide_factor != 1.0 and op is not Average:
        raise ValueError("gradient_predivide_factor requires op == Average (as in Horovod)")
    strategy = AllReduce(num_buckets=num_groups or None, prescale_factor=1.0 / gradient_predivide_factor,
                         postscale_factor=gradient_predivide_factor)
    return _DistributedOptimizer(optimizer, named_parameters=named_parameters, strategy=strategy,
                                 compression=compression, backward_passes_per_step=backward_passes_per_step, op=op)


def mpi_threads_supported() -> bool:
    return False


def mpi_enabled() -> bool:
    return False


def mpi_built() -> bool:
    return False


def gloo_enabled() -> bool:
    return True


def gloo_built() -> bool:
    return True


def nccl_built() -> bool:
    return torch.cuda.is_available() and torch.distributed.is_nccl_available()


def cuda_built() -> bool:
    return torch.cuda.is_available()


def rocm_built() -> bool:
    return False


__all__ = [
    "Adasum", "AllReduce", "Average", "Compression", "Compressor", "DistributedOptimizer", "Max", "Min", "Product",
    "ProcessSet", "Sum", "allgather", "allgather_async", "allgather_object", "allreduce", "allreduce_",
    "allreduce_async", "allreduce_async_", "barrier", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters", "cross_rank",
    "cross_size", "cuda_built", "global_process_set", "gloo_built", "gloo_enabled", "init", "is_initialized",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll",
    "rank", "rocm_built", "shutdown", "size", "synchronize",
]
