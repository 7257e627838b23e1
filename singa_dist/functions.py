"""Model-level functions: what walks a model's or an optimizer's tensors and exchanges them all.

- `check_consistency`: before any training, every worker has the same parameter names, shapes and dtypes;
- `broadcast_parameters` / `broadcast_optimizer_state`: every worker starts from the root's state;
- `allreduce_gradients_`: one fused all-reduce of every parameter's `.grad` inside a group (the
  parameter-server strategies' synchronous step inside a worker group);
- `broadcast_flat_`: one fused broadcast of many tensors inside a group;
- `join`: uneven data: `with sd.join(model, optimizer):` lets the ranks that run out of batches take part in the
  others' steps with zeros, then every rank takes the model of the rank that finished last.
Feature-split parameters (`singa_dist.shards`) differ by worker by design: they are compared by the shape
of the whole tensor they were cut from and are never broadcast.
"""
from __future__ import annotations

import functools

import torch

from . import primitives, runtime, timeline
from . import collectives
from .collectives import _broadcast_start, allgather_object, broadcast_object, check_root
from .primitives import is_active
from .shards import is_feature_split, shard_of


def check_consistency(named_tensors, what: str = "parameter") -> None:
    """Raise on every worker when workers disagree on tensor names, shapes or dtypes (before any training).

    Mismatched models otherwise fail late and obscurely: collectives of different sizes hang or mix data.
    """
    if not is_active():
        return
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


def _reaches_others() -> bool:
    """Whether a broadcast from the root has other workers to reach. A replacement worker group of an asynchronous
    job takes the current values (and the servers' optimizer state) from the servers, or Hogwild's masters, as its
    optimizer is set up; the others are far ahead."""
    return is_active() and not runtime.is_replacement()


def broadcast_parameters(params, root_rank: int = 0) -> None:
    """Overwrite every worker's tensors with the root's, in place.

    params: a `state_dict()`, `named_parameters()`, or a list of tensors. Names, shapes and dtypes are
    compared first, so workers with different models get an error naming the tensor instead of a hang.
    """
    runtime.require_init("broadcast_parameters()")
    named = _named_tensors(params)
    check_root(root_rank)
    if not _reaches_others():
        return
    check_consistency(named, "tensor")
    with torch.no_grad():
        # each worker keeps its own shard of a feature-split tensor
        pending = [_broadcast_start(t.data, root_rank, name) for name, t in named if not is_feature_split(t)]
        for handle in pending:
            handle.wait()


def user_optimizer_class(optimizer) -> type:
    """The user's optimizer class: DistributedOptimizer re-classes the object to a subclass of it."""
    return getattr(type(optimizer), "_singa_user_class", type(optimizer))


def _base_state_dict(optimizer):
    """The wrapped torch optimizer's own state dict (without a DistributedOptimizer's strategy state)."""
    base = user_optimizer_class(optimizer)
    return base.state_dict(optimizer), functools.partial(base.load_state_dict, optimizer)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, model=None) -> None:
    """Give every worker the root's optimizer state and hyperparameters (values and dtypes).

    Works for every torch.optim optimizer but LBFGS. As in Horovod, an optimizer that has not stepped yet first
    gets its state made by one step of the wrapped optimizer on zero gradients (sparse ones for SparseAdam and
    for the sparse embeddings of `model`); the parameters' `.grad` are those zeros afterwards, and the
    parameters keep their values.
    """
    runtime.require_init("broadcast_optimizer_state()")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("broadcast_optimizer_state does not support torch.optim.LBFGS (its state holds closures' "
                         "history that is not per parameter)")
    check_root(root_rank)
    if not _reaches_others():
        return
    state, load = _base_state_dict(optimizer)
    if not state["state"]:
        _make_state(optimizer, model)
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


