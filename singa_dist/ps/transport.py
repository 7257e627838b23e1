"""Parameter-server traffic on torch.distributed.rpc (TensorPipe), with timeouts and errors that name the peer.

Every process of the job (workers and servers) joins one RPC group named by process rank ("p<rank>"),
rendezvousing through the same MASTER_ADDR/MASTER_PORT store as the process group. Workers join lazily, when
their first parameter-server strategy is set up (or at `singa_dist.shutdown()`, to release the servers);
servers join in `serve()`. CUDA tensors never travel: callers stage them through pinned host memory.

A worker leaving the job says goodbye to every separate server (`release_servers`); a server learns of it
through the callback it registered with `on_goodbye`, so this module needs nothing from the server's.

A worker group that replaces a lost one (singa-launch --max-restarts under Downpour, Hybrid, Hogwild) comes after
the RPC group formed and cannot join it: its calls go through `ps.sockets` instead, to the door every server (and
every Hogwild worker) of an asynchronous job listens at. Nothing calls a replacement: workers call servers, and
Hogwild's masters are groups never lost. Joining, it tells every separate server that its processes are back
(`on_readmit`).
"""
from __future__ import annotations

import datetime
import logging
import os
import queue
import threading
import warnings

import torch
import torch.distributed.rpc as rpc

from .. import metrics, runtime
from ..environment import NO_SECRET_ADVICE, SECRET_VARIABLE, interface_address, job_secret
from . import sockets

log = logging.getLogger(__name__)

_lock = threading.Lock()
_joined = False
_released = False  # this worker said goodbye to the separate servers already
_side = False  # this process replaces a lost one: every call goes through ps.sockets
_door: sockets.Listener | None = None  # where this process takes calls through ps.sockets
_doors: dict[int, sockets.Connection] = {}  # this process's connections to the others' doors


def proc_name(proc: int) -> str:
    return f"p{proc}"


def describe(proc: int) -> str:
    """A process as people know it: 'server 0.1 (process 5)' or 'worker group 1 (process 1)'."""
    role = runtime.topology().role_of(proc)
    if role.is_server:
        return f"parameter server {role.group}.{role.index} (process {proc})"
    return f"worker group {role.group} (process {proc}, co-located server group {role.group})"


def joined() -> bool:
    return _joined


def join() -> None:
    """Join the job's RPC group (once per process); every process of the job must join."""
    global _joined, _side
    with _lock:
        if _joined:
            return
        if runtime.is_replacement():
            _side = _joined = True
            _readmit_everywhere()
            return
        if "TP_SOCKET_IFNAME" not in os.environ and os.environ.get("GLOO_SOCKET_IFNAME"):
            # TensorPipe otherwise takes the address the host name resolves to, which may not be the job's network.
            os.environ["TP_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"].split(",")[0]
        options = rpc.TensorPipeRpcBackendOptions(init_method="env://", rpc_timeout=runtime.timeout_s(),
                                                  num_worker_threads=16, _transports=["uv"], _channels=["basic"])
        with warnings.catch_warnings():
            # torch's own init_rpc hands a Gloo backend to an object collective and warns about itself.
            warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
            rpc.init_rpc(proc_name(runtime.proc_rank()), rank=runtime.proc_rank(),
                         world_size=runtime.proc_size(), rpc_backend_options=options)
        _joined = True


def leave() -> None:
    """Leave the RPC group once every process of the job has come to leave it too (bounded by the timeout)."""
    global _joined, _side
    with _lock:
        if not _joined:
            return
        _joined = False
        if _side:  # a replacement: it meets the others as they leave, then closes its connections
            _side = False
            try:
                runtime.barrier_live("leaving the RPC group", processes=True, timeout=min(runtime.timeout_s(), 60.0))
            except RuntimeError:
                pass
            _close_doors()
            return
        try:
            # Graceful: every process of the job meets here first, so no peer sees its connections drop
            # mid-message. A peer that died makes it fail after the timeout; the local side still closes. A worker
            # group singa-launch lost would never come: the others meet without it (every exchange is over once
            # every live process is here: the servers' goodbyes, Hogwild's close()) and leave at once.
            graceful = True
            if runtime.tracks_lost():
                try:
                    runtime.barrier_live("leaving the RPC group", processes=True,
                                         timeout=min(runtime.timeout_s(), 60.0))
                except RuntimeError:  # a process that is neither here nor lost: leave without it
                    graceful = False
                # Everyone came: torch's graceful goodbye closes every connection cleanly (no peer sees a pipe
                # drop); with a lost group it would wait for that group's processes in vain.
                # A replaced process never joined the RPC group: its original is waited for in vain too.
                graceful = graceful and not runtime.lost_procs() and not runtime.replaced_procs()
            rpc.shutdown(graceful=graceful, timeout=min(runtime.timeout_s(), 60.0))
        except Exception:
            pass
        _close_doors()


