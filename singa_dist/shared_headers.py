"""Negotiation headers through shared memory, for a process set whose members all run on this host.

Every collective's fixed-size header is all-gathered before its data moves (singa_dist.coordinator). Across
hosts that is a small all-gather on the set's negotiation group. On one host it is cheaper through memory:
each member writes its headers into a ring of slots in a file of its own (under /dev/shm) and reads the
others' files. A header then costs a few microseconds instead of a collective, whose enqueue and threads
took about 0.3 ms of every training step from the computation on a 2-core host (benchmarks/dist_overhead.py).
`SINGA_SHM_NEGOTIATION=0` keeps the all-gather.

A member's file: META int64 fields (magic, pid, the highest submission it has read every member's header of,
whether it has opened every member's file), then SLOTS slots of (header, checksum). Submission k goes into slot
k % SLOTS; a reader takes a slot only when its sequence number is k and its checksum matches (a half-written slot
never passes), and a writer reuses a slot only once every member has read it. Members find each other's files
through the job's store; a file's name is removed as soon as every member has it open, so that nothing is left
behind even by a killed process.
"""
from __future__ import annotations

import array
import atexit
import mmap
import os
import secrets
import tempfile
import time
import weakref

import torch
import torch.distributed as dist

from . import primitives, runtime

SLOTS = 1024  # submissions a member may run ahead of the slowest reader
META = 4
MAGIC, PID, READ, ATTACHED = range(META)
MAGIC_VALUE = 0x534E47484452  # "SNGHDR"
FILE_PREFIX = "singa-negotiation-"

_open: "weakref.WeakSet[SharedHeaders]" = weakref.WeakSet()


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
    """Remove the files of processes that died without closing theirs (killed)."""
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
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass


class MembersEnded(RuntimeError):
    """Members whose processes are gone: the failure's explanation need not wait for them to answer."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ended_ranks = ranks


class _Header:
    """The work of one submission's header exchange (what primitives.Handle waits on)."""

    def __init__(self, owner: "SharedHeaders", k: int, what: str):
        self.owner, self.k, self.what = owner, k, what
        self.rows: torch.Tensor | None = None

    def is_completed(self) -> bool:
        if self.rows is None:
            rows = self.owner.read(self.k)
            if rows is not None:
                self.rows = torch.tensor(rows, dtype=torch.int64)
        return self.rows is not None

    def wait(self) -> None:
        pause = 0.00002
        check_at = time.monotonic() + 0.05
        deadline = time.monotonic() + runtime.timeout_s()
        while not self.is_completed():
            now = time.monotonic()
            if now > check_at:
                check_at = now + 0.05
                self.owner.check_members(self.k, self.what, deadline)
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


