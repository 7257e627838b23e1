"""Collectives on tensors and objects among the workers (Horovod's names), and what keeps them from hanging.

Tensor collectives return new tensors and support autograd as horovod.torch defines it:
- `allreduce(x, op)`: the gradient is allreduced with the same op;
- `allgather(x)`: the gradient is averaged over the ranks, then each rank takes the slice of its own input;
- `broadcast(x, root_rank)`: the gradient is averaged over the ranks and kept on the root only (zero elsewhere).
The `_` variants work in place (no autograd); `*_async` variants return a Handle for `synchronize(handle)`.

In a single process (no launcher, or one worker) every collective is an identity.

A rank that does not reach a collective within the job's timeout (`sd.init(timeout=...)`, SINGA_TIMEOUT)
makes the waiting ranks stop with a RuntimeError that names the missing ranks: after the wait fails, the
ranks that are still alive answer a roll call through the job's key-value store (see `_roll_call`).
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from . import runtime
from .compression import Compression, resolve as _resolve_compression


class ReduceOp:
    """How gradients and tensors from the workers combine (Horovod's names)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"singa_dist.{self.name}"


Average = ReduceOp("Average")
Sum = ReduceOp("Sum")
Min = ReduceOp("Min")
Max = ReduceOp("Max")
Product = ReduceOp("Product")

# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); older versions have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_DIST_ERROR = getattr(dist, "DistError", RuntimeError)  # torch >= 2.2; a RuntimeError subclass

_TORCH_OPS = {"Average": dist.ReduceOp.SUM, "Sum": dist.ReduceOp.SUM, "Min": dist.ReduceOp.MIN,
              "Max": dist.ReduceOp.MAX, "Product": dist.ReduceOp.PRODUCT}


def torch_op(op: ReduceOp):
    """The torch.distributed op that carries `op` (Average travels as a sum, divided afterwards)."""
    try:
        return _TORCH_OPS[op.name]
    except (KeyError, AttributeError):
        raise ValueError(f"op must be one of sd.Average, sd.Sum, sd.Min, sd.Max, sd.Product, got {op!r}") from None


def resolve_op(op=None, average=None) -> ReduceOp:
    """Horovod's rule: `average` (deprecated there) wins when given; the default is Average."""
    if average is not None:
        if op is not None:
            raise ValueError("give either op or average, not both")
        return Average if average else Sum
    return Average if op is None else op


# --------------------------------------------------------------------------------------------------------------
# The job, and how a failed wait is explained

def is_active() -> bool:
    """True when there are other workers to talk to."""
    return runtime.is_initialized() and runtime.is_distributed() and runtime.size() > 1


def process_group():
    return runtime.workers_process_group()


_roll_calls = 0


def _roll_call(what: str) -> tuple[list[int], dict[int, str]]:
    """Which workers are still alive to answer, and what each is waiting in.

    Every worker whose wait failed writes what it waits in under a numbered key and looks for the others'
    keys for a while; a worker that never writes one is missing (stopped, hung, or busy elsewhere).
    """
    global _roll_calls
    _roll_calls += 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"singa/rollcall/{_roll_calls}/"
    workers = runtime.topology().worker_ranks()
    me = runtime.proc_rank()
    store.set(prefix + str(me), what)
    answers: dict[int, str] = {me: what}
    deadline = time.monotonic() + min(max(runtime.timeout_s(), 1.0), 10.0)
    while len(answers) < len(workers) and time.monotonic() < deadline:
        for r in workers:
            if r not in answers and store.check([prefix + str(r)]):
                answers[r] = store.get(prefix + str(r)).decode()
        time.sleep(0.05)
    return [r for r in workers if r not in answers], answers


def collective_failure(what: str, error: BaseException) -> RuntimeError:
    """A RuntimeError that says which ranks did not reach `what` (or what each rank was doing instead)."""
    me = runtime.rank()
    timeout = runtime.timeout_s()
    try:
        missing, answers = _roll_call(what)
    except Exception as store_error:  # the store itself is gone: rank 0's process has died
        return RuntimeError(
            f"rank {me}: {what} failed and the job's store (hosted by rank 0) did not answer "
            f"({store_error}); rank 0 is missing. Cause: {error}")
    if missing:
        names = ", ".join(str(r) for r in missing)
        return RuntimeError(
            f"rank {me}: rank{'s' if len(missing) > 1 else ''} {names} did not reach {what} within the "
            f"{timeout:g} s timeout (missing: stopped, hung or too slow); stopping instead of waiting forever. "
            f"Raise the timeout with sd.init(timeout=...) or SINGA_TIMEOUT if the ranks are merely slow. "
            f"Cause: {error}")
    if len(set(answers.values())) == 1:  # every rank is in the same collective: it failed for another reason
        return RuntimeError(f"rank {me}: {what} failed on every rank: {error}")
    doing = "; ".join(f"rank {r}: {answers[r]}" for r in sorted(answers))
    return RuntimeError(
        f"rank {me}: {what} failed although every rank is alive; the ranks were waiting in different "
        f"collectives ({doing}), so they do not run the same sequence of communication. Cause: {error}")


@contextlib.contextmanager
def watch(what: str):
    """Turns a failed or timed-out communication inside the block into an error naming the missing ranks."""
    try:
        yield
    except (RuntimeError, _DIST_ERROR) as error:
        if not is_active() or isinstance(error, CollectiveError):
            raise
        raise CollectiveError(str(collective_failure(what, error))) from error


class CollectiveError(RuntimeError):
    """A collective failed; the message says which ranks were missing or what each rank was doing."""


# --------------------------------------------------------------------------------------------------------------
# Asynchronous handles

# Asynchronous work started and not yet finished (handles, gradient buckets in flight), dropped by the caller
# or not: shutdown() waits for it, so that no communication thread still holds this process's tensors when
# the interpreter exits. Finished work is pruned whenever new work is tracked.
_outstanding: list = []


def track(work) -> None:
    """Have shutdown() call `work.wait()` if `work.is_completed()` is still False by then."""
    _outstanding[:] = [w for w in _outstanding if not w.is_completed()]
    _outstanding.append(work)


def wait_outstanding() -> None:
    """Wait for every tracked asynchronous operation that has not finished (after a failed one, for no more)."""
    try:
        while _outstanding:
            _outstanding.pop(0).wait()
    finally:
        _outstanding.clear()


class Handle:
    """An operation in flight; `synchronize(handle)` (or `handle.wait()`) returns its result."""

    def __init__(self, works, finish, what: str):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._what = what
        self._result = None
        self._done = False
        if self._works:
            track(self)

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self):
        if not self._done:
            with watch(self._what):
                for w in self._works:
                    w.wait()
            self._result = self._finish()
            self._done = True
            self._works = []
            if self in _outstanding:
                _outstanding.remove(self)
        return self._result