def abandon() -> None:
    """The process dies of an uncaught exception: stop the RPC agent at once. Left running, its threads would
    serve a peer's call (the others' leaving meets through process 0) while the interpreter is taken apart,
    which aborts the process."""
    global _joined, _side
    if not _joined:
        return
    _joined = False
    if _side:
        _side = False
    else:
        try:
            rpc.shutdown(graceful=False)
        except Exception:
            pass
    _close_doors()


runtime.on_shutdown(abandon, phase="abandon", persistent=True)


def call_async(proc: int, fn, *args, timeout: float | None = None) -> torch.futures.Future:
    """Run fn(*args) on process `proc`; the future fails with a timeout after `timeout` s (default: sd's)."""
    if timeout is None:
        timeout = runtime.timeout_s()
    try:
        if _side:
            return _door_call(proc, fn, args, timeout)
        return rpc.rpc_async(proc_name(proc), fn, args=args, timeout=timeout)
    except Exception as exc:
        raise PeerError(proc, fn.__name__, exc, timeout) from None


# ---- ps.sockets: the doors of an asynchronous job ---------------------------------------------------------------
def _door_key(proc: int) -> str:
    return f"{runtime.job_key('door')}{proc}"


def door_host() -> str:
    """Where this process's door listens: on the interface the job's torch traffic is told to use (singa-launch
    --network-interface, TP_SOCKET_IFNAME / GLOO_SOCKET_IFNAME; loopback for a job on one host), else at the address
    the job's other hosts reach this one by, seen from the way to the store's host."""
    for name in (os.environ.get("TP_SOCKET_IFNAME"), (os.environ.get("GLOO_SOCKET_IFNAME") or "").split(",")[0]):
        if name:
            try:
                return interface_address(name)
            except OSError:
                pass
    return sockets.local_address(os.environ.get("MASTER_ADDR", "127.0.0.1"))


def listen() -> None:
    """Take calls through ps.sockets too (servers and Hogwild workers of an asynchronous job), at an address the
    job's store gives. Without the job's secret no door opens: the job runs, but a lost worker group cannot be
    replaced (said once, on this process's log)."""
    global _door
    if _door is not None:
        return
    key = job_secret()
    if key is None:
        log.warning("%s opens no door for replacement worker groups: %s is not set, so a worker group lost in "
                    "this job cannot be replaced (%s)", describe(runtime.proc_rank()), SECRET_VARIABLE,
                    NO_SECRET_ADVICE)
        return
    host = door_host()
    _door = sockets.Listener(host, key)
    runtime.job_store().set(_door_key(runtime.proc_rank()), f"{host} {_door.port}")


def _door_call(proc: int, fn, args: tuple, timeout: float) -> torch.futures.Future:
    conn = _doors.get(proc)
    if conn is None or conn.broken is not None:
        key = job_secret()
        if key is None:
            raise RuntimeError(f"a replacement worker group calls the others through ps.sockets, which needs the "
                               f"job's secret, and {SECRET_VARIABLE} is not set ({NO_SECRET_ADVICE})")
        store = runtime.job_store()
        name = _door_key(proc)
        store.wait([name], datetime.timedelta(seconds=timeout))
        host, port = store.get(name).decode().split()
        conn = _doors[proc] = sockets.Connection((host, int(port)), describe(proc),
                                                 connect_timeout=min(timeout, 30.0), key=key)
    return conn.call(fn, args, timeout)


def _close_doors() -> None:
    global _door
    for conn in _doors.values():
        conn.close()
    _doors.clear()
    if _door is not None:
        _door.close()
        _door = None


def wait(proc: int, future: torch.futures.Future, what: str):
    """The answer of a call; a failed call raises PeerError naming the peer."""
    t0 = metrics.now() if metrics.on else 0
    try:
        return _answer(proc, future, what)
    finally:
        if t0:
            metrics.waited(t0)


def _answer(proc: int, future: torch.futures.Future, what: str):
    try:
        answer = future.wait()
    except PeerError:
        raise
    except Exception as exc:
        raise PeerError(proc, what, exc) from None
    if isinstance(answer, BaseException):  # an asynchronous handler's failure arrives as its answer
        raise PeerError(proc, what, answer)
    return answer


