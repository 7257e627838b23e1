"""Hybrid partitioning inside one worker group (SINGA's `partition_dim`): each layer splits either the batch
or the features across the group's workers, and connection layers join layers that split differently.

- `partition_dim=0`: the layer sees this worker's share of the batch; its parameters are replicated and the
  DistributedOptimizer averages their gradients (data parallelism).
- `partition_dim=1`: the layer keeps this worker's share of the output features (a Linear's rows, a
  convolution's output channels) and sees the whole batch; its parameters are not replicated and are never
  all-reduced (model parallelism).

An activation is in one of three layouts across the group: "batch" (each worker holds its rows, all
features), "feature" (all rows, each worker its feature columns, dim 1) or "full" (every worker holds all of
it). The connection layers move between them over torch.distributed collectives of the worker group:

| layer | forward | backward |
|---|---|---|
| `Concate(dim)` | all-gather the workers' parts along `dim` | keep this worker's part of the gradient |
| `Split()` | the same tensor on every worker, feeding each worker's partition | sum the partitions' gradients |
| `Slice(dim)` | keep this worker's part along `dim` | all-gather the parts of the gradient |
| `BridgeSrc()` | all-to-all: batch split -> feature split | all-to-all: feature split -> batch split |
| `BridgeDst()` | all-to-all: feature split -> batch split | all-to-all: batch split -> feature split |

Gradients follow SINGA's semantics: a connection layer's backward returns the gradient of the sum of the
workers' losses. A feature-split parameter therefore receives the gradient of every worker's loss, n times
the gradient of their average; the AllReduce strategy divides it by n (under `op=sd.Average`) instead of
all-reducing it, so training equals one process on the whole batch.

`partition(model, dims)` rewrites an `nn.Sequential` (nested ones too): it shards the parameters of the
layers with `partition_dim=1` out of the full model, so every worker starts where a single process would,
and inserts the connection layers. The model's input and output are split by batch, as in data parallelism.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import primitives, runtime
from .shards import Shard, is_feature_split, mark_shard, shard_of, split_sizes  # noqa: F401 (public here too)


def _group():
    """(process group, this worker's rank in it, its size) of this worker's group; (None, 0, 1) alone."""
    if not runtime.is_initialized() or not runtime.is_distributed():
        return None, 0, 1
    pg = runtime.group_process_group()
    return pg, dist.get_rank(pg), dist.get_world_size(pg)


# ------------------------------------------------------------------------------------------------- collectives

# Every collective is a primitive's (singa_dist.primitives): a worker that never arrives is named in the error
# (within the job's timeout) instead of leaving the others waiting.

def _gather_sizes(local: int, pg, n: int, what: str) -> list[int]:
    mine = torch.tensor([local], dtype=torch.int64)
    return primitives.all_gather_into(mine.new_empty(n), mine, f"{what} (the workers' sizes)", group=pg).tolist()


def _all_gather(x: torch.Tensor, dim: int, sizes: list[int], pg, what: str) -> torch.Tensor:
    """Concatenate every worker's `x` along `dim` (lengths `sizes`, which may differ) in rank order."""
    most = max(sizes)
    x = x.contiguous()
    if x.shape[dim] < most:
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    parts = primitives.all_gather_into(x.new_empty((len(sizes) * x.shape[0], *x.shape[1:])), x, what,
                                       group=pg).chunk(len(sizes))
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)


def _all_to_all(x: torch.Tensor, split_dim: int, split: list[int], cat_dim: int, cat: list[int], pg,
                rank: int, what: str) -> torch.Tensor:
    """Send part r of `x` along `split_dim` to worker r; concatenate what arrives along `cat_dim`.

    Worker q's part has length cat[q] along `cat_dim`; the result's length along `split_dim` is split[rank].
    """
    send = [p.contiguous().reshape(-1) for p in x.split(split, split_dim)]
    shape = list(x.shape)
    shape[split_dim] = split[rank]
    recv_shapes = []
    for q in range(len(cat)):
        s = list(shape)
        s[cat_dim] = cat[q]
        recv_shapes.append(s)
    recv_numels = [int(torch.Size(s).numel()) for s in recv_shapes]
    out = primitives.all_to_all_single(x.new_empty(sum(recv_numels)), torch.cat(send), what,
                                       output_split_sizes=recv_numels, input_split_sizes=[p.numel() for p in send],
                                       group=pg)
    return torch.cat([p.view(s) for p, s in zip(out.split(recv_numels), recv_shapes)], cat_dim)