class SharedHeaders:
    """The header exchange of one process set on this rank (see the module's docstring)."""

    def __init__(self, members: list[int], index: int, header_len: int, key: str, group=None):
        self.members, self.index, self.n = members, index, len(members)
        self.header_len = header_len
        self.slot = header_len + 1
        self.key, self.group = key, group
        self.store = dist.distributed_c10d._get_default_store()
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
        self.read_upto = 0
        self.read_ahead: set[int] = set()  # submissions read out of order (their slots stay taken until then)
        self.early: dict[int, list] = {}  # headers read while waiting for a slot, before their handles asked
        self.closed = False
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
                raise RuntimeError(f"rank {self.members[j]}'s negotiation file {path} is gone (the process ended)")
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

    def _base(self, k: int) -> int:
        """Where submission k's slot starts in a member's file (int64 fields)."""
        return META + (k % SLOTS) * self.slot

    def _unlink_when_everyone_has_it(self) -> None:
        if self.mine[ATTACHED] and all(f[ATTACHED] for f in self.files):
            self.close()

    # ---- writing -------------------------------------------------------------------------------------
    def post(self, fields: list[int], what: str) -> primitives.Handle:
        """Publish this rank's header of submission fields[0] (k); the handle's result is every member's header
        (an n x header_len tensor in set order)."""
        k = fields[0]
        if k > SLOTS:
            self._wait_for_readers(k - SLOTS, what)
        base = self._base(k)
        mine = self.mine
        # The fields, then k, then the checksum: a reader that sees k and a matching checksum sees the fields.
        mine[base + 1:base + self.header_len] = memoryview(array.array("q", fields[1:]))
        mine[base] = k
        mine[base + self.header_len] = hash(tuple(fields))
        work = _Header(self, k, what)
        handle = primitives.Handle([work], lambda: work.rows, what, self.group)
        primitives.untrack(handle)  # no thread holds a tensor of it: shutdown need not wait for it
        return handle

    def _wait_for_readers(self, k: int, what: str) -> None:
        """Slot k is reused next: wait until every member has read submission k. Meanwhile this rank reads what
        the others have written (into self.early), as they may be waiting for it in the same way."""
        deadline = time.monotonic() + runtime.timeout_s()
        pause = 0.0001
        while True:
            for ahead in range(self.read_upto + 1, k + SLOTS):
                if ahead not in self.early and ahead not in self.read_ahead:
                    rows = self._read_slots(ahead)
                    if rows is None:
                        break
                    self.early[ahead] = rows
                    self._mark_read(ahead)
            behind = [j for j in range(self.n) if (f := self._file(j)) is None or f[READ] < k]
            if not behind:
                return
            self.check_members(k, what, deadline, behind)
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, k: int) -> list | None:
        """Every member's header of submission k, or None while one is missing."""
        rows = self.early.pop(k, None)
        if rows is None:
            rows = self._read_slots(k)
            if rows is not None:
                self._mark_read(k)
                if not self.closed:
                    self._unlink_when_everyone_has_it()
        return rows

    def _read_slots(self, k: int) -> list | None:
        rows = []
        base = self._base(k)
        end = base + self.slot
        for j in range(self.n):
            view = self._file(j)
            if view is None:
                return None
            slot = view[base:end].tolist()
            header = slot[:-1]
            if slot[0] != k or hash(tuple(header)) != slot[-1]:
                return None
            rows.append(header)
        return rows

    def _mark_read(self, k: int) -> None:
        if k == self.read_upto + 1:
            self.read_upto = k
            while self.read_upto + 1 in self.read_ahead:
                self.read_ahead.discard(self.read_upto + 1)
                self.read_upto += 1
            self.mine[READ] = self.read_upto
        elif k > self.read_upto:
            self.read_ahead.add(k)

    def check_members(self, k: int, what: str, deadline: float, missing=None) -> None:
        """While waiting for submission k: raise if a member has died, the job lost it, or the timeout passed."""
        if missing is None:
            missing = [j for j in range(self.n) if self._file(j) is None or self.files[j][self._base(k)] != k]
        dead = [self.members[j] for j in missing if self.pids[j] and not alive(self.pids[j])]
        lost = runtime.lost_procs() if runtime.tracks_lost() else ()
        dead += [self.members[j] for j in missing if self.members[j] in lost and self.members[j] not in dead]
        if dead:
            names = ", ".join(map(str, dead))
            raise MembersEnded(f"rank{'s' if len(dead) > 1 else ''} {names} ended without reaching {what}", dead)
        if time.monotonic() > deadline:
            names = ", ".join(str(self.members[j]) for j in missing)
            raise RuntimeError(f"rank{'s' if len(missing) > 1 else ''} {names} did not reach {what} within "
                               f"{runtime.timeout_s():g} s")

    def close(self) -> None:
        """Remove this member's file name (the members that have it open keep reading it)."""
        if self.closed:
            return
        self.closed = True
        _open.discard(self)
        try:
            os.unlink(self.path)
        except OSError:
            pass


@atexit.register
def _close_all() -> None:
    for headers in list(_open):
        headers.close()
