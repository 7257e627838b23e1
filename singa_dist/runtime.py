"""The process runtime: who this process is, and the torch.distributed groups it talks through.

`init()` reads the environment of whatever started the process:
- `singa-launch` and `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
  `singa-launch` adds SINGA_PROC_RANK/SINGA_PROC_WORLD_SIZE (every process of the job, servers included),
  SINGA_TOPOLOGY (a ClusterTopology as JSON) and SINGA_STRATEGY;
- `mpirun` (Open MPI's OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*) and SLURM's `srun` (SLURM_PROCID, ...);
- nothing: a single process, with every collective an identity.

`rank()` and `size()` count the workers only; servers run no user code.

`shutdown()` leaves the job; it also runs when the interpreter exits after `init()` if the script did not call
it (not when the script is dying of an uncaught exception: then the process leaves at once).
"""
from __future__ import annotations

import atexit
import datetime
import gc
import importlib
import os
import socket
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .topology import ClusterTopology, ProcessRole

DEFAULT_TIMEOUT_S = 300.0
# How long a process that exits without shutdown() waits at exit for the others to arrive.
EXIT_MEETING_S = 30.0


@dataclass
class _Runtime:
    initialized: bool = False
    distributed: bool = False  # a torch.distributed process group exists
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
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
_inits = 0  # init() calls that joined a job, the same count on every process of it


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _detect_launcher() -> tuple[str, int, int, int | None, int | None] | None:
    """(launcher, rank, size, local_rank, local_size) from the environment, or None for a lone process.

    local_rank and local_size are None where the launcher does not export them; init() then finds them from
    the host names of all processes."""
    env = os.environ
    if "SINGA_PROC_RANK" in env:
        rank, size = int(env["SINGA_PROC_RANK"]), int(env["SINGA_PROC_WORLD_SIZE"])
        return ("singa-launch", rank, size, _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return ("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), _env_int("LOCAL_RANK"),
                _env_int("LOCAL_WORLD_SIZE"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return ("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                _env_int("OMPI_COMM_WORLD_LOCAL_RANK"), _env_int("OMPI_COMM_WORLD_LOCAL_SIZE"))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return ("mpirun", int(env["PMI_RANK"]), int(env["PMI_SIZE"]), _env_int("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
                _env_int("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _env_int("SLURM_LOCALID"),
                _local_size_from_slurm())
    return None


def _slurm_tasks_per_node() -> list[int]:
    # SLURM_TASKS_PER_NODE lists every node's task count, compressed: "2(x3),1" is 2,2,2,1.
    counts = []
    for item in os.environ.get("SLURM_TASKS_PER_NODE", "").split(","):
        if not item:
            continue
        value, _, repeat = item.partition("(x")
        counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def _local_size_from_slurm() -> int | None:
    # This node is SLURM_NODEID; SLURM_NTASKS_PER_NODE (the requested count) is the fallback.
    counts = _slurm_tasks_per_node()
    node = _env_int("SLURM_NODEID") or 0
    if node < len(counts):
        return counts[node]
    return _env_int("SLURM_NTASKS_PER_NODE")


def _ranks_within(keys: list) -> list[tuple[int, int]]:
    """For every process (keys[p] for process p): its rank among the processes with the same key, in process
    order, and their number. Keyed by local rank this is Horovod's (cross_rank, cross_size): one process per
    node; keyed by host, (local_rank, local_size)."""
    seen: dict = {}
    ranks = []
    for key in keys:
        ranks.append(seen.get(key, 0))
        seen[key] = ranks[-1] + 1
    return [(r, seen[key]) for r, key in zip(ranks, keys)]


def _layout_from_slurm(local_rank: int) -> tuple[int, int] | None:
    """(cross_rank, cross_size) from SLURM's node list alone, when tasks fill the nodes in order (block)."""
    counts = _slurm_tasks_per_node()
    node = _env_int("SLURM_NODEID")
    distribution = os.environ.get("SLURM_DISTRIBUTION", "block")
    if node is None or node >= len(counts) or not distribution.startswith("block"):
        return None
    return (sum(1 for c in counts[:node] if c > local_rank), sum(1 for c in counts if c > local_rank))


def _node_layout(launcher: str, proc_rank: int, proc_size: int, local_rank: int | None,
                 local_size: int | None) -> tuple[int, int, int, int]:
    """(local_rank, local_size, cross_rank, cross_size) of this process.

    Every process of the job takes the same branch (each one depends only on job-wide facts), so that either
    all of them or none take part in the all-gather."""
    if local_size == proc_size and local_rank is not None:  # every process is on this node
        return local_rank, local_size, 0, 1
    if launcher == "srun" and local_rank is not None and local_size is not None:
        found = _layout_from_slurm(local_rank)
        if found is not None:
            return (local_rank, local_size) + found
    # Otherwise every process says where it runs: the launcher's node index (torchrun and singa-launch's
    # GROUP_RANK: distinct even for nodes sharing a host name) or the host name, and its local rank if known.
    node = os.environ.get("GROUP_RANK") if launcher in ("torchrun", "singa-launch") else None
    mine = (f"node {node}" if node is not None else socket.gethostname(), local_rank)
    everyone = [None] * proc_size
    dist.all_gather_object(everyone, mine)
    if local_rank is None or local_size is None:  # numbered by host, in process order
        by_host = _ranks_within([host for host, _ in everyone])
        local_rank, local_size = by_host[proc_rank]
        local_ranks = [local for local, _ in by_host]
    else:
        local_ranks = [local for _, local in everyone]
    return (local_rank, local_size) + _ranks_within(local_ranks)[proc_rank]


def free_port(host: str = "") -> int:
    """A TCP port free on `host` (every interface by default) at the time of the call."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
            port = free_port()
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
    global _inits
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
    _state.topology, _state.role = topology, role
    _state.size = topology.nworkers
    _state.rank = proc_rank if role.is_worker else -1

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # The GPU follows the launcher's local rank (or the process rank, when it gives none, for one node).
        gpu = local_rank if local_rank is not None else proc_rank
        _state.device = torch.device("cuda", gpu % torch.cuda.device_count())
        torch.cuda.set_device(_state.device)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if _state.device.type == "cuda" else "gloo"
    _state.backend = backend

    if proc_size > 1 or not dist.is_initialized():
        _rendezvous_address(launcher, proc_rank)
        # This module's functions take the WORLD group as a default argument, evaluated when it is imported
        # (torch imports it with the first optimizer): imported after the group exists, it would keep the
        # group alive until the interpreter exits, past shutdown().
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(
            backend=backend, init_method="env://", rank=proc_rank, world_size=proc_size,
            timeout=datetime.timedelta(seconds=_state.timeout_s))
        _state.distributed = True
        _inits += 1
        _register_exit()
    if _state.distributed:
        local_rank, local_size, _state.cross_rank, _state.cross_size = _node_layout(
            launcher, proc_rank, proc_size, local_rank, local_size)
    _state.local_rank = 0 if local_rank is None else local_rank
    _state.local_size = 1 if local_size is None else local_size

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
    """This process's rank among the processes with its local rank, one per node (Horovod's cross rank): the
    index of its node in a job with the same number of processes on every node."""
    return _require_init().cross_rank


def cross_size() -> int:
    """The number of processes with this process's local rank (Horovod's cross size): the number of nodes in a
    job with the same number of processes on every node."""
    return _require_init().cross_size


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


def on_shutdown(close, weak: bool = False) -> None:
    """Call `close()` at `shutdown()`, before the process groups go (strategies release their servers).

    weak: hold a bound method weakly, so that registering does not keep its object alive (nothing is called
    if the object is gone by then)."""
    _closers.append(weakref.WeakMethod(close) if weak else (lambda: close))


def shutdown() -> None:
    """Leave the job. In order: wait for the asynchronous collectives still in flight, close the strategies
    that asked to be closed, release separate parameter servers (they exit once every worker has left), meet
    every other process of the job (bounded by the job's timeout; a RuntimeError names the processes that
    never came), then destroy the process groups and let go of them, so that their communication threads end
    while the interpreter is whole.

    Called while an exception propagates (e.g. from a `finally:` block) it does not wait for the others, who
    may be waiting for this process in a collective. Safe to call twice or without init()."""
    _leave(meeting_s=None if sys.exc_info()[1] is None else 0.0)


def _leave(meeting_s: float | None, strict: bool = True) -> None:
    """shutdown(): meet the others for up to `meeting_s` seconds (None: the job's timeout; 0: do not wait for
    them); raise the first error if `strict`, else print it."""
    global _state
    errors = []
    if meeting_s != 0.0 and _state.distributed:
        # Communication still in flight holds tensors on the groups' threads; let it finish first.
        from .collectives import wait_outstanding
        try:
            wait_outstanding()
        except Exception as exc:
            errors.append(exc)
    while _closers:
        close = _closers.pop()()
        try:
            if close is not None:
                close()
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
    groups = []
    if _state.distributed and dist.is_initialized():
        if meeting_s != 0.0:
            bound = _state.timeout_s if meeting_s is None else min(meeting_s, _state.timeout_s)
            missing = _meet(bound)
            if missing:
                names = ", ".join(str(p) for p in missing)
                errors.append(RuntimeError(
                    f"process {_state.proc_rank}: process{'es' if len(missing) > 1 else ''} {names} did not reach "
                    f"singa_dist.shutdown() within {bound:g} s (stopped, hung, or still working); "
                    "the process groups were destroyed without them"))
        # (A process outside a group holds a marker, not a group.)
        groups = [weakref.ref(pg) for pg in {dist.group.WORLD, _state.workers_pg, *_state.group_pgs.values()}
                  if isinstance(pg, dist.ProcessGroup)]
        dist.destroy_process_group()
    _state = _Runtime()
    # A group's C++ side ends, joining its communication threads, when its last reference goes; a strategy
    # that kept one may sit in a reference cycle with its optimizer. A communication thread that outlives the
    # interpreter aborts the process at exit ("terminate called without an active exception").
    if any(ref() is not None for ref in groups):
        gc.collect()
    if errors:
        if strict:
            raise errors[0]
        print(f"singa_dist.shutdown() at exit: {errors[0]}", file=sys.stderr, flush=True)


def _meet(timeout: float) -> list[int]:
    """Wait until every process of the job has come here (through the job's key-value store); return the
    processes that did not come within `timeout` seconds."""
    store = dist.distributed_c10d._get_default_store()
    me, n = _state.proc_rank, _state.proc_size
    # Keys are new for every init() and restart: a launcher's store can outlive them.
    prefix = f"singa/shutdown/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_inits}/"
    try:
        store.set(f"{prefix}at/{me}", "1")
        if store.add(prefix + "count", 1) == n:
            store.set(prefix + "all", "1")
        store.wait([prefix + "all"], datetime.timedelta(seconds=max(timeout, 0.001)))
    except Exception:
        try:
            return [p for p in range(n) if not store.check([f"{prefix}at/{p}"])]
        except Exception:  # the store went with the process that hosts it (process 0)
            return [0]
    # Process 0 hosts the store: it stays until every process has seen the others arrive.
    try:
        if store.add(prefix + "passed", 1) == n:
            store.set(prefix + "all-passed", "1")
        if me == 0:
            store.wait([prefix + "all-passed"], datetime.timedelta(seconds=min(timeout, 30.0)))
    except Exception:
        pass
    return []


_exit_registered = False


def _register_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        atexit.register(_leave_at_exit)
        _exit_registered = True


def _leave_at_exit() -> None:
    """shutdown() for a script that did not call it. A script dying of an uncaught exception leaves at once:
    its peers may be waiting for it in a collective, and the sooner it goes the sooner they learn."""
    if not _state.initialized or not _state.distributed:
        return
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
        return
    _leave(meeting_s=EXIT_MEETING_S, strict=False)
