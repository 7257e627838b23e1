"""Negotiation: before any data moves, the ranks of a process set agree on what each collective is.

Horovod's coordinator matches collectives across the ranks by name and checks their kind, dtype, shape, op and
root before running them; a mismatch becomes an error on every rank instead of a crash or a wrong answer. Here:

- Every collective of a process set (`Request`) gets a fixed-size header: a hash of its name (unnamed ones also
  carry their place among this process's unnamed collectives of that kind, and match by it), its kind, a hash of
  everything that must agree (name, kind, dtype, shape, op, root, scale factors, ...) and the per-rank facts the
  exchange needs (the first dimension for allgather, the byte count of a pickled object). Submitting never
  blocks.
- The ranks exchange headers in rounds: in each round every member sends one block (the headers it submitted
  since its last block, and whether it has joined, waits, or has waited with no news for a while), through
  shared memory when every worker runs on this host, else by an all-gather on the set's *negotiation* group
  (singa_dist.shared_headers). A rank takes part in a round when it has something to send or waits for a
  result; every member reads every block, so every member keeps the same table of pending collectives.
- A collective is ready once every member sent its header (or has joined). The collectives that became ready
  in a round run in the same order on every member (by where they first appeared), on the set's *data* group:
  - fast path: every header has the same kind and hash;
  - slow path: the hashes differ, or ranks have joined. Every member all-gathers its full description and
    either raises the same `CollectiveMismatchError` (naming the collective, the ranks and the fields that
    differ) or, with joined ranks, runs the collective with them taking part with zeros (allreduce, gradient
    steps, barriers; other kinds raise, as in Horovod).
- Every member waits and no round brings news: a rank submitted what the others never will (different names,
  or an order that cannot complete). Every member then says what it waits for, and every pending collective
  fails with the same error. Long before that, after HOROVOD_STALL_CHECK_TIME_SECONDS, a waiting rank warns
  which ranks have not submitted what it waits for (Horovod's stall check).

Gradient rounds of `DistributedOptimizer` announce themselves here too (kind "gradients"), so that a joined
rank takes part in them and a rank doing something else is named at once.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import os
import threading
import time
import weakref

import torch
import torch.distributed as dist

from . import primitives, runtime, shared_headers, timeline
from .primitives import CollectiveError, Handle

HEADER = 9  # int64 fields of a collective's header, in this order:
MATCH, PLACE, KIND, HASH, DIM0, NUMEL, DTYPE, FLAGS, EXTRA = range(HEADER)
# A round's block: these fields, then the headers of at most MAX_REQUESTS collectives.
ROUND_FIELDS = 3
ROUND, FLAGS_AT, COUNT = range(ROUND_FIELDS)
MAX_REQUESTS = 16
BLOCK = ROUND_FIELDS + MAX_REQUESTS * HEADER
# Flags (of a header passed to an exchange, and of a block): the rank has joined (it has no more data); and, of a
# block, the rank waits for a collective, and has waited for a while with no news.
JOINED, WAITING, STUCK = 1, 2, 4
JOINABLE = ("allreduce", "grouped_allreduce", "barrier", "gradients")  # what runs while ranks have joined (Horovod)
_JOINED_ROW = [JOINED if i == FLAGS else 0 for i in range(HEADER)]
LEFT_CHECK_S = 0.5  # how often a rank waiting for an all-gather round asks whether the others are in shutdown()

KINDS = ("allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "barrier", "join", "gradients",
         "grouped_allreduce", "grouped_allgather", "grouped_reducescatter", "broadcast_object",
         "allgather_object")
DTYPES = (None, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

log = logging.getLogger(__name__)

runtime.request_worker_group("negotiation")
runtime.request_worker_group("collectives")


class CollectiveMismatchError(CollectiveError):
    """The ranks submitted collectives that do not match (name, kind, shape, dtype, op, root, ...)."""


def dtype_code(dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else 0


# --------------------------------------------------------------------------------------------------------------
# Process sets

class ProcessSet:
    """A subset of the workers that runs collectives of its own (Horovod's process set).

    Create it on every worker in the same order, with `add_process_set(ranks)` (or `init(process_sets=[...])`);
    pass it as `process_set=` to collectives and to DistributedOptimizer. Ranks are worker ranks; a root rank
    given to a collective is a worker rank too, not the rank within the set.
    """

    def __init__(self, ranks):
        try:
            ranks = sorted(ranks)
        except TypeError:
            raise ValueError("ProcessSet should be initialized with a list of process ranks") from None
        if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
            raise ValueError("ProcessSet should be initialized with a list of process ranks")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ProcessSet ranks must be distinct, got {ranks}")
        self.ranks = ranks
        self.process_set_id: int | None = None
        self._engine: _Engine | None = None

    def size(self) -> int | None:
        """The number of workers in the set (None until it is registered)."""
        if self.process_set_id is None:
            return None
        return runtime.size() if self.process_set_id == 0 else len(self.ranks)

    def rank(self) -> int | None:
        """This worker's rank within the set (None until it is registered)."""
        if self.process_set_id is None:
            return None
        if self.process_set_id == 0:
            return runtime.rank()
        if runtime.rank() not in self.ranks:
            raise ValueError("Process is not part of provided process set.")
        return self.ranks.index(runtime.rank())

    def included(self) -> bool | None:
        """True when this worker belongs to the set."""
        if self.process_set_id == 0:
            return runtime.is_initialized()
        return runtime.rank() in self.ranks

    def __repr__(self) -> str:
        ranks = "all workers" if self.process_set_id == 0 else self.ranks
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={ranks})"


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0
_sets: dict[int, ProcessSet] = {0: global_process_set}
_lock = threading.RLock()


