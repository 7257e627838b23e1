"""Negotiation: before any data moves, the ranks of a process set agree on what each collective is.

Horovod's coordinator checks every collective's name, kind, dtype, shape, op and root across the ranks
before running it; a mismatch becomes an error on every rank instead of a crash or a wrong answer. Here:

- Every collective of a process set (`Request`) gets the next sequence number k on each rank and a fixed-size
  header: its kind, a hash of everything that must agree (name, kind, dtype, shape, op, root, scale factors,
  ...) and the per-rank facts the exchange needs (the first dimension for allgather, the byte count of a
  pickled object). The headers of submission k are all-gathered on the set's *negotiation* group, at once
  and asynchronously: submitting never blocks. When every worker runs on one host they go through shared
  memory instead (singa_dist.shared_headers), for a few microseconds rather than a collective.
- Fast path: every rank sent the same kind and hash. The exchange runs on the set's *data* group, in
  sequence order on every rank, so the data of one collective never meets that of another.
- Slow path: the hashes differ, or a rank has joined. Every rank sees the same headers, so every rank takes
  the slow path for k: the ranks all-gather their full descriptions (on the data group, at position k) and
  either raise the same `CollectiveMismatchError` (naming the collective, the ranks and the fields that
  differ) or, with joined ranks, run the collective with the joined ranks taking part with zeros.
- The header exchange is the response cache: a signature's hash is computed once per name and signature,
  and ranks that agree pay one small all-gather that overlaps their work; descriptions travel only when
  something differs.

Data exchanges are issued when a rank processes its queue: on every submission (without waiting) and when
it waits for a result. `join()` keeps a rank that has run out of data taking part in the others'
collectives (as zeros) until every rank has joined. Gradient rounds of `DistributedOptimizer` announce
themselves here too (kind "gradients"), so that a joined rank takes part in them and a rank doing something
else is named at once.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import threading
import weakref

import torch
import torch.distributed as dist

from . import primitives, runtime, shared_headers, timeline
from .primitives import CollectiveError, Handle

HEADER = 8  # int64 fields of a header, in this order:
K, KIND, HASH, DIM0, NUMEL, DTYPE, FLAGS, EXTRA = range(HEADER)
JOINED = 1  # header flag: the rank has joined (it has no more data)

KINDS = ("allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "barrier", "join", "gradients",
         "grouped_allreduce", "grouped_allgather", "grouped_reducescatter", "broadcast_object",
         "allgather_object")
DTYPES = (None, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

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
    joinable = False  # may run while some ranks have joined (they take part with zeros)

    def __init__(self, name: str):
        self.name = name
        # Unnamed collectives are numbered per process ("allreduce.noname.7"): ranks that issued different
        # numbers of them (uneven steps before join) still match them by position, so the number is not compared.
        head, sep, _ = name.partition(".noname.")
        self.match_name = head + ".noname" if sep else name

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
        member's header), contributing nothing (zeros, no rows) and keeping nothing. Only kinds with
        `joinable = True` are asked."""
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
    __slots__ = ("k", "request", "header", "handle", "error", "done", "result", "t0", "t1")

    def __init__(self, k, request, header, t0=0):
        self.k, self.request, self.header = k, request, header
        self.handle: Handle | None = None
        self.error: BaseException | None = None
        self.done = False
        self.result = None
        self.t0 = t0  # timeline: when it was submitted (0: not recording)...
        self.t1 = 0  # ...and when its negotiation was settled on this rank


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


