"""The collective primitives: every exchange of tensors or objects between processes goes through here.

Each primitive takes a torch.distributed process group (None: all workers) and a description of what
travels (`what`, e.g. "allreduce of fc1.weight (64, 32)"). It runs inside `watch(what, group)`: when a
member of the group does not arrive within the job's timeout (`sd.init(timeout=...)`, SINGA_TIMEOUT), or the
exchange fails, every waiting member raises a CollectiveError that names the missing ranks (or what each
member was doing instead) and the tensor. After a wait fails, the members that are still alive answer a
roll call through the job's key-value store (see `_roll_call`).

Asynchronous primitives return a `Handle`; work in flight is tracked so that `shutdown()` waits for it
before the process groups go (registered below as the shutdown's "drain" phase).
"""
from __future__ import annotations

import contextlib
import pickle
import time
import zlib

import torch
import torch.distributed as dist

from . import metrics, runtime, timeline

# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); older versions have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_DIST_ERROR = getattr(dist, "DistError", RuntimeError)  # torch >= 2.2; a RuntimeError subclass


class CollectiveError(RuntimeError):
    """A collective failed; the message says which ranks were missing or what each rank was doing."""


# --------------------------------------------------------------------------------------------------------------
# Groups

def is_active(group=None) -> bool:
    """True when there are other processes in `group` (all workers by default) to talk to."""
    if not (runtime.is_initialized() and runtime.is_distributed()):
        return False
    if group is None or group is runtime.workers_process_group():
        return runtime.size() > 1
    return dist.get_world_size(group) > 1


def _group(group):
    if group is None:
        group = runtime.workers_process_group()
        if group is None and runtime.is_replacement():
            raise runtime.replacement_error("a collective of all workers")
    return group


def members(group=None) -> list[int]:
    """The process ranks of `group`'s members (workers come first in the job, so these are worker ranks)."""
    if group is None or group is runtime.workers_process_group():
        return runtime.topology().worker_ranks()
    return dist.get_process_group_ranks(group)


# --------------------------------------------------------------------------------------------------------------
# How a failed wait is explained

_roll_calls: dict[int, int] = {}  # group tag -> roll calls so far (the same count on every member)


def _roll_call(what: str, ranks: list[int], ended=()) -> tuple[list[int], dict[int, str]]:
    """Which of `ranks` are still alive to answer, and what each is waiting in.

    Every member whose wait failed writes what it waits in under a numbered key and looks for the others'
    keys for a while; a member that never writes one is missing (stopped, hung, or busy elsewhere). Members
    known to have ended (`ended`) are not waited for.
    """
    tag = zlib.crc32(",".join(map(str, ranks)).encode())
    _roll_calls[tag] = number = _roll_calls.get(tag, 0) + 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"singa/rollcall/{tag}/{number}/"
    me = runtime.proc_rank()
    store.set(prefix + str(me), what)
    answers: dict[int, str] = {me: what}
    deadline = time.monotonic() + min(max(runtime.timeout_s(), 1.0), 10.0)
    while len(answers) + len(set(ended) - set(answers)) < len(ranks) and time.monotonic() < deadline:
        for r in ranks:
            if r not in answers and store.check([prefix + str(r)]):
                answers[r] = store.get(prefix + str(r)).decode()
        time.sleep(0.05)
    return [r for r in ranks if r not in answers], answers


def collective_failure(what: str, error: BaseException, group=None) -> CollectiveError:
    """An error that says which members of `group` did not reach `what` (or what each was doing instead)."""
    me = runtime.proc_rank()
    timeout = runtime.timeout_s()
    runtime.publish_where(what)
    try:
        ended = getattr(error, "ended_ranks", ())
        missing, answers = _roll_call(what, members(group), ended)
    except Exception as store_error:  # the store itself is gone: rank 0's process has died
        return CollectiveError(
            f"rank {me}: {what} failed and the job's store (hosted by rank 0) did not answer "
            f"({store_error}); rank 0 is missing. Cause: {error}")
    if missing:
        names = ", ".join(str(r) for r in missing)
        # A missing rank that is in shutdown() ran fewer steps than this one: say so, and where each is.
        elsewhere = {r: runtime.where_is(r, wait_s=1.0) for r in missing}
        done = {r: w["steps"] for r, w in elsewhere.items()
                if w and w["where"] in (runtime.WHERE_SHUTDOWN, runtime.WHERE_EXIT)}
        if done:
            return ended_early(done, what, error, exited={r for r, w in elsewhere.items()
                                                          if w and w["where"] == runtime.WHERE_EXIT})
        runtime.blame(missing, f"rank{'s' if len(missing) > 1 else ''} {names} did not reach {what}")
        if set(missing) <= set(ended):
            return CollectiveError(
                f"rank {me}: rank{'s' if len(missing) > 1 else ''} {names} ended (the process is gone) without "
                f"reaching {what}; stopping instead of waiting for {'them' if len(missing) > 1 else 'it'}.")
        return CollectiveError(
            f"rank {me}: rank{'s' if len(missing) > 1 else ''} {names} did not reach {what} within the "
            f"{timeout:g} s timeout (missing: stopped, hung or too slow); stopping instead of waiting forever. "
            f"Raise the timeout with sd.init(timeout=...) or SINGA_TIMEOUT if the ranks are merely slow. "
            f"Cause: {error}")
    if len(set(answers.values())) == 1:  # every rank is in the same collective: it failed for another reason
        return CollectiveError(f"rank {me}: {what} failed on every rank: {error}")
    doing = "; ".join(f"rank {r}: {answers[r]}" for r in sorted(answers))
    return CollectiveError(
        f"rank {me}: {what} failed although every rank is alive; the ranks were waiting in different "
        f"collectives ({doing}), so they do not run the same sequence of communication. Cause: {error}")