def resolve_set(process_set) -> ProcessSet:
    """The registered ProcessSet meant by `process_set` (None: all workers)."""
    if process_set is None or process_set is global_process_set:
        return global_process_set
    if not isinstance(process_set, ProcessSet):
        raise ValueError(f"process_set must be a ProcessSet (from add_process_set), got {process_set!r}")
    if process_set.process_set_id is None or _sets.get(process_set.process_set_id) is not process_set:
        raise ValueError(f"{process_set} does not exist, or has not been registered (add_process_set)")
    return process_set


def add_process_set(process_set) -> ProcessSet:
    """Register a process set (a ProcessSet or a list of worker ranks) and return it.

    Every worker must call it, in the same order as the others (every worker takes part in creating the set's
    groups, as in Horovod).
    """
    if not isinstance(process_set, ProcessSet):
        process_set = ProcessSet(process_set)
    size = runtime.size()
    bad = [r for r in process_set.ranks if not 0 <= r < size]
    if bad or not process_set.ranks:
        raise ValueError(f"a process set needs worker ranks between 0 and {size - 1}, got {process_set.ranks}")
    with _lock:
        if process_set.process_set_id is not None:
            raise ValueError(f"Attempted to add a duplicate process set: {process_set}")
        if any(s.ranks == process_set.ranks for i, s in _sets.items() if i):
            raise ValueError(f"Attempted to add a duplicate process set: {process_set} (the same ranks are "
                             "registered already)")
        # The lowest free id, as Horovod reuses the ids of removed sets (the same on every worker).
        process_set.process_set_id = next(i for i in range(1, len(_sets) + 2) if i not in _sets)
        _sets[process_set.process_set_id] = process_set
    if runtime.is_distributed():
        topology = runtime.topology()
        if topology.nprocs != topology.nworkers:
            raise ValueError("process sets need a job of workers only: this one has separate parameter servers")
        # Every worker takes part in creating every set's groups, in the same order (as torch.distributed
        # requires); the members keep them.
        wait = datetime.timedelta(seconds=runtime.timeout_s())
        groups = [dist.new_group(process_set.ranks, timeout=wait) for _ in range(3)]
        if runtime.rank() in process_set.ranks:
            process_set._engine = _Engine(process_set, *groups)
    return process_set


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set; False for the global set or one that is not registered."""
    with _lock:
        if process_set.process_set_id in (None, 0) or _sets.get(process_set.process_set_id) is not process_set:
            return False
        del _sets[process_set.process_set_id]
        process_set.process_set_id = None
        engine, process_set._engine = process_set._engine, None
    if engine is not None:
        engine.close()
    return True


def process_sets() -> list[ProcessSet]:
    return [s for _, s in sorted(_sets.items())]


def engine_of(process_set: ProcessSet) -> "_Engine":
    """The negotiation engine of a set this worker belongs to."""
    if process_set.process_set_id == 0:
        engine = global_process_set._engine
        if engine is None or engine.header_pg is not runtime.named_process_group("negotiation"):
            engine = global_process_set._engine = _Engine(
                global_process_set, runtime.named_process_group("negotiation"),
                runtime.named_process_group("collectives"), runtime.workers_process_group())
        return engine
    if process_set._engine is None:
        raise ValueError(f"Rank {runtime.rank()} is not a member of the provided process set.")
    return process_set._engine


def _forget_sets() -> None:
    """shutdown(): process sets belong to one job; after it every set but the global one is gone."""
    with _lock:
        for i, s in list(_sets.items()):
            if s._engine is not None and s._engine.shared is not None:
                s._engine.shared.close()
            if i:
                s.process_set_id = None
                s._engine = None
                del _sets[i]
        global_process_set._engine = None
        _round_owners.clear()


runtime.on_shutdown(_forget_sets, phase="release", persistent=True)
runtime.on_reset(_forget_sets, phase="leave")  # an elastic round's sets and engines go with it


# --------------------------------------------------------------------------------------------------------------
# Requests

class Request:
    """One rank's side of a collective. Subclasses (in singa_dist.collectives) say what must agree and how the
    data travels."""

    kind = "?"

    def __init__(self, name: str):
        self.name = name
        # Named collectives match by name, as in Horovod. Unnamed ones are numbered per process
        # ("allreduce.noname.7"); they match by their place among the unnamed ones of their kind, so that ranks
        # that issued different numbers of other collectives still agree.
        head, sep, _ = name.partition(".noname.")
        self.match_name = head + ".noname" if sep else name
        self.ordered = bool(sep)  # matched by its place among this process's collectives of the same match_name

    @property
    def label(self) -> str:
        """How errors name this collective: "allreduce of loss (2, 3)"."""
        prefix, _, rest = self.name.partition(".")
        if rest.startswith("noname."):
            rest = f"an unnamed tensor (#{rest[7:]})"
        shape = getattr(self, "desc", {}).get("shape")
        return f"{prefix} of {rest or self.name}" + (f" {shape}" if shape is not None else "")

    def signature(self) -> tuple:
        """Everything that must be the same on every rank."""
        return (self.kind, self.match_name)

    def header(self) -> tuple[int, int, int, int]:
        """(dim0, numel, dtype code, extra): per-rank facts the exchange needs, sent with the header."""
        return 0, 0, 0, 0

    def describe(self) -> dict:
        """What the other ranks are told when something differs (and what a joined rank needs to take part)."""
        return {"kind": self.kind, "name": self.match_name}

    @classmethod
    def mismatch(cls, descs: dict[int, dict]) -> str | None:
        """Why the ranks' descriptions (rank -> describe()) cannot run together, or None."""
        return describe_differences(descs)

    def exchange(self, engine: "_Engine", rows: torch.Tensor) -> Handle:
        """Start the data exchange on engine.data_pg (rows: every member's header, in set order)."""
        return primitives.done(None)

    @classmethod
    def shadow(cls, engine: "_Engine", desc: dict, rows: torch.Tensor) -> Handle:
        """On a joined rank: take part in a collective that an active rank described as `desc` (rows: every
        member's header), contributing nothing (zeros) and keeping nothing. Only the kinds in JOINABLE are
        asked."""
        return primitives.done(None)