class _Engine:
    """Sequence numbers, headers and the queue of one process set on this rank."""

    def __init__(self, process_set: ProcessSet, header_pg, data_pg, strategy_pg):
        self.process_set = process_set
        self.header_pg, self.data_pg, self.strategy_pg = header_pg, data_pg, strategy_pg
        self.members = runtime.topology().worker_ranks() if process_set.process_set_id == 0 else process_set.ranks
        self.index = self.members.index(runtime.rank())
        self.n = len(self.members)
        self.k = 0
        self.queue: collections.deque[_Entry] = collections.deque()  # negotiating, in sequence order
        self.names: dict[str, _Entry] = {}  # names in flight (duplicates are refused)
        self.lock = threading.RLock()
        self.joined_at: int | None = None  # the sequence number at which this rank joined
        self.shadows: list = []  # what a joined rank took part in, still in flight
        self.progressing = False
        # On one host the headers go through shared memory instead of header_pg (see singa_dist.shared_headers).
        self.shared = None
        if header_pg is not None and shared_headers.wanted(self.n):
            self.shared = shared_headers.SharedHeaders(
                self.members, self.index, HEADER, f"{runtime.job_key('negotiation')}{header_pg.group_name}/",
                group=header_pg)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
        for pg in (self.header_pg, self.data_pg, self.strategy_pg):
            if pg is not None and pg is not runtime.workers_process_group():
                try:
                    dist.destroy_process_group(pg)
                except Exception:
                    pass

    def describe_set(self) -> str:
        return "" if self.process_set.process_set_id == 0 else f" in process set {self.process_set.process_set_id}"

    # ---- submitting ------------------------------------------------------------------------------------
    def submit(self, request: Request, flags: int = 0) -> _Entry:
        with self.lock:
            if request.name in self.names:
                raise ValueError(
                    "Requested to allreduce, allgather, or broadcast a tensor with the same name as another tensor "
                    "that is currently being processed.  If you want to request another tensor, use a different "
                    f"tensor name. (rank {runtime.rank()}: '{request.name}')")
            t0 = timeline.now() if timeline.on else 0
            self.k += 1
            dim0, numel, dtype, extra = request.header()
            mine = [self.k, KINDS.index(request.kind), signature_hash(request.signature()), dim0, numel, dtype, flags,
                    extra]
            what = f"{request.label}{self.describe_set()}"
            if self.shared is not None:
                header = self.shared.post(mine, what)
            else:
                rows = torch.empty(self.n * HEADER, dtype=torch.int64)
                header = primitives.all_gather_into(rows, torch.tensor(mine, dtype=torch.int64), what,
                                                    group=self.header_pg, async_op=True,
                                                    finish=lambda: rows.view(self.n, HEADER))
            entry = _Entry(self.k, request, header, t0)
            if t0:
                header.timeline_what = f"negotiation of {what}"
            self.names[request.name] = entry
            self.queue.append(entry)
        self.progress(block_until=None)
        return entry

    # ---- processing the queue --------------------------------------------------------------------------
    def progress(self, block_until: _Entry | None) -> None:
        """Settle negotiated entries in sequence order and start their exchanges; with `block_until`, wait for
        negotiations up to and including that entry."""
        with self.lock:
            if self.progressing:
                return  # re-entered from inside an exchange (tracking new work polls old handles)
            self.progressing = True
            try:
                self._progress(block_until)
            finally:
                self.progressing = False

    def _progress(self, block_until: _Entry | None) -> None:
        while self.queue:
            entry = self.queue[0]
            blocking = block_until is not None and block_until.k >= entry.k
            if not blocking and not entry.header.is_completed():
                return
            try:
                rows = entry.header.wait()
            except Exception as exc:  # a member is missing: the entry fails (the error names it)
                self._fail(entry, exc)
                self.queue.popleft()
                continue
            if entry.t0 and not entry.t1:
                _negotiated(entry)
            if not self._settle(entry, rows, blocking):
                return  # the slow path needs everyone: it runs when this rank waits
            self.queue.popleft()

    def _settle(self, entry: _Entry, rows: torch.Tensor, blocking: bool) -> bool:
        """Decide what entry k is (the same decision on every member) and start it; False to postpone."""
        table = rows.tolist()  # (Python: a few tensor operations would cost more than the rest of a step's checks)
        joined = [row[FLAGS] & JOINED for row in table]
        if all(joined):
            self._finish_join(entry, rows)
            return True
        kind, signature = table[0][KIND], table[0][HASH]
        if not any(joined) and all(row[KIND] == kind and row[HASH] == signature for row in table):
            if getattr(entry.request, "stages", 1) > 1 and not blocking:
                return False  # an exchange in several dependent steps runs when this rank waits
            try:
                entry.handle = entry.request.exchange(self, rows)
            except Exception as exc:
                self._fail(entry, exc)
            return True
        if not blocking:
            return False
        self._slow_path(entry, rows)
        return True

    def _slow_path(self, entry: _Entry, rows: torch.Tensor) -> None:
        joined = [self.members[i] for i in range(self.n) if rows[i, FLAGS] & JOINED]
        mine = {"joined": True} if entry.request.kind == "join" else entry.request.describe()
        everyone = primitives.all_gather_object(
            mine, f"the descriptions of {entry.request.name}{self.describe_set()} (they differ across ranks)",
            group=self.data_pg)
        descs = {self.members[i]: d for i, d in enumerate(everyone) if not d.get("joined")}
        active = next(iter(descs.values()))
        problem = describe_differences({r: {"kind": d["kind"], "name": d["name"]} for r, d in descs.items()})
        if problem:
            problem = (f"the ranks issued different collectives at the same point{self.describe_set()} "
                       f"({problem}); every rank must issue the same collectives in the same order")
        else:
            problem = _kinds[active["kind"]].mismatch(descs)
            if problem is None and joined and not _kinds[active["kind"]].joinable:
                problem = (f"{active['kind']} is not supported while rank{'s' if len(joined) > 1 else ''} "
                           f"{', '.join(map(str, joined))} {'have' if len(joined) > 1 else 'has'} joined "
                           f"(join() lets the others go on with allreduce only)")
        if entry.request.kind == "join":
            if problem is None:
                # Take part with zeros, without waiting: a gradient round's data comes only once the others finish
                # their backward pass, which may need this rank in collectives negotiated after this one.
                self.shadows.append(_kinds[active["kind"]].shadow(self, active, rows))
            entry.handle = primitives.done(None)
            return
        if problem is not None:
            self._fail(entry, CollectiveMismatchError(f"rank {runtime.rank()}: {entry.request.name}: {problem}"))
            return
        try:
            entry.handle = entry.request.exchange(self, rows)
        except Exception as exc:
            self._fail(entry, exc)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        entry.error = error
        entry.handle = None

    def _finish_join(self, entry: _Entry, rows: torch.Tensor) -> None:
        """Every member has joined: the result is the rank that joined last (the latest sequence number at
        joining; the highest rank among equals, as Horovod's coordinator reports it)."""
        at = rows[:, EXTRA].tolist()
        last = max(range(self.n), key=lambda i: (at[i], i))
        entry.handle = primitives.done(self.members[last])

    # ---- results ---------------------------------------------------------------------------------------
    def wait(self, entry: _Entry):
        if not entry.done:
            try:
                self.progress(block_until=entry)
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
        if entry.error is not None:
            raise entry.error
        return entry.result

    def completed(self, entry: _Entry) -> bool:
        if entry.done:
            return True
        self.progress(block_until=None)
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


