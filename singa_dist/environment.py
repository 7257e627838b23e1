"""The launch environment: which launcher started this process, where it runs, and how ranks meet.

Read once by `runtime.init()`:
- `singa-launch` and `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
  `singa-launch` adds SINGA_PROC_RANK/SINGA_PROC_WORLD_SIZE (every process of the job, servers included),
  SINGA_TOPOLOGY (a ClusterTopology as JSON) and SINGA_STRATEGY;
- `mpirun` (Open MPI's OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*) and SLURM's `srun` (SLURM_PROCID, ...);
- nothing: a single process.
`singa-launch --autotune` sets SINGA_AUTOTUNE=1: AllReduce's default bucket size and the parameter-server strategies'
messages per server are then "auto" (tuned).

Nothing here talks to other processes except `rendezvous_address` under mpirun (through mpi4py).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from typing import NamedTuple

from .topology import ClusterTopology, TopologyError, strategy_kind


class Launch(NamedTuple):
    """What the launcher told this process. local_rank and local_size are None where the launcher does not
    export them; `runtime.init()` then finds them from the host names of all processes."""

    launcher: str  # "singa-launch", "torchrun", "mpirun" or "srun"
    rank: int
    size: int
    local_rank: int | None
    local_size: int | None


def env_int(*names: str) -> int | None:
    """The first of the variables `names` that is set and not empty, as an int."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


# Where singa-launch marks, in the job's store, the processes of worker groups it lost in an asynchronous job:
# "<prefix><attempt>/<proc>", and a "changes" counter bumped after each mark (runtime.lost_procs reads them).
LOST_KEY_PREFIX = "singa/lost/"


def init_key(attempt: int | str, inits: int, proc: int) -> str:
    """The key process `proc` sets in the job's store as it joins the rendezvous (attempt: the launcher's restart
    count; inits: how many times the process joined a job before), which singa-launch reads to know who came."""
    return f"singa/init/{attempt}/{inits}/{proc}"
AUTOTUNE_VARIABLE = "SINGA_AUTOTUNE"  # 1: AllReduce tunes its bucket size unless the script fixes one
# Where Downpour's and Hybrid's servers checkpoint their slices, and every how many updates, unless the script says.
SERVER_CHECKPOINT_DIR_VARIABLE = "SINGA_SERVER_CHECKPOINT_DIR"
SERVER_CHECKPOINT_EVERY_VARIABLE = "SINGA_SERVER_CHECKPOINT_EVERY"
CHECKPOINTED_STRATEGIES = ("downpour", "hybrid")
# The strategies that tune something then: AllReduce its bucket size, the others their messages per server.
AUTOTUNED_STRATEGIES = ("allreduce", "sandblaster", "downpour", "hybrid")
# The exit status of a process whose input data is wrong (sysexits.h's EX_DATAERR), as the model zoo's scripts
# end on a dataset error: the other ranks read the same data, and singa-launch lets them end on their own and
# says the error once.
DATA_ERROR_STATUS = 65


def server_checkpoint_defaults() -> tuple[str | None, int]:
    """The server checkpoint folder and interval the launcher asked for (singa-launch --server-checkpoint-dir,
    --server-checkpoint-every), or (None, 100)."""
    folder = os.environ.get(SERVER_CHECKPOINT_DIR_VARIABLE) or None
    text = os.environ.get(SERVER_CHECKPOINT_EVERY_VARIABLE, "").strip()
    try:
        every = int(text) if text else 100
    except ValueError:
        every = 0
    if every < 1:
        raise ValueError(f"{SERVER_CHECKPOINT_EVERY_VARIABLE} must be a positive number of updates, got {text!r}")
    return folder, every