_kinds: dict[str, type] = {}


def register(*kinds: str):
    """Class decorator: the Request class of these kinds (a joined rank looks it up to take part)."""
    def wrap(cls):
        cls.kind = kinds[0]
        for kind in kinds:
            _kinds[kind] = cls
        return cls
    return wrap


_hashes: dict = {}


def signature_hash(signature: tuple) -> int:
    value = _hashes.get(signature)
    if value is None:
        if len(_hashes) > 100_000:
            _hashes.clear()
        digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
        value = _hashes[signature] = int.from_bytes(digest, "little", signed=True)
    return value


_FIELD_NAMES = {"kind": "operations", "dtype": "data types", "shape": "tensor shapes", "op": "reduction operations",
                "root": "root ranks", "scale": "prescale and/or postscale factors", "device": "CPU/GPU device selection",
                "name": "tensor names"}


def describe_differences(descs: dict[int, dict], fields=None) -> str | None:
    """'Mismatched <field>: rank 0 sent X, rank 1 sent Y' for every field that differs across the ranks."""
    ranks = sorted(descs)
    fields = fields or [f for f in descs[ranks[0]] if f not in ("dim0", "per_rank")]
    problems = []
    for field in fields:
        values = {r: descs[r].get(field) for r in ranks}
        if len({repr(v) for v in values.values()}) > 1:
            by_value: dict = {}
            for r, v in values.items():
                by_value.setdefault(repr(v), []).append(r)
            parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} sent {v}" for v, rs in by_value.items()]
            problems.append(f"Mismatched {_FIELD_NAMES.get(field, field)}: {'; '.join(parts)}")
    return ". ".join(problems) or None


# --------------------------------------------------------------------------------------------------------------
# The engine of one process set

class _Entry:
    """One collective this rank submitted: negotiated, then started, then waited for."""

    __slots__ = ("key", "request", "row", "handle", "error", "done", "result", "t0", "t1", "submitted")

    def __init__(self, key, request, row, t0=0):
        self.key, self.request, self.row = key, request, row
        self.handle: Handle | None = None
        self.error: BaseException | None = None
        self.done = False
        self.result = None
        self.t0 = t0  # timeline: when it was submitted (0: not recording)...
        self.t1 = 0  # ...and when its negotiation was settled on this rank
        self.submitted = time.monotonic()

    @property
    def started(self) -> bool:
        return self.handle is not None or self.error is not None


