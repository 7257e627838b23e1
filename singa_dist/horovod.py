"""horovod.torch's names on top of singa_dist: a Horovod PyTorch script runs by changing its import.

    import singa_dist.horovod as hvd     # instead of: import horovod.torch as hvd
    hvd.init()
    torch.cuda.set_device(hvd.local_rank())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=hvd.Compression.fp16, op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

Start it with `singa-launch -np N python train.py` (or torchrun / mpirun) instead of `horovodrun`. Every
collective of horovod.torch 0.28 is here with its signature and defaults (allreduce, grouped_allreduce,
allgather, broadcast, alltoall, reducescatter, their async and in-place forms, join, barrier, process sets,
Adasum, SyncBatchNorm); like Horovod's coordinator, the ranks agree on each collective before it runs, and a
mismatch raises HorovodInternalError on every rank.
"""
from __future__ import annotations

import os
import sys

import torch

from . import elastic, runtime
from .collectives import (Adasum, Average, Max, Min, Product, Sum, allgather, allgather_async,  # noqa: F401
                          allgather_object, allreduce, allreduce_, allreduce_async, allreduce_async_, alltoall,
                          alltoall_async, barrier, broadcast, broadcast_, broadcast_async, broadcast_async_,
                          broadcast_object, grouped_allgather, grouped_allgather_async, grouped_allreduce,
                          grouped_allreduce_, grouped_allreduce_async, grouped_allreduce_async_,
                          grouped_reducescatter, grouped_reducescatter_async, join, poll, reducescatter,
                          reducescatter_async, sparse_allreduce_async, synchronize)
from .compression import Compression, Compressor  # noqa: F401
from .elastic import HostsUpdatedInterrupt  # noqa: F401
from .coordinator import (ProcessSet, add_process_set, global_process_set, remove_process_set)  # noqa: F401
from .functions import broadcast_optimizer_state, broadcast_parameters  # noqa: F401
from .optimizer import DistributedOptimizer as _DistributedOptimizer
from .primitives import CollectiveError
from .runtime import (cross_rank, cross_size, is_initialized, local_rank, local_size, rank, shutdown,  # noqa: F401
                      size)
from .runner import local_slots, run as _run, run_elastic
from .strategies.allreduce import AllReduce  # noqa: F401
from .sync_batch_norm import SyncBatchNorm  # noqa: F401

HorovodInternalError = CollectiveError  # what a failed or mismatched collective raises, on every rank

# horovod.torch.elastic: `hvd.elastic.run`, and `from singa_dist.horovod.elastic import TorchState` too.
sys.modules[__name__ + ".elastic"] = elastic


def init(comm=None, process_sets=None) -> None:
    """Join the job (from singa-launch, torchrun, mpirun or SLURM; a single process otherwise).

    comm: None, or every worker's rank (a list), or an mpi4py communicator of the whole job: the job is the one
    the launcher started. process_sets: ProcessSets (or lists of ranks) to register now, in this order, or
    "dynamic" (sets may be added later with add_process_set, as they may here in any case).
    """
    runtime.init()
    if comm is not None:
        members = list(range(runtime.size()))
        ranks = list(comm) if isinstance(comm, (list, tuple, range)) else None
        if ranks is None and hasattr(comm, "Get_size"):
            ranks = list(range(comm.Get_size())) if comm.Get_size() == runtime.size() else None
        if ranks is not None and sorted(ranks) not in ([], members):
            raise ValueError(f"singa_dist.horovod.init(comm=...) runs the job the launcher started ({len(members)} "
                             f"workers); for a subset of them, use a process set: add_process_set({ranks})")
        if ranks is None:
            raise ValueError("singa_dist.horovod.init(comm=...) takes a list of ranks or an mpi4py communicator "
                             "of the whole job")
    if process_sets == "dynamic":
        os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"
    elif process_sets:
        for i, ps in enumerate(process_sets):
            if isinstance(ps, ProcessSet) and ps.process_set_id is not None:
                raise ValueError(f"Horovod could not be initialized because process_sets entry number {i} is a "
                                 f"duplicate: {ps}")
            add_process_set(ps)


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step: int = 1, op=Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups=None, sparse_as_dense: bool = False,
                         process_set=global_process_set):
    """horovod.torch.DistributedOptimizer: gradients averaged (or summed) with fused, overlapped all-reduce;
    op=Adasum combines each worker's update with Adasum instead (Horovod's Adasum optimizer)."""
    return _DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                 strategy="adasum" if op is Adasum else "allreduce", compression=compression,
                                 backward_passes_per_step=backward_passes_per_step, op=op,
                                 gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
                                 groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set)


def is_homogeneous() -> bool:
    """True when every node runs the same number of workers."""
    return runtime.size() % runtime.local_size() == 0 and runtime.cross_size() * runtime.local_size() == runtime.size()