def wait_all(calls: list[tuple[int, torch.futures.Future]], what: str) -> list:
    """The results of several calls, in order. Failures are taken in the order they happen: a server that died
    fails its call at once and is named, rather than a live server that waits for it and times out later."""
    t0 = metrics.now() if metrics.on else 0
    finished: queue.SimpleQueue = queue.SimpleQueue()
    for index, (_, future) in enumerate(calls):
        future.add_done_callback(lambda _, index=index: finished.put(index))
    answers = [None] * len(calls)
    try:
        for _ in calls:
            index = finished.get()
            answers[index] = _answer(*calls[index], what)  # raises PeerError for a failed call
    finally:
        if t0:
            metrics.waited(t0)
    return answers


def call(proc: int, fn, *args, timeout: float | None = None):
    return wait(proc, call_async(proc, fn, *args, timeout=timeout), fn.__name__)


class PeerError(RuntimeError):
    """A parameter server (or co-located server) failed, died or did not answer in time."""

    def __init__(self, proc: int, what: str, cause: BaseException, timeout: float | None = None,
                 message: str | None = None):
        self.proc = proc
        if message is not None:  # the caller found out more than the call's failure says
            super().__init__(message)
            return
        text = str(cause).strip().splitlines()
        detail = text[0] if text else type(cause).__name__
        for line in text:  # a remote exception's own message is more telling than the wrapper's first line
            if "Error" in line and len(line) < 400:
                detail = line.strip()
        lowered = str(cause).lower()
        if "different numbers of steps" in detail:  # the server answered that a worker left before the others
            how = "reports"
            runtime.blame([proc], detail[detail.index("the ranks ran"):], neutral=True)
        elif "timeout" in lowered or "timed out" in lowered:  # torch's RPC says so when the time ran out
            how = f"did not answer within {runtime.timeout_s() if timeout is None else timeout:g}s"
        elif "On WorkerInfo" in str(cause) or isinstance(cause, sockets.RemoteError):  # the handler raised there
            how = "raised"
        else:
            how = "failed or died (its connection closed, or it raised)"
        super().__init__(f"{describe(proc)} {how} during {what}: {detail}")


_goodbye_callback = None


def on_goodbye(callback) -> None:
    """On a server: `callback(worker_proc)` runs when a worker says goodbye (None: stop listening)."""
    global _goodbye_callback
    _goodbye_callback = callback


@sockets.handler
def goodbye(worker_proc: int) -> None:
    """RPC handler (runs on a server): worker `worker_proc` has left the job."""
    if _goodbye_callback is None:
        raise RuntimeError(f"process {runtime.proc_rank()} is not serving parameters")
    _goodbye_callback(worker_proc)


_readmit_callback = None


def on_readmit(callback) -> None:
    """On a server: `callback(worker_proc, generation)` runs when a replacement of a lost worker joins."""
    global _readmit_callback
    _readmit_callback = callback


@sockets.handler
def readmit(worker_proc: int, generation: int) -> None:
    """Handler (runs on a server): the `generation`-th replacement of worker `worker_proc` has joined the job."""
    if _readmit_callback is None:
        raise RuntimeError(f"process {runtime.proc_rank()} is not serving parameters")
    _readmit_callback(worker_proc, generation)


def _readmit_everywhere() -> None:
    """A replacement joining: every separate server takes its group back (before the group opens a table)."""
    topo = runtime.topology()
    if not topo.server_worker_separate:
        return
    me, generation = runtime.proc_rank(), runtime.replacement_generation()
    calls = [(proc, call_async(proc, readmit, me, generation)) for proc in topo.server_ranks()]
    wait_all(calls, "readmit")


def release_servers() -> None:
    """A worker's goodbye: tell every separate server that this worker is done, then leave the RPC group.
    Servers exit when every worker has said it. A server that is gone already is skipped. Once per job."""
    global _released
    if _released:
        return
    _released = True
    join()
    topo = runtime.topology()
    me = runtime.proc_rank()
    futures = [(proc, call_async(proc, goodbye, me, timeout=min(runtime.timeout_s(), 10.0)))
               for proc in topo.server_ranks()]
    for proc, fut in futures:
        try:
            fut.wait()
        except Exception:
            pass
    leave()


def leave_job() -> None:
    """shutdown()'s "release" phase: a worker of a job with separate servers releases them (they wait for
    every worker's goodbye, whether or not this worker used them); any other process leaves the RPC group."""
    global _released
    topo = runtime.topology() if runtime.is_initialized() else None
    if topo is not None and runtime.is_distributed() and runtime.role().is_worker \
            and topo.server_worker_separate and topo.nservers > 0:
        release_servers()
    else:
        leave()
    _released = False  # the next job has servers of its own