class _Pending:
    """A collective some member submitted and not every member has yet: each member's header (or None), and
    where it first appeared (round, member, position), which orders the collectives that become ready together."""

    __slots__ = ("rows", "order")

    def __init__(self, n: int, order: tuple):
        self.rows: list = [None] * n
        self.order = order


# What became of a pending collective once every member has it (or has joined), in the order every member runs them.
FAST, SLOW, REFUSED, STALLED, JOINED_ALL = "fast", "slow", "refused", "stalled", "joined_all"


class _Decision:
    __slots__ = ("what", "key", "pending", "message")

    def __init__(self, what, key=None, pending=None, message=None):
        self.what, self.key, self.pending, self.message = what, key, pending, message


def _lane(request: Request) -> str:
    """The timeline lane of a collective: its name (numbers of unnamed ones left out), as Horovod's rows."""
    return "negotiation" if request.kind == "gradients" else request.match_name


def _negotiated(entry: _Entry) -> None:
    """Timeline: entry's negotiation ended on this rank."""
    entry.t1 = timeline.now()
    request = entry.request
    if request.kind == "gradients":
        timeline.record("negotiate", entry.t0, entry.t1, lane="negotiation", tensor=request.label)
    else:
        timeline.record(f"negotiate {request.name}", entry.t0, entry.t1, lane=_lane(request), cat="negotiate")


def _seconds(variable: str, default: float) -> float:
    try:
        return float(os.environ.get(variable, default))
    except ValueError:
        return default


