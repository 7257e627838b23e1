"""The process runtime: who this process is, and the torch.distributed groups it talks through.

`init()` reads the environment of whatever started the process:
- `singa-launch` and `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
  `singa-launch` adds SINGA_PROC_RANK/SINGA_PROC_WORLD_SIZE (every process of the job, servers included),
  SINGA_TOPOLOGY (a ClusterTopology as JSON) and SINGA_STRATEGY;
- `mpirun` (Open MPI's OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*) and SLURM's `srun` (SLURM_PROCID, ...);
- nothing: a single process, with every collective an identity.

`rank()` and `size()` count the workers only; servers run no user code.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .topology import ClusterTopology, ProcessRole

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class _Runtime:
    initialized: bool = False
    distributed: bool = False  # a torch.distributed process group exists
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    proc_rank: int = 0
    proc_size: int = 1
    topology: ClusterTopology = field(default_factory=lambda: ClusterTopology.allreduce(1))
    role: ProcessRole = field(default_factory=lambda: ProcessRole("worker", 0, 0, 0))
    strategy: str = "allreduce"
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = "none"
    launcher: str = "none"
    workers_pg: object = None  # all workers
    group_pgs: dict = field(default_factory=dict)  # worker group index -> process group of that group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


_state = _Runtime()


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _detect_launcher() -> tuple[str, int, int, int, int] | None:
    """(launcher, rank, size, local_rank, local_size) from the environment, or None for a lone process."""
    env = os.environ
    if "SINGA_PROC_RANK" in env:
        rank, size = int(env["SINGA_PROC_RANK"]), int(env["SINGA_PROC_WORLD_SIZE"])
        return ("singa-launch", rank, size, _env_int("LOCAL_RANK") or 0, _env_int("LOCAL_WORLD_SIZE") or 1)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = _env_int("LOCAL_RANK")
        local_size = _env_int("LOCAL_WORLD_SIZE")
        return ("torchrun", rank, size, rank if local_rank is None else local_rank,
                size if local_size is None else local_size)
    if "OMPI_COMM_WORLD_RANK" in env:
        return ("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                _env_int("OMPI_COMM_WORLD_LOCAL_RANK") or 0, _env_int("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return ("mpirun", int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                _env_int("MPI_LOCALRANKID", "PMI_LOCAL_RANK") or 0,
                _env_int("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE") or 1)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                _env_int("SLURM_LOCALID") or 0, _local_size_from_slurm())
    return None


def _local_size_from_slurm() -> int:
    # SLURM_TASKS_PER_NODE lists every node's task count, compressed: "2(x3),1" is 2,2,2,1; this node is
    # SLURM_NODEID. SLURM_NTASKS_PER_NODE (the requested count) is the fallback.
    counts = []
    for item in os.environ.get("SLURM_TASKS_PER_NODE", "").split(","):
        if not item:
            continue
        value, _, repeat = item.partition("(x")
        counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = _env_int("SLURM_NODEID") or 0
    if node < len(counts):
        return counts[node]
    return _env_int("SLURM_NTASKS_PER_NODE") or 1


def _rendezvous_address(launcher: str, rank: int) -> None:
    """Make MASTER_ADDR/MASTER_PORT known on every rank when the launcher did not set them."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    if launcher == "mpirun":
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(
                "singa_dist.init() under mpirun needs MASTER_ADDR and MASTER_PORT, or mpi4py to agree on them "
                "(pip install 'singa[mpi]'); or start the job with singa-launch --mpi") from None
        address = None
        if rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            host = socket.gethostbyname(socket.gethostname())
            ifname = os.environ.get("GLOO_SOCKET_IFNAME")
            if ifname:  # the interface the job was told to use (singa-launch --network-interface)
                import fcntl
                import struct
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
                host = socket.inet_ntoa(packed[20:24])
            elif host.startswith("127."):
                # The host name maps to loopback (as on Debian): other hosts need the routed address.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    try:
                        s.connect(("10.255.255.255", 1))  # UDP: picks the route, sends nothing
                        host = s.getsockname()[0]
                    except OSError:
                        pass
            address = (host, port)
        address = MPI.COMM_WORLD.bcast(address, root=0)
        os.environ.setdefault("MASTER_ADDR", address[0])
        os.environ.setdefault("MASTER_PORT", str(address[1]))
        return
    raise RuntimeError(
        f"singa_dist.init(): started by {launcher} but MASTER_ADDR/MASTER_PORT are not set; "
        "set them to the address and a free port of rank 0's host")