@torch.no_grad()
def _make_state(optimizer, model) -> None:
    """One step of the wrapped optimizer (not the distributed one: no communication) on zero gradients. The
    parameters are put back afterwards: weight decay would otherwise move them on the workers that had no state
    yet, and only theirs."""
    sparse = {id(m.weight) for m in (model.modules() if model is not None else [])
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
        if isinstance(optimizer, torch.optim.SparseAdam) or id(p) in sparse:
            p.grad = p.grad.to_sparse()
    user_optimizer_class(optimizer).step(optimizer)
    for p, value in zip(params, saved):
        p.copy_(value)


def _restore_dtypes(optimizer, state) -> None:
    """load_state_dict casts floating state to the parameter's dtype; keep the root's dtypes exactly."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in state["state"].items():
        live = optimizer.state[params[index]]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and isinstance(live.get(key), torch.Tensor) \
                    and live[key].dtype != value.dtype:
                live[key] = live[key].to(value.dtype)


# --------------------------------------------------------------------------------------------------------------
# Fused exchanges inside a group

def allreduce_gradients_(named_params, group, group_size: int, average: bool = True, what: str = "gradients") -> int:
    """Sum (or average) every parameter's `.grad` over `group` in one fused message; a parameter with no
    gradient on this rank counts as zeros, and one with no gradient on any rank keeps `.grad = None` (so the
    optimizer skips it, as torch's optimizers and DDP's find_unused_parameters do). The parameter-server
    strategies use it inside a worker group. Returns the message's bytes."""
    named_params = list(named_params)
    if not named_params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in named_params]
    # One more element per parameter counts the ranks that had a gradient for it, in the same message.
    had = torch.tensor([float(p.grad is not None) for _, p in named_params], dtype=grads[0].dtype,
                       device=grads[0].device)
    flat = torch._utils._flatten_dense_tensors(grads + [had])
    description = f"{what} of {len(named_params)} parameters ({named_params[0][0]}, ...)"
    t0 = timeline.now() if timeline.on else 0
    primitives.all_reduce(flat, description, group=group)
    if t0:
        timeline.span("allreduce", t0, tensor=description, cat="comm")
    counts = flat[-len(grads):].tolist()
    if average:
        flat[:-len(grads)] /= group_size
    for (_, p), g, count in zip(named_params, torch._utils._unflatten_dense_tensors(flat, grads), counts):
        p.grad = g.view_as(p) if count > 0 else None
    return flat.numel() * flat.element_size()


@torch.no_grad()
def broadcast_flat_(tensors: list[torch.Tensor], root: int, what: str, group=None) -> int:
    """Overwrite `tensors` with member `root`'s (counted within `group`), in one fused message; returns its bytes."""
    if not tensors:
        return 0
    flat = torch._utils._flatten_dense_tensors(tensors)
    primitives.broadcast(flat, root, what, group=group)
    for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(v)
    return flat.numel() * flat.element_size()


# --------------------------------------------------------------------------------------------------------------
# Uneven data

class Join:
    """The context `sd.join(model, optimizer)` returns: see `join`."""

    def __init__(self, joinables, divide_by_initial_world_size: bool):
        self.models = [j for j in joinables if isinstance(j, torch.nn.Module)]
        self.optimizers = [j for j in joinables if isinstance(j, torch.optim.Optimizer)]
        other = [j for j in joinables if not isinstance(j, (torch.nn.Module, torch.optim.Optimizer))]
        if other:
            raise TypeError(f"sd.join() takes models and optimizers, got {type(other[0]).__name__}")
        self.divide_by_initial_world_size = divide_by_initial_world_size
        self.last: int | None = None

    def _strategies(self) -> list:
        return [s for s in (getattr(opt, "strategy", None) for opt in self.optimizers)
                if s is not None and hasattr(s, "average_over_active")]

    def __enter__(self) -> "Join":
        for strategy in self._strategies():
            strategy.average_over_active = not self.divide_by_initial_world_size
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.last = collectives.join()
                for model in self.models:
                    broadcast_parameters(model.state_dict(), root_rank=self.last)
                for opt in self.optimizers:
                    broadcast_optimizer_state(opt, root_rank=self.last)
        finally:
            for strategy in self._strategies():
                strategy.average_over_active = False
        return False


def join(*joinables, divide_by_initial_world_size: bool = False, device: int = -1):
    """Uneven data, as DDP's `Join` context and Horovod's `join()`.

    `with sd.join(model, optimizer): <training loop>`: a rank whose loop ends first waits at the end of the block,
    taking part in the other ranks' gradient steps, allreduces and barriers with zeros, until every rank has left
    the block; then every rank takes the model and optimizer state of the rank that finished last. A step that
    some ranks sat out averages over the ranks that took part (divide_by_initial_world_size=True: over all), so
    the result equals one process training on the same batches. `.last` holds the rank that finished last.
    Called without models or optimizers (Horovod's `join(device)`), it is the join itself: it returns the rank
    that joined last.

    Arguments:
        joinables: the models and DistributedOptimizers of the loop.
        divide_by_initial_world_size: average a step over every rank, the joined ones' zeros included.
        device: Horovod's argument (the GPU of this rank), accepted and not needed.
    Returns:
        the context (with models or optimizers), else the rank that joined last.
    Raises:
        CollectiveError when a rank that has joined is asked for something it cannot take part in (an allgather
        or broadcast of the others: as in Horovod).
    """
    if not joinables or (len(joinables) == 1 and isinstance(joinables[0], int) and not isinstance(joinables[0], bool)):
        return collectives.join(*joinables)
    return Join(joinables, divide_by_initial_world_size)