class _Engine:
    """The negotiation of one process set on this rank: rounds of blocks, the table of pending collectives
    (the same on every member), and the decisions, run in the same order on every member."""

    def __init__(self, process_set: ProcessSet, header_pg, data_pg, strategy_pg):
        self.process_set = process_set
        self.header_pg, self.data_pg, self.strategy_pg = header_pg, data_pg, strategy_pg
        self.members = runtime.topology().worker_ranks() if process_set.process_set_id == 0 else process_set.ranks
        self.index = self.members.index(runtime.rank())
        self.n = len(self.members)
        self.lock = threading.RLock()
        self.names: dict[str, _Entry] = {}  # names in flight (duplicates are refused)
        self.ordinals: dict[int, int] = {}  # match-name hash -> the last place used by an ordered collective
        self.outbox: collections.deque[_Entry] = collections.deque()  # submitted, not yet in a block
        self.mine: dict[tuple, _Entry] = {}  # (match hash, place) -> this rank's entry, not yet started
        self.table: dict[tuple, _Pending] = {}  # what every member knows is pending
        self.ready: collections.deque[_Decision] = collections.deque()
        self.round = 0  # rounds completed
        self.in_flight = False  # this rank's block of round self.round + 1 is posted
        self.joined = False  # this rank has joined (join() is running)
        self.join_rounds = [0] * self.n  # the round in which each member was first seen joined
        self.join_entry: _Entry | None = None
        self.shadows: list = []  # what a joined rank took part in, still in flight
        self.waiting_for: _Entry | None = None
        self.quiet_since: float | None = None  # waiting, and no round has brought anything new since then
        self.warned_at: float | None = None
        self.pause = 0.0
        self.broken: BaseException | None = None
        self.progressing = False
        self.stall_grace = _seconds("SINGA_STALL_GRACE_SECONDS", 0.5)
        self.stall_warning = (0.0 if os.environ.get("HOROVOD_STALL_CHECK_DISABLE", "0") not in ("", "0") else
                              _seconds("HOROVOD_STALL_CHECK_TIME_SECONDS", 60.0))
        self.cycle_s = _seconds("HOROVOD_CYCLE_TIME", 1.0) / 1000.0
        self.left_checked = 0.0
        self.channel = None
        if header_pg is not None:
            if shared_headers.wanted(self.n):
                self.channel = shared_headers.SharedRounds(
                    self.members, self.index, BLOCK, HEADER,
                    f"{runtime.job_key('negotiation')}{header_pg.group_name}/", group=header_pg)
            else:
                self.channel = shared_headers.GatheredRounds(self.n, BLOCK, header_pg)

    @property
    def shared(self):
        """The shared-memory channel, when this set negotiates through one."""
        return self.channel if self.channel is not None and self.channel.shared else None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for pg in (self.header_pg, self.data_pg, self.strategy_pg):
            if pg is not None and pg is not runtime.workers_process_group():
                try:
                    dist.destroy_process_group(pg)
                except Exception as exc:  # the group may be gone with a broken job; nothing waits on it
                    log.debug("destroying a process group of %s: %s", self.process_set, exc)

    def describe_set(self) -> str:
        return "" if self.process_set.process_set_id == 0 else f" in process set {self.process_set.process_set_id}"

    # ---- submitting ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> _Entry:
        with self.lock:
            if request.name in self.names:
                raise ValueError(
                    "Requested to allreduce, allgather, or broadcast a tensor with the same name as another tensor "
                    "that is currently being processed.  If you want to request another tensor, use a different "
                    f"tensor name. (rank {runtime.rank()}: '{request.name}')")
            if self.broken is not None:
                raise CollectiveError(f"rank {runtime.rank()}: the negotiation{self.describe_set()} failed before "
                                      f"{request.label} ({self.broken}); no collective can run on it any more")
            t0 = timeline.now() if timeline.on else 0
            match = signature_hash(("match", request.match_name))
            place = 0
            if request.ordered:
                place = self.ordinals[match] = self.ordinals.get(match, 0) + 1
            dim0, numel, dtype, extra = request.header()
            row = [match, place, KINDS.index(request.kind), signature_hash(request.signature()), dim0, numel, dtype,
                   0, extra]
            entry = _Entry((match, place), request, row, t0)
            self.names[request.name] = entry
            self.mine[entry.key] = entry
            self.outbox.append(entry)
        self.progress(None)
        return entry

    # ---- rounds ----------------------------------------------------------------------------------------
    def progress(self, until: _Entry | None) -> None:
        """Run what is decided and move the rounds on without waiting; with `until`, wait until that entry (of
        this engine) is started."""
        with self.lock:
            if self.progressing:
                return  # re-entered from inside an exchange (tracking new work polls old handles)
            self.progressing = True
            self.waiting_for = until
            try:
                self._progress(until)
            finally:
                self.progressing = False
                self.waiting_for = None

    def _progress(self, until: _Entry | None) -> None:
        blocking = until is not None
        while True:
            if not self._run_ready(blocking):
                return
            if blocking and until.started:
                return
            if self.in_flight:
                if not blocking and not self.channel.completed():
                    return
                self._absorb(self._wait_round(until))
                continue
            if not (self.outbox or blocking):
                return
            if self.broken is not None:
                raise self.broken
            self._post(blocking)

    def _post(self, waiting: bool) -> None:
        """Contribute this rank's block of the next round: the collectives submitted since the last one (at most
        MAX_REQUESTS), and whether it has joined, waits, or has waited in vain for a while."""
        flags = JOINED if self.joined else 0
        if waiting and not self.outbox:
            now = time.monotonic()
            if self.quiet_since is None:
                self.quiet_since, self.pause = now, 0.0
            else:
                # Rounds that bring nothing new are paced (Horovod's cycle time, at most), and after a grace
                # period say so: when every member says so, nobody can move on.
                self.pause = min(max(self.pause * 2, 0.00002), self.cycle_s)
                time.sleep(self.pause)
                now = time.monotonic()
            flags |= WAITING | (STUCK if now - self.quiet_since >= self.stall_grace else 0)
            self._warn_stall()
        block = [self.round + 1, flags, 0]
        while self.outbox and block[COUNT] < MAX_REQUESTS:
            block += self.outbox.popleft().row
            block[COUNT] += 1
        self.channel.post(block, f"the negotiation of {self._waiting_label()}{self.describe_set()}")
        self.in_flight = True

    def _waiting_label(self) -> str:
        """What this rank waits for, as errors name it."""
        until = self.waiting_for
        if until is None:
            return "collectives"
        return until.request.label if until.request is not None else "join()"

    def _wait_round(self, until: _Entry | None) -> list[list[int]]:
        try:
            blocks = self.channel.wait(self._waiting_label() + self.describe_set(), tick=self._tick)
        except BaseException as exc:
            self.in_flight = False
            self._break(exc)
            raise
        self.in_flight = False
        return blocks

    def _break(self, error: BaseException) -> None:
        """A round failed (a member is gone or too late): the members no longer agree on what is pending, so
        every collective not yet started fails, now and later, with this error."""
        self.broken = error
        for entry in list(self.mine.values()):
            if entry is not self.waiting_for:
                self._fail(entry, error)
        self.mine.clear()
        self.outbox.clear()

    def _absorb(self, blocks: list[list[int]]) -> None:
        """Take in every member's block of the round just completed and decide what became ready."""
        self.round += 1
        news = False
        flags = [b[FLAGS_AT] for b in blocks]
        for i, block in enumerate(blocks):
            if block[ROUND] != self.round:
                self._break(CollectiveError(f"rank {runtime.rank()}: the negotiation{self.describe_set()} lost "
                                            f"step: member {self.members[i]} sent round {block[ROUND]}, this rank "
                                            f"expected {self.round}"))
                raise self.broken
            if flags[i] & JOINED and not self.join_rounds[i]:
                self.join_rounds[i] = self.round
            for p in range(block[COUNT]):
                row = block[ROUND_FIELDS + p * HEADER:ROUND_FIELDS + (p + 1) * HEADER]
                key = (row[MATCH], row[PLACE])
                pending = self.table.get(key)
                if pending is None:
                    pending = self.table[key] = _Pending(self.n, (self.round, i, p))
                pending.rows[i] = row
                news = True
        joined = [bool(f & JOINED) for f in flags]
        complete = sorted(((k, p) for k, p in self.table.items() if all(r is not None for r in p.rows)),
                          key=lambda kp: kp[1].order)
        if all(joined):
            decided = complete + sorted(((k, p) for k, p in self.table.items() if any(r is None for r in p.rows)),
                                        key=lambda kp: kp[1].order)
        else:
            decided = sorted(((k, p) for k, p in self.table.items()
                              if all(r is not None or j for r, j in zip(p.rows, joined))), key=lambda kp: kp[1].order)
        for key, pending in decided:
            del self.table[key]
            self.ready.append(self._decide(key, pending, joined))
        if all(joined):
            self.ready.append(_Decision(JOINED_ALL))
        elif self.table and all(f & STUCK for f in flags):
            stuck = sorted(self.table.items(), key=lambda kp: kp[1].order)
            self.table.clear()
            self.ready.append(_Decision(STALLED, pending=stuck))
        if news or decided:
            self.quiet_since = None
            self.warned_at = None

    def _decide(self, key, pending: _Pending, joined: list[bool]) -> _Decision:
        """The same decision on every member, from what every member sent."""
        rows = pending.rows
        present = [r for r in rows if r is not None]
        missing = [self.members[i] for i, r in enumerate(rows) if r is None]
        kind = KINDS[present[0][KIND]]
        if missing and kind not in JOINABLE:
            return _Decision(REFUSED, key, pending, (
                f"{kind.capitalize()} is not supported with Join at this time (rank{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} {'have' if len(missing) > 1 else 'has'} joined; join() lets the "
                f"others go on with allreduce, gradient steps and barriers only)"))
        if not missing and all(r[KIND] == present[0][KIND] and r[HASH] == present[0][HASH] for r in present):
            return _Decision(FAST, key, pending)
        return _Decision(SLOW, key, pending)

    # ---- running the decisions -------------------------------------------------------------------------
    def _run_ready(self, blocking: bool) -> bool:
        """Start what is decided, in order; False when something needs this rank to wait and it may not."""
        while self.ready:
            decision = self.ready[0]
            entry = self.mine.get(decision.key) if decision.key is not None else None
            needs_wait = decision.what in (SLOW, STALLED) or (
                decision.what == FAST and entry is not None and getattr(entry.request, "stages", 1) > 1)
            if needs_wait and not blocking:
                return False
            self.ready.popleft()
            if entry is not None:
                del self.mine[decision.key]
                if entry.t0 and not entry.t1:
                    _negotiated(entry)
            elif decision.key is not None and decision.key[1]:
                # The others' unnamed collective, settled without one of this rank's (it has joined): this rank's
                # next unnamed one of that kind takes the place after it, as theirs do.
                match, place = decision.key
                self.ordinals[match] = max(self.ordinals.get(match, 0), place)
            try:
                getattr(self, "_run_" + decision.what)(decision, entry)
            except Exception as exc:
                if entry is None:
                    raise
                self._fail(entry, exc)
        return True

    def _rows(self, pending: _Pending) -> torch.Tensor:
        """Every member's header as an n x HEADER tensor; a member that has joined gets a row flagged JOINED."""
        return torch.tensor([r if r is not None else _JOINED_ROW for r in pending.rows], dtype=torch.int64)

    def _run_fast(self, decision: _Decision, entry: _Entry | None) -> None:
        if entry is not None:
            entry.handle = entry.request.exchange(self, self._rows(decision.pending))

    def _run_refused(self, decision: _Decision, entry: _Entry | None) -> None:
        if entry is not None:
            self._fail(entry, CollectiveMismatchError(f"rank {runtime.rank()}: {entry.request.label}: "
                                                      f"{decision.message}"))

    def _run_slow(self, decision: _Decision, entry: _Entry | None) -> None:
        """The headers differ, or some members joined: every member sends its full description."""
        pending = decision.pending
        mine = {"joined": True} if entry is None else entry.request.describe()
        label = entry.request.label if entry is not None else "a collective"
        everyone = primitives.all_gather_object(
            mine, f"the descriptions of {label}{self.describe_set()} (they differ across ranks)", group=self.data_pg)
        descs = {self.members[i]: d for i, d in enumerate(everyone) if not d.get("joined")}
        active = next(iter(descs.values()))
        problem = describe_differences({r: {"kind": d["kind"], "name": d["name"]} for r, d in descs.items()})
        if problem:
            problem = (f"the ranks issued different collectives under one name{self.describe_set()} ({problem}); "
                       "every rank must issue the same collectives")
        else:
            problem = _kinds[active["kind"]].mismatch(descs)
        if entry is None:
            if problem is None:
                # Take part with zeros, without waiting: a gradient round's data comes only once the others finish
                # their backward pass, which may need this rank in collectives negotiated after this one.
                self.shadows.append(_kinds[active["kind"]].shadow(self, active, self._rows(pending)))
            return
        if problem is not None:
            raise CollectiveMismatchError(f"rank {runtime.rank()}: {entry.request.name}: {problem}")
        entry.handle = entry.request.exchange(self, self._rows(pending))

    def _run_stalled(self, decision: _Decision, entry: _Entry | None) -> None:
        """Every member waits for a collective that some member never submitted: nobody can move on. Every
        member says what it waits for, and every pending collective fails with the same explanation."""
        keys = {key for key, _ in decision.pending}
        waits = self._waiting_label()
        pending_here = [e.request.label for k, e in self.mine.items() if k in keys]
        everyone = primitives.all_gather_object(
            {"waits": waits, "pending": pending_here},
            f"what every rank waits for{self.describe_set()} (nobody can move on)", group=self.data_pg)
        said = "; ".join(f"rank {self.members[i]} waits for {d['waits']}" + (
            f" (submitted, not matched: {', '.join(d['pending'])})" if d["pending"] and d["pending"] != [d["waits"]]
            else "") for i, d in enumerate(everyone))
        error = CollectiveMismatchError(
            f"rank {runtime.rank()}: the ranks issued different collectives{self.describe_set()}: {said}. Every rank "
            "must submit the same collectives: named ones are matched by name, unnamed ones by their order")
        for key in keys:
            stuck = self.mine.pop(key, None)
            if stuck is not None:
                self._fail(stuck, error)
            elif key[1]:  # (as _run_ready: the places of unnamed collectives stay aligned)
                self.ordinals[key[0]] = max(self.ordinals.get(key[0], 0), key[1])

    def _run_joined_all(self, decision: _Decision, entry: _Entry | None) -> None:
        """Every member has joined: join() returns the rank that joined last (the highest rank among those that
        joined in the same round, as Horovod's coordinator reports it)."""
        last = max(range(self.n), key=lambda i: (self.join_rounds[i], i))
        self.join_rounds = [0] * self.n
        self.joined = False
        if self.join_entry is not None:
            self.join_entry.handle = primitives.done(self.members[last])

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        entry.error = error
        entry.handle = None

    def _tick(self) -> None:
        """Called every few tens of milliseconds while this rank waits for a round."""
        self._warn_stall()
        if not self.channel.shared:
            self._check_left()

    def _check_left(self) -> None:
        """Across hosts (an all-gather round): a member in shutdown() will never send its block. Its files say so
        through shared memory; here the job's store does (what shutdown() publishes), read every LEFT_CHECK_S."""
        now = time.monotonic()
        if now - self.left_checked < LEFT_CHECK_S:
            return
        self.left_checked = now
        done, exited = {}, set()
        for member in self.members:
            if member != runtime.rank():
                where = runtime.where_is(member, wait_s=0.0)
                if where and where["where"] in (runtime.WHERE_SHUTDOWN, runtime.WHERE_EXIT):
                    done[member] = where["steps"]
                    if where["where"] == runtime.WHERE_EXIT:
                        exited.add(member)
        if done:
            raise primitives.ended_early(done, self._waiting_label() + self.describe_set(), exited=exited)

    def _warn_stall(self) -> None:
        """Horovod's stall check: once a collective of this rank has waited HOROVOD_STALL_CHECK_TIME_SECONDS for
        the others, say which ranks have not submitted it (once per period; the job goes on until its timeout)."""
        if not self.stall_warning or not self.mine:
            return
        now = time.monotonic()
        oldest = min(e.submitted for e in self.mine.values())
        if now - oldest < self.stall_warning or (self.warned_at is not None and
                                                 now - self.warned_at < self.stall_warning):
            return
        self.warned_at = now
        unheard = self.channel.missing() if self.in_flight else None
        lines = []
        for key, entry in self.mine.items():
            if now - entry.submitted < self.stall_warning:
                continue
            pending = self.table.get(key)
            if pending is not None:
                missing = [self.members[i] for i, r in enumerate(pending.rows) if r is None]
            else:
                missing = [self.members[i] for i in unheard] if unheard is not None else None
            who = (f"missing rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}" if missing
                   else "not yet heard from the other ranks")
            lines.append(f"{entry.request.name}: {who}")
        log.warning("rank %d: one or more collectives%s were submitted by a subset of the ranks and have waited for "
                    "the others for more than %g s (the job stops after its timeout, %g s). This may mean that the "
                    "ranks submit different collectives, or that only some ranks submit them. %s",
                    runtime.rank(), self.describe_set(), self.stall_warning, runtime.timeout_s(), "; ".join(lines))

    # ---- results ---------------------------------------------------------------------------------------
    def wait(self, entry: _Entry):
        if not entry.done:
            try:
                if not entry.started:
                    self.progress(until=entry)
                if entry.error is not None:
                    raise entry.error
                entry.result = entry.handle.wait()
            except BaseException as exc:
                entry.error = entry.error or exc
                raise
            finally:
                entry.done = True
                with self.lock:
                    if self.names.get(entry.request.name) is entry:
                        del self.names[entry.request.name]
                    self.mine.pop(entry.key, None)
        if entry.error is not None:
            raise entry.error
        return entry.result

    def completed(self, entry: _Entry) -> bool:
        if entry.done:
            return True
        self.progress(until=None)
        return entry.error is not None or (entry.handle is not None and entry.handle.is_completed())


