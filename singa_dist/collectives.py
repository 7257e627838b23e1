"""Collectives on tensors and objects among the workers, with Horovod's names and semantics.

Tensor collectives return new tensors and support autograd as horovod.torch defines it:
- `allreduce(x, op)`: the gradient is allreduced with the same op;
- `allgather(x)`: the gradient is averaged over the ranks, then each rank takes the slice of its own input;
- `broadcast(x, root_rank)`: the gradient is averaged over the ranks and kept on the root only (zero elsewhere).
The `_` variants work in place (no autograd); `*_async` variants return a Handle for `synchronize(handle)`.

In a single process (no launcher, or one worker) every collective is an identity. Every exchange runs
through `singa_dist.primitives`, so a rank that does not arrive is named in the error instead of a hang.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import primitives, runtime
from .compression import Compression, resolve as _resolve_compression
from .primitives import CollectiveError, Handle, is_active  # noqa: F401 (CollectiveError: public here too)


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


def synchronize(handle: Handle):
    """Wait for an asynchronous collective and return its output (horovod.torch.synchronize)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when the asynchronous collective has finished (horovod.torch.poll)."""
    return handle.is_completed()


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
    if prescale != 1.0:
        tensor.mul_(prescale)
    wire, ctx = compressor.compress(tensor)

    def finish():
        out = compressor.decompress(wire, ctx)
        if out is not tensor:
            tensor.copy_(out)
        if op is Average:
            _divide(tensor, runtime.size())
        if postscale != 1.0:
            tensor.mul_(postscale)
        return tensor
    return primitives.all_reduce(wire, f"allreduce of {name or 'a tensor'} {tuple(tensor.shape)}",
                                 op=torch_op(op), async_op=True, finish=finish)


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
        return primitives.done(tensor.detach().clone())
    what = f"allgather of {name or 'a tensor'} {tuple(tensor.shape)}"
    n = runtime.size()
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = primitives.all_gather_into(torch.empty(n, dtype=torch.int64, device=tensor.device), rows,
                                        what).tolist()
    most = max(counts)
    send = tensor.detach().contiguous()
    if tensor.shape[0] < most:
        send = torch.cat([send, send.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))])
    gathered = send.new_empty((n * most, *tensor.shape[1:]))

    def finish():
        if all(c == most for c in counts):
            return gathered
        return torch.cat([gathered[r * most: r * most + c] for r, c in enumerate(counts)])
    handle = primitives.all_gather_into(gathered, send, what, async_op=True, finish=finish)
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

def check_root(root_rank: int) -> None:
    n = runtime.size() if runtime.is_initialized() else 1
    if not 0 <= root_rank < n:
        raise ValueError(f"root_rank {root_rank} is not a worker rank (there are {n} workers)")


def _broadcast_start(tensor: torch.Tensor, root_rank: int, name: str | None) -> Handle:
    """Overwrite `tensor` with the root's, in place, asynchronously."""
    check_root(root_rank)
    if not is_active():
        return primitives.done(tensor)
    return primitives.broadcast(tensor, root_rank,
                                f"broadcast of {name or 'a tensor'} {tuple(tensor.shape)} from rank {root_rank}",
                                async_op=True)


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

def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=None):
    """The root worker's picklable `obj`, on every worker."""
    _no_process_sets(process_set)
    check_root(root_rank)
    if not is_active():
        return obj
    return primitives.broadcast_object(obj if runtime.rank() == root_rank else None, root_rank,
                                       f"broadcast_object of {name or 'an object'} from rank {root_rank}")


def allgather_object(obj, name: str | None = None, process_set=None) -> list:
    """Every worker's picklable `obj`, as a list in rank order."""
    _no_process_sets(process_set)
    if not is_active():
        return [obj]
    return primitives.all_gather_object(obj, f"allgather_object of {name or 'an object'}")


def barrier(process_set=None) -> None:
    """Wait until every worker arrives here."""
    _no_process_sets(process_set)
    if is_active():
        primitives.barrier("barrier")


def _no_process_sets(process_set) -> None:
    if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
        raise ValueError("singa_dist runs collectives on all workers; Horovod process sets other than the "
                         "global one are not supported")