class _BatchSizes:
    """The workers' batch sizes of the current forward pass, shared by one model's connection layers:
    the layer that gathers the batch records them, the bridge that returns to a batch split reads them."""

    def __init__(self):
        self.sizes: list[int] | None = None


class _ConcateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, pg, rank):
        ctx.dim, ctx.start, ctx.length = dim, sum(sizes[:rank]), sizes[rank]
        return _all_gather(x, dim, sizes, pg, f"Concate of {tuple(x.shape)} along dim {dim}")

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.length), None, None, None, None


class _SliceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, pg, rank):
        ctx.dim, ctx.sizes, ctx.pg = dim, sizes, pg
        return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).clone()

    @staticmethod
    def backward(ctx, grad):
        what = f"the gradient of Slice {tuple(grad.shape)} along dim {ctx.dim}"
        return _all_gather(grad, ctx.dim, ctx.sizes, ctx.pg, what), None, None, None, None


class _SplitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = primitives.all_reduce(grad.contiguous().clone(), f"the gradient of Split {tuple(grad.shape)}",
                                     group=ctx.pg)
        return grad, None


class _AllToAllFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split_dim, split, cat_dim, cat, pg, rank, name):
        ctx.args, ctx.name = (cat_dim, cat, split_dim, split, pg, rank), name
        return _all_to_all(x, split_dim, split, cat_dim, cat, pg, rank, f"{name} of {tuple(x.shape)}")

    @staticmethod
    def backward(ctx, grad):
        what = f"the gradient of {ctx.name} {tuple(grad.shape)}"
        return _all_to_all(grad, *ctx.args, what), None, None, None, None, None, None, None


def _dim(x: torch.Tensor, dim: int) -> int:
    return dim % x.dim()