class Coordinated:
    """The handle of a negotiated collective: `wait()` returns its result (or raises on every rank)."""

    def __init__(self, engine: _Engine, entry: _Entry, finish=None):
        self._engine, self._entry, self._finish = engine, entry, finish
        self._result = None
        self._done = False
        primitives.track(self)

    def is_completed(self) -> bool:
        return self._done or self._engine.completed(self._entry)

    def wait(self):
        if not self._done:
            try:
                value = self._engine.wait(self._entry)
                self._result = value if self._finish is None else self._finish(value)
            finally:
                self._done = True
                primitives.untrack(self)
            entry = self._entry
            if entry.t1 and timeline.on and entry.request.kind != "gradients":
                # The collective itself, named by its tensor (as Horovod's timeline): from its negotiation's end.
                timeline.span(entry.request.name, entry.t1, lane=_lane(entry.request), cat=entry.request.kind)
        return self._result

    __call__ = wait  # Horovod's sparse_allreduce_async hands back a function to call


def submit(request: Request, process_set=None, finish=None) -> Coordinated:
    """Negotiate `request` among the members of `process_set` (all workers by default) and start it."""
    engine = engine_of(resolve_set(process_set))
    return Coordinated(engine, engine.submit(request), finish)


# --------------------------------------------------------------------------------------------------------------
# join, and the gradient rounds of DistributedOptimizer