def synchronize(handle: Handle):
    """Wait for an asynchronous collective and return its output (horovod.torch.synchronize)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when the asynchronous collective has finished (horovod.torch.poll)."""
    return handle.is_completed()


def _done(value) -> Handle:
    return Handle([], lambda: value, "nothing")


# --------------------------------------------------------------------------------------------------------------
# allreduce

def _divide(tensor: torch.Tensor, by: float) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.div_(by)
    else:  # an average of integers stays an integer, as in Horovod
        tensor.div_(by, rounding_mode="trunc")


def _allreduce_start(tensor: torch.Tensor, op: ReduceOp, compression, prescale: float, postscale: float,
                     name: str | None) -> Handle:
    """Reduce `tensor` in place, asynchronously."""
    torch_op(op)
    compressor = _resolve_compression(compression)
    if not is_active():
        def local():
            if prescale * postscale != 1.0:
                tensor.mul_(prescale * postscale)
            return tensor
        return Handle([], local, "allreduce")
    what = f"allreduce of {name or 'a tensor'} {tuple(tensor.shape)}"
    if prescale != 1.0:
        tensor.mul_(prescale)
    wire, ctx = compressor.compress(tensor)
    with watch(what):
        work = dist.all_reduce(wire, op=torch_op(op), group=process_group(), async_op=True)

    def finish():
        out = compressor.decompress(wire, ctx)
        if out is not tensor:
            tensor.copy_(out)
        if op is Average:
            _divide(tensor, runtime.size())
        if postscale != 1.0:
            tensor.mul_(postscale)
        return tensor
    return Handle([work], finish, what)


class _AllreduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, compression, prescale, postscale, name):
        ctx.args = (op, compression, prescale, postscale, name)
        return _allreduce_start(tensor.detach().clone(), op, compression, prescale, postscale, name).wait()

    @staticmethod
    def backward(ctx, grad):
        op, compression, prescale, postscale, name = ctx.args
        out = _allreduce_start(grad.detach().clone(), op, compression, prescale, postscale,
                               f"the gradient of {name or 'an allreduce'}").wait()
        return out, None, None, None, None, None


