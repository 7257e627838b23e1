"""The process runtime: who this process is, the torch.distributed groups it talks through, and leaving.

`init()` reads the launch environment (`singa_dist.environment`: singa-launch, torchrun, mpirun, SLURM, or
nothing for a single process), joins the job's process group and creates the groups of the topology: all
workers, and each worker group. `rank()` and `size()` count the workers only; servers run no user code.

`shutdown()` leaves the job in phases. The layers above register what they must do then with
`on_shutdown(fn, phase=...)` (this module imports none of them): "drain" waits for communication in flight,
"close" releases the strategies, "release" says goodbye to parameter servers; then every process meets
and the groups are destroyed. It also runs when the interpreter exits after `init()` if the script did not
call it (not when the script is dying of an uncaught exception: then the process leaves at once).

`start_timeline(FILE)` / `stop_timeline()` (and SINGA_TIMELINE or HOROVOD_TIMELINE at `init()`) record this
process's timeline (`singa_dist.timeline`); process 0 merges every process's part into FILE when recording
stops and again at `shutdown()`, after every process has written its own.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import importlib
import json
import os
import sys
import time
import uuid
import warnings
import weakref
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import rendezvous, timeline
from .environment import (LOST_KEY_PREFIX, detect_launcher, env_flag, init_key, job_topology, layout_from_slurm,
                          node_key, ranks_within, rendezvous_address, stall_shutdown_s, store_listen_fd)
from .topology import ClusterTopology, ProcessRole, strategy_kind

DEFAULT_TIMEOUT_S = 300.0
# How long a process that exits without shutdown() waits at exit for the others to arrive.
EXIT_MEETING_S = 30.0
# Where a process that leaves the job says it is (publish_where): in shutdown(), or leaving because its script ended
# (or called sys.exit()) without calling it. Peers still waiting for it are told either way.
WHERE_SHUTDOWN = "singa_dist.shutdown()"
WHERE_EXIT = "its exit (the script ended, or called sys.exit(), without singa_dist.shutdown())"


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
    strategy: str = "allreduce"  # what trains (the latest DistributedOptimizer's)
    job_strategy: str = "allreduce"  # what the job was started for
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = "none"
    launcher: str = "none"
    steps: int = 0  # DistributedOptimizer steps this process took (for "which rank is where")
    workers_pg: object = None  # all workers
    group_pgs: dict = field(default_factory=dict)  # worker group index -> process group of that group
    named_pgs: dict = field(default_factory=dict)  # name -> a group of all workers that a layer above asked for
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    elastic_round: int = -1  # in an elastic job, the round this process is in (see singa_dist.rendezvous)
    # A worker of a group that replaces a lost one in an asynchronous job (singa-launch --max-restarts): the how-many-th
    # replacement of its process (0: an original process). Its own group is its default process group.
    replacement: int = 0
    job_store: object = None  # a replacement's view of the job's store, as the others' default group has it


_state = _Runtime()
_init_args: dict = {}  # what init() was called with (reset() calls it again so)
_inits = 0  # init() calls that joined a job, the same count on every process of it
_tcp_stores: dict = {}  # (host, port, hosting) -> the job's store, kept across init() calls of this process
_worker_group_names: list[str] = []  # see request_worker_group


def request_worker_group(name: str) -> None:
    """Have every init() create one more process group of all workers, named `name` (`named_process_group`).

    A layer above calls this when it is imported, so that the group exists on every process of every job
    (servers included take part in creating it, as torch.distributed requires) in the same order."""
    if name not in _worker_group_names:
        _worker_group_names.append(name)


def _node_layout(launcher: str, proc_rank: int, proc_size: int, local_rank: int | None,
                 local_size: int | None, workers: int) -> tuple[int, int, int, int]:
    """(local_rank, local_size, cross_rank, cross_size) of this process.

    A worker counts the workers only (processes 0 .. workers-1, which come first on every node), as size()
    does: Horovod's local and cross ranks are those of its ranks, and parameter servers are not ranks. A
    server counts every process. Every process of the job takes the same branch (each one depends only on
    job-wide facts), so that either all of them or none take part in the all-gather."""
    members = workers if proc_rank < workers else proc_size  # the processes this one is counted among
    if local_size == proc_size and local_rank is not None:  # every process is on this node
        return local_rank, members, 0, 1
    if launcher == "srun" and local_rank is not None and local_size is not None and workers == proc_size:
        found = layout_from_slurm(local_rank)
        if found is not None:
            return (local_rank, local_size) + found
    # Otherwise every process says where it runs (see node_key) and its local rank if known.
    mine = (node_key(launcher), local_rank)
    everyone = [None] * proc_size
    dist.all_gather_object(everyone, mine)
    everyone = everyone[:members]
    if local_rank is None or local_size is None:  # numbered by host, in process order
        by_host = ranks_within([host for host, _ in everyone])
        local_rank, local_size = by_host[proc_rank]
        local_ranks = [local for local, _ in by_host]
    else:
        local_ranks = [local for _, local in everyone]
        if members < proc_size:  # the launcher's count includes the servers on this node
            local_size = sum(1 for host, _ in everyone if host == everyone[proc_rank][0])
    return (local_rank, local_size) + ranks_within(local_ranks)[proc_rank]


class NotInitializedError(RuntimeError, ValueError):
    """A call that needs the job came before singa_dist.init() (a ValueError too, as Horovod raises one)."""

    def __init__(self, what: str = "this call"):
        super().__init__(f"singa_dist has not been initialized: call singa_dist.init() before {what} "
                         "(hvd.init() in a Horovod script)")


class ServerDone(SystemExit):
    """Ends a server process that was started with the user's script, once it has served (exit status 0)."""


# The life of a server process: registered by the package (it lives in a layer above this one).
_server_loop = None


def on_server_role(loop) -> None:
    """`loop()` is what a parameter-server process does between init() and shutdown()."""
    global _server_loop
    _server_loop = loop


