"""singa-launch's command line: the flags, their checks, and the per-process plan (command and environment).

Everything that can be wrong with the input is found here, before any process starts: `UsageError`
carries a one-line reason and the launcher exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from singa_dist.environment import (MIN_SECRET_CHARS, NO_SECRET_ADVICE, SECRET_VARIABLE, free_port, loopback_only,
                                    make_secret)
from singa_dist.environment import (AUTOTUNE_VARIABLE, AUTOTUNED_STRATEGIES, CHECKPOINTED_STRATEGIES,
                                    SERVER_CHECKPOINT_DIR_VARIABLE, SERVER_CHECKPOINT_EVERY_VARIABLE)
from singa_dist.metrics import FILE_VARIABLE as METRICS_FILE_VARIABLE
from singa_dist.metrics import VARIABLE as METRICS_VARIABLE
from singa_dist.metrics import parse_interval
from singa_dist.timeline import check_writable
from singa_dist.topology import STRATEGIES, ClusterTopology, TopologyError, strategy_kind

from . import horovodrun
from .horovodrun import HorovodKnobs

DEFAULT_MASTER_PORT = 29500
# Environment a remote node or mpirun passes on besides the launcher's own variables.
FORWARDED_PREFIXES = ("SINGA_", "HOROVOD_", "NCCL_", "GLOO_", "TORCH_", "OMP_", "MKL_", "CUDA_", "PYTHON")
FORWARDED_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "TRITON_INTERPRET")


class UsageError(Exception):
    """Bad input: the launcher prints `singa-launch: error: <reason>` and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other bad input
        raise UsageError(message)


@dataclass
class Host:
    name: str
    slots: int


@dataclass
class ProcessSpec:
    """One process of the job: where it runs, what it runs, and the environment it gets."""

    proc_rank: int
    local_rank: int
    role: str  # "worker" or "server"
    index: int  # rank among the processes of its role
    argv: list[str]
    env: dict[str, str]

    @property
    def label(self) -> str:
        """Output prefix: the worker's rank, or s<index> for a server."""
        return str(self.index) if self.role == "worker" else f"s{self.index}"

    @property
    def title(self) -> str:
        if self.role == "worker":
            return f"rank {self.index}"
        return f"server {self.index} (process {self.proc_rank})"


@dataclass
class ElasticSpec:
    """An elastic job's bounds and how it finds hosts (launchers/elastic.py)."""

    initial_np: int
    min_np: int
    max_np: int
    discovery_script: str | None = None
    discovery_interval: float = 1.0
    slots: int = 1  # slots of a discovered host printed without a count
    # Failed workers after which a host is left out (blacklisted): None is 1 where the job names its hosts
    # (--host-discovery-script, --hosts: horovodrun's rule) and 3 on this host alone or with --nnodes.
    host_failures: int | None = None
    elastic_timeout: float = 600.0  # how long the job may stay below min_np
    reset_limit: int | None = None
    agents: bool = False  # nodes each run singa-launch (--rdzv-backend c10d): the one at the endpoint drives the job
    fixed_hosts: dict | None = None  # --hosts with --min-np/--max-np: host -> slots, never changing
    # --blacklist-cooldown-range MIN MAX: a left-out host may come back after a cooldown that grows with each time
    # it is left out (horovodrun's); None: left out for good
    cooldown_range: tuple[int, int] | None = None

    def __post_init__(self):
        if self.host_failures is None:
            self.host_failures = 1 if self.discovery_script or self.fixed_hosts else 3
        if self.fixed_hosts is not None and len(self.fixed_hosts) < 2:
            raise UsageError("an elastic job over --hosts needs at least 2 hosts (a host whose worker fails is left "
                             "out, as horovodrun does); on one host, give -np and --min-np/--max-np without --hosts")
        if self.cooldown_range is not None:
            low, high = self.cooldown_range
            if not 1 <= low <= high <= 3600:
                raise UsageError(f"--blacklist-cooldown-range wants MIN MAX seconds with 1 <= MIN <= MAX <= 3600, "
                                 f"got {low} {high}")
        if self.min_np < 1:
            raise UsageError(f"--min-np must be at least 1, got {self.min_np}")
        if self.max_np < self.min_np:
            raise UsageError(f"--max-np {self.max_np} is below --min-np {self.min_np}")
        if not self.min_np <= self.initial_np <= self.max_np:
            raise UsageError(f"-np {self.initial_np} must lie between --min-np {self.min_np} and --max-np "
                             f"{self.max_np}")
        if not self.discovery_interval > 0 or not self.elastic_timeout > 0:
            raise UsageError("--discovery-interval and --elastic-timeout must be positive numbers of seconds")
        if self.slots < 1 or self.host_failures < 1:
            raise UsageError("--slots and --host-failures must be at least 1")
        if self.reset_limit is not None and self.reset_limit < 0:
            raise UsageError(f"--reset-limit must be 0 or more, got {self.reset_limit}")


