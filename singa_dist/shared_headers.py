"""The negotiation's rounds: every member's block of one round, through shared memory or an all-gather.

singa_dist.coordinator matches collectives by name in rounds: in each round every member of a process set
contributes one fixed-size block (the collectives it submitted since its last block, and flags), and every
member reads every block. Two channels carry the rounds:

- `GatheredRounds`: an all-gather of the blocks on the set's negotiation group (members on several hosts, or
  `SINGA_SHM_NEGOTIATION=0`).
- `SharedRounds`: every member on this host writes its blocks into a ring of slots in a file of its own under
  /dev/shm and reads the others' files: a round costs microseconds instead of a collective whose threads
  compete with the backward pass.

A block is (round, flags, count, then count headers). A member's file: META int64 fields (magic, pid, the last round it has read from every member, whether it has
opened every member's file, how it left: 0 while it takes part, else its optimizer steps + 1, the last round it
posted, and whether it left because its process exits without having called shutdown()), then SLOTS
slots of (block, padding to the largest block, checksum of the block). Round r goes into slot r % SLOTS; a reader takes a slot only when it holds round r
and its checksum matches (a half-written slot never passes), and a writer reuses a slot only once every member
has read it. Members find each other's files through the job's store, under keys that are new for every
process set's channel. A file's name is removed once every member has it open, or, if some member never
opened it, when its process exits: a member that leaves (shutdown) keeps its last rounds readable for the
others, and says in its file that it left, so that a member still waiting for it is told at once.
"""
from __future__ import annotations

import array
import atexit
import logging
import mmap
import os
import secrets
import tempfile
import time
import weakref

import torch

from . import primitives, runtime

SLOTS = 8  # a member is never more than two rounds ahead of another's reading (a round needs every block)
META = 7
MAGIC, PID, READ, ATTACHED, LEFT, POSTED, AT_EXIT = range(META)
MAGIC_VALUE = 0x534E47524E44  # "SNGRND"
FILE_PREFIX = "singa-negotiation-"
TICK_S = 0.05  # how often a waiting member checks on the others
log = logging.getLogger(__name__)

_open: "weakref.WeakSet[SharedRounds]" = weakref.WeakSet()
_lingering: set[str] = set()  # files closed before every member had opened them: removed at exit


def wanted(members: int) -> bool:
    """Whether a set of `members` workers negotiates through shared memory: every worker of the job runs on this
    host (the same answer on every worker, as local_size() counts the workers of a node)."""
    return (members > 1 and runtime.is_distributed() and runtime.local_size() == runtime.size()
            and os.environ.get("SINGA_SHM_NEGOTIATION", "1") != "0")


def _folder() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _sweep(folder: str) -> None:
    """Remove the files of processes that died without removing theirs (killed)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(FILE_PREFIX):
            try:
                pid = int(name[len(FILE_PREFIX):].split("-")[0])
            except ValueError:
                continue
            if not alive(pid):
                _unlink(os.path.join(folder, name))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("could not remove the negotiation file %s: %s", path, exc)


class MembersEnded(RuntimeError):
    """Members whose processes are gone: the failure's explanation need not wait for them to answer."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ended_ranks = ranks


class GatheredRounds:
    """Rounds as all-gathers of the blocks on the set's negotiation group."""

    shared = False

    def __init__(self, n: int, block_len: int, group):
        self.n, self.block_len, self.group = n, block_len, group
        self.handle = None

    def post(self, block: list[int], what: str) -> None:
        """Contribute this member's block of the next round (padded to the block length)."""
        mine = torch.zeros(self.block_len, dtype=torch.int64)
        mine[:len(block)] = torch.tensor(block, dtype=torch.int64)
        rows = torch.empty(self.n * self.block_len, dtype=torch.int64)
        self.handle = primitives.all_gather_into(rows, mine, what, group=self.group, async_op=True,
                                                 finish=lambda: rows.view(self.n, self.block_len).tolist())
        primitives.untrack(self.handle)  # the engine waits for it; shutdown need not

    def completed(self) -> bool:
        return self.handle.is_completed()

    def missing(self) -> None:
        """Which members' blocks of the round in flight have not come (an all-gather does not say)."""
        return None

    def wait(self, what: str, tick=None) -> list[list[int]]:
        """Every member's block of the round in flight, in set order; `tick()` is called every TICK_S meanwhile."""
        handle, self.handle = self.handle, None
        handle.rename(what)
        if tick is not None:
            pause, ticked = 0.00002, time.monotonic()
            while not handle.is_completed():
                if time.monotonic() - ticked > TICK_S:
                    tick()
                    ticked = time.monotonic()
                time.sleep(pause)
                pause = min(pause * 2, 0.001)
        return handle.wait()

    def close(self) -> None:
        self.handle = None