def init(timeout: float | None = None, backend: str | None = None, *, strategy: str | None = None,
         servers: int | None = None, worker_groups: int | None = None, sync_freq: int | None = None,
         _serve: bool = True) -> None:
    """Join the job this process belongs to; without a launcher, a job of one process (a Gloo group of one, so
    that torch.distributed's own APIs work as under torchrun with one process).

    timeout: seconds a collective may wait for a missing rank before the job stops with an error
             (default: SINGA_TIMEOUT from the environment, else Horovod's stall shutdown time,
             HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, where it applies, else 300).
    backend: torch.distributed backend; default Gloo for CPU tensors and, where CUDA is available, NCCL
             for CUDA tensors.
    strategy, servers, worker_groups, sync_freq: the training framework and its topology, for launchers that
             start every process with the script (torchrun, mpirun, srun); also read from SINGA_STRATEGY,
             SINGA_SERVERS, SINGA_WORKER_GROUPS and SINGA_SYNC_FREQ. singa-launch's topology, when there is one,
             is the job's. With separate servers, the last processes are the servers: on them init() runs the
             server until the workers are done and then exits the process, so the script goes no further there.
    """
    global _init_args
    if _state.initialized:
        return
    _init_args = dict(timeout=timeout, backend=backend, strategy=strategy, servers=servers,
                      worker_groups=worker_groups, sync_freq=sync_freq, _serve=_serve)
    if not rendezvous.enabled():
        _init(**_init_args)
        return
    while True:
        try:
            _init(**_init_args)
            return
        except Exception as exc:
            # A member of the round died while its process groups formed: drop what was built and meet the
            # others in the next round, which singa-launch publishes without the dead member.
            if not _round_broke(exc):
                raise
            _leave_groups()


def _round_broke(exc: Exception) -> bool:
    """Whether `exc`, raised while this elastic worker formed its round's groups, came of the round breaking.
    A connection refused by a member that just died may come before singa-launch marks the round: wait a little
    for the mark rather than fail the job."""
    global _forming_round
    number, _forming_round = _forming_round, -1
    if number < 0:  # it failed before it came to a round (or after it formed one): not the round's doing
        return False
    if isinstance(exc, rendezvous.RoundAborted):
        return True
    deadline = time.monotonic() + min(5.0, _state.timeout_s)
    while time.monotonic() < deadline:
        if rendezvous.aborted(_elastic_store(), number) is not None:
            return True
        time.sleep(rendezvous.POLL_S)
    return False


def _init(timeout, backend, strategy, servers, worker_groups, sync_freq, _serve) -> None:
    global _inits, _forming_round
    if timeout is None:
        timeout = float(os.environ.get("SINGA_TIMEOUT") or stall_shutdown_s() or DEFAULT_TIMEOUT_S)
    if not timeout > 0:
        raise ValueError(f"the timeout must be a positive number of seconds, got {timeout!r}")
    _state.timeout_s = float(timeout)

    found = detect_launcher()
    joining = None
    if rendezvous.enabled():
        # An elastic job: the rank and size are this worker's place in the newest round that lists it.
        joining = _join_round(_last_round, rendezvous.join_timeout(_state.timeout_s))
        _remember_round(joining.number)
        rank_, size_, local_rank_, local_size_, _, _ = joining.layout(rendezvous.worker_id())
        found = ("singa-launch", rank_, size_, local_rank_, local_size_)
    alone = found is None
    if alone:
        found = ("none", 0, 1, 0, 1)
    launcher, proc_rank, proc_size, local_rank, local_size = found
    if alone:
        # A lone process is its own server: any strategy trains it like its optimizer, no server started.
        topology = ClusterTopology.allreduce(1)
        named = strategy or os.environ.get("SINGA_STRATEGY") or "allreduce"
        strategy_kind(named)  # an unknown name is an error here too
    else:
        topology = job_topology(proc_size, strategy, servers=servers, worker_groups=worker_groups,
                                sync_freq=sync_freq)
        named = topology.strategy
    replacement = int(os.environ.get("SINGA_REPLACEMENT") or 0) if launcher == "singa-launch" else 0
    if replacement and not (topology.role_of(proc_rank).is_worker and topology.nworker_groups > 1
                            and strategy_kind(topology.strategy).asynchronous):
        raise RuntimeError("singa_dist.init(): only a worker group of an asynchronous job (downpour, hybrid, hogwild) "
                           "can replace a lost one")
    if joining is not None and topology.nprocs != topology.nworkers:
        raise RuntimeError(f"singa_dist.init(): an elastic job trains with workers only (allreduce, adasum); the "
                           f"{topology.strategy} strategy needs parameter servers, which cannot come and go")
    if topology.nprocs != proc_size:
        raise RuntimeError(
            f"singa_dist.init(): the topology has {topology.nprocs} processes but the launcher started {proc_size}")
    role = topology.role_of(proc_rank)

    _state.launcher = launcher
    _state.strategy = _state.job_strategy = named.lower()
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
        # This module's functions take the WORLD group as a default argument, evaluated when it is imported
        # (torch imports it with the first optimizer): imported after the group exists, it would keep the
        # group alive until the interpreter exits, past shutdown().
        importlib.import_module("torch.distributed.nn.functional")
        wait = datetime.timedelta(seconds=_state.timeout_s)
        if alone:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)
        elif replacement:
            _join_replacement_group(backend, topology, proc_rank, wait, replacement)
        elif joining is not None:
            _forming_round = joining.number  # from here to the end of init(), a failure may be the round breaking
            dist.init_process_group(backend=backend, store=rendezvous.RoundStore(_elastic_store(), joining.number),
                                    rank=proc_rank, world_size=proc_size, timeout=wait)
            _state.elastic_round = joining.number
        else:
            rendezvous_address(launcher, proc_rank)
            _join_process_group(backend, proc_rank, proc_size, wait)
        _state.distributed = True
        if joining is None:  # (an elastic round's keys are its own already: workers that joined late count alike)
            _inits += 1
        _register_exit()
    if joining is not None:
        _, _, local_rank, local_size, _state.cross_rank, _state.cross_size = joining.layout(rendezvous.worker_id())
        os.environ.update({"RANK": str(proc_rank), "WORLD_SIZE": str(proc_size), "LOCAL_RANK": str(local_rank),
                           "LOCAL_WORLD_SIZE": str(local_size)})
    elif _state.distributed and not alone:
        layout_key = f"{job_key('layout')}{proc_rank}"
        if replacement:  # the lost process's place: it said where it was when the job formed
            store = job_store()
            store.wait([layout_key], datetime.timedelta(seconds=_state.timeout_s))
            local_rank, local_size, _state.cross_rank, _state.cross_size = json.loads(store.get(layout_key))
        else:
            local_rank, local_size, _state.cross_rank, _state.cross_size = _node_layout(
                launcher, proc_rank, proc_size, local_rank, local_size, topology.nworkers)
            if topology.nworker_groups > 1 and strategy_kind(topology.strategy).asynchronous and role.is_worker:
                # (for a replacement, which cannot take part in the all-gather that found it)
                job_store().set(layout_key, json.dumps([local_rank, local_size, _state.cross_rank,
                                                        _state.cross_size]))
    _state.local_rank = 0 if local_rank is None else local_rank
    _state.local_size = 1 if local_size is None else local_size

    # Every process takes part in creating every group, as torch.distributed requires. A group's own timeout
    # defaults to torch's (30 minutes), not the job's: each is given the job's.
    wait = datetime.timedelta(seconds=_state.timeout_s)
    if replacement:
        # Only the group's own workers share a process group with it: the job's groups formed without it.
        _state.workers_pg = None
        _state.group_pgs[role.group] = dist.group.WORLD
    else:
        if topology.nprocs == topology.nworkers:
            _state.workers_pg = dist.group.WORLD
        else:
            _state.workers_pg = dist.new_group(topology.worker_ranks(), timeout=wait)
        if topology.nworker_groups == 1:
            _state.group_pgs[0] = _state.workers_pg
        else:
            for g in range(topology.nworker_groups):
                _state.group_pgs[g] = dist.new_group(topology.worker_ranks(g), timeout=wait)
        for name in _worker_group_names:
            _state.named_pgs[name] = dist.new_group(topology.worker_ranks(), timeout=wait)
    _state.initialized = True
    if replacement:
        _mark_back(proc_rank)
    _forming_round = -1
    _timeline_from_environment()
    if topology.nprocs != topology.nworkers:
        _samplers_count_workers()
    if role.is_worker:  # what horovodrun sets, true whatever launched the job (tools read it after init)
        os.environ.update({"HOROVOD_RANK": str(_state.rank), "HOROVOD_SIZE": str(_state.size),
                           "HOROVOD_LOCAL_RANK": str(_state.local_rank), "HOROVOD_LOCAL_SIZE": str(_state.local_size),
                           "HOROVOD_CROSS_RANK": str(_state.cross_rank), "HOROVOD_CROSS_SIZE": str(_state.cross_size)})
    elif _serve and _server_loop is not None:
        # A server process that was started with the user's script (torchrun, mpirun, srun start every process
        # so): it serves until every worker is done, leaves the job, and ends here.
        _server_loop()
        shutdown()
        raise ServerDone(0)