def ended_early(done: dict[int, int], what: str, error: BaseException | None = None,
                exited=()) -> CollectiveError:
    """The error of a rank waiting in `what` for ranks that left the job already (done: rank -> its optimizer
    steps; `exited`: those of them that left because their process exits, without calling shutdown()): the ranks
    ran different numbers of steps. Ranks in shutdown() are not the cause (a neutral note for the launcher); ranks
    whose process exits are (the launcher names them, and waits a little for their exit status)."""
    me = runtime.proc_rank()
    plural = lambda n: f"{n} step{'s' if n != 1 else ''}"  # noqa: E731
    finished = ", ".join(f"rank {r} finished after {plural(steps)}" for r, steps in sorted(done.items()))
    here = f"rank {me} is at step {runtime.steps() + 1}"
    quitting = sorted(r for r in done if r in exited)
    how = "the ranks that finished are in singa_dist.shutdown()"
    if quitting:
        how = (f"{', '.join(f'rank {r}' for r in quitting)} exit{'s' if len(quitting) == 1 else ''} without "
               "singa_dist.shutdown(): the script ended, or called sys.exit()")
    runtime.blame(quitting or list(done), f"the ranks ran different numbers of steps ({finished}; {here}, waiting "
                                          f"in {what})", neutral=not quitting)
    cause = f" Cause: {error}" if error is not None else ""
    return CollectiveError(
        f"rank {me}: the ranks ran different numbers of steps: {finished}, {here} (waiting in {what}; {how}). Give "
        f"every rank the same number of batches, or let the ranks that run out of data take part with zeros: `with "
        f"sd.join(model, optimizer):` around the training loop (hvd.join() in Horovod scripts).{cause}")


@contextlib.contextmanager
def watch(what: str, group=None):
    """Turns a failed or timed-out communication inside the block into an error naming the missing ranks."""
    try:
        yield
    except (RuntimeError, _DIST_ERROR) as error:
        if isinstance(error, CollectiveError) or not is_active(group):
            raise
        if runtime.is_elastic():
            # An elastic job goes on without the failed worker: every member stops waiting now (no roll call),
            # and singa_dist.elastic.run rolls back to the last commit and joins the next round.
            if not isinstance(error, runtime.RoundAborted):
                runtime.break_round(f"{what} failed: {str(error).splitlines()[0] if str(error) else error!r}")
            raise CollectiveError(f"rank {runtime.rank()}: {what} failed: {error}") from error
        raise collective_failure(what, error, group) from error


# --------------------------------------------------------------------------------------------------------------
# Work in flight

# Asynchronous work started and not yet finished (handles, gradient buckets in flight), dropped by the caller
# or not: shutdown() waits for it, so that no communication thread still holds this process's tensors when
# the interpreter exits. Finished work is pruned whenever new work is tracked.
_outstanding: list = []


def track(work) -> None:
    """Have shutdown() call `work.wait()` if `work.is_completed()` is still False by then."""
    _outstanding[:] = [w for w in _outstanding if not w.is_completed()]
    _outstanding.append(work)


_track = track  # (Handle's argument of that name hides it there)


def untrack(work) -> None:
    """`work` has finished (or failed and was reported): shutdown() need not wait for it."""
    for i, w in enumerate(_outstanding):
        if w is work:
            del _outstanding[i]
            return


def wait_outstanding() -> None:
    """Wait for every tracked asynchronous operation that has not finished (after a failed one, for no more)."""
    try:
        while _outstanding:
            _outstanding.pop(0).wait()
    finally:
        _outstanding.clear()


runtime.on_shutdown(wait_outstanding, phase="drain", persistent=True)
runtime.on_reset(_outstanding.clear, phase="leave")  # a broken round's work is abandoned, not waited for