def allreduce(tensor: torch.Tensor, average=None, name: str | None = None, compression=Compression.none, op=None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=None) -> torch.Tensor:
    """The reduction (Average by default) of `tensor` over the workers, as a new tensor; differentiable."""
    _no_process_sets(process_set)
    return _AllreduceFunction.apply(tensor, resolve_op(op, average), compression, prescale_factor,
                                    postscale_factor, name)


def allreduce_(tensor: torch.Tensor, average=None, name: str | None = None, op=None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set=None) -> torch.Tensor:
    """In-place allreduce (no autograd); returns `tensor`."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set).wait()


def allreduce_async(tensor: torch.Tensor, average=None, name: str | None = None, op=None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=None) -> Handle:
    """Start an allreduce into a new tensor; `synchronize(handle)` returns it."""
    _no_process_sets(process_set)
    return _allreduce_start(tensor.detach().clone(), resolve_op(op, average), Compression.none, prescale_factor,
                            postscale_factor, name)


def allreduce_async_(tensor: torch.Tensor, average=None, name: str | None = None, op=None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=None) -> Handle:
    """Start an in-place allreduce of `tensor`; `synchronize(handle)` returns it."""
    _no_process_sets(process_set)
    return _allreduce_start(tensor, resolve_op(op, average), Compression.none, prescale_factor, postscale_factor,
                            name)


# --------------------------------------------------------------------------------------------------------------
# allgather

def _allgather_start(tensor: torch.Tensor, name: str | None) -> Handle:
    """Concatenate every worker's `tensor` along dim 0; the first dimension may differ between workers."""
    if tensor.dim() == 0:
        tensor = tensor.view(1)
    if not is_active():
        return _done(tensor.detach().clone())
    what = f"allgather of {name or 'a tensor'} {tuple(tensor.shape)}"
    n = runtime.size()
    pg = process_group()
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    all_rows = torch.empty(n, dtype=torch.int64, device=tensor.device)
    with watch(what):
        _all_gather_single(all_rows, rows, group=pg)
    counts = all_rows.tolist()
    most = max(counts)
    send = tensor.detach().contiguous()
    if tensor.shape[0] < most:
        send = torch.cat([send, send.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))])
    gathered = send.new_empty((n * most, *tensor.shape[1:]))
    with watch(what):
        work = _all_gather_single(gathered, send, group=pg, async_op=True)

    def finish():
        if all(c == most for c in counts):
            return gathered
        return torch.cat([gathered[r * most: r * most + c] for r, c in enumerate(counts)])
    handle = Handle([work], finish, what)
    handle.counts = counts
    return handle


class _AllgatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        handle = _allgather_start(tensor, name)
        counts = getattr(handle, "counts", [tensor.shape[0] if tensor.dim() else 1])
        r = runtime.rank() if is_active() else 0
        ctx.offset, ctx.rows, ctx.shape, ctx.name = sum(counts[:r]), counts[r], tensor.shape, name
        return handle.wait()

    @staticmethod
    def backward(ctx, grad):
        reduced = _allreduce_start(grad.detach().clone(), Average, Compression.none, 1.0, 1.0,
                                   f"the gradient of {ctx.name or 'an allgather'}").wait()
        return reduced.narrow(0, ctx.offset, ctx.rows).reshape(ctx.shape), None


def allgather(tensor: torch.Tensor, name: str | None = None, process_set=None) -> torch.Tensor:
    """Every worker's `tensor` concatenated along dim 0 in rank order (sizes of dim 0 may differ)."""
    _no_process_sets(process_set)
    return _AllgatherFunction.apply(tensor, name)


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set=None) -> Handle:
    _no_process_sets(process_set)
    return _allgather_start(tensor, name)


# --------------------------------------------------------------------------------------------------------------
# broadcast

def _check_root(root_rank: int) -> None:
    n = runtime.size() if runtime.is_initialized() else 1
    if not 0 <= root_rank < n:
        raise ValueError(f"root_rank {root_rank} is not a worker rank (there are {n} workers)")


def _broadcast_start(tensor: torch.Tensor, root_rank: int, name: str | None) -> Handle:
    """Overwrite `tensor` with the root's, in place, asynchronously."""
    _check_root(root_rank)
    if not is_active():
        return _done(tensor)
    what = f"broadcast of {name or 'a tensor'} {tuple(tensor.shape)} from rank {root_rank}"
    with watch(what):
        work = dist.broadcast(tensor, group_src=root_rank, group=process_group(), async_op=True)
    return Handle([work], lambda: tensor, what)


