"""The launchers of a job on several nodes (--nnodes, --hosts) watch each other through the job's store.

Node 0's launcher hosts the job's store (a TCPStore at --master-port, as torchrun's agent does); every
process of the job, rank 0 included, joins it as a client, so the store lives as long as node 0's launcher
and not as long as rank 0. Each launcher keeps a heartbeat there:

- a node whose launcher dies (SIGKILL, power loss) stops beating: node 0's launcher notices after STALE_S
  and stops the job, naming that node;
- node 0's launcher dying takes the store with it: the other launchers' next heartbeat fails and they stop
  their processes, saying that node 0's launcher is gone;
- at the end, a launcher whose processes all finished well marks itself done, and node 0's launcher keeps
  the store up until every node is done (or has stopped beating), so a slower node is never cut short.

Processes that sleep in user code, and so never reach a collective that would fail, are stopped this way too.

In an asynchronous job (Downpour, Hybrid, Hogwild) on one node the launcher hosts the store the same way, so that
the store outlives rank 0's worker group, and marks there the processes of a worker group it lost (`mark_lost`).
"""
from __future__ import annotations

import datetime
import socket
import threading
import time

import torch.distributed as dist

from singa_dist.environment import LOST_KEY_PREFIX, init_key, store_listen_fd

HEARTBEAT_S = 1.0
STALE_S = 10.0  # a launcher whose heartbeat stood still this long is gone
CONNECT_S = 600.0  # how long a node's launcher waits for node 0's to open the store
OP_TIMEOUT_S = 30.0  # one store operation on a host that vanished without closing its connections


def is_this_host(host: str) -> bool:
    """Whether `host` names this machine (by name, or by an address one of its interfaces holds)."""
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


_rendezvous_store = None  # node 0's store of a c10d rendezvous: the job's store from then on (NodeWatch)