class Handle:
    """An operation in flight; `wait()` returns its result (what `finish()` returns once the works are done)."""

    timeline_what = None  # what the timeline calls a wait for it, when not `what`

    def __init__(self, works, finish, what: str, group=None, track: bool = True):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._what = what
        self._group = group
        self._result = None
        self._done = False
        if self._works and track:
            _track(self)

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def rename(self, what: str) -> None:
        """Errors and the timeline name the operation `what` from now on (what a waiter is waiting for)."""
        self._what = what

    def works(self) -> list:
        """The torch.distributed works in flight (the timeline asks them whether the communication has ended)."""
        return list(self._works)

    def wait(self):
        if not self._done:
            # The timeline's "wait" and the metrics' communication wait: time this process spends blocked on its
            # peers.
            t0 = 0
            if timeline.on or metrics.on:
                if timeline.on:
                    timeline.poll()
                t0 = 0 if self.is_completed() else timeline.now()
            try:
                with watch(self._what, self._group):
                    for w in self._works:
                        runtime.wait_work(w, self._what)
                if t0:
                    if timeline.on:
                        timeline.span("wait", t0, tensor=self.timeline_what or self._what)
                    if metrics.on:
                        metrics.waited(t0)
                self._result = self._finish()
            finally:
                untrack(self)  # a failure is reported here, once: shutdown() does not raise it again
            self._done = True
            self._works = []
        return self._result


def done(value) -> Handle:
    """A Handle with nothing in flight whose result is `value`."""
    return Handle([], lambda: value, "nothing")


def _started(work, finish, what: str, group, async_op: bool):
    handle = Handle([work], finish, what, group)
    return handle if async_op else handle.wait()


# --------------------------------------------------------------------------------------------------------------
# The primitives. Synchronous ones return their output; with async_op=True, a Handle whose wait() returns it.
# `finish` (optional) runs after the exchange; its value is the result instead.

def all_reduce(tensor: torch.Tensor, what: str, *, op=dist.ReduceOp.SUM, group=None, async_op: bool = False,
               finish=None):
    """Reduce `tensor` in place over the group."""
    pg = _group(group)
    with watch(what, group):
        work = dist.all_reduce(tensor, op=op, group=pg, async_op=True)
    return _started(work, finish or (lambda: tensor), what, group, async_op)


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, what: str, *, group=None, async_op: bool = False,
                    finish=None):
    """Every member's `tensor` (same shape everywhere) concatenated along dim 0 into `output`, in rank order."""
    pg = _group(group)
    with watch(what, group):
        work = _all_gather_single(output, tensor, group=pg, async_op=True)
    return _started(work, finish or (lambda: output), what, group, async_op)


def all_to_all_single(output: torch.Tensor, tensor: torch.Tensor, what: str, *, output_split_sizes: list[int],
                      input_split_sizes: list[int], group=None) -> torch.Tensor:
    """Part r of `tensor` (sizes along dim 0: input_split_sizes) goes to member r; `output` receives the parts."""
    pg = _group(group)
    with watch(what, group):
        work = dist.all_to_all_single(output, tensor, output_split_sizes=output_split_sizes,
                                      input_split_sizes=input_split_sizes, group=pg, async_op=True)
    return _started(work, lambda: output, what, group, False)


def broadcast(tensor: torch.Tensor, root: int, what: str, *, group=None, async_op: bool = False, finish=None):
    """Overwrite `tensor` with member `root`'s (`root` counts within the group), in place."""
    pg = _group(group)
    with watch(what, group):
        work = dist.broadcast(tensor, group_src=root, group=pg, async_op=True)
    return _started(work, finish or (lambda: tensor), what, group, async_op)


# Objects travel as pickled bytes in CPU tensors, through the primitives above: their waits are watched like
# every other (torch's object collectives block inside the backend, out of reach of a broken elastic round).

def broadcast_object(obj, root: int, what: str, *, group=None):
    """Member `root`'s picklable `obj`, on every member (`root` counts within the group)."""
    mine = dist.get_group_rank(_group(group), dist.get_rank()) == root
    at = _object_device()
    payload = _pickled(obj).to(at) if mine else None
    length = torch.tensor([payload.numel() if mine else 0], dtype=torch.int64, device=at)
    broadcast(length, root, what, group=group)
    data = payload if mine else torch.empty(int(length.item()), dtype=torch.uint8, device=at)
    broadcast(data, root, what, group=group)
    return obj if mine else pickle.loads(data.cpu().numpy().tobytes())


def all_gather_object(obj, what: str, *, group=None) -> list:
    """Every member's picklable `obj`, as a list in rank order."""
    n = dist.get_world_size(_group(group))
    at = _object_device()
    payload = _pickled(obj)
    lengths = torch.empty(n, dtype=torch.int64, device=at)
    all_gather_into(lengths, torch.tensor([payload.numel()], dtype=torch.int64, device=at), what, group=group)
    lengths = lengths.cpu()
    most = int(lengths.max().item())
    padded = torch.zeros(most, dtype=torch.uint8)
    padded[:payload.numel()] = payload
    out = torch.empty(n * most, dtype=torch.uint8, device=at)
    all_gather_into(out, padded.to(at), what, group=group)
    out = out.cpu()
    return [pickle.loads(out[i * most:i * most + int(lengths[i])].numpy().tobytes()) for i in range(n)]


def _pickled(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _object_device() -> torch.device:
    """CPU, unless the job's only backend is NCCL (which moves CUDA tensors alone)."""
    return runtime.device() if runtime.backend() == "nccl" else torch.device("cpu")


def barrier(what: str = "barrier", *, group=None) -> None:
    """Wait until every member of the group arrives here."""
    with watch(what, group):
        work = dist.barrier(group=_group(group), async_op=True)
    _started(work, lambda: None, what, group, False)