class _BroadcastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root, ctx.name = root_rank, name
        return _broadcast_start(tensor.detach().clone(), root_rank, name).wait()

    @staticmethod
    def backward(ctx, grad):
        reduced = _allreduce_start(grad.detach().clone(), Average, Compression.none, 1.0, 1.0,
                                   f"the gradient of {ctx.name or 'a broadcast'}").wait()
        if is_active() and runtime.rank() != ctx.root:
            reduced.zero_()
        return reduced, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=None) -> torch.Tensor:
    """The root worker's `tensor`, as a new tensor on every worker; differentiable."""
    _no_process_sets(process_set)
    return _BroadcastFunction.apply(tensor, root_rank, name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=None) -> torch.Tensor:
    """Overwrite `tensor` with the root worker's, in place (no autograd); returns `tensor`."""
    _no_process_sets(process_set)
    with torch.no_grad():
        return _broadcast_start(tensor, root_rank, name).wait()


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=None) -> Handle:
    _no_process_sets(process_set)
    return _broadcast_start(tensor, root_rank, name)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=None) -> Handle:
    _no_process_sets(process_set)
    return _broadcast_start(tensor.detach().clone(), root_rank, name)


# --------------------------------------------------------------------------------------------------------------
# Python objects, barrier

def allreduce_gradients_(named_params, group, group_size: int, average: bool = True) -> None:
    """Sum (or average) every parameter's `.grad` over `group` in one fused message; a parameter with no
    gradient on this rank counts as zeros, and one with no gradient on any rank keeps `.grad = None` (so the
    optimizer skips it, as torch's optimizers and DDP's find_unused_parameters do). The parameter-server
    strategies use it inside a worker group."""
    named_params = list(named_params)
    if not named_params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in named_params]
    # One more element per parameter counts the ranks that had a gradient for it, in the same message.
    had = torch.tensor([float(p.grad is not None) for _, p in named_params], dtype=grads[0].dtype,
                       device=grads[0].device)
    flat = torch._utils._flatten_dense_tensors(grads + [had])
    dist.all_reduce(flat, group=group)
    counts = flat[-len(grads):].tolist()
    if average:
        flat[:-len(grads)] /= group_size
    for (_, p), g, count in zip(named_params, torch._utils._unflatten_dense_tensors(flat, grads), counts):
        p.grad = g.view_as(p) if count > 0 else None


def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=None):
    """The root worker's picklable `obj`, on every worker."""
    _no_process_sets(process_set)
    _check_root(root_rank)
    if not is_active():
        return obj
    box = [obj if runtime.rank() == root_rank else None]
    with watch(f"broadcast_object of {name or 'an object'} from rank {root_rank}"):
        dist.broadcast_object_list(box, group_src=root_rank, group=process_group())
    return box[0]


def allgather_object(obj, name: str | None = None, process_set=None) -> list:
    """Every worker's picklable `obj`, as a list in rank order."""
    _no_process_sets(process_set)
    if not is_active():
        return [obj]
    out = [None] * runtime.size()
    with watch(f"allgather_object of {name or 'an object'}"):
        dist.all_gather_object(out, obj, group=process_group())
    return out


def barrier(process_set=None) -> None:
    """Wait until every worker arrives here."""
    _no_process_sets(process_set)
    if is_active():
        with watch("barrier"):
            dist.barrier(group=process_group())


def _no_process_sets(process_set) -> None:
    if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
        raise ValueError("singa_dist runs collectives on all workers; Horovod process sets other than the "
                         "global one are not supported")


# --------------------------------------------------------------------------------------------------------------
# Model consistency

def check_consistency(named_tensors, what: str = "parameter") -> None:
    """Raise on every worker when workers disagree on tensor names, shapes or dtypes (before any training).

    Mismatched models otherwise fail late and obscurely: collectives of different sizes hang or mix data.
    """
    if not is_active():
        return
    from .partition import shard_of
    # A feature-split parameter's shard differs by rank; the whole tensor it was cut from must agree.
    mine = [(name, tuple(getattr(shard_of(t), "full_shape", t.shape)), str(t.dtype).replace("torch.", ""))
            for name, t in named_tensors]
    everyone = allgather_object(mine, name=f"the {what} list (model consistency check)")
    problems = []
    ref = {n: (s, d) for n, s, d in everyone[0]}
    for r, theirs in enumerate(everyone[1:], start=1):
        own = {n: (s, d) for n, s, d in theirs}
        for n, s, d in theirs:
            if n not in ref:
                problems.append(f"rank {r} has {what} '{n}' {s} {d} that rank 0 does not have")
            elif ref[n] != (s, d):
                problems.append(f"rank {r}'s {what} '{n}' is {s} {d} but rank 0's is {ref[n][0]} {ref[n][1]}")
        for n, s, d in everyone[0]:
            if n not in own:
                problems.append(f"rank {r} lacks {what} '{n}' {s} {d} that rank 0 has")
        if not problems and [n for n, _, _ in theirs] != [n for n, _, _ in everyone[0]]:
            problems.append(f"rank {r} lists its {what}s in a different order than rank 0")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RuntimeError(f"rank {runtime.rank()}: the workers' models differ: {shown}. Every worker must build "
                           "the same model (same parameter names, shapes and dtypes).")