class _RoundWork:
    """Round r of a SharedRounds channel as a torch.distributed work (what runtime.wait_work waits on)."""

    def __init__(self, owner: "SharedRounds", r: int):
        self.owner, self.r = owner, r
        self.rows: list | None = None
        self.what = "negotiation"
        self.tick = None

    def is_completed(self) -> bool:
        if self.rows is None:
            self.rows = self.owner.read(self.r)
        return self.rows is not None

    def wait(self) -> None:
        pause = 0.00002
        check_at = time.monotonic() + TICK_S
        deadline = time.monotonic() + runtime.timeout_s()
        while not self.is_completed():
            now = time.monotonic()
            if now > check_at:
                check_at = now + TICK_S
                self.owner.check_members(self.r, self.what, deadline)
                if self.tick is not None:
                    self.tick()
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


class SharedRounds:
    """Rounds through the members' files in shared memory (see the module's docstring)."""

    shared = True

    def __init__(self, members: list[int], index: int, block_len: int, header_len: int, key: str, group=None):
        self.members, self.index, self.n = members, index, len(members)
        self.block_len, self.header_len = block_len, header_len
        self.slot = block_len + 1
        self.key, self.group = key, group
        self.store = runtime.job_store()
        folder = _folder()
        _sweep(folder)
        self.path = os.path.join(folder, f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        self.size = 8 * (META + SLOTS * self.slot)  # bytes of every member's file
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, self.size)
                self._map = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RuntimeError(f"rank {runtime.rank()}: cannot make the negotiation file {self.path} ({exc}); free "
                               f"space in {folder}, or set SINGA_SHM_NEGOTIATION=0 on every process to negotiate "
                               "through the network instead") from exc
        self.mine = memoryview(self._map).cast("q")
        self.mine[PID] = os.getpid()
        self.mine[MAGIC] = MAGIC_VALUE
        self.files: list = [None] * self.n  # the members' files, once found
        self.files[index] = self.mine
        self.pids = [0] * self.n
        self.pids[index] = os.getpid()
        self.work: _RoundWork | None = None
        self.handle = None
        self.unlinked = False  # the file's name is gone (every member has the file open)
        self.closed = False  # this member has left
        self.store.set(self._key(index), self.path)
        _open.add(self)

    def _key(self, index: int) -> str:
        return f"{self.key}{index}"

    def _file(self, j: int):
        """Member j's file, or None while it has not published it yet."""
        view = self.files[j]
        if view is None:
            if not self.store.check([self._key(j)]):
                return None
            path = self.store.get(self._key(j)).decode()
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MembersEnded(f"rank {self.members[j]}'s negotiation file {path} is gone: its process ended",
                                   [self.members[j]]) from None
            try:
                mapped = mmap.mmap(fd, self.size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            view = memoryview(mapped).cast("q")
            if view[MAGIC] != MAGIC_VALUE:
                raise RuntimeError(f"{path} is not rank {self.members[j]}'s negotiation file")
            self.files[j] = view
            self.pids[j] = view[PID]
            if all(f is not None for f in self.files):
                self.mine[ATTACHED] = 1
        return view

    def _base(self, r: int) -> int:
        """Where round r's slot starts in a member's file (int64 fields)."""
        return META + (r % SLOTS) * self.slot

    # ---- writing -------------------------------------------------------------------------------------
    def post(self, block: list[int], what: str) -> None:
        """Contribute this member's block of round block[0]."""
        r = block[0]
        if r > SLOTS:
            self._wait_for_readers(r - SLOTS, what)
        base = self._base(r)
        mine = self.mine
        # The fields, then r, then the checksum of the block (the slot's used part): a reader that sees r and a
        # matching checksum sees the fields.
        mine[base + 1:base + len(block)] = memoryview(array.array("q", block[1:]))
        mine[base] = r
        mine[base + self.block_len] = hash(tuple(block))
        mine[POSTED] = r
        self.work = work = _RoundWork(self, r)
        # (not tracked: the engine waits for it, shutdown need not)
        self.handle = primitives.Handle([work], lambda: work.rows, what, self.group, track=False)

    def _wait_for_readers(self, r: int, what: str) -> None:
        """Slot r is reused next: wait until every member has read round r."""
        deadline = time.monotonic() + runtime.timeout_s()
        pause = 0.0001
        while True:
            behind = [j for j in range(self.n) if (f := self._file(j)) is None or f[READ] < r]
            if not behind:
                return
            self.check_members(r, what, deadline, behind)
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    # ---- reading -------------------------------------------------------------------------------------
    def completed(self) -> bool:
        return self.work.is_completed()

    def missing(self) -> list[int]:
        """The members (indices) whose blocks of the round in flight have not come."""
        r = self.work.r
        return [j for j in range(self.n) if (f := self._file(j)) is None or f[POSTED] < r]

    def wait(self, what: str, tick=None) -> list[list[int]]:
        """Every member's block of the round in flight, in set order; `tick()` is called every TICK_S meanwhile."""
        handle, work = self.handle, self.work
        self.handle = None
        work.what, work.tick = what, tick
        handle.rename(what)
        return handle.wait()

    def read(self, r: int) -> list | None:
        """Every member's block of round r, or None while one is missing."""
        rows = []
        base = self._base(r)
        for j in range(self.n):
            view = self._file(j)
            if view is None or view[base] != r:
                return None
            used = 3 + view[base + 2] * self.header_len  # (round, flags, count, then count headers)
            if not 3 <= used <= self.block_len:
                return None  # being written
            block = view[base:base + used].tolist()
            if hash(tuple(block)) != view[base + self.block_len]:
                return None
            rows.append(block)
        self.mine[READ] = r
        if not self.unlinked and self.mine[ATTACHED] and all(f[ATTACHED] for f in self.files):
            self._unlink_name()
        return rows

    def check_members(self, r: int, what: str, deadline: float, missing=None) -> None:
        """While waiting for round r: raise if a member has died or left, the job lost it, or the timeout passed."""
        if missing is None:
            missing = self.missing()
        dead = [self.members[j] for j in missing if self.pids[j] and not alive(self.pids[j])]
        lost = runtime.lost_procs() if runtime.tracks_lost() else ()
        dead += [self.members[j] for j in missing if self.members[j] in lost and self.members[j] not in dead]
        if dead:
            names = ", ".join(map(str, dead))
            raise MembersEnded(f"rank{'s' if len(dead) > 1 else ''} {names} ended without reaching {what}", dead)
        left = [j for j in missing if self.files[j] is not None and self.files[j][LEFT]]
        if left:
            raise primitives.ended_early({self.members[j]: self.files[j][LEFT] - 1 for j in left}, what,
                                         exited={self.members[j] for j in left if self.files[j][AT_EXIT]})
        if time.monotonic() > deadline:
            names = ", ".join(str(self.members[j]) for j in missing)
            raise RuntimeError(f"rank{'s' if len(missing) > 1 else ''} {names} did not reach {what} within "
                               f"{runtime.timeout_s():g} s")

    # ---- leaving -------------------------------------------------------------------------------------
    def _unlink_name(self) -> None:
        self.unlinked = True
        _lingering.discard(self.path)
        _unlink(self.path)

    def close(self) -> None:
        """This member leaves: its file says so (a member still waiting for its blocks is told at once); the name
        goes now if every member has the file open, else when this process exits (its last rounds stay readable)."""
        if self.closed:
            return
        self.closed = True
        _open.discard(self)
        self.mine[AT_EXIT] = int(runtime.leaving_at_exit())
        self.mine[LEFT] = runtime.steps() + 1 if runtime.is_initialized() else 1
        if self.unlinked:
            return
        if all(f is not None and f[ATTACHED] for f in self.files):
            self._unlink_name()
        else:
            _lingering.add(self.path)


@atexit.register
def _close_all() -> None:
    for rounds in list(_open):
        rounds.close()
    for path in list(_lingering):
        _unlink(path)
    _lingering.clear()