def mpi_threads_supported() -> bool:
    if not mpi_enabled():
        raise ValueError("Horovod MPI is not enabled; Please make sure it's installed and enabled.")
    from mpi4py import MPI
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    """True when the job was started by mpirun (singa-launch --mpi included)."""
    return runtime.is_initialized() and runtime.launcher() == "mpirun"


def mpi_built() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def gloo_enabled() -> bool:
    return runtime.is_initialized() and "gloo" in runtime.backend()


def gloo_built() -> bool:
    return torch.distributed.is_gloo_available()


def nccl_built() -> int:
    """NCCL's version code (2.21.5 is 22105) when torch has NCCL, else 0."""
    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        return 0
    major, minor, patch = torch.cuda.nccl.version()
    return major * 10000 + minor * 100 + patch


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return torch.version.cuda is not None


def rocm_built() -> bool:
    return getattr(torch.version, "hip", None) is not None


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Creates a timeline file at `file_path` and begins recording (Horovod's): a Chrome trace with one track per
    rank and parameter server, written by rank 0 (see singa_dist.start_timeline). Raises ValueError if Horovod is
    not initialized."""
    if not runtime.is_initialized():
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    runtime.start_timeline(file_path, mark_cycles)


def stop_timeline() -> None:
    """Stops the active timeline recording and writes the file; warns when none is being recorded."""
    if not runtime.is_initialized():
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    runtime.stop_timeline()


def run(func, args=(), kwargs=None, num_proc=None, min_num_proc=None, max_num_proc=None, slots=None,
        reset_limit=None, cooldown_range=None, hosts=None, hostfile=None, host_discovery_script=None,
        start_timeout=None, ssh_port=None, ssh_identity_file=None, disable_cache=None, output_filename=None,
        verbose=None, use_gloo=None, use_mpi=None, mpi_args=None, network_interface=None, network_interfaces=None,
        executable=None, np=None, min_np=None, max_np=None):
    """horovod.run: run `func(*args, **kwargs)` on `num_proc` processes of this host joined in one job and return
    their results in rank order (singa_dist.run does the work). `hosts` (or a hostfile) may name this host.

    Elastic (min_num_proc/min_np, max_num_proc/max_np or host_discovery_script given, as horovod.run has them):
    the workers are started and replaced as `singa-launch --min-np/--max-np` does, `func` wraps its loop in
    `hvd.elastic.run`, and the results are those of the workers of the job's last round, in rank order
    (singa_dist.runner.run_elastic). Without a discovery script the hosts are this one, with num_proc slots (or
    the slots `hosts` gives)."""
    if hosts is not None and hostfile is not None:
        raise ValueError("Argument hosts and hostfile only allow one provided.")
    if use_gloo and use_mpi:
        raise ValueError("Argument use_gloo and use_mpi only allow one set True.")
    min_np = min_np if min_np is not None else min_num_proc
    max_np = max_np if max_np is not None else max_num_proc
    if min_np is not None or max_np is not None or host_discovery_script is not None:
        if output_filename is not None:
            raise ValueError("an elastic run's workers come and go and print to this console, tagged by worker: "
                             "output_filename is for runs of fixed processes")
        if use_mpi:
            raise ValueError("an elastic run starts its workers itself and joins them over Gloo: use_mpi=True does "
                             "not apply")
        if hosts is not None or hostfile is not None:
            num_proc = num_proc if num_proc is not None or np is not None else _local_slots(hosts, hostfile)
        return run_elastic(func, np=np if np is not None else num_proc, min_np=min_np, max_np=max_np,
                           args=tuple(args), kwargs=kwargs, host_discovery_script=host_discovery_script,
                           slots=slots, reset_limit=reset_limit, elastic_timeout=start_timeout,
                           cooldown_range=cooldown_range)
    if hostfile is not None:
        hosts = _hostfile_hosts(hostfile)
    num_proc = np if np is not None else num_proc
    if num_proc is None and hosts is None:
        num_proc = 1
    return _run(func, np=num_proc, args=tuple(args), kwargs=kwargs, hosts=hosts, use_gloo=use_gloo,
                use_mpi=use_mpi, output_dir=output_filename)


def _hostfile_hosts(hostfile: str) -> str:
    """A hostfile's `host slots=N` lines as horovod.run's hosts string."""
    with open(hostfile) as f:
        return ",".join(line.split()[0] + ":" + (line.split("slots=")[1].split()[0] if "slots=" in line else "1")
                        for line in f if line.strip() and not line.lstrip().startswith("#"))


def _local_slots(hosts, hostfile) -> int | None:
    return local_slots(_hostfile_hosts(hostfile) if hostfile is not None else hosts)