@dataclass
class LaunchConfig:
    command: list[str]
    topology: ClusterTopology
    node_procs: list[int]  # processes on each node, in node order
    node_rank: int = 0
    hosts: list[Host] = field(default_factory=list)  # ssh / mpirun hosts; empty for one node or --nnodes
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    max_restarts: int = 0
    log_dir: str | None = None
    tee: int = 0  # with log_dir: also to the console, stdout (1), stderr (2) or both (3)
    omp_num_threads: int | None = None
    network_interface: str | None = None
    grace_period: float = 5.0
    extra_env: dict = field(default_factory=dict)
    ssh_command: list[str] = field(default_factory=lambda: ["ssh"])
    ssh_port: int | None = None
    ssh_identity: str | None = None
    mpi: bool = False
    mpi_args: list[str] = field(default_factory=list)
    dry_run: bool = False
    exit_on_stdin_close: bool = False
    timeline: str | None = None  # absolute path of the job's timeline (SINGA_TIMELINE for every process)
    metrics: float | None = None  # seconds between live-metrics reports (SINGA_METRICS for every process)
    elastic: ElasticSpec | None = None  # --min-np/--max-np/--host-discovery-script: an elastic job
    autotune: bool = False  # AllReduce's bucket size, the parameter servers' messages (SINGA_AUTOTUNE=1 everywhere)
    server_checkpoint_dir: str | None = None  # absolute: where Downpour's/Hybrid's servers checkpoint their slices
    server_checkpoint_every: int | None = None  # ...every this many updates
    run_id: str = "none"  # torchrun's --rdzv-id (TORCHELASTIC_RUN_ID)
    rank_from_rendezvous: bool = False  # c10d, several nodes, no --node-rank: node_rank comes from node 0 at start
    rendezvous_timeout: float = 600.0  # how long a node waits for node 0 to give it its rank
    console_ranks: frozenset | None = None  # --local-ranks-filter: the local ranks shown on the console
    # horovodrun's flags (launchers/horovodrun.py): the HOROVOD_* knobs, and how the launcher itself behaves
    horovod: HorovodKnobs = field(default_factory=HorovodKnobs)
    output_filename: str | None = None  # --output-filename: log_dir in horovodrun's layout (with --mpi: mpirun's)
    timestamp_output: bool = False  # --prefix-output-with-timestamp
    verbose: bool = False
    start_timeout: int | None = None  # seconds the ssh checks of remote hosts may take
    binding_args: list[str] = field(default_factory=list)  # --mpi: Open MPI's binding options
    notes: list[str] = field(default_factory=list)  # what --verbose says of flags without effect here

    @property
    def nnodes(self) -> int:
        return len(self.node_procs)

    @property
    def local_nprocs(self) -> int:
        return self.node_procs[self.node_rank]

    def ensure_secret(self) -> str | None:
        """Put the job's secret (SINGA_SECRET, docs/security.md) in this launcher's environment, which every process
        it starts here inherits; over ssh it travels on standard input. Never on a command line, in the store or in a
        file. The user's if set, else a new one; nodes started one by one (--nnodes without --hosts) cannot share one
        made here, so they take the user's only. Returns a note to print when the job then has none and needs it."""
        given = os.environ.get(SECRET_VARIABLE)
        if given:
            if len(given) < MIN_SECRET_CHARS:
                raise UsageError(f"{SECRET_VARIABLE} has {len(given)} characters; a secret needs at least "
                                 f"{MIN_SECRET_CHARS}")
            return None
        if self.nnodes == 1 or self.hosts or self.mpi:
            os.environ[SECRET_VARIABLE] = make_secret()
            return None
        topo = self.topology
        if self.max_restarts and topo.nworker_groups > 1 and strategy_kind(topo.strategy).asynchronous:
            return (f"{SECRET_VARIABLE} is not set, so a worker group this job loses cannot be replaced (its "
                    f"replacement reaches the others through their doors, which need the job's secret): "
                    f"{NO_SECRET_ADVICE}")
        return None

    def server_command(self) -> list[str]:
        # SINGA_SERVER_COMMAND: a testing/debugging hook that replaces the parameter-server program.
        override = os.environ.get("SINGA_SERVER_COMMAND")
        if override:
            return shlex.split(override)
        return [sys.executable, "-m", "singa_dist.ps"]

    def threads_per_process(self) -> str | None:
        """OMP_NUM_THREADS for this node's processes: the cores shared out, so processes never oversubscribe."""
        if self.omp_num_threads is not None:
            return str(self.omp_num_threads)
        if "OMP_NUM_THREADS" in os.environ:
            return None  # the user's choice stands
        if self.local_nprocs <= 1:
            return None
        return str(max(1, _cores() // self.local_nprocs))

    def common_env(self, restart_count: int = 0) -> dict[str, str]:
        env = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "SINGA_PROC_WORLD_SIZE": str(self.topology.nprocs),
            "SINGA_TOPOLOGY": self.topology.to_json(),
            "SINGA_STRATEGY": self.topology.strategy,
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.nnodes),
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_RUN_ID": self.run_id,
            "TORCHELASTIC_MAX_RESTARTS": str(self.max_restarts),
            # Children write to files the launcher tails: unbuffered, so lines show when printed.
            "PYTHONUNBUFFERED": "1",
        }
        if self.nnodes > 1 and not self.mpi:
            # Node 0's launcher hosts the job's store (launchers.watchdog); every process joins it as a client.
            env.update({"TORCHELASTIC_USE_AGENT_STORE": "True", "SINGA_LAUNCHER_STORE": "1"})
        threads = self.threads_per_process()
        if threads is not None:
            env["OMP_NUM_THREADS"] = threads
        if self.network_interface:  # one or several, comma-separated (Gloo and NCCL take a list)
            first = self.network_interface.split(",")[0]
            env["GLOO_SOCKET_IFNAME"] = self.network_interface
            env["NCCL_SOCKET_IFNAME"] = self.network_interface
            env["TP_SOCKET_IFNAME"] = first  # torch RPC's TensorPipe (the parameter servers) takes one
            env["HOROVOD_GLOO_IFACE"] = first  # (as horovodrun sets it)
        elif self.nnodes == 1 and self.elastic is None:
            # Every process on this host: torch's listeners on loopback, out of the network's reach (docs/security.md).
            env.update(loopback_only())
        if self.timeline:
            env["SINGA_TIMELINE"] = self.timeline
        if self.metrics is not None:
            env[METRICS_VARIABLE] = f"{self.metrics:g}"
            if self.log_dir:  # rank 0 writes the rows beside the processes' output
                env[METRICS_FILE_VARIABLE] = os.path.join(os.path.abspath(self.log_dir), "metrics.csv")
        if self.autotune:
            env[AUTOTUNE_VARIABLE] = "1"
        if self.server_checkpoint_dir:
            env[SERVER_CHECKPOINT_DIR_VARIABLE] = self.server_checkpoint_dir
        if self.server_checkpoint_every is not None:
            env[SERVER_CHECKPOINT_EVERY_VARIABLE] = str(self.server_checkpoint_every)
        env.update(self.horovod.env())
        if self.elastic is not None:
            env["HOROVOD_ELASTIC"] = "1"
        env.update(self.extra_env)
        return env

    def workers_per_node(self) -> list[int]:
        """How many of each node's processes are workers (they come first in the numbering, servers last)."""
        counts, offset = [], 0
        for count in self.node_procs:
            counts.append(max(0, min(count, self.topology.nworkers - offset)))
            offset += count
        return counts

    def node_plan(self, node_rank: int | None = None, restart_count: int = 0) -> list[ProcessSpec]:
        """The processes of one node, numbered as topology.py says: workers first, then separate servers."""
        node = self.node_rank if node_rank is None else node_rank
        offset = sum(self.node_procs[:node])
        count = self.node_procs[node]
        topo = self.topology
        base = self.common_env(restart_count)
        base["GROUP_RANK"] = str(node)
        workers_per_node = self.workers_per_node()
        specs = []
        for local in range(count):
            proc = offset + local
            role = topo.role_of(proc)
            env = dict(base)
            env.update({"SINGA_PROC_RANK": str(proc), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(count),
                        "ROLE_NAME": role.role})
            if role.is_worker:
                index = proc
                env.update({"RANK": str(proc), "WORLD_SIZE": str(topo.nworkers),
                            "ROLE_RANK": str(proc), "ROLE_WORLD_SIZE": str(topo.nworkers)})
                # What horovodrun sets, for scripts and tools that read it (workers only: servers run no user code).
                here = workers_per_node[node]
                env.update({"HOROVOD_RANK": str(proc), "HOROVOD_SIZE": str(topo.nworkers),
                            "HOROVOD_LOCAL_RANK": str(local), "HOROVOD_LOCAL_SIZE": str(here),
                            "HOROVOD_CROSS_RANK": str(sum(1 for n in workers_per_node[:node] if n > local)),
                            "HOROVOD_CROSS_SIZE": str(sum(1 for n in workers_per_node if n > local)),
                            "HOROVOD_HOSTNAME": (self.hosts[node].name if self.hosts else socket.gethostname()
                                                 if self.nnodes > 1 else "localhost"),
                            "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"})
                argv = list(self.command)
            else:
                index = proc - topo.nworkers
                env.update({"ROLE_RANK": str(index), "ROLE_WORLD_SIZE": str(topo.nprocs - topo.nworkers)})
                argv = self.server_command()
            specs.append(ProcessSpec(proc, local, role.role, index, argv, env))
        return specs


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="singa-launch", allow_abbrev=False,
        description="Start a singa (or any torch.distributed) job: local processes, several hosts over ssh or "
                    "per node, or through mpirun.",
        usage="singa-launch [options] [-np N] COMMAND [ARGS...]")
    p.add_argument("-v", "--version", action="version", version=f"singa-launch {_version()}")
    p.add_argument("-np", "--num-proc", dest="np", type=int, help="number of worker processes in the whole job")
    p.add_argument("-m", "--module", action="store_true",
                   help="run COMMAND as a Python module, as `python -m COMMAND` (as torchrun -m)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=_nproc_per_node,
                   help="processes on this node (with --nnodes; as torchrun): a number, or auto, cpu or gpu")
    g = p.add_argument_group("topology (SINGA's cluster fields)")
    g.add_argument("--strategy", default="allreduce", help=f"one of {', '.join(STRATEGIES)}")
    g.add_argument("--worker-groups", type=int)
    g.add_argument("--workers-per-group", type=int)
    g.add_argument("--servers", type=int, help="servers per server group")
    g.add_argument("--server-groups", type=int)
    g.add_argument("--sync-freq", type=int, default=1)
    g.add_argument("--server-checkpoint-dir", metavar="DIR",
                   help="downpour/hybrid: each server checkpoints its slices there; a restarted one resumes from them")
    g.add_argument("--server-checkpoint-every", type=int, metavar="N",
                   help="with --server-checkpoint-dir: every N updates (default 100)")
    sep = g.add_mutually_exclusive_group()
    sep.add_argument("--colocate-servers", dest="separate", action="store_false", default=None,
                     help="servers live inside worker processes")
    sep.add_argument("--separate-servers", dest="separate", action="store_true",
                     help="servers run as their own processes")
    g.add_argument("--topology-json", help=argparse.SUPPRESS)  # a whole topology, as the ssh path hands it on
    m = p.add_argument_group("several nodes")
    m.add_argument("-H", "--hosts", help="h1:2,h2:2 -- hosts and their slots, started over ssh (horovodrun's -H)")
    m.add_argument("-hostfile", "--hostfile", help="a file with one 'host slots' (or host:slots) a line")
    m.add_argument("--nnodes", type=_nnodes, help="nodes in the job; run singa-launch on each with its --node-rank. "
                   "MIN:MAX (torchrun's elastic form): an elastic job of MIN to MAX nodes of --nproc-per-node "
                   "workers each, found by --host-discovery-script, started from this launcher")
    m.add_argument("--node-rank", "--node_rank", type=int,
                   help="this node's place (default 0; with --rdzv-backend c10d and several nodes, given out by the "
                        "rendezvous)")
    m.add_argument("--node-slots", help=argparse.SUPPRESS)  # per-node process counts, from the ssh path
    m.add_argument("--master-addr", "--master_addr", help="address of node 0 (default 127.0.0.1, or the first host)")
    m.add_argument("--master-port", "--master_port", type=int, help=f"a free port on node 0 (default {DEFAULT_MASTER_PORT} "
                                                   "with several nodes, a free one on one node)")
    m.add_argument("--network-interface", "--network-interfaces", action="append", metavar="IF[,IF...]",
                   help="interfaces Gloo, NCCL and the parameter servers' RPC use (GLOO_SOCKET_IFNAME, "
                   "NCCL_SOCKET_IFNAME, TP_SOCKET_IFNAME: the first); may be repeated")
    m.add_argument("--ssh-command", default="ssh", help="the ssh program and its options (default: ssh)")
    m.add_argument("-p", "--ssh-port", type=int, help="ssh port on every host (horovodrun's -p)")
    m.add_argument("-i", "--ssh-identity", "--ssh-identity-file", help="ssh's identity (private key) file")
    m.add_argument("--exit-on-stdin-close", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--mpi", action="store_true", help="start the job with mpirun (Open MPI or MPICH)")
    m.add_argument("--gloo", action="store_true",
                   help="start the processes and meet through Gloo, without mpirun (the default; horovodrun's --gloo)")
    m.add_argument("--standalone", action="store_true",
                   help="one node, rendezvous on this host (the default for one node; torchrun's --standalone)")
    m.add_argument("--mpi-args", default="", help="extra options for mpirun, as one string")
    t = p.add_argument_group("torchrun's rendezvous and process options (the same meaning here)")
    t.add_argument("--rdzv-backend", "--rdzv_backend", default="static",
                   help="static (node ranks given, node 0 at --master-addr) or c10d (node 0 is the node at "
                        "--rdzv-endpoint; the others get their ranks from it)")
    t.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default="", help="HOST[:PORT] of the rendezvous (node 0)")
    t.add_argument("--rdzv-id", "--rdzv_id", default="none", help="the job's id (TORCHELASTIC_RUN_ID)")
    t.add_argument("--rdzv-conf", "--rdzv_conf", default="", help="KEY=VALUE,...: join_timeout (seconds), is_host")
    t.add_argument("--local-addr", "--local_addr", help="this node's address (accepted; the rendezvous finds it)")
    t.add_argument("--monitor-interval", "--monitor_interval", type=float, default=None,
                   help="accepted for torchrun's sake: processes are watched continuously")
    t.add_argument("--start-method", "--start_method", choices=["spawn", "fork", "forkserver"], default="spawn",
                   help="accepted for torchrun's sake: every process starts as a fresh program")
    t.add_argument("--role", default="default", help="accepted for torchrun's sake (ROLE_NAME is worker or server)")
    t.add_argument("--no-python", "--no_python", action="store_true",
                   help="run COMMAND as it is, even a .py script (not with this Python)")
    t.add_argument("--run-path", "--run_path", action="store_true", help="run a script by its path (the default)")
    t.add_argument("-r", "--redirects", default="0",
                   help="accepted for torchrun's sake: with --log-dir every process's output goes to files")
    t.add_argument("--local-ranks-filter", "--local_ranks_filter", default="",
                   help="show only these local ranks' output on the console, e.g. 0 or 0,2")
    r = p.add_argument_group("processes")
    r.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="restart the whole job this many times after a failure (downpour, hybrid, hogwild: a lost "
                        "worker group is replaced instead, each replacement counting as one)")
    r.add_argument("--log-dir", "--log_dir", help="write each process's output to files there instead of the console")
    r.add_argument("-t", "--tee", type=int, choices=[0, 1, 2, 3], default=0,
                   help="with --log-dir, also show stdout (1), stderr (2) or both (3) on the console (as torchrun)")
    r.add_argument("--omp-num-threads", type=int,
                   help="intra-op threads per process (default: the cores shared out among the processes)")
    r.add_argument("--grace-period", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when the job stops")
    r.add_argument("-x", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set (or pass on) an environment variable for every process")
    r.add_argument("--dry-run", action="store_true", help="print what would run on every host, and exit")
    r.add_argument("--timeline", metavar="FILE.json",
                   help="record a timeline of the job (a Chrome trace: one track per rank and server) into FILE.json")
    r.add_argument("--metrics", metavar="SECONDS",
                   help="every SECONDS, rank 0 prints steps/s, samples/s, communication wait, bytes per step and "
                        "staleness (and writes them to DIR/metrics.csv with --log-dir DIR)")
    r.add_argument("--autotune", action="store_const", const=True, default=None,
                   help="AllReduce tries a few bucket sizes (Sandblaster, Downpour and Hybrid a few numbers of "
                        "messages per server) during the first steps and keeps the fastest (unless the script gives "
                        "bucket_mb or messages_per_server)")
    e = p.add_argument_group("elastic jobs (workers may fail or be added while the job runs; see docs/elastic.md)")
    e.add_argument("--min-np", "--min-num-proc", type=int,
                   help="fewest workers the job goes on with (makes the job elastic)")
    e.add_argument("--max-np", "--max-num-proc", type=int, help="most workers the job grows to")
    e.add_argument("--host-discovery-script", help="prints the hosts that may run workers now, host:slots a line")
    e.add_argument("--discovery-interval", type=float, default=1.0, help="seconds between runs of the script")
    e.add_argument("--slots", "--slots-per-host", type=int, default=1,
                   help="slots of a discovered host printed without a count")
    e.add_argument("--host-failures", type=int,
                   help="leave a host out of the job after this many failed workers on it (default 1 with "
                        "--host-discovery-script or --hosts, as horovodrun; 3 on this host alone)")
    e.add_argument("--blacklist-cooldown-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="a host left out may come back after MIN*2^n (+ up to MIN) seconds, at most MAX, n the "
                        "times it was left out (horovodrun's); without it a host left out stays out")
    e.add_argument("--elastic-timeout", type=float,
                   help="seconds the job may wait below --min-np for hosts (default HOROVOD_ELASTIC_TIMEOUT, "
                        "else 600)")
    e.add_argument("--reset-limit", type=int, help="most changes of workers the job goes through")
    horovodrun.add_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    return p


def parse_hosts(text: str) -> list[Host]:
    hosts = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        if not name.strip():
            raise UsageError(f"--hosts entry {item!r} names no host")
        hosts.append(Host(name, _positive(slots, f"slots of host {name!r}")))
    if not hosts:
        raise UsageError("--hosts names no host")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the hostfile {path}: {exc.strerror}") from None
    hosts = []
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        words = line.split()
        name, slots = words[0], "1"
        if ":" in name:
            name, slots = name.rsplit(":", 1)
        for w in words[1:]:  # "host slots=2" (Open MPI) or "host 2"
            slots = w.split("=", 1)[1] if w.startswith("slots=") else w
        hosts.append(Host(name, _positive(slots, f"slots of host {name!r} in {path}")))
    if not hosts:
        raise UsageError(f"the hostfile {path} names no host")
    return hosts


def _positive(text, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value}")
    return value


def resolve_command(command: list[str], python: bool = True) -> list[str]:
    """The program to run: a .py script runs with this Python (unless `python` is False: torchrun's --no-python);
    anything else must be on PATH or a file."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no program given: singa-launch [options] COMMAND [ARGS...]")
    program = command[0]
    if program.endswith(".py") and python:
        if not os.path.isfile(program):
            raise UsageError(f"the program {program} does not exist")
        return [sys.executable, *command]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise UsageError(f"the program {program} does not exist or is not executable")
        path = program
    else:
        path = shutil.which(program)
        if path is None:
            raise UsageError(f"the program {program!r} is not on PATH")
    _check_interpreter(path)
    if os.path.basename(path).startswith("python") and len(command) > 1 and command[1].endswith(".py") \
            and not os.path.isfile(command[1]):
        raise UsageError(f"the script {command[1]} does not exist")
    return list(command)


def python_with_torch(command: list[str]) -> tuple[list[str], str | None]:
    """A bare `python` or `python3` on PATH that cannot import torch (a shell outside the virtualenv) is replaced by
    this launcher's Python, as torchrun runs sys.executable: otherwise every rank fails with "No module named
    'torch'". Returns the command and, when it was replaced, the line that says so."""
    program = command[0] if command else ""
    path = shutil.which(program) if program in ("python", "python3") else None
    if path is None or _imports_torch(path):
        return command, None
    return ([sys.executable, *command[1:]],
            f"{program} on PATH ({path}) cannot import torch; running {sys.executable} (this launcher's Python) "
            "instead")


def _imports_torch(python: str) -> bool:
    """Whether the interpreter `python` finds torch (a lookup, not an import: a few tens of milliseconds)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return True
    try:
        found = subprocess.run([python, "-c", "import importlib.util, sys; "
                                "sys.exit(importlib.util.find_spec('torch') is None)"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return True  # could not tell: run what was asked for
    return found.returncode == 0


def _check_interpreter(path: str) -> None:
    """A script's #! interpreter must exist: otherwise every process would fail with "no such file", which reads
    as if the script itself were missing."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return
    if not first.startswith(b"#!"):
        return
    words = first[2:].decode("utf-8", "replace").split()
    if not words:
        raise UsageError(f"the program {path} starts with an empty #! line")
    interpreter = words[0]
    if os.path.basename(interpreter) == "env" and len(words) > 1:
        name = next((w for w in words[1:] if not w.startswith("-")), None)
        if name is not None and shutil.which(name) is None:
            raise UsageError(f"the program {path} runs with {name!r} (its #! line), which is not on PATH")
        return
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise UsageError(f"the program {path} runs with {interpreter} (its #! line), which does not exist")


def resolve_module(command: list[str]) -> list[str]:
    """`-m module args`: the module runs with this Python, as `python -m module args`."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("-m: no module given: singa-launch [options] -m MODULE [ARGS...]")
    top = command[0].split(".")[0]
    if not top.isidentifier() or importlib.util.find_spec(top) is None:
        raise UsageError(f"-m: no module named {command[0]!r} (looked for {top!r} from {os.getcwd()})")
    return [sys.executable, "-m", *command]


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("singa")
    except Exception:
        return "unknown"


def _extra_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name:
            raise UsageError(f"-x/--env wants NAME or NAME=VALUE, got {item!r}")
        if not eq:
            if name not in os.environ:
                raise UsageError(f"-x {name}: {name} is not set in this environment")
            value = os.environ[name]
        env[name] = value
    return env


def _nnodes(text: str):
    """--nnodes N, or MIN:MAX for an elastic job (as torchrun writes it)."""
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of nodes or MIN:MAX, got {text!r}") from None


def _nproc_per_node(text: str):
    """torchrun's --nproc-per-node: a number, or cpu (the cores), gpu (the GPUs), auto (the GPUs, else the cores)."""
    if text in ("auto", "cpu", "gpu"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of processes, auto, cpu or gpu, got {text!r}") from None


def _resolve_nproc(value):
    if not isinstance(value, str):
        return value
    gpus = 0
    if value in ("auto", "gpu"):
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "gpu" and gpus == 0:
        raise UsageError("--nproc-per-node gpu: this host has no GPU that torch can use")
    return gpus if gpus else os.cpu_count() or 1


def _endpoint(text: str, default_port: int) -> tuple[str, int]:
    """HOST[:PORT] (an IPv6 address in brackets when it has a port), as torchrun's --rdzv-endpoint."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        number = int(port) if port else default_port
    except ValueError:
        number = -1
    if not host or not 0 <= number <= 65535 or (port and not port.isdigit()):
        raise UsageError(f"--rdzv-endpoint wants HOST[:PORT], got {text!r}")
    return host, number


def _rdzv_conf(text: str) -> dict[str, str]:
    conf = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--rdzv-conf wants KEY=VALUE,..., got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


def parse_args(argv: list[str]) -> LaunchConfig:
    args = build_parser().parse_args(argv)
    try:
        horovodrun.resolve(args)  # horovodrun's spellings and --config-file, in singa-launch's terms
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.nproc_per_node = _resolve_nproc(args.nproc_per_node)
    if isinstance(args.nnodes, tuple) and args.nnodes[0] == args.nnodes[1] and not args.host_discovery_script:
        args.nnodes = args.nnodes[0]  # torchrun's N:N (its default is 1:1): a job of N nodes
    backend = args.rdzv_backend.lower()
    if backend not in ("static", "c10d"):
        raise UsageError(f"--rdzv-backend {args.rdzv_backend}: this launcher's rendezvous is static or c10d (node 0 "
                         "hosts it, as torchrun's c10d does); etcd is not available")
    conf = _rdzv_conf(args.rdzv_conf)
    unknown = set(conf) - {"join_timeout", "is_host", "timeout", "read_timeout", "last_call_timeout",
                           "close_timeout", "keep_alive_interval", "keep_alive_max_attempt"}
    if unknown:
        raise UsageError(f"--rdzv-conf: unknown key(s) {', '.join(sorted(unknown))}")
    if args.rdzv_endpoint:
        host, port = _endpoint(args.rdzv_endpoint, 29400 if backend == "c10d" else DEFAULT_MASTER_PORT)
        if args.master_addr not in (None, host) or args.master_port not in (None, port):
            raise UsageError(f"--rdzv-endpoint {args.rdzv_endpoint} and --master-addr/--master-port name different "
                             "places for node 0: give one of them")
        if port == 0 and args.nnodes not in (None, 1):
            raise UsageError("--rdzv-endpoint HOST:0 (a free port) is for one node: several nodes must agree on one")
        args.master_addr, args.master_port = host, port or None  # (HOST:0: a free port, as torchrun picks)
    try:
        join_timeout = float(conf.get("join_timeout", 600))
    except ValueError:
        raise UsageError(f"--rdzv-conf join_timeout wants seconds, got {conf['join_timeout']!r}") from None
    rank_from_rendezvous = (backend == "c10d" and args.node_rank is None and isinstance(args.nnodes, int)
                            and args.nnodes > 1 and conf.get("is_host", "").lower() not in ("1", "true", "yes"))
    if args.node_rank is None:
        args.node_rank = 0
    try:
        console_ranks = frozenset(int(r) for r in args.local_ranks_filter.split(",") if r.strip()) or None
    except ValueError:
        raise UsageError(f"--local-ranks-filter wants local ranks such as 0 or 0,2, got "
                         f"{args.local_ranks_filter!r}") from None
    agents = False  # an elastic job of nodes that each run singa-launch, meeting at --rdzv-endpoint
    if isinstance(args.nnodes, tuple):
        # torchrun's elastic --nnodes MIN:MAX, in this launcher's terms: workers, --nproc-per-node a node.
        low, high = args.nnodes
        if not 1 <= low <= high:
            raise UsageError(f"--nnodes MIN:MAX wants 1 <= MIN <= MAX, got {low}:{high}")
        if not args.host_discovery_script:
            if backend != "c10d" or not args.rdzv_endpoint:
                raise UsageError("--nnodes MIN:MAX is an elastic job: run it from one launcher with "
                                 "--host-discovery-script (it prints the nodes, host:slots a line), or on every node "
                                 "with --rdzv-backend c10d --rdzv-endpoint HOST[:PORT] (as torchrun)")
            agents = True
        per_node = args.nproc_per_node or 1
        args.min_np = args.min_np if args.min_np is not None else low * per_node
        args.max_np = args.max_np if args.max_np is not None else high * per_node
        args.slots = args.nproc_per_node or args.slots
        args.nnodes = args.nproc_per_node = None
    if args.np is not None and args.np < 1:
        raise UsageError(f"-np must be at least 1, got {args.np}")
    if args.hosts and args.hostfile:
        raise UsageError("give --hosts or --hostfile, not both")
    hosts = parse_hosts(args.hosts) if args.hosts else parse_hostfile(args.hostfile) if args.hostfile else []
    if hosts and args.nnodes:
        raise UsageError("--hosts/--hostfile start every node over ssh; --nnodes is for starting each node yourself")
    if args.mpi and args.gloo:
        raise UsageError("--mpi starts the job with mpirun, --gloo without it: give one of them")
    if args.standalone and (hosts or (args.nnodes or 1) > 1):
        raise UsageError("--standalone runs one node on this host: it does not combine with --hosts or --nnodes")
    if args.tee and not args.log_dir:
        raise UsageError("--tee copies the --log-dir files to the console: give --log-dir too (without it, all "
                         "output goes to the console already)")
    if args.mpi and (args.max_restarts or args.nnodes or args.log_dir):
        raise UsageError("--mpi: mpirun starts and stops the job itself; --max-restarts, --nnodes and --log-dir "
                         "do not apply (use --mpi-args for mpirun's own options)")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts must be at least 0, got {args.max_restarts}")
    if args.omp_num_threads is not None and args.omp_num_threads < 1:
        raise UsageError(f"--omp-num-threads must be at least 1, got {args.omp_num_threads}")
    if not math.isfinite(args.grace_period) or args.grace_period < 0:
        raise UsageError(f"--grace-period must be a number of seconds, 0 or more, got {args.grace_period}")
    for flag, value in (("--nnodes", args.nnodes), ("--nproc-per-node", args.nproc_per_node),
                        ("--worker-groups", args.worker_groups), ("--workers-per-group", args.workers_per_group),
                        ("--server-groups", args.server_groups), ("--sync-freq", args.sync_freq)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.servers is not None and args.servers < 0:
        raise UsageError(f"--servers must be 0 or more, got {args.servers}")
    if args.node_rank < 0:
        raise UsageError(f"--node-rank must be 0 or more, got {args.node_rank}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise UsageError(f"--master-port must be a port number between 1 and 65535, got {args.master_port}")
    if args.ssh_port is not None and not 1 <= args.ssh_port <= 65535:
        raise UsageError(f"--ssh-port must be a port number between 1 and 65535, got {args.ssh_port}")
    names = {name for _, name in socket.if_nameindex()}
    for interface in args.network_interface.split(",") if args.network_interface else []:
        if interface not in names:
            raise UsageError(f"--network-interface {interface!r} is not an interface of this host "
                             f"(it has {', '.join(sorted(names))})")
    if args.log_dir is not None and os.path.exists(args.log_dir) and not os.path.isdir(args.log_dir):
        raise UsageError(f"--log-dir {args.log_dir} is a file, not a directory")
    timeline = None
    if args.timeline is not None:
        if not args.timeline:
            raise UsageError("--timeline wants a file name, got an empty one")
        timeline = os.path.abspath(args.timeline)  # the processes (and other nodes) may run elsewhere
        try:
            check_writable(timeline)
        except OSError as exc:
            raise UsageError(f"--timeline: {exc}") from None

    interval = None
    if args.metrics is not None:
        try:
            interval = parse_interval(args.metrics, "--metrics")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if interval is None:
            raise UsageError(f"--metrics wants a number of seconds above 0 between reports, got {args.metrics!r}")

    if args.autotune and args.strategy not in AUTOTUNED_STRATEGIES:
        raise UsageError(f"--autotune tunes AllReduce's bucket size and the messages per server of "
                         f"{', '.join(AUTOTUNED_STRATEGIES[1:])}; --strategy {args.strategy} has neither")

    checkpoint_dir = None
    if args.server_checkpoint_dir is not None or args.server_checkpoint_every is not None:
        if args.strategy not in CHECKPOINTED_STRATEGIES:
            raise UsageError(f"--server-checkpoint-dir/--server-checkpoint-every: the servers of "
                             f"{' and '.join(CHECKPOINTED_STRATEGIES)} checkpoint; --strategy {args.strategy} has none")
        if args.server_checkpoint_dir is None:
            raise UsageError("--server-checkpoint-every needs --server-checkpoint-dir DIR")
        if args.server_checkpoint_every is not None and args.server_checkpoint_every < 1:
            raise UsageError(f"--server-checkpoint-every must be at least 1, got {args.server_checkpoint_every}")
        if not args.server_checkpoint_dir or os.path.isfile(args.server_checkpoint_dir):
            raise UsageError(f"--server-checkpoint-dir {args.server_checkpoint_dir!r} is not a directory")
        checkpoint_dir = os.path.abspath(args.server_checkpoint_dir)

    if args.no_python and args.module:
        raise UsageError("--no-python runs COMMAND as a program; -m runs a Python module: give one of them")
    command = (resolve_module(args.command) if args.module
               else resolve_command(args.command, python=not args.no_python))
    # What every job takes from the flags alike, elastic or not (one list, so that no flag is dropped in one kind).
    try:
        knobs = horovodrun.knobs_from_args(args, timeline if args.timeline_filename is not None else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    common = dict(
        command=command, omp_num_threads=args.omp_num_threads, network_interface=args.network_interface,
        grace_period=args.grace_period, extra_env=_extra_env(args.env), ssh_command=shlex.split(args.ssh_command),
        ssh_port=args.ssh_port, ssh_identity=args.ssh_identity, dry_run=args.dry_run, timeline=timeline,
        metrics=interval, autotune=bool(args.autotune), server_checkpoint_dir=checkpoint_dir,
        server_checkpoint_every=args.server_checkpoint_every, run_id=args.rdzv_id, console_ranks=console_ranks,
        horovod=knobs, output_filename=args.output_filename and os.path.abspath(args.output_filename),
        timestamp_output=args.prefix_output_with_timestamp, verbose=args.verbose, start_timeout=args.start_timeout,
        binding_args=shlex.split(args.binding_args or ""),
        notes=horovodrun.notes(args, knobs, remote_hosts=bool(hosts) or bool(args.host_discovery_script)))

    if args.min_np is not None or args.max_np is not None or args.host_discovery_script or agents:
        if args.mpi or args.nnodes:
            raise UsageError("an elastic job (--min-np/--max-np/--host-discovery-script) is started by this "
                             "launcher alone: give its hosts through --host-discovery-script or --hosts, not --mpi "
                             "or --nnodes")
        if hosts and args.host_discovery_script:
            raise UsageError("an elastic job finds its hosts through --host-discovery-script or has the fixed "
                             "--hosts/--hostfile: give one of them")
        if args.strategy not in ("allreduce", "adasum"):
            raise UsageError(f"an elastic job trains with workers only (allreduce, adasum); --strategy "
                             f"{args.strategy} needs parameter servers, which cannot come and go")
        if args.max_restarts:
            raise UsageError("--max-restarts restarts a whole job; an elastic job replaces its workers instead")
        if args.log_dir is not None or args.tee:
            raise UsageError("an elastic job's workers come and go and print to this console, tagged by worker; "
                             "--log-dir and --tee are for jobs of fixed processes")
        # -np: the workers the job needs to start (it starts with every slot the hosts offer, up to --max-np);
        # --min-np defaults to it, as horovodrun has them. (With agents: once min_np slots have come.)
        min_np = args.min_np if args.min_np is not None else args.np if args.np is not None and not agents else 1
        initial = args.np if args.np is not None else min_np
        fixed = None
        if hosts:
            fixed = {}
            for h in hosts:
                fixed[h.name] = fixed.get(h.name, 0) + h.slots
        if args.max_np is not None:
            max_np = args.max_np
        elif args.host_discovery_script:  # as many as discovery offers
            max_np = 1 << 16
        else:  # as many as the hosts hold, or as started on this one
            max_np = max(sum(fixed.values()) if fixed else initial, min_np)
        timeout = args.elastic_timeout
        if timeout is None:
            try:
                timeout = float(os.environ.get("HOROVOD_ELASTIC_TIMEOUT") or 600.0)  # (horovodrun reads it too)
            except ValueError:
                raise UsageError(f"HOROVOD_ELASTIC_TIMEOUT wants seconds, got "
                                 f"{os.environ['HOROVOD_ELASTIC_TIMEOUT']!r}") from None
        spec = ElasticSpec(initial_np=initial, min_np=min_np, max_np=max_np,
                           discovery_script=args.host_discovery_script,
                           discovery_interval=args.discovery_interval, slots=args.slots,
                           host_failures=args.host_failures, elastic_timeout=timeout,
                           reset_limit=args.reset_limit, agents=agents, fixed_hosts=fixed,
                           cooldown_range=tuple(args.blacklist_cooldown_range) if args.blacklist_cooldown_range
                           else None)
        try:
            topology = ClusterTopology.for_strategy(args.strategy, spec.initial_np, servers=args.servers,
                                                    server_groups=args.server_groups)
        except TopologyError as exc:
            raise UsageError(f"bad topology: {exc}") from None
        return LaunchConfig(topology=topology, node_procs=[spec.initial_np],
                            master_addr=args.master_addr or "127.0.0.1", master_port=args.master_port or free_port(),
                            elastic=spec, **common)

    # Workers: -np, else what the nodes hold.
    nworkers = args.np
    if nworkers is None and not args.topology_json:  # a whole topology (ssh path) carries its own counts
        if args.nproc_per_node and args.nnodes:
            nworkers = args.nproc_per_node * args.nnodes
        elif args.nproc_per_node:
            nworkers = args.nproc_per_node
        elif hosts:
            nworkers = sum(h.slots for h in hosts)
        else:
            raise UsageError("say how many worker processes to start: -np N")
    try:
        if args.topology_json:
            topology = ClusterTopology.from_json(args.topology_json)
        else:
            topology = ClusterTopology.for_strategy(
                args.strategy, nworkers, worker_groups=args.worker_groups, workers_per_group=args.workers_per_group,
                servers=args.servers, server_groups=args.server_groups, sync_freq=args.sync_freq,
                separate=args.separate)
    except (TopologyError, TypeError) as exc:
        raise UsageError(f"bad topology: {exc}") from None
    nprocs = topology.nprocs

    node_rank = args.node_rank
    master_addr = args.master_addr
    master_port = args.master_port
    if args.node_slots:
        node_procs = [_positive(n, "--node-slots entries") for n in args.node_slots.split(",")]
    elif hosts:
        node_procs = _fill_hosts(hosts, nprocs)
        hosts = hosts[:len(node_procs)]
        master_addr = master_addr or hosts[0].name
    elif args.nnodes:
        per_node = args.nproc_per_node
        if per_node is None:
            if nprocs % args.nnodes:
                raise UsageError(f"{nprocs} processes do not divide evenly over {args.nnodes} nodes; "
                                 "give --nproc-per-node")
            per_node = nprocs // args.nnodes
        if per_node * args.nnodes != nprocs:
            raise UsageError(f"{args.nnodes} nodes x {per_node} processes is not the job's {nprocs} processes "
                             f"({topology.nworkers} workers + {nprocs - topology.nworkers} servers)")
        node_procs = [per_node] * args.nnodes
        if args.nnodes > 1 and master_addr is None:
            raise UsageError("--nnodes > 1 needs --master-addr (the address of node 0)")
    else:
        if args.nproc_per_node and args.np and args.nproc_per_node != nprocs:
            raise UsageError("on one node -np and --nproc-per-node must agree")
        node_procs = [nprocs]
    if sum(node_procs) != nprocs:
        raise UsageError(f"the nodes hold {sum(node_procs)} processes but the job has {nprocs}")
    if not 0 <= node_rank < len(node_procs):
        raise UsageError(f"--node-rank {node_rank} is outside 0..{len(node_procs) - 1}")
    several = len(node_procs) > 1
    master_addr = master_addr or "127.0.0.1"
    if master_port is None:
        master_port = DEFAULT_MASTER_PORT if several else free_port()
    elif node_rank == 0 and not args.node_slots and not args.dry_run and not args.mpi and not hosts \
            and not rank_from_rendezvous:
        _check_port_free(master_port)

    return LaunchConfig(
        topology=topology, node_procs=node_procs, node_rank=node_rank, hosts=hosts, master_addr=master_addr,
        master_port=master_port, max_restarts=args.max_restarts, log_dir=args.log_dir, mpi=args.mpi,
        mpi_args=shlex.split(args.mpi_args), exit_on_stdin_close=args.exit_on_stdin_close, tee=args.tee,
        rank_from_rendezvous=rank_from_rendezvous, rendezvous_timeout=join_timeout, **common)


def _check_port_free(port: int) -> None:
    """Node 0 hosts the rendezvous: its --master-port must be free there (otherwise every process would wait for
    a store that never answers)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except PermissionError:
            raise UsageError(f"--master-port {port} needs privileges this user lacks (ports below 1024)") from None
        except OSError:
            raise UsageError(f"--master-port {port} is in use on this host") from None


def _fill_hosts(hosts: list[Host], nprocs: int) -> list[int]:
    """Processes per host, filling the hosts in order (as mpirun does)."""
    total = sum(h.slots for h in hosts)
    if nprocs > total:
        raise UsageError(f"the job needs {nprocs} processes but the hosts give only {total} slots")
    counts, left = [], nprocs
    for h in hosts:
        if left == 0:
            break
        counts.append(min(h.slots, left))
        left -= counts[-1]
    return counts


def forwarded_env() -> dict[str, str]:
    """The part of this environment a remote node needs (paths, and singa/torch/NCCL/Gloo settings); the job's
    secret goes on standard input instead (launchers.lifeline.take_secret_from_stdin)."""
    return {k: v for k, v in os.environ.items()
            if (k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES)) and k != SECRET_VARIABLE}