def _samplers_count_workers() -> None:
    """torch's DistributedSampler(dataset) takes its replicas and rank from the default group, which holds the
    parameter servers too: the workers would read only their shares of the data and the servers' shares would
    never be read, without a word. While a job with servers runs, a sampler given neither takes the workers'
    size() and rank() instead (given values are kept)."""
    from torch.utils.data import distributed as sampling
    original = sampling.DistributedSampler.__init__
    if getattr(original, "_singa_workers", False):
        return

    def __init__(self, dataset, num_replicas=None, rank=None, *args, **kwargs):
        if _state.initialized and _state.rank >= 0 and _state.topology.nprocs != _state.topology.nworkers:
            num_replicas = _state.size if num_replicas is None else num_replicas
            rank = _state.rank if rank is None else rank
        original(self, dataset, num_replicas, rank, *args, **kwargs)

    __init__._singa_workers = True
    __init__.__doc__, __init__.__wrapped__ = original.__doc__, original
    sampling.DistributedSampler.__init__ = __init__


def blame(procs: list[int], what: str, neutral: bool = False) -> None:
    """Leave a note for the launcher: this process fails because of processes `procs` (what: e.g. "they never
    reached init()"), so that the launcher names them as the cause rather than this process, which merely
    failed first. `neutral`: the note says what went wrong (the ranks ran different numbers of steps) but the
    other processes are not its cause. The note also says whether this process is leaving at its exit (without
    shutdown()). Written where singa-launch says (SINGA_FAILURE_DIR); nothing happens elsewhere."""
    folder = os.environ.get("SINGA_FAILURE_DIR")
    if not folder or not procs:
        return
    me = _state.proc_rank if _state.initialized else int(os.environ.get("SINGA_PROC_RANK", os.environ.get("RANK", -1)))
    try:
        with open(os.path.join(folder, f"blame.{me}"), "w") as f:
            json.dump({"proc": me, "blames": sorted(set(procs)), "what": what, "neutral": neutral,
                       "at_exit": _leaving_at_exit}, f)
    except OSError:
        pass