# --------------------------------------------------------------------------------------------------------------
# Starting every worker from the same state

def _named_tensors(params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = list(params)
        if items and not isinstance(items[0], tuple):
            items = [(f"tensor.{i}", t) for i, t in enumerate(items)]
    return [(n, t) for n, t in items if isinstance(t, torch.Tensor)]


def broadcast_parameters(params, root_rank: int = 0) -> None:
    """Overwrite every worker's tensors with the root's, in place.

    params: a `state_dict()`, `named_parameters()`, or a list of tensors. Names, shapes and dtypes are
    compared first, so workers with different models get an error naming the tensor instead of a hang.
    """
    named = _named_tensors(params)
    _check_root(root_rank)
    if not is_active():
        return
    check_consistency(named, "tensor")
    from .partition import is_feature_split
    pending = []
    with torch.no_grad():
        for name, t in named:
            if is_feature_split(t):
                continue  # each worker keeps its own shard
            # torch.distributed needs contiguous memory; a strided tensor is received in a copy
            buf = t.data if t.is_contiguous() else t.data.contiguous()
            pending.append((_broadcast_start(buf, root_rank, name), t, buf))
        for handle, t, buf in pending:
            handle.wait()
            if buf is not t.data:
                t.data.copy_(buf)


def _base_state_dict(optimizer):
    """The wrapped torch optimizer's own state dict (without a DistributedOptimizer's strategy state)."""
    from .optimizer import _DistributedOptimizer
    if isinstance(optimizer, _DistributedOptimizer):
        return super(_DistributedOptimizer, optimizer).state_dict(), \
            super(_DistributedOptimizer, optimizer).load_state_dict
    return optimizer.state_dict(), optimizer.load_state_dict


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Give every worker the root's optimizer state and hyperparameters (values and dtypes).

    Works for every torch.optim optimizer but LBFGS. An optimizer that has not stepped yet has an empty
    state: then every worker ends with the root's (empty) state and hyperparameters, and the state is
    created identically on every worker by the first step. (Horovod instead creates it with a step on zero
    gradients, which moves parameters under weight decay and advances Adam's step count; this does neither.)
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("broadcast_optimizer_state does not support torch.optim.LBFGS (its state holds closures' "
                         "history that is not per parameter)")
    _check_root(root_rank)
    if not is_active():
        return
    state, load = _base_state_dict(optimizer)
    is_root = runtime.rank() == root_rank
    # The structure travels as a pickled object with tensors replaced by (index, shape, dtype, on_cpu);
    # the tensors themselves go through torch.distributed (NCCL for CUDA tensors).
    tensors: list[torch.Tensor] = []

    def strip(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return ("__singa_tensor__", len(tensors) - 1, tuple(value.shape), value.dtype, value.device.type == "cpu")
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(strip(v) for v in value)
        return value

    skeleton = broadcast_object(strip(state) if is_root else None, root_rank, name="optimizer state")
    if is_root:
        received = tensors
    else:
        received = []
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))

        def fill(value):
            if isinstance(value, tuple) and len(value) == 5 and value[0] == "__singa_tensor__":
                _, i, shape, dtype, on_cpu = value
                t = torch.empty(shape, dtype=dtype, device="cpu" if on_cpu else device)
                received.append(t)
                return t
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(fill(v) for v in value)
            return value
        state = fill(skeleton)
    handles = [_broadcast_start(t if t.is_contiguous() else t.contiguous(), root_rank, f"optimizer state #{i}")
               for i, t in enumerate(received)]
    for h in handles:
        h.wait()
    if not is_root:
        load(state)
        _restore_dtypes(optimizer, state)


def _restore_dtypes(optimizer, state) -> None:
    """load_state_dict casts floating state to the parameter's dtype; keep the root's dtypes exactly."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in state["state"].items():
        live = optimizer.state[params[index]]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and isinstance(live.get(key), torch.Tensor) \
                    and live[key].dtype != value.dtype:
                live[key] = live[key].to(value.dtype)