def take_node_rank(addr: str, port: int, nnodes: int, run_id: str, timeout_s: float) -> int:
    """torchrun's c10d rendezvous for a job of `nnodes` fixed nodes, each launcher started without --node-rank: the
    launcher on the endpoint's host that can open the store there is node 0; the others number themselves 1, 2, ...
    in the order they come. Node 0 waits until every other node has its number, then closes that store (its
    NodeWatch keeps that store as the job's: the others' launchers and processes connect to it once more)."""
    key = f"singa/rdzv/{run_id}/taken"
    wait = datetime.timedelta(seconds=timeout_s)
    if is_this_host(addr):
        try:
            store = dist.TCPStore(addr, port, is_master=True, wait_for_workers=False, timeout=wait,
                                  master_listen_fd=store_listen_fd(addr, port))
        except Exception:  # another launcher of this host hosts it: this one is not node 0
            store = None
        if store is not None:
            deadline = time.monotonic() + timeout_s
            while store.add(key, 0) < nnodes - 1:
                if time.monotonic() > deadline:
                    came = store.add(key, 0)
                    raise OSError(f"the rendezvous at {addr}:{port} (job {run_id}): {came} of the other "
                                  f"{nnodes - 1} node(s) came within {timeout_s:g} s")
                time.sleep(0.05)
            global _rendezvous_store
            _rendezvous_store = store
            return 0
    try:
        client = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False, timeout=wait)
    except Exception as exc:
        raise OSError(f"the rendezvous at {addr}:{port} (node 0's launcher) did not answer within {timeout_s:g} s: "
                      f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    rank = client.add(key, 1)
    del client
    if rank > nnodes - 1:
        raise OSError(f"the rendezvous at {addr}:{port} (job {run_id}) has all its {nnodes} nodes already: this "
                      f"node is one too many (--nnodes {nnodes})")
    return rank


class NodeWatch:
    """One attempt's store and heartbeat on one node. `problem` becomes a sentence once a peer is gone."""

    def __init__(self, master_addr: str, master_port: int, node: int, nnodes: int, attempt: int):
        self.addr, self.port, self.node, self.nnodes = master_addr, master_port, node, nnodes
        self.prefix = f"singa/launchers/{attempt}/"
        self.attempt = attempt
        self.problem: str | None = None
        self._stop = threading.Event()
        self._store = None
        if node == 0 and _rendezvous_store is not None:
            self._store = _rendezvous_store  # opened by the rendezvous: every attempt's keys have their own prefix
            self._store.set_timeout(datetime.timedelta(seconds=OP_TIMEOUT_S))
        elif node == 0:
            try:
                # Listening at the job's address alone (loopback for a job on one host), not on every interface.
                self._store = dist.TCPStore(master_addr, master_port, is_master=True, wait_for_workers=False,
                                            timeout=datetime.timedelta(seconds=OP_TIMEOUT_S),
                                            master_listen_fd=store_listen_fd(master_addr, master_port))
            except Exception as exc:
                raise OSError(f"cannot host the job's store at port {master_port} on node 0: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        self._thread = threading.Thread(target=self._run, name="singa-launch-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _key(self, what: str, node: int) -> str:
        return f"{self.prefix}{what}/{node}"

    def _run(self) -> None:
        if self.node != 0:
            try:
                self._store = dist.TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                                            timeout=datetime.timedelta(seconds=CONNECT_S))
                self._store.set_timeout(datetime.timedelta(seconds=OP_TIMEOUT_S))
            except Exception:
                # Node 0 never came: this node's processes fail their rendezvous and say so themselves.
                return
        store = self._store
        seen: dict[int, tuple[str, float]] = {}  # node -> (last heartbeat, when it changed)
        beat = 0
        while not self._stop.is_set():
            try:
                store.set(self._key("alive", self.node), str(beat))
                if self.node == 0:
                    self._check_others(store, seen)
            except Exception as exc:
                if self._stop.is_set():
                    return
                if self.node != 0:
                    self.problem = (f"node 0's launcher is gone: the job's store at {self.addr}:{self.port}, "
                                    f"which it hosts, stopped answering ({str(exc).splitlines()[0] if str(exc) else exc!r})")
                    return
            beat += 1
            self._stop.wait(HEARTBEAT_S)

    def _heartbeat_age(self, store, node: int, seen: dict) -> tuple[str | None, float]:
        """`node`'s latest heartbeat (None before its first) and how long it has stood still; `seen` keeps, per
        node, the value last read and when it changed."""
        key = self._key("alive", node)
        value = store.get(key).decode() if store.check([key]) else None
        now = time.monotonic()
        if node not in seen or seen[node][0] != value:
            seen[node] = (value, now)
        return value, now - seen[node][1]

    def _check_others(self, store, seen: dict) -> None:
        for node in range(1, self.nnodes):
            if store.check([self._key("done", node)]):
                continue
            value, still = self._heartbeat_age(store, node, seen)
            if value is not None and still > STALE_S and self.problem is None:
                self.problem = (f"node {node}'s launcher stopped answering (no heartbeat in the job's store "
                                f"for {STALE_S:g} s): it was killed, or its host is gone")

    def joined(self, procs: list[int]) -> bool:
        """Whether these processes came to the job's rendezvous (the keys singa_dist.runtime's init() sets there): a
        process lost before it would leave the others waiting in theirs."""
        store = self._store
        try:
            return store is not None and store.check([init_key(self.attempt, 0, p) for p in procs])
        except Exception:
            return False

    def mark_lost(self, procs: list[int]) -> None:
        """Tell the job's processes that these processes were lost with their worker group (an asynchronous job
        goes on without them): keys singa_dist.runtime.lost_procs() reads."""
        store = self._store
        if store is None:
            return
        prefix = f"{LOST_KEY_PREFIX}{self.attempt}/"
        try:
            for proc in procs:  # how many times each was lost (a replacement may take its place each time)
                store.add(f"{prefix}{proc}", 1)
            store.add(prefix + "changes", 1)
        except Exception:  # the store is gone: the job is ending anyway
            pass

    def mark_coming(self, procs: list[int], generation: int) -> None:
        """Tell the servers, before the loss itself, that replacement `generation` of these lost processes is on its
        way (singa_dist.runtime.replacements_coming()): they keep serving for it."""
        store = self._store
        if store is None:
            return
        try:
            for proc in procs:
                store.set(f"{LOST_KEY_PREFIX}{self.attempt}/coming/{proc}", str(generation))
        except Exception:
            pass

    def finish(self, ok: bool, stopped=lambda: False) -> None:
        """This node's processes have ended (well when `ok`). Node 0 keeps the store up while other nodes still
        run, unless `stopped()` says the launcher was told to stop; every node stops beating."""
        store = self._store
        if store is not None and ok and self.problem is None:
            try:
                store.set(self._key("done", self.node), "1")
            except Exception:
                pass
            if self.node == 0:
                self._wait_for_others(store, stopped)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=OP_TIMEOUT_S + 1)

    def _wait_for_others(self, store, stopped) -> None:
        """Until every other node is done, or stopped beating for STALE_S."""
        pending = set(range(1, self.nnodes))
        seen: dict = {}
        while pending and self.problem is None and not stopped():
            for node in sorted(pending):
                try:
                    if store.check([self._key("done", node)]) or self._heartbeat_age(store, node, seen)[1] > STALE_S:
                        pending.discard(node)
                except Exception:
                    return
            if pending:
                time.sleep(HEARTBEAT_S / 4)

    def close(self) -> None:
        self._stop.set()
        self._store = None  # node 0: the store's server stops with its last reference