def submit(request: Request, process_set=None, finish=None) -> Coordinated:
    """Negotiate `request` among the members of `process_set` (all workers by default) and start it."""
    engine = engine_of(resolve_set(process_set))
    return Coordinated(engine, engine.submit(request), finish)


# --------------------------------------------------------------------------------------------------------------
# join, and the gradient rounds of DistributedOptimizer

@register("join")
class _JoinRequest(Request):
    def __init__(self, joined_at: int):
        super().__init__("join.noname")
        self.joined_at = joined_at

    def header(self):
        return 0, 0, 0, self.joined_at


def join() -> int:
    """This rank has no more data: it takes part in the other ranks' allreduces (and gradient steps) with zeros
    until every rank has joined, then returns the rank that joined last (Horovod's join)."""
    engine = engine_of(global_process_set)
    with engine.lock:
        engine.joined_at = engine.k + 1
    try:
        while True:
            entry = engine.submit(_JoinRequest(engine.joined_at), flags=JOINED)
            result = engine.wait(entry)
            if entry.header.wait()[:, FLAGS].bitwise_and(JOINED).all():
                return result
    finally:
        engine.joined_at = None
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
    same plan), and so that a joined rank takes part (its owner's `shadow_round()` contributes zeros)."""

    joinable = True

    def __init__(self, plan: int, round_number: int, label: str):
        super().__init__(f"gradients.{plan}.{round_number}")
        self.plan, self._label = plan, label

    @property
    def label(self) -> str:
        return self._label

    def signature(self):
        return (self.kind, self.plan)

    def describe(self):
        return {"kind": self.kind, "name": "gradients", "plan": self.plan, "label": self._label}

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