class Concate(nn.Module):
    """SINGA's ConcateLayer across the workers: every worker's part, all-gathered along `dim`.

    sizes: every worker's length along `dim` when it is known in advance (a feature split); otherwise the
    lengths are exchanged at every call (a batch split, whose last batch may be smaller).
    """

    def __init__(self, dim: int = 0, sizes: list[int] | None = None, batch: _BatchSizes | None = None):
        super().__init__()
        self.dim, self.sizes, self.batch = dim, sizes, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pg, rank, n = _group()
        if n == 1:
            return x
        dim = _dim(x, self.dim)
        sizes = list(self.sizes) if self.sizes is not None else \
            _gather_sizes(x.shape[dim], pg, n, f"Concate of {tuple(x.shape)} along dim {dim}")
        if dim == 0 and self.batch is not None:
            self.batch.sizes = sizes
        return _ConcateFunction.apply(x, dim, sizes, pg, rank)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Slice(nn.Module):
    """SINGA's SliceLayer across the workers: of a tensor every worker holds whole, keep this worker's part
    along `dim` (torch.tensor_split's sizes, or `sizes`)."""

    def __init__(self, dim: int = 0, sizes: list[int] | None = None):
        super().__init__()
        self.dim, self.sizes = dim, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pg, rank, n = _group()
        if n == 1:
            return x
        dim = _dim(x, self.dim)
        sizes = list(self.sizes) if self.sizes is not None else split_sizes(x.shape[dim], n)
        if sum(sizes) != x.shape[dim]:
            raise ValueError(f"Slice: sizes {sizes} do not add up to dimension {dim} of {tuple(x.shape)}")
        return _SliceFunction.apply(x, dim, sizes, pg, rank)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Split(nn.Module):
    """SINGA's SplitLayer across the workers: a tensor every worker holds whole feeds each worker's partition
    of the next layer; the backward pass sums the partitions' gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pg, _, n = _group()
        return x if n == 1 else _SplitFunction.apply(x, pg)


class BridgeSrc(nn.Module):
    """From data-parallel to model-parallel layers: an all-to-all turns a batch split (each worker its rows)
    into a feature split along dim 1 (all rows, each worker its features; torch.tensor_split's sizes, or
    `sizes`). Gradients travel back the other way. SINGA's BridgeSrc/BridgeDst pair sends between two
    workers; with every worker on both sides it is one all-to-all."""

    def __init__(self, sizes: list[int] | None = None, batch: _BatchSizes | None = None):
        super().__init__()
        self.sizes, self.batch = sizes, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pg, rank, n = _group()
        if n == 1:
            return x
        rows = _gather_sizes(x.shape[0], pg, n, f"BridgeSrc of {tuple(x.shape)}")
        if self.batch is not None:
            self.batch.sizes = rows
        features = list(self.sizes) if self.sizes is not None else split_sizes(x.shape[1], n)
        return _AllToAllFunction.apply(x, 1, features, 0, rows, pg, rank, "BridgeSrc")


class BridgeDst(nn.Module):
    """From model-parallel back to data-parallel layers: an all-to-all turns a feature split along dim 1
    into a batch split. Each worker gets back the rows it contributed (as recorded by the connection layer
    that gathered the batch, when there is one; else torch.tensor_split's sizes). Gradients travel back
    the other way."""

    def __init__(self, batch: _BatchSizes | None = None, sizes: list[int] | None = None):
        super().__init__()
        self.batch, self.sizes = batch, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pg, rank, n = _group()
        if n == 1:
            return x
        rows = self.batch.sizes if self.batch is not None and self.batch.sizes is not None else None
        if rows is None or sum(rows) != x.shape[0]:
            rows = split_sizes(x.shape[0], n)
        features = list(self.sizes) if self.sizes is not None else \
            _gather_sizes(x.shape[1], pg, n, f"BridgeDst of {tuple(x.shape)}")
        return _AllToAllFunction.apply(x, 0, rows, 1, features, pg, rank, "BridgeDst")


# ------------------------------------------------------------------------------------------------ partition()

# Layers that act on each element alone run on whatever split reaches them (they take the previous dim).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardtanh,
                nn.Dropout, nn.Identity)
_ELEMENTWISE_NAMES = {"STanh", "Activation"}  # native_layers' own, recognised without importing them
# Layers whose outputs can be split along dim 1 by splitting their parameters' first dimension.
_FEATURE_SPLITTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_elementwise(m: nn.Module) -> bool:
    return isinstance(m, _ELEMENTWISE) or type(m).__name__ in _ELEMENTWISE_NAMES


def _default_dim(m: nn.Module, previous: int, linear_dim: int) -> int:
    if isinstance(m, nn.Linear):
        return linear_dim
    if _is_elementwise(m):
        return previous
    return 0


def _shard_parameters(module: nn.Module, rank: int, n: int) -> None:
    """Keep this worker's share of `module`'s output features (dim 0 of its weight and bias)."""
    if isinstance(module, _FEATURE_SPLITTABLE[1:]) and module.groups != 1:
        raise ValueError(f"partition_dim=1 needs an ungrouped convolution, got groups={module.groups}")
    out = module.weight.shape[0]
    sizes = split_sizes(out, n)
    if min(sizes) == 0:
        raise ValueError(f"{type(module).__name__} has {out} output features, fewer than the {n} workers")
    start = sum(sizes[:rank])
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is None:
            continue
        shard = nn.Parameter(p.detach()[start:start + sizes[rank]].clone(), requires_grad=p.requires_grad)
        mark_shard(shard, Shard(0, tuple(p.shape), start, sizes[rank], tuple(sizes)))
        setattr(module, name, shard)
    if isinstance(module, nn.Linear):
        module.out_features = sizes[rank]
    else:
        module.out_channels = sizes[rank]
    module._register_load_state_dict_pre_hook(_load_full_shard, with_module=True)


def _load_full_shard(module, state_dict, prefix, *args) -> None:
    """load_state_dict() of the whole model's tensors keeps this worker's share of the split ones."""
    for name in ("weight", "bias"):
        key, p = prefix + name, getattr(module, name, None)
        info = shard_of(p) if p is not None else None
        if info is not None and key in state_dict and tuple(state_dict[key].shape) == info.full_shape \
                and info.full_shape != tuple(p.shape):
            state_dict[key] = state_dict[key].narrow(info.dim, info.start, info.length)


def partition(model: nn.Sequential, dims: dict | Callable | None = None, *, linear_dim: int = 1) -> nn.Sequential:
    """A copy of `model` partitioned across this worker's group, with connection layers where needed.

    dims: each layer's partition_dim, as {module name: 0 or 1} (names as in model.named_modules()) or a
          callable (name, module) -> 0, 1 or None (None: the default). Defaults: `linear_dim` for
          nn.Linear, the previous layer's dim for element-wise layers (activations, dropout), 0 for the
          rest (convolution, pooling, normalization, flatten).
    The copy's parameter names and state_dict keys are the model's: connection layers hold no state.
    Build the model identically on every worker (or broadcast it first): the shards are cut from it.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"partition() takes an nn.Sequential (nested ones included), got {type(model).__name__}")
    runtime.require_init("partition()")
    _, rank, n = _group()
    if callable(dims):
        choose = dims
    else:
        given = dict(dims or {})
        names = {name for name, _ in model.named_modules()}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"partition(): dims names modules the model does not have: {unknown}")
        choose = lambda name, m: given.get(name)  # noqa: E731
    model = copy.deepcopy(model)
    batch = _BatchSizes()
    counter = [0]

    def connect(layout: str, need: str, sizes, out: OrderedDict) -> None:
        """Append the connection layers that turn `layout` into `need`."""
        def add(kind, module):
            out[f"{kind}_{counter[0]}"] = module
            counter[0] += 1
        if layout == need:
            return
        if need == "full":
            add("concate", Concate(0, batch=batch) if layout == "batch" else Concate(1, sizes=sizes))
            add("split", Split())
        elif need == "batch":
            add("bridge_dst", BridgeDst(batch, sizes=sizes))
        else:
            add("bridge_src", BridgeSrc(batch=batch))

    # A running state: the current layout, the previous layer's dim, the feature sizes of a feature split.
    state = {"layout": "batch", "dim": 0, "sizes": None}

    def rebuild(seq: nn.Sequential, prefix: str) -> nn.Sequential:
        out = OrderedDict()
        for name, m in seq.named_children():
            full = prefix + name
            if isinstance(m, nn.Sequential):
                out[name] = rebuild(m, full + ".")
                continue
            dim = choose(full, m)
            dim = _default_dim(m, state["dim"], linear_dim) if dim is None else dim
            if dim not in (0, 1):
                raise ValueError(f"partition_dim of '{full}' must be 0 or 1, got {dim!r}")
            if dim == 0:
                connect(state["layout"], "batch", state["sizes"], out)
                state["layout"] = "batch"
            elif isinstance(m, _FEATURE_SPLITTABLE):
                connect(state["layout"], "full", state["sizes"], out)
                state["layout"], state["sizes"] = "feature", split_sizes(m.weight.shape[0], n)
                if n > 1:
                    _shard_parameters(m, rank, n)
            elif _is_elementwise(m):
                if state["layout"] != "feature":
                    connect(state["layout"], "feature", state["sizes"], out)
                    state["layout"], state["sizes"] = "feature", None
            else:
                raise ValueError(f"'{full}' ({type(m).__name__}) cannot split its features (partition_dim=1): "
                                 "that needs a Linear, an ungrouped convolution or an element-wise layer")
            state["dim"] = dim
            out[name] = m
        seq._modules = out  # the copy's own container, so a Sequential subclass keeps its class
        return seq

    result = rebuild(model, "")
    if state["layout"] != "batch":
        tail = OrderedDict()
        connect(state["layout"], "batch", state["sizes"], tail)
        for key, module in tail.items():
            result.add_module(key, module)
    return result


def full_state_dict(model: nn.Module) -> dict:
    """The single-process model's state_dict: every feature-split tensor all-gathered from the workers'
    shards (a collective: call it on every worker of the group, then save it on rank 0)."""
    pg, _, n = _group()
    out = OrderedDict()
    for key, value in model.state_dict(keep_vars=True).items():
        info = shard_of(value) if isinstance(value, torch.Tensor) else None
        if info is not None and n > 1:
            value = _all_gather(value.detach(), info.dim, list(info.sizes), pg, f"full_state_dict() of {key}")
        out[key] = value.detach() if isinstance(value, torch.Tensor) else value
    return out