def _join_process_group(backend: str, rank: int, size: int, wait: datetime.timedelta) -> None:
    """init_process_group, naming the processes that never came when the rendezvous times out (torch says only
    how many came). Under torchrun's agent, whose store it must share, it is torch's own env:// rendezvous."""
    # singa-launch on several nodes: its node-0 launcher hosts the store (launchers/watchdog.py).
    hosted = os.environ.get("SINGA_LAUNCHER_STORE") == "1"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not hosted:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size, timeout=wait)
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    seconds = wait.total_seconds()
    try:
        # Kept for a later init() of this process: a new store at the same port would race with the old one
        # (a rank's client could connect to the server that is about to close).
        store = _tcp_stores.get((host, port, rank == 0 and not hosted))
        if store is None:
            # Process 0's server listens at the job's address alone (loopback for a job on one host).
            store = _tcp_stores[(host, port, rank == 0 and not hosted)] = dist.TCPStore(
                host, port, size, is_master=rank == 0 and not hosted, timeout=wait, wait_for_workers=False,
                multi_tenant=True, master_listen_fd=store_listen_fd(host, port) if rank == 0 and not hosted else None)
    except Exception as exc:
        if hosted:
            raise RuntimeError(
                f"process {rank}: the job's store at {host}:{port}, hosted by singa-launch on node 0, did not "
                f"answer within {seconds:g} s: node 0's launcher is not running, or --master-addr/--master-port "
                f"are wrong. Cause: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        if rank == 0:
            raise RuntimeError(f"process 0: cannot host the job's rendezvous at {host}:{port}: {exc}") from exc
        blame([0], "process 0 never opened the job's rendezvous (singa_dist.init())")
        raise RuntimeError(
            f"process {rank}: the job's rendezvous at {host}:{port} (hosted by process 0) did not answer within "
            f"{seconds:g} s: process 0 never reached singa_dist.init() (stopped, hung before it, or elsewhere), "
            f"or MASTER_ADDR/MASTER_PORT are wrong. Cause: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    if _inits:
        # init() again after shutdown(): the store outlives the job's groups, and torch names the new default
        # group's keys as it named the old one's: a rank would read a peer's address of the last init.
        store = dist.PrefixStore(f"singa/reinit/{attempt}/{_inits}/", store)
    store.set(init_key(attempt, _inits, rank), "1")
    try:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size, timeout=wait)
    except Exception as exc:
        try:
            missing = [r for r in range(size) if not store.check([init_key(attempt, _inits, r)])]
        except Exception:
            missing = []
        if not missing:
            raise
        names = ", ".join(map(str, missing))
        blame(missing, f"process{'es' if len(missing) > 1 else ''} {names} never reached singa_dist.init()")
        raise RuntimeError(
            f"process {rank}: process{'es' if len(missing) > 1 else ''} {names} never reached singa_dist.init() "
            f"within {seconds:g} s (stopped, hung before it, or started for another job); "
            f"{size - len(missing)} of {size} came") from exc


# --------------------------------------------------------------------------------------------------------------
# Elastic jobs (singa_dist.rendezvous): joining a round, noticing that it broke, and moving to the next one

_last_round = -1  # the round this process was last in (kept across reset())
_forming_round = -1  # the round whose process groups this process is forming now
_elastic_client = None  # this process's connection to the launcher's store
_reset_hooks: dict[str, list] = {"leave": [], "join": []}


def _remember_round(number: int) -> None:
    global _last_round
    _last_round = number


def _elastic_store():
    global _elastic_client
    if _elastic_client is None:
        _elastic_client = rendezvous.connect(_state.timeout_s)
    return _elastic_client


def _join_round(after: int, timeout_s: float) -> "rendezvous.Round":
    """The round this worker forms a process group in: the newest after `after` that lists it, once every member
    has come to it (torch's group creation cannot be interrupted, so a member that died before coming must not
    leave the others inside it: the round breaks, and they meet again in the next one)."""
    store, me = _elastic_store(), rendezvous.worker_id()
    deadline = time.monotonic() + timeout_s
    while True:
        found = rendezvous.next_round(store, me, after, max(deadline - time.monotonic(), 0.0))
        store.set(rendezvous.joined_key(found.number, me), "1")
        keys = [rendezvous.joined_key(found.number, m) for m in found.members]
        # Broken (a member died) is checked first: a round the launcher broke is never formed. (Workers added
        # meanwhile wait for the next round; this one forms, and they are taken in at the next commit.)
        while rendezvous.aborted(store, found.number) is None:
            if store.check(keys):
                return found
            if time.monotonic() > deadline:
                missing = [m for m, k in zip(found.members, keys) if not store.check([k])]
                raise RuntimeError(f"elastic worker {me}: workers {missing} of round {found.number} did not come "
                                   f"within {timeout_s:g} s")
            time.sleep(rendezvous.POLL_S)
        after = found.number


RoundAborted = rendezvous.RoundAborted  # the elastic job's round broke while this process waited for it


def is_elastic() -> bool:
    return _state.elastic_round >= 0


def elastic_round() -> int:
    """The round of the elastic job this process is in; -1 outside an elastic job."""
    return _state.elastic_round


def newest_round() -> int:
    """The newest round singa-launch has published (newer than elastic_round() once it added or lost workers)."""
    return rendezvous.latest(_elastic_store()) if is_elastic() else -1


def break_round(why: str) -> None:
    """Tell every member of this round that it is broken (a collective of it failed here)."""
    if is_elastic():
        rendezvous.abort(_elastic_store(), _state.elastic_round, f"rank {_state.rank}: {why}")


def wait_work(work, what: str) -> None:
    """Wait for a torch.distributed work; in an elastic job, stop waiting (RoundAborted) as soon as the round
    breaks, instead of waiting for a failed peer until the job's timeout."""
    if _state.elastic_round < 0:
        work.wait()
        return
    store, number = _elastic_store(), _state.elastic_round
    pause, checked = 0.0001, 0.0
    while not work.is_completed():
        now = time.monotonic()
        if now - checked > rendezvous.POLL_S:
            checked = now
            why = rendezvous.aborted(store, number)
            if why is not None:
                raise RoundAborted(f"round {number} of the elastic job broke ({why}) while rank {_state.rank} "
                                   f"waited in {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    work.wait()


def on_reset(fn, *, phase: str, weak: bool = False) -> None:
    """Call `fn()` at every reset() of an elastic job: phase "leave" before this process leaves its round (drop
    what belongs to the round's groups), "join" once it is in the next one (rebuild it for the new size)."""
    if phase not in _reset_hooks:
        raise ValueError(f"phase must be 'leave' or 'join', got {phase!r}")
    _reset_hooks[phase].append(weakref.WeakMethod(fn) if weak else (lambda: fn))


def _run_reset_hooks(phase: str) -> None:
    alive = []
    for get in _reset_hooks[phase]:
        fn = get()
        if fn is not None:
            alive.append(get)
            fn()
    _reset_hooks[phase] = alive


def reset() -> None:
    """Elastic: leave this round at once (its collectives are abandoned, nobody is waited for) and join the
    next round singa-launch publishes; rank() and size() are then those of the new round. What the layers
    above built on the old round's groups is rebuilt (on_reset hooks): a DistributedOptimizer goes on working.
    """
    if not is_elastic():
        raise RuntimeError("reset() is for elastic jobs (singa-launch --min-np/--max-np); this process is not in one")
    init_args = _init_args
    _run_reset_hooks("leave")
    _leave_groups()
    init(**init_args)
    _run_reset_hooks("join")


def _leave_groups() -> None:
    """Drop this process's groups of its elastic round at once (nobody is waited for) and forget the round."""
    global _state
    groups = {dist.group.WORLD if dist.is_initialized() else None, _state.workers_pg, *_state.group_pgs.values(),
              *_state.named_pgs.values()}
    for pg in groups:
        if isinstance(pg, dist.ProcessGroup):
            try:  # work in flight on a broken round would hold the group's threads until the timeout
                pg._get_backend(torch.device("cpu")).abort()
            except Exception:
                pass
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = _Runtime()
    groups.clear()
    gc.collect()


def _require_init() -> _Runtime:
    if not _state.initialized:
        raise NotInitializedError()
    return _state


def require_init(what: str) -> None:
    """Raise NotInitializedError naming `what` unless init() ran."""
    if not _state.initialized:
        raise NotInitializedError(what)


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
    """The number of workers on this node (parameter servers are not counted, as size() does not count them)."""
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
    """The strategy this job trains with: the latest DistributedOptimizer's, else the one the job was started for
    (singa-launch --strategy, SINGA_STRATEGY, sd.init(strategy=...)), 'allreduce' when none."""
    return _require_init().strategy


def job_strategy() -> str:
    """The strategy the job was started for (singa-launch --strategy, SINGA_STRATEGY, sd.init(strategy=...)):
    what a DistributedOptimizer given no strategy uses."""
    return _require_init().job_strategy


def note_strategy(name: str) -> None:
    """A DistributedOptimizer trains with `name` (what strategy_name() reports from now on)."""
    _require_init().strategy = name


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


def named_process_group(name: str):
    """The group of all workers that `request_worker_group(name)` asked for (None in a single process)."""
    return _require_init().named_pgs.get(name)


def launcher() -> str:
    """What started this process: "singa-launch", "torchrun", "mpirun", "srun" or "none"."""
    return _require_init().launcher


def backend() -> str:
    """The torch.distributed backend of the job ("gloo", "cpu:gloo,cuda:nccl", ...; "none" in a single process)."""
    return _require_init().backend


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


# What the layers above do when the process leaves the job, by phase, in this order:
SHUTDOWN_PHASES = ("drain", "close", "release")
# ...and "abandon", alone, when the process dies of an uncaught exception: stop the threads that could run
# Python code for a peer (an RPC agent's) without waiting for anyone, before the interpreter is taken apart.
_ABANDON = "abandon"
_hooks: dict[str, list] = {phase: [] for phase in SHUTDOWN_PHASES + (_ABANDON,)}  # (callable or weak method, persistent)


def on_shutdown(close, weak: bool = False, *, phase: str = "close", persistent: bool = False) -> None:
    """Call `close()` at `shutdown()`, before the process groups go.

    phase: "drain" (wait for communication in flight; skipped when leaving because of an error), "close"
           (strategies release their resources), "release" (goodbyes to parameter servers). Within a phase
           the latest registered runs first. "abandon" hooks run instead of all these when the interpreter
           exits because of an uncaught exception: they stop communication threads without waiting for peers.
    weak: hold a bound method weakly, so that registering does not keep its object alive (nothing is called
          if the object is gone by then).
    persistent: keep the hook for every later shutdown (a module's own hook, registered when it is
          imported); otherwise it runs once."""
    if phase not in _hooks:
        raise ValueError(f"phase must be one of {', '.join(SHUTDOWN_PHASES + (_ABANDON,))}, got {phase!r}")
    _hooks[phase].append((weakref.WeakMethod(close) if weak else (lambda: close), persistent))


def _run_hooks(phase: str, errors: list) -> None:
    hooks = _hooks[phase]
    _hooks[phase] = [h for h in hooks if h[1]]
    for get, _ in reversed(hooks):
        close = get()
        try:
            if close is not None:
                close()
        except Exception as exc:  # one failed hook must not keep the other resources from being released
            errors.append(exc)


def shutdown() -> None:
    """Leave the job. In order: wait for the asynchronous collectives still in flight, close the strategies
    that asked to be closed, release the parameter servers (they exit once every worker has left), meet
    every other process of the job (bounded by the job's timeout; a RuntimeError names the processes that
    never came), then destroy the process groups and let go of them, so that their communication threads end
    while the interpreter is whole.

    Called while an exception propagates (e.g. from a `finally:` block) it does not wait for the others, who
    may be waiting for this process in a collective. Safe to call twice or without init()."""
    _leave(meeting_s=None if sys.exc_info()[1] is None else 0.0)


def _leave(meeting_s: float | None, strict: bool = True) -> None:
    """shutdown(): meet the others for up to `meeting_s` seconds (None: the job's timeout; 0: do not wait for
    them); raise the first error if `strict`, else print it."""
    global _leave_deadline
    errors = []
    if meeting_s != 0.0 and _state.distributed:
        # One timeout for every meeting of the way out (leaving the RPC group, the final meeting): a process that
        # never comes is waited for once, not once per meeting.
        _leave_deadline = time.monotonic() + (_state.timeout_s if meeting_s is None else min(meeting_s, _state.timeout_s))
    try:
        _leave_now(meeting_s, strict, errors)
    finally:
        _leave_deadline = None


def _leave_now(meeting_s: float | None, strict: bool, errors: list) -> None:
    global _state
    if meeting_s != 0.0 and _state.distributed:
        _run_hooks("drain", errors)  # communication still in flight holds tensors on the groups' threads
    _run_hooks("close", errors)
    _run_hooks("release", errors)
    _stop_recording()  # this process's part is complete before it meets the others
    groups = []
    if _state.distributed and dist.is_initialized():
        if meeting_s != 0.0:
            waited = _state.timeout_s if meeting_s is None else min(meeting_s, _state.timeout_s)
            bound = max(_leave_deadline - time.monotonic(), 0.001) if _leave_deadline is not None else waited
            publish_where(WHERE_EXIT if _leaving_at_exit else WHERE_SHUTDOWN)
            missing = _meet(bound)
            if _state.proc_rank == 0:  # every process that came has written its part
                for path in sorted(_timeline_paths):
                    try:
                        _gather_timeline(path, wait_s=0.0, final=not missing)
                    except Exception as exc:
                        print(f"singa_dist.shutdown(): could not write the timeline {path}: {exc}", file=sys.stderr,
                              flush=True)
            if missing:
                names = ", ".join(str(p) for p in missing)
                elsewhere = {p: where_is(p) for p in missing}
                seen = "; ".join(f"process {p} is waiting in {w['where']} after {w['steps']} optimizer step(s)"
                                 for p, w in elsewhere.items() if w)
                if seen:
                    blame(missing, f"the ranks ran different numbers of steps ({seen}; process {_state.proc_rank}: "
                                   f"{_state.steps} step(s), in singa_dist.shutdown())", neutral=True)
                    seen = (f": {seen}, while this process took {_state.steps} step(s): the ranks ran different "
                            "numbers of steps")
                else:
                    # Separate servers wait for every worker's goodbye: a missing worker keeps them too.
                    workers = [p for p in missing if p < _state.topology.nworkers] or missing
                    blame(workers, f"process{'es' if len(workers) > 1 else ''} {', '.join(map(str, workers))} "
                                   "did not reach singa_dist.shutdown()")
                errors.append(RuntimeError(
                    f"process {_state.proc_rank}: process{'es' if len(missing) > 1 else ''} {names} did not reach "
                    f"singa_dist.shutdown() within {waited:g} s{seen or ' (stopped, hung, or still working)'}; "
                    "the process groups were destroyed without them"))
        # (A process outside a group holds a marker, not a group.)
        groups = [weakref.ref(pg) for pg in {dist.group.WORLD, _state.workers_pg, *_state.group_pgs.values(),
                                             *_state.named_pgs.values()} if isinstance(pg, dist.ProcessGroup)]
        dist.destroy_process_group()
    _state = _Runtime()
    _timeline_paths.clear()
    # A group's C++ side ends, joining its communication threads, when its last reference goes; a strategy
    # that kept one may sit in a reference cycle with its optimizer. A communication thread that outlives the
    # interpreter aborts the process at exit ("terminate called without an active exception").
    if any(ref() is not None for ref in groups):
        gc.collect()
    if errors:
        if strict:
            raise errors[0]
        print(f"singa_dist.shutdown() at exit: {errors[0]}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The timeline (Horovod's): every process records its own part; process 0 merges them

TIMELINE_VARIABLES = ("SINGA_TIMELINE", "HOROVOD_TIMELINE")
# Files this process recorded for in this job (process 0 merges them at shutdown), each with the number of times it
# started recording for it: the processes of a job count alike, and each recording has keys of its own.
_timeline_paths: dict[str, int] = {}
# How long process 0's stop_timeline() waits for the other workers to stop recording before merging what is there
# (the rest is merged at shutdown()).
TIMELINE_STOP_WAIT_S = 10.0


def _timeline_from_environment() -> None:
    for variable in TIMELINE_VARIABLES:
        value = os.environ.get(variable)
        if value and value.upper() != "DYNAMIC":  # Horovod's DYNAMIC: recording starts from the script
            try:
                start_timeline(value, mark_cycles=env_flag("HOROVOD_TIMELINE_MARK_CYCLES"))
            except OSError as exc:
                raise RuntimeError(f"{variable}={value}: {exc}") from None
            return


def job_key(kind: str) -> str:
    """The prefix of this job's keys of `kind` in the store: new for every init() and restart, since a launcher's
    store can outlive them (an elastic round's store has a prefix of its own already)."""
    return f"singa/{kind}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_inits}/"


def _timeline_key(path: str) -> str:
    return f"{job_key('timeline')}{path}/{_timeline_paths.get(path, 0)}/"


def _store():
    try:
        return job_store() if _state.distributed and dist.is_initialized() else None
    except Exception:
        return None


def start_timeline(file_path, mark_cycles: bool = False) -> None:
    """Record a timeline of this job into `file_path` (Horovod's start_timeline): a Chrome trace with one track per
    rank and parameter server, written by process 0 when recording stops (stop_timeline() or shutdown()).

    Call it on every worker (each records its own spans; a worker that does not call it has no track). Servers
    record when the timeline is started from the environment (SINGA_TIMELINE, singa-launch --timeline).
    mark_cycles: an instant event at the start of every optimizer step. Raises OSError when the file cannot be
    written."""
    if not _state.initialized:
        raise NotInitializedError("start_timeline()")
    path = os.path.abspath(os.fspath(file_path))
    if timeline.active_path() == path:
        return
    timeline.check_writable(path)
    if timeline.active_path() is not None:
        stop_timeline()
    _timeline_paths[path] = _timeline_paths.get(path, 0) + 1
    prefix, store = _timeline_key(path), _store()
    token = uuid.uuid4().hex
    if store is not None:  # the parts of one job's recording share a token (other jobs may reuse the name)
        token = store.compare_set(prefix + "token", "", token).decode()
    role = _state.role
    name = f"rank {_state.rank}" if role.is_worker else f"server {_state.proc_rank - _state.topology.nworkers}"
    timeline.start(path, _state.proc_rank, name, token, mark_cycles)
    if store is not None:
        store.set(prefix + f"started/{_state.proc_rank}", "1")


def stop_timeline() -> None:
    """Stop recording (Horovod's stop_timeline); process 0 then writes the file from every worker's part. Without a
    timeline being recorded it warns, as Horovod logs, and does nothing."""
    if not _state.initialized:
        raise NotInitializedError("stop_timeline()")
    path = _stop_recording()
    if path is None:
        warnings.warn("stop_timeline(): no timeline is being recorded (start one with start_timeline(), "
                      "SINGA_TIMELINE or singa-launch --timeline)", stacklevel=2)
        return
    if _state.proc_rank == 0:
        _gather_timeline(path, wait_s=TIMELINE_STOP_WAIT_S, final=False)


def _stop_recording() -> str | None:
    path = timeline.stop()
    store = _store()
    if path is not None and store is not None:
        try:
            store.set(_timeline_key(path) + f"stopped/{_state.proc_rank}", "1")
        except Exception:
            pass
    return path


def _gather_timeline(path: str, wait_s: float, final: bool) -> None:
    """Process 0: merge the parts of `path` into it, after waiting up to `wait_s` for the workers that record for it
    to stop. The parts are deleted once every process that recorded has stopped (`final`: at shutdown, after the
    meeting, when every process came); until then a later merge rewrites the file with more."""
    store, prefix, token, complete = _store(), _timeline_key(path), None, final
    if store is not None:
        token = store.get(prefix + "token").decode() if store.check([prefix + "token"]) else None
        started = [p for p in range(_state.proc_size) if store.check([prefix + f"started/{p}"])]
        keys = [prefix + f"stopped/{p}" for p in started]
        workers = [prefix + f"stopped/{p}" for p in started if p < _state.topology.nworkers]
        if wait_s > 0 and workers:
            try:
                store.wait(workers, datetime.timedelta(seconds=wait_s))
            except Exception:
                pass
        complete = all(store.check([k]) for k in keys)
    timeline.merge(path, token, remove_parts=complete)


def _abandon_timeline() -> None:
    timeline.stop()  # what was recorded reaches this process's part before the process dies


PROGRESS_S = 1.0  # how often a worker of an asynchronous job says how far it is (see _meet_live)
_progress_said = 0.0


def count_step() -> None:
    """A DistributedOptimizer step began (what publish_where reports). In an asynchronous job a worker also says
    its step count in the store every PROGRESS_S: the others, done, wait for a group that is still training (a
    replacement runs the script from its start) as long as it goes on, and give up on one that stalls."""
    global _progress_said
    _state.steps += 1
    if tracks_lost():  # (a replacement's job is one too)
        now = time.monotonic()
        if now - _progress_said > PROGRESS_S:
            _progress_said = now
            try:
                job_store().set(f"{job_key('progress')}{_state.proc_rank}", str(_state.steps))
            except Exception:
                pass


def _where_key(proc: int) -> str:
    return f"{job_key('where')}{proc}"


def publish_where(what: str) -> None:
    """Say where this process is stuck (a collective it waits in, or shutdown()), with its step count, so that
    the others can say which rank is where when they fail too."""
    try:
        store = job_store()
        store.set(_where_key(_state.proc_rank), json.dumps({"where": what, "steps": _state.steps}))
    except Exception:
        pass


def where_is(proc: int, wait_s: float = 3.0) -> dict | None:
    """What process `proc` published with publish_where ({"where": ..., "steps": ...}), waiting a little for it
    (it may be noticing its own failure right now); None if it said nothing."""
    try:
        store = job_store()
        deadline = time.monotonic() + wait_s
        while True:
            if store.check([_where_key(proc)]):
                return json.loads(store.get(_where_key(proc)).decode())
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
    except Exception:
        return None


def steps() -> int:
    return _state.steps


# (changes seen, {process: times singa-launch lost it}, {process: times a replacement took its place},
#  {process: the generation of the replacement singa-launch started for it})
_lost: tuple[int, dict, dict, dict] = (0, {}, {}, {})


def _lost_prefix() -> str:
    return f"{LOST_KEY_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _root_store():
    """The job's store itself, without the default group's prefix (singa-launch writes there)."""
    store = job_store()
    return getattr(store, "_underlying_non_prefix_store", store)


def _lost_counts() -> tuple[dict, dict, dict]:
    """How many times singa-launch lost each process of an asynchronous job (Downpour, Hybrid, Hogwild) with its
    worker group, how many times a replacement took its place since (singa-launch --max-restarts), and the
    generation of the replacement started for it (announced before the loss)."""
    global _lost
    if not _state.initialized or not _state.distributed or not dist.is_initialized():
        return {}, {}, {}
    try:
        store = _root_store()
        prefix = _lost_prefix()
        changes = store.add(prefix + "changes", 0)
        if changes != _lost[0]:
            lost, back, coming = {}, {}, {}
            for p in range(_state.proc_size):
                if store.check([f"{prefix}{p}"]):
                    lost[p] = int(store.add(f"{prefix}{p}", 0))
                    if store.check([f"{prefix}back/{p}"]):
                        back[p] = int(store.add(f"{prefix}back/{p}", 0))
                    if store.check([f"{prefix}coming/{p}"]):
                        coming[p] = int(store.get(f"{prefix}coming/{p}"))
            _lost = (changes, lost, back, coming)
    except Exception:  # the store is gone with the job
        pass
    return _lost[1], _lost[2], _lost[3]


def lost_procs() -> frozenset:
    """The processes of worker groups singa-launch found lost in an asynchronous job (Downpour, Hybrid, Hogwild),
    with no replacement on its way or joined since: the others no longer wait for them. Empty elsewhere."""
    lost, back, coming = _lost_counts()
    return frozenset(p for p, n in lost.items() if n > back.get(p, 0) and coming.get(p, 0) < n)


def times_lost() -> dict:
    """{process: how many times singa-launch lost it} (a replacement of the n-th loss is generation n)."""
    return dict(_lost_counts()[0])


def replacements_coming() -> dict:
    """{process: the generation of the replacement singa-launch started for it} (announced before the loss)."""
    return dict(_lost_counts()[2])


def replaced_procs() -> frozenset:
    """The processes whose place a replacement took (they talk to the servers through ps.sockets, not torch RPC)."""
    return frozenset(_lost_counts()[1])


def is_replacement() -> bool:
    """Whether this process replaces a lost worker of an asynchronous job (its group came after the job formed)."""
    return _state.initialized and _state.replacement > 0


def replacement_generation() -> int:
    return _state.replacement


def job_store():
    """The key-value store every process of the job shares keys through (the default group's)."""
    if _state.job_store is not None:
        return _state.job_store
    return dist.distributed_c10d._get_default_store()


def _join_replacement_group(backend: str, topology, proc_rank: int, wait, generation: int) -> None:
    """A worker of a group that replaces a lost one: the group's workers form a default process group of their own
    through the job's store (hosted by singa-launch); the job's groups formed long ago, without them."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        root = dist.TCPStore(host, port, is_master=False, timeout=wait, wait_for_workers=False, multi_tenant=True)
    except Exception as exc:
        raise RuntimeError(f"process {proc_rank}: the job's store at {host}:{port} (singa-launch's) did not answer: "
                           f"{exc}") from exc
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    group = topology.role_of(proc_rank).group
    ranks = topology.worker_ranks(group)
    dist.init_process_group(backend=backend, rank=ranks.index(proc_rank), world_size=len(ranks), timeout=wait,
                            store=dist.PrefixStore(f"singa/replacement/{attempt}/{group}/{generation}/", root))
    # The original processes' default group (the job's first, "0") keeps its keys under "0/".
    _state.job_store = dist.PrefixStore("0/", root)
    _state.replacement = generation


def _mark_back(proc_rank: int) -> None:
    """A replacement has joined: the others count this process as live again."""
    store = _root_store()
    prefix = _lost_prefix()
    store.add(f"{prefix}back/{proc_rank}", 1)
    store.add(prefix + "changes", 1)


def replacement_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what}: rank {_state.rank} belongs to worker group {_state.role.group}, which replaced a lost group of this "
        f"asynchronous job: the job's process groups formed without it, so it has no collectives across worker "
        "groups (the groups exchange through the parameter servers, or Hogwild's masters); collectives inside "
        "its own worker group work")


def _meet(timeout: float) -> list[int]:
    """Wait until every process of the job has come here (through the job's key-value store); return the
    processes that did not come within `timeout` seconds."""
    store = job_store()
    me, n = _state.proc_rank, _state.proc_size
    prefix = job_key("shutdown")
    asynchronous = strategy_kind(_state.job_strategy).asynchronous
    try:
        store.set(f"{prefix}at/{me}", "1")
        if store.add(prefix + "count", 1) == n:
            store.set(prefix + "all", "1")
        if asynchronous:
            _meet_live(store, prefix, n, timeout)
        else:
            store.wait([prefix + "all"], datetime.timedelta(seconds=max(timeout, 0.001)))
    except Exception:
        try:
            lost = lost_procs()
            return [p for p in range(n) if p not in lost and not store.check([f"{prefix}at/{p}"])]
        except Exception:  # the store went with the process that hosts it (process 0)
            return [0]
    # Process 0 hosts the store: it stays until every process has seen the others arrive.
    try:
        if store.add(prefix + "passed", 1) == n - len(lost_procs()):
            store.set(prefix + "all-passed", "1")
        if me == 0:
            store.wait([prefix + "all-passed"], datetime.timedelta(seconds=min(timeout, 30.0)))
    except Exception:
        pass
    return []


def tracks_lost() -> bool:
    """Whether singa-launch drops this job's lost worker groups (an asynchronous job of several groups): then the
    others meet through barrier_live, which does not wait for them."""
    return (_state.initialized and _state.launcher == "singa-launch" and _state.topology.nworker_groups > 1
            and strategy_kind(_state.job_strategy).asynchronous)


# barrier_live calls so far, by (workers or every process, what): the same everywhere, and for a replacement too,
# which meets the others only at the end
_live_meetings: dict = {}


def barrier_live(what: str, processes: bool = False, timeout: float | None = None) -> None:
    """A barrier of every worker (`processes`: every process, servers too) that singa-launch has not lost (an
    asynchronous job), through the job's store: a worker group lost before or while the others wait here is not
    waited for, as a collective would wait for it."""
    key = (processes, what)
    _live_meetings[key] = number = _live_meetings.get(key, 0) + 1
    n = _state.proc_size if processes else _state.size
    store = job_store()
    tag = zlib.crc32(what.encode())
    prefix = f"{job_key('live')}{'p' if processes else 'w'}{tag}.{number}/"
    store.set(f"{prefix}at/{_state.proc_rank}", "1")
    store.add(prefix + "count", 1)
    timeout = _state.timeout_s if timeout is None else timeout
    try:
        _meet_live(store, prefix, n, timeout)
    except TimeoutError:
        lost = lost_procs()
        missing = [p for p in range(n) if p not in lost and not store.check([f"{prefix}at/{p}"])]
        blame(missing, f"process{'es' * (len(missing) > 1)} {', '.join(map(str, missing))} did not reach {what}")
        raise RuntimeError(f"process {_state.proc_rank}: worker process{'es' * (len(missing) > 1)} "
                           f"{', '.join(map(str, missing))} did not reach {what} within {timeout:g} s") from None


def _meet_live(store, prefix: str, n: int, timeout: float) -> None:
    """_meet in an asynchronous job: every process has come, or every one that singa-launch has not lost. A worker
    still training (its step count in the store moves: a group that replaced a lost one, a slow group) is waited for
    as long as it goes on; the timeout counts from its last step."""
    global _leave_deadline
    deadline = time.monotonic() + timeout
    if _leave_deadline is not None:  # shutdown()'s meetings share one deadline
        deadline = min(deadline, _leave_deadline)
    looked, progress = time.monotonic(), {}
    while not store.check([prefix + "all"]):
        if store.add(prefix + "count", 0) >= n - len(lost_procs()):
            return
        now = time.monotonic()
        if now - looked > PROGRESS_S:
            looked = now
            for p in range(min(n, _state.topology.nworkers)):
                key = f"{job_key('progress')}{p}"
                if store.check([key]) and not store.check([f"{prefix}at/{p}"]):
                    steps = store.get(key)
                    if progress.setdefault(p, steps) != steps:
                        progress[p] = steps
                        deadline = now + timeout
                        if _leave_deadline is not None:
                            _leave_deadline = max(_leave_deadline, deadline)
        if now > deadline:
            raise TimeoutError(f"the processes did not meet within {timeout:g} s")
        time.sleep(0.05)


_exit_registered = False
_leave_deadline: float | None = None  # while shutdown() runs: when its meetings stop waiting (see _leave)


_dying: BaseException | None = None  # the uncaught exception the script is dying of
_leaving_at_exit = False


on_shutdown(_abandon_timeline, phase=_ABANDON, persistent=True)


def _register_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        atexit.register(_leave_at_exit)
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            global _dying
            if not hasattr(sys, "ps1"):  # an interactive session goes on after an error
                _dying = value
            previous(kind, value, tb)

        sys.excepthook = excepthook
        _exit_registered = True


def _leave_at_exit() -> None:
    """shutdown() for a script that did not call it. A script dying of an uncaught exception leaves at once:
    its peers may be waiting for it in a collective, and the sooner it goes the sooner they learn."""
    if not _state.initialized or not _state.distributed:
        return
    if _dying is not None or getattr(sys, "last_exc", None) is not None or \
            getattr(sys, "last_value", None) is not None:
        _run_hooks(_ABANDON, [])
        if _dying is not None:  # the script's uncaught exception (not an earlier error pytest or a shell kept)
            _die_of(_dying)
        return
    global _leaving_at_exit
    _leaving_at_exit = True
    _leave(meeting_s=EXIT_MEETING_S, strict=False)


def leaving_at_exit() -> bool:
    """Whether this process is leaving the job because it exits (shutdown() at exit, not called by the script)."""
    return _leaving_at_exit


def _die_of(error: BaseException) -> None:
    """End a process that is dying of `error` (its traceback is printed already) without taking the interpreter
    apart: communication threads of torch.distributed may still wait on peers, and destroying their objects
    under them aborts the process (SIGABRT, "terminate called without an active exception") instead of the
    exit status 1 that says the script failed. Output is flushed first; atexit handlers registered before
    init() (logging's) run here."""
    import logging
    try:
        logging.shutdown()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if isinstance(error, KeyboardInterrupt):  # as Python does: die of the signal itself
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(1)