def init(timeout: float | None = None, backend: str | None = None) -> None:
    """Join the job this process belongs to (or become a single-process job when there is none).

    timeout: seconds a collective may wait for a missing rank before the job stops with an error
             (default: SINGA_TIMEOUT from the environment, else 300).
    backend: torch.distributed backend; default Gloo for CPU tensors and, where CUDA is available, NCCL
             for CUDA tensors.
    """
    if _state.initialized:
        return
    if timeout is None:
        timeout = float(os.environ.get("SINGA_TIMEOUT", DEFAULT_TIMEOUT_S))
    _state.timeout_s = float(timeout)
    _state.strategy = os.environ.get("SINGA_STRATEGY", "allreduce").lower()

    found = _detect_launcher()
    if found is None:
        _state.initialized = True
        _state.topology = ClusterTopology.allreduce(1)
        return
    launcher, proc_rank, proc_size, local_rank, local_size = found
    if "SINGA_TOPOLOGY" in os.environ:
        topology = ClusterTopology.from_json(os.environ["SINGA_TOPOLOGY"])
        _state.strategy = topology.strategy
    else:
        topology = ClusterTopology.allreduce(proc_size)
    if topology.nprocs != proc_size:
        raise RuntimeError(
            f"singa_dist.init(): the topology has {topology.nprocs} processes but the launcher started {proc_size}")
    role = topology.role_of(proc_rank)

    _state.launcher = launcher
    _state.proc_rank, _state.proc_size = proc_rank, proc_size
    _state.local_rank, _state.local_size = local_rank, local_size
    _state.topology, _state.role = topology, role
    _state.size = topology.nworkers
    _state.rank = proc_rank if role.is_worker else -1

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        _state.device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_state.device)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if _state.device.type == "cuda" else "gloo"
    _state.backend = backend

    if proc_size > 1 or not dist.is_initialized():
        _rendezvous_address(launcher, proc_rank)
        dist.init_process_group(
            backend=backend, init_method="env://", rank=proc_rank, world_size=proc_size,
            timeout=datetime.timedelta(seconds=_state.timeout_s))
        _state.distributed = True

    # Every process takes part in creating every group, as torch.distributed requires.
    if topology.nprocs == topology.nworkers:
        _state.workers_pg = dist.group.WORLD
    else:
        _state.workers_pg = dist.new_group(topology.worker_ranks())
    if topology.nworker_groups == 1:
        _state.group_pgs[0] = _state.workers_pg
    else:
        for g in range(topology.nworker_groups):
            _state.group_pgs[g] = dist.new_group(topology.worker_ranks(g))
    _state.initialized = True


def _require_init() -> _Runtime:
    if not _state.initialized:
        raise RuntimeError("singa_dist is not initialized: call singa_dist.init() first")
    return _state


def is_initialized() -> bool:
    return _state.initialized


def rank() -> int:
    """This worker's rank among all workers (servers, which run no user code, are not counted)."""
    return _require_init().rank


def size() -> int:
    """The number of workers in the job."""
    return _require_init().size


def local_rank() -> int:
    return _require_init().local_rank


def local_size() -> int:
    return _require_init().local_size


def cross_rank() -> int:
    """Index of this process's node (Horovod's name): rank // local_size for a uniform job."""
    st = _require_init()
    return st.proc_rank // max(st.local_size, 1)


def cross_size() -> int:
    st = _require_init()
    return max(st.proc_size // max(st.local_size, 1), 1)


def topology() -> ClusterTopology:
    return _require_init().topology


def role() -> ProcessRole:
    return _require_init().role


def worker_group() -> int:
    """Index of this worker's group (workers inside a group are synchronous; groups are asynchronous)."""
    return _require_init().role.group


def strategy_name() -> str:
    """The strategy the launcher was given (SINGA_STRATEGY / the topology), 'allreduce' when none."""
    return _require_init().strategy


def is_distributed() -> bool:
    return _require_init().distributed


def workers_process_group():
    """The torch.distributed group of all workers (None in a single process)."""
    return _require_init().workers_pg


def group_process_group(group: int | None = None):
    """The torch.distributed group of worker group `group` (this worker's own by default)."""
    st = _require_init()
    if not st.distributed:
        return None
    return st.group_pgs[st.role.group if group is None else group]


def proc_rank() -> int:
    """This process's number in the whole job, servers included."""
    return _require_init().proc_rank


def proc_size() -> int:
    return _require_init().proc_size


def timeout_s() -> float:
    return _require_init().timeout_s


def device() -> torch.device:
    """The device this process computes on: its local GPU when there is one, else the CPU."""
    return _require_init().device


# Strategies that hold resources beyond the process groups (parameter-server connections) register here.
_closers: list = []


def on_shutdown(close) -> None:
    """Call `close()` at `shutdown()`, before the process groups go (strategies release their servers)."""
    _closers.append(close)


def shutdown() -> None:
    """Leave the job: close the strategies that asked to be closed, release separate parameter servers (they
    exit once every worker has left), then destroy the process groups. Safe to call twice or without init()."""
    global _state
    errors = []
    while _closers:
        try:
            _closers.pop()()
        except Exception as exc:  # a dead server must not keep the other resources from being released
            errors.append(exc)
    if _state.initialized and _state.distributed and _state.role.is_worker \
            and _state.topology.server_worker_separate and _state.topology.nservers > 0:
        from .ps.transport import release_servers
        release_servers()
    else:
        transport = sys.modules.get(__package__ + ".ps.transport")
        if transport is not None:
            transport.leave()
    if _state.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _state = _Runtime()
    if errors:
        raise errors[0]