def autotune_requested() -> bool:
    """Whether the launcher (or the user, through SINGA_AUTOTUNE) asked for the bucket size to be tuned."""
    value = os.environ.get(AUTOTUNE_VARIABLE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{AUTOTUNE_VARIABLE} must be 1 or 0, got {value!r}")


# horovodrun's variables that singa_dist reads (horovodrun and singa-launch set them from their flags).
FUSION_THRESHOLD_VARIABLE = "HOROVOD_FUSION_THRESHOLD"  # bytes (--fusion-threshold-mb); 0: no fusion


def env_flag(name: str) -> bool:
    """A Horovod on/off variable: on when it is a number above 0 (Horovod reads them with strtol), or true/yes/on."""
    value = os.environ.get(name, "").strip().lower()
    try:
        return float(value) > 0
    except ValueError:
        return value in ("true", "yes", "on")


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{name} must be a number of seconds, 0 or more, got {text!r}")
    return value


def fusion_threshold_mb() -> float | None:
    """AllReduce's bucket size in MB from HOROVOD_FUSION_THRESHOLD (bytes); 0 disables fusion (a bucket per
    tensor, as in Horovod); None where the variable is not set."""
    text = os.environ.get(FUSION_THRESHOLD_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{FUSION_THRESHOLD_VARIABLE} must be a number of bytes, 0 or more, got {text!r}")
    return int(text) / 2**20


def stall_shutdown_s() -> float | None:
    """Horovod's stall shutdown, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS: how long a collective may wait for a rank
    before the job ends, or None. As in Horovod it applies only above 0, with the stall check on
    (HOROVOD_STALL_CHECK_DISABLE) and when not below the warning time (HOROVOD_STALL_CHECK_TIME_SECONDS, 60)."""
    shutdown = _env_seconds("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0.0)
    if not shutdown or env_flag("HOROVOD_STALL_CHECK_DISABLE"):
        return None
    return shutdown if shutdown >= _env_seconds("HOROVOD_STALL_CHECK_TIME_SECONDS", 60.0) else None


def detect_launcher() -> Launch | None:
    """The launcher's numbering of this process, from the environment; None for a lone process."""
    env = os.environ
    if "SINGA_PROC_RANK" in env:
        return Launch("singa-launch", int(env["SINGA_PROC_RANK"]), int(env["SINGA_PROC_WORLD_SIZE"]),
                      env_int("LOCAL_RANK"), env_int("LOCAL_WORLD_SIZE"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), env_int("LOCAL_RANK"),
                      env_int("LOCAL_WORLD_SIZE"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      env_int("OMPI_COMM_WORLD_LOCAL_RANK"), env_int("OMPI_COMM_WORLD_LOCAL_SIZE"))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launch("mpirun", int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                      env_int("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), env_int("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Launch("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), env_int("SLURM_LOCALID"),
                      _local_size_from_slurm())
    return None


def job_topology(nprocs: int, strategy: str | None = None, *, servers: int | None = None,
                 worker_groups: int | None = None, server_groups: int | None = None,
                 sync_freq: int | None = None) -> ClusterTopology:
    """The topology of a job of `nprocs` processes: SINGA_TOPOLOGY when singa-launch wrote it; otherwise the one
    of `strategy` (sd.init's argument, else SINGA_STRATEGY, else allreduce) with the shape given to sd.init or
    in SINGA_SERVERS, SINGA_WORKER_GROUPS, SINGA_SERVER_GROUPS and SINGA_SYNC_FREQ. So torchrun, mpirun and srun,
    which start every process with the user's script, run the parameter-server frameworks too: the last
    processes are the servers."""
    if "SINGA_TOPOLOGY" in os.environ:
        return ClusterTopology.from_json(os.environ["SINGA_TOPOLOGY"])
    name = (strategy or os.environ.get("SINGA_STRATEGY") or "allreduce").lower()
    kind = strategy_kind(name)

    def setting(value, variable):
        if value is not None:
            return value
        text = os.environ.get(variable)
        if text in (None, ""):
            return None
        try:
            return int(text)
        except ValueError:
            raise TopologyError(f"{variable} must be a whole number, got {text!r}") from None

    servers = setting(servers, "SINGA_SERVERS")
    groups = setting(server_groups, "SINGA_SERVER_GROUPS")
    separate = 0
    if kind.parameter_servers and kind.separate_servers:
        separate = (1 if servers is None else servers) * (groups or 1)
    if nprocs - separate < 1:
        raise TopologyError(f"{name} with {separate} server process(es) needs more than the {nprocs} process(es) "
                            "the launcher started")
    return ClusterTopology.for_strategy(name, nprocs - separate, worker_groups=setting(worker_groups,
                                        "SINGA_WORKER_GROUPS"), servers=servers, server_groups=groups,
                                        sync_freq=setting(sync_freq, "SINGA_SYNC_FREQ") or 1)


def slurm_tasks_per_node() -> list[int]:
    """Every node's task count; SLURM_TASKS_PER_NODE compresses it: "2(x3),1" is 2,2,2,1."""
    counts = []
    for item in os.environ.get("SLURM_TASKS_PER_NODE", "").split(","):
        if not item:
            continue
        value, _, repeat = item.partition("(x")
        counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def _local_size_from_slurm() -> int | None:
    # This node is SLURM_NODEID; SLURM_NTASKS_PER_NODE (the requested count) is the fallback.
    counts = slurm_tasks_per_node()
    node = env_int("SLURM_NODEID") or 0
    if node < len(counts):
        return counts[node]
    return env_int("SLURM_NTASKS_PER_NODE")


def ranks_within(keys: list) -> list[tuple[int, int]]:
    """For every process (keys[p] for process p): its rank among the processes with the same key, in process
    order, and their number. Keyed by local rank this is Horovod's (cross_rank, cross_size): one process per
    node; keyed by host, (local_rank, local_size)."""
    seen: dict = {}
    ranks = []
    for key in keys:
        ranks.append(seen.get(key, 0))
        seen[key] = ranks[-1] + 1
    return [(r, seen[key]) for r, key in zip(ranks, keys)]


def layout_from_slurm(local_rank: int) -> tuple[int, int] | None:
    """(cross_rank, cross_size) from SLURM's node list alone, when tasks fill the nodes in order (block)."""
    counts = slurm_tasks_per_node()
    node = env_int("SLURM_NODEID")
    distribution = os.environ.get("SLURM_DISTRIBUTION", "block")
    if node is None or node >= len(counts) or not distribution.startswith("block"):
        return None
    return (sum(1 for c in counts[:node] if c > local_rank), sum(1 for c in counts if c > local_rank))


def node_key(launcher: str) -> str:
    """What names this process's node: the launcher's node index (torchrun's and singa-launch's GROUP_RANK,
    distinct even for nodes sharing a host name) or the host name."""
    node = os.environ.get("GROUP_RANK") if launcher in ("torchrun", "singa-launch") else None
    return f"node {node}" if node is not None else socket.gethostname()


def free_port(host: str = "") -> int:
    """A TCP port free on `host` (every interface by default) at the time of the call."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def interface_address(ifname: str) -> str:
    """The IPv4 address of network interface `ifname` (Linux); OSError if it has none."""
    import fcntl
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
    return socket.inet_ntoa(packed[20:24])


def loopback_interface() -> str | None:
    """The name of this host's loopback interface ("lo" on Linux), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def loopback_only() -> dict[str, str]:
    """The variables that keep torch's Gloo and TensorPipe listeners on loopback, for a job whose processes all run
    on this host (singa-launch on one node, singa_dist.run); those the user set stay as they are."""
    name = loopback_interface()
    if name is None:
        return {}
    return {var: name for var in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME") if var not in os.environ}


def store_listen_fd(host: str, port: int) -> int | None:
    """A listening socket for the TCPStore server of a job whose processes reach it at `host` (MASTER_ADDR), bound
    to that address alone where it names this host by address (loopback for a job on one host), as a descriptor to
    hand to `TCPStore(..., master_listen_fd=)`, which owns it from then on. torch's own server listens on every
    interface. None for a host name other than localhost (a name may resolve to loopback here and to the network's
    address elsewhere, as Debian maps a host's own name): torch's default then. OSError when the port is taken."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if not ip.is_loopback:
        try:
            with socket.socket(family) as probe:
                probe.bind((host, 0))  # only an address of this host can be bound
        except OSError:
            return None
    listener = socket.socket(family)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as torch's: a restart may reuse the port)
        listener.bind((host, port))
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener.detach()


# ---- the job's secret (docs/security.md) ----
SECRET_VARIABLE = "SINGA_SECRET"
MIN_SECRET_CHARS = 16
NO_SECRET_ADVICE = (f"singa-launch and singa_dist.run make one for every job; a job started otherwise (torchrun, "
                    f"mpirun, SLURM, or singa-launch on each node by hand) takes it from the environment: give every "
                    f"process the same {SECRET_VARIABLE}, e.g. export {SECRET_VARIABLE}=$(python -c \"import "
                    f"secrets; print(secrets.token_hex(32))\")")


def make_secret() -> str:
    """A new secret for a job: 32 random bytes as hex."""
    return secrets.token_hex(32)


def job_secret() -> bytes | None:
    """The job's secret (SINGA_SECRET), which the processes of the job prove they share on every call through
    singa_dist.ps.sockets; None when it is not set. ValueError when it is too short to be a secret."""
    value = os.environ.get(SECRET_VARIABLE)
    if not value:
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"{SECRET_VARIABLE} has {len(value)} characters; a secret needs at least "
                         f"{MIN_SECRET_CHARS} ({NO_SECRET_ADVICE})")
    return value.encode()


def _routed_address() -> str:
    """This host's address as other hosts reach it (the host name may map to loopback, as on Debian)."""
    host = socket.gethostbyname(socket.gethostname())
    if host.startswith("127."):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))  # UDP: picks the route, sends nothing
                host = s.getsockname()[0]
            except OSError:
                pass
    return host


def rendezvous_address(launcher: str, rank: int) -> None:
    """Make MASTER_ADDR/MASTER_PORT known on every rank when the launcher did not set them."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    if launcher != "mpirun":
        raise RuntimeError(
            f"singa_dist.init(): started by {launcher} but MASTER_ADDR/MASTER_PORT are not set; "
            "set them to the address and a free port of rank 0's host")
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "singa_dist.init() under mpirun needs MASTER_ADDR and MASTER_PORT, or mpi4py to agree on them "
            "(pip install 'singa[mpi]'); or start the job with singa-launch --mpi") from None
    address = None
    if rank == 0:
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")  # the interface the job was told to use
        address = (interface_address(ifname) if ifname else _routed_address(), free_port())
    address = MPI.COMM_WORLD.bcast(address, root=0)
    os.environ.setdefault("MASTER_ADDR", address[0])
    os.environ.setdefault("MASTER_PORT", str(address[1]))