def join() -> int:
    """This rank has no more data: it takes part in the other ranks' allreduces, gradient steps and barriers with
    zeros until every rank has joined, then returns the rank that joined last (Horovod's join)."""
    engine = engine_of(global_process_set)
    entry = _Entry(None, None, None)
    with engine.lock:
        if engine.joined:
            raise RuntimeError(f"rank {runtime.rank()}: join() is running already (in another thread)")
        engine.joined, engine.join_entry = True, entry
    try:
        while not entry.started:
            engine.progress(until=entry)
        return entry.handle.wait()
    finally:
        with engine.lock:
            engine.joined, engine.join_entry = False, None
        shadows, engine.shadows = engine.shadows, []
        for handle in shadows:
            handle.wait()


_round_owners: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register_round_owner(plan: int, owner) -> None:
    """`owner` (a strategy) takes part in the rounds of `plan` (a hash of its communication: its buckets) when
    this rank has joined; any live owner of the same plan communicates the same way."""
    _round_owners[plan] = owner


@register("gradients")
class GradientRound(Request):
    """A DistributedOptimizer's gradient round: announced so that the ranks check that they all are in one (of the
    same plan), and so that a joined rank takes part (its owner's `shadow_round()` contributes zeros). Rounds match
    by their order: ranks that ran different numbers of steps before joining still agree."""

    def __init__(self, plan: int, round_number: int, label: str):
        super().__init__(f"gradients.{plan}.{round_number}")
        self.plan, self._label = plan, label
        self.match_name, self.ordered = "gradients", True  # a different plan is a mismatch, said as such

    @property
    def label(self) -> str:
        return self._label

    def signature(self):
        return (self.kind, self.plan)

    def describe(self):
        return {"kind": self.kind, "name": "gradients", "plan": self.plan, "label": self._label}

    def exchange(self, engine, rows):
        """The round's result: how many members take part with gradients of their own (the others have joined)."""
        return primitives.done(int((rows[:, FLAGS] & JOINED == 0).sum()))

    @classmethod
    def mismatch(cls, descs):
        problem = describe_differences(descs, ["plan"])
        if problem:
            labels = "; ".join(f"rank {r}: {d['label']}" for r, d in sorted(descs.items()))
            problem = f"the ranks' DistributedOptimizers communicate different gradient buckets ({labels})"
        return problem

    @classmethod
    def shadow(cls, engine, desc, rows):
        owner = _round_owners.get(desc["plan"])
        if owner is None:
            raise CollectiveError(f"rank {runtime.rank()} has joined but has no DistributedOptimizer like the other "
                                  f"ranks' to take part in their gradient step ({desc['label']})")
        return owner.shadow_round()
