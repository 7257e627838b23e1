"""Collectives among the workers with horovod.torch's names, signatures and semantics.

Every call is negotiated first (`singa_dist.coordinator`): the ranks of the process set agree on the
collective's name, kind, dtype, shape, op, root and scale factors before any data moves, and a mismatch
raises `CollectiveMismatchError` (a HorovodInternalError) on every rank instead of crashing or mixing data.
`*_async` calls return a handle at once; `synchronize(handle)` (or `handle.wait()`) returns the result.

- allreduce / grouped_allreduce: ops Average (default), Sum, Min, Max, Product, Adasum; prescale_factor and
  postscale_factor (on integer tensors as Horovod does: scaled in float64, truncated toward zero); any dtype
  (int16 and bool travel as int32).
- allgather / grouped_allgather: concatenation along dim 0, whose size may differ across ranks.
- broadcast, broadcast_ (in place), alltoall (with splits), reducescatter / grouped_reducescatter (Sum or
  Average; with uneven first dimensions the lowest ranks get one row more), barrier, join.
- broadcast_object / allgather_object: picklable objects.
Tensor collectives are differentiable as horovod.torch defines them. In a single process (or a process set of
one) every collective is an identity.

Names: `name=None` gets Horovod's automatic name ("allreduce.noname.<n>", n counting this process's
collectives), so that ranks issuing the same sequence of calls agree; two collectives with one name may not be
in flight at once (ValueError, as in Horovod).
"""
from __future__ import annotations

import itertools
import math
import pickle
import warnings

import torch
import torch.distributed as dist

from . import coordinator, primitives, runtime
from .compression import Compression, resolve as _resolve_compression
from .coordinator import (CollectiveMismatchError, ProcessSet, Request, add_process_set, global_process_set,  # noqa: F401
                          register, remove_process_set)
from .primitives import CollectiveError, Handle  # noqa: F401 (CollectiveError: public here too)


class ReduceOp:
    """How tensors from the workers combine (Horovod's names)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"singa_dist.{self.name}"

    def __reduce__(self):
        return self.name  # pickles as the module-level constant


Average = ReduceOp("Average")
Sum = ReduceOp("Sum")
Adasum = ReduceOp("Adasum")
Min = ReduceOp("Min")
Max = ReduceOp("Max")
Product = ReduceOp("Product")
_OPS = {op.name: op for op in (Average, Sum, Adasum, Min, Max, Product)}
_OP_CODES = {"Average": 0, "Sum": 1, "Adasum": 2, "Min": 3, "Max": 4, "Product": 5}  # Horovod's ReduceOp values
_TORCH_OPS = {"Average": dist.ReduceOp.SUM, "Sum": dist.ReduceOp.SUM, "Min": dist.ReduceOp.MIN,
              "Max": dist.ReduceOp.MAX, "Product": dist.ReduceOp.PRODUCT}


def torch_op(op: ReduceOp):
    """The torch.distributed op that carries `op` (Average travels as a sum, scaled afterwards)."""
    try:
        return _TORCH_OPS[op.name]
    except (KeyError, AttributeError):
        raise ValueError(f"op must be one of sd.Average, sd.Sum, sd.Min, sd.Max, sd.Product (or sd.Adasum for "
                         f"allreduce), got {op!r}") from None


def resolve_op(op=None, average=None) -> ReduceOp:
    """Horovod's rule: `op` and `average` (deprecated) exclude each other; the default is Average."""
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0",
                      DeprecationWarning, stacklevel=3)
        return Average if average else Sum
    if op is None:
        return Average
    if not isinstance(op, ReduceOp) or op.name not in _OPS:
        raise ValueError(f"op must be one of sd.Average, sd.Sum, sd.Adasum, sd.Min, sd.Max, sd.Product, got {op!r}")
    return _OPS[op.name]


def synchronize(handle):
    """Wait for an asynchronous collective and return its output (horovod.torch.synchronize)."""
    return handle.wait()


def poll(handle) -> bool:
    """True when the asynchronous collective has finished (horovod.torch.poll)."""
    return handle.is_completed()


_counter = itertools.count(1)


def _name(prefix: str, name: str | None) -> str:
    number = next(_counter)  # one per collective, named or not, as Horovod's handles
    return f"{prefix}.{name}" if name else f"{prefix}.noname.{number}"


def _set_and_engine(process_set, what: str):
    """(the ProcessSet, True when there are others in it to talk to); a rank outside the set gets Horovod's error."""
    runtime.require_init(f"{what.lower()}()")
    ps = coordinator.resolve_set(process_set)
    if ps.process_set_id != 0 and runtime.rank() not in ps.ranks:
        raise ValueError(f"{what}: Rank {runtime.rank()} is not a member of the provided process set.")
    if not (runtime.is_initialized() and runtime.is_distributed()):
        return ps, False
    if runtime.is_replacement():
        raise runtime.replacement_error(f"{what.lower()}()")
    return ps, (ps.size() or 1) > 1


def _members(ps: ProcessSet) -> list[int]:
    return list(range(runtime.size())) if ps.process_set_id == 0 else ps.ranks


def _device(t: torch.Tensor) -> str:
    return t.device.type


# --------------------------------------------------------------------------------------------------------------
# Wire formats

# Gloo and NCCL reduce no int16 and no bool: those travel as int32 (and bool comes back as `!= 0`).
_WIRE = {torch.int16: torch.int32, torch.bool: torch.int32}


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return _WIRE.get(dtype, dtype)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 view (data movement works for every dtype this way)."""
    t = t.reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    return b.view(dtype).reshape(shape)


def _scale(t: torch.Tensor, factor: float) -> None:
    """Multiply in place as Horovod does: floating tensors in their dtype (fp16 through fp32), integer ones in
    float64 and truncated toward zero."""
    if factor == 1.0:
        return
    if t.is_floating_point() or t.is_complex():
        t.mul_(factor)
    else:
        t.copy_((t.double() * factor).to(t.dtype))


def _divide(t: torch.Tensor, n: int) -> None:
    """Average's division of a sum by the number of ranks, in place: a division, not a product with 1/n (which
    rounds twice: 2a * fl(1/3) is not always fl(2a / 3)); integers truncated toward zero."""
    if n == 1:
        return
    if t.is_floating_point() or t.is_complex():
        t.div_(n)
    else:
        t.copy_(torch.div(t, n, rounding_mode="trunc"))


def _identity(op_name: str, dtype: torch.dtype) -> float | int:
    """What a joined rank contributes: the op's neutral element."""
    if op_name in ("Min", "Max"):
        info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
        return info.max if op_name == "Min" else info.min
    return 1 if op_name == "Product" else 0


# --------------------------------------------------------------------------------------------------------------
# allreduce (and its grouped form, and reducescatter, which reduces the same way)

class _ReduceBuffers:
    """Tensors fused into one flat wire buffer per wire dtype (in the order they were given)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.groups: dict = {}
        for i, t in enumerate(tensors):
            self.groups.setdefault((_wire_dtype(t.dtype), t.device.type), []).append(i)
        self.buffers = []
        for (dtype, _), members in self.groups.items():
            parts = [tensors[i].detach().reshape(-1).to(dtype) for i in members]
            self.buffers.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())

    def layout(self) -> list[tuple[str, int, str]]:
        return [(str(b.dtype), b.numel(), b.device.type) for b in self.buffers]

    def results(self) -> list[torch.Tensor]:
        """The reduced tensors, in their own dtypes and shapes."""
        out = [None] * len(self.tensors)
        for (dtype, _), members, buf in zip(self.groups, self.groups.values(), self.buffers):
            for i, part in zip(members, buf.split([self.tensors[i].numel() for i in members])):
                t = self.tensors[i]
                out[i] = (part != 0 if t.dtype == torch.bool else part.to(t.dtype)).reshape(t.shape)
        return out


def _check_reducible(tensors, op: ReduceOp, what: str) -> None:
    for t in tensors:
        if op is Adasum and not t.is_floating_point():
            raise ValueError(f"{what}: Adasum reduces floating-point tensors only, got {t.dtype}")
        if t.dtype == torch.bool and op in (Average, Adasum):
            raise ValueError(f"{what}: a bool tensor cannot be averaged; use op=Sum (any), Min (all) or Max (any)")


@register("allreduce", "grouped_allreduce", "reducescatter", "grouped_reducescatter")
class _Allreduce(Request):
    """Reduce tensors (one, or a group fused into one message per dtype)."""

    def __init__(self, name, tensors, op: ReduceOp, prescale: float, postscale: float, size: int, kind="allreduce"):
        super().__init__(name)
        self.kind = kind
        self.fused = _ReduceBuffers(tensors)
        self.op, self.prescale, self.postscale, self.size = op, float(prescale), float(postscale), size
        shapes = tuple(tuple(t.shape) for t in tensors)
        dtypes = tuple(str(t.dtype).replace("torch.", "") for t in tensors)
        self.desc = {"kind": kind, "name": self.match_name, "dtype": dtypes if len(tensors) > 1 else dtypes[0],
                     "shape": shapes if len(tensors) > 1 else shapes[0], "op": op.name,
                     "scale": (self.prescale, self.postscale), "device": _device(tensors[0]),
                     "buffers": self.fused.layout()}

    def signature(self):
        d = self.desc
        return (d["kind"], d["name"], d["dtype"], d["shape"], d["op"], d["scale"], d["device"])

    def header(self):
        buf = self.fused.buffers[0]
        return 0, sum(b.numel() for b in self.fused.buffers), coordinator.dtype_code(buf.dtype), _OP_CODES[self.op.name]

    def describe(self):
        return self.desc

    @classmethod
    def mismatch(cls, descs):
        return coordinator.describe_differences(descs, ["kind", "dtype", "shape", "op", "scale", "device"])

    def exchange(self, engine, rows):
        for buf in self.fused.buffers:
            _scale(buf, self.prescale)
        handle = _reduce_buffers(engine, self.fused.buffers, self.op, self.name)
        average = self.op is Average and self.postscale == 1.0

        def finish():
            handle.wait()
            for buf in self.fused.buffers:
                if average:
                    _divide(buf, self.size)
                else:
                    _scale(buf, self.postscale / (self.size if self.op is Average else 1))
            return self.fused.results()
        return Handle([handle], finish, self.name)

    @classmethod
    def shadow(cls, engine, desc, rows):
        zeros = [torch.full((n,), _identity(desc["op"], getattr(torch, dt.replace("torch.", ""))),
                            dtype=getattr(torch, dt.replace("torch.", "")), device=_shadow_device(dev))
                 for dt, n, dev in desc["buffers"]]
        return _reduce_buffers(engine, zeros, _OPS[desc["op"]], desc["name"])


def _shadow_device(device_type: str) -> torch.device:
    return runtime.device() if device_type == "cuda" else torch.device("cpu")


def _reduce_buffers(engine, buffers, op: ReduceOp, name: str) -> Handle:
    """All-reduce every buffer on the set's data group (Adasum: all-gather and combine, see _adasum)."""
    if op is Adasum:
        return _adasum_buffers(engine, buffers, name)
    handles = [primitives.all_reduce(b, f"allreduce of {name}{engine.describe_set()}", op=torch_op(op),
                                     group=engine.data_pg, async_op=True) for b in buffers]
    return Handle(handles, lambda: [h.wait() for h in handles], name)


def _adasum_buffers(engine, buffers, name: str) -> Handle:
    """Horovod's Adasum on every buffer: each rank's vector is gathered, then combined pairwise in a binary tree
    over the ranks (neighbours first), in float64, identically on every rank."""
    n = engine.n
    gathered = [b.new_empty(n * b.numel()) for b in buffers]
    handles = [primitives.all_gather_into(g, b, f"adasum of {name}{engine.describe_set()}", group=engine.data_pg,
                                          async_op=True) for g, b in zip(gathered, buffers)]

    def finish():
        for h, g, b in zip(handles, gathered, buffers):
            h.wait()
            b.copy_(adasum_tree(list(g.view(n, -1).double().unbind(0))).to(b.dtype))
    return Handle(handles, finish, name)


def adasum_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Adasum of two vectors: (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b (a coefficient stays 1 for a zero
    vector)."""
    dot = float(torch.dot(a, b))
    anorm, bnorm = float(torch.dot(a, a)), float(torch.dot(b, b))
    tiny = math.sqrt(2.2250738585072014e-308)  # sqrt(DBL_MIN), Horovod's threshold
    acoeff = 1.0 - dot / anorm * 0.5 if anorm >= tiny else 1.0
    bcoeff = 1.0 - dot / bnorm * 0.5 if bnorm >= tiny else 1.0
    return acoeff * a + bcoeff * b


def adasum_tree(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Combine the ranks' vectors level by level: (0,1), (2,3), ..., then the pairs of those results, ..."""
    while len(vectors) > 1:
        vectors = [adasum_pair(vectors[i], vectors[i + 1]) for i in range(0, len(vectors), 2)]
    return vectors[0]


def _check_adasum(ps: ProcessSet, size: int) -> None:
    if ps.process_set_id != 0:
        raise NotImplementedError("Adasum does not support non-global process sets yet.")
    if size & (size - 1):
        raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")


def _allreduce_start(tensors: list[torch.Tensor], op: ReduceOp, prescale: float, postscale: float, name: str,
                     process_set, what: str = "Allreduce", kind: str = "allreduce"):
    """Start reducing `tensors`; the handle's result is the list of reduced tensors (new tensors)."""
    ps, active = _set_and_engine(process_set, what)
    if not tensors:
        return primitives.done([])
    _check_reducible(tensors, op, what)
    if op is Adasum:
        _check_adasum(ps, ps.size() or 1)
    if not active:
        def local():
            out = []
            for t in tensors:
                r = t.detach().clone()
                _scale(r, prescale)
                _scale(r, postscale)
                out.append(r)
            return out
        return Handle([], local, name)
    return coordinator.submit(_Allreduce(name, tensors, op, prescale, postscale, ps.size(), kind), ps)


class _AllreduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, name, process_set):
        ctx.args = (op, prescale, postscale, process_set)
        return _allreduce_start([tensor], op, prescale, postscale, name, process_set).wait()[0]

    @staticmethod
    def backward(ctx, grad):
        op, prescale, postscale, process_set = ctx.args
        out = _allreduce_start([grad], op, prescale, postscale, _name("allreduce", None), process_set).wait()[0]
        return out, None, None, None, None, None


def allreduce(tensor: torch.Tensor, average=None, name: str | None = None, compression=Compression.none, op=None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set=global_process_set) -> torch.Tensor:
    """The reduction (Average by default) of `tensor` over the workers, as a new tensor; differentiable."""
    compressor = _resolve_compression(compression)
    wire, ctx = compressor.compress(tensor)
    out = _AllreduceFunction.apply(wire, resolve_op(op, average), prescale_factor, postscale_factor,
                                   _name("allreduce", name), process_set)
    return compressor.decompress(out, ctx)


def allreduce_async(tensor: torch.Tensor, average=None, name: str | None = None, op=None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=global_process_set):
    """Start an allreduce into a new tensor; `synchronize(handle)` returns it."""
    return _single(_allreduce_start([tensor], resolve_op(op, average), prescale_factor, postscale_factor,
                                    _name("allreduce", name), process_set))


def allreduce_(tensor: torch.Tensor, average=None, name: str | None = None, op=None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set=global_process_set) -> torch.Tensor:
    """In-place allreduce (no autograd); returns `tensor`."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set).wait()


def allreduce_async_(tensor: torch.Tensor, average=None, name: str | None = None, op=None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=global_process_set):
    """Start an in-place allreduce of `tensor`; `synchronize(handle)` returns it."""
    handle = _allreduce_start([tensor], resolve_op(op, average), prescale_factor, postscale_factor,
                              _name("allreduce", name), process_set)
    return _into([tensor], handle, single=True)


class _Then:
    """A handle whose result is `then(result of the inner handle)`; calling it waits too (Horovod's
    sparse_allreduce_async hands back a function to call)."""

    def __init__(self, inner, then):
        self._inner, self._then = inner, then
        self._done, self._result = False, None

    def is_completed(self) -> bool:
        return self._done or self._inner.is_completed()

    def wait(self):
        if not self._done:
            self._result = self._then(self._inner.wait())
            self._done = True
        return self._result

    __call__ = wait


def _single(handle):
    return _Then(handle, lambda out: out[0])


def _into(tensors: list[torch.Tensor], handle, single: bool = False):
    """A handle that copies its results into `tensors` (in place) and returns them."""
    def copy(results):
        with torch.no_grad():
            for t, r in zip(tensors, results):
                t.copy_(r)
        return tensors[0] if single else tuple(tensors)
    return _Then(handle, copy)


class _GroupedAllreduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, prescale, postscale, name, process_set, *tensors):
        ctx.args = (op, prescale, postscale, process_set)
        return tuple(_allreduce_start(list(tensors), op, prescale, postscale, name, process_set,
                                      kind="grouped_allreduce").wait())

    @staticmethod
    def backward(ctx, *grads):
        op, prescale, postscale, process_set = ctx.args
        out = _allreduce_start(list(grads), op, prescale, postscale, _name("grouped_allreduce", None), process_set,
                               kind="grouped_allreduce").wait()
        return (None,) * 5 + tuple(out)


def grouped_allreduce(tensors, average=None, name: str | None = None, compression=Compression.none, op=None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                      process_set=global_process_set) -> list[torch.Tensor]:
    """Allreduce of several tensors with one negotiation and one fused message per dtype; differentiable."""
    compressor = _resolve_compression(compression)
    wires, ctxs = zip(*[compressor.compress(t) for t in tensors]) if tensors else ((), ())
    out = _GroupedAllreduceFunction.apply(resolve_op(op, average), prescale_factor, postscale_factor,
                                          _name("grouped_allreduce", name), process_set, *wires)
    return [compressor.decompress(o, c) for o, c in zip(out, ctxs)]


def grouped_allreduce_async(tensors, average=None, name: str | None = None, op=None, prescale_factor: float = 1.0,
                            postscale_factor: float = 1.0, process_set=global_process_set):
    return _Then(_allreduce_start(list(tensors), resolve_op(op, average), prescale_factor, postscale_factor,
                                  _name("grouped_allreduce", name), process_set, kind="grouped_allreduce"), tuple)


def grouped_allreduce_(tensors, average=None, name: str | None = None, op=None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set=global_process_set):
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set).wait()


def grouped_allreduce_async_(tensors, average=None, name: str | None = None, op=None, prescale_factor: float = 1.0,
                             postscale_factor: float = 1.0, process_set=global_process_set):
    tensors = list(tensors)
    handle = _allreduce_start(tensors, resolve_op(op, average), prescale_factor, postscale_factor,
                              _name("grouped_allreduce", name), process_set, kind="grouped_allreduce")
    return _into(tensors, handle)


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op, process_set=global_process_set):
    """Reduce a sparse tensor by gathering every rank's indices and values (Horovod's way); the handle's result
    is a sparse tensor (values divided by the set's size under Average)."""
    op = resolve_op(op)
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = allgather_async(t.indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                              process_set=process_set)
    values = allgather_async(t.values(), name=f"{name}.values", process_set=process_set)
    size = coordinator.resolve_set(process_set).size() if runtime.is_initialized() else 1

    def finish(_):
        v = values.wait()
        i = indices.wait()
        if op is Average:
            v = v / size
        return torch.sparse_coo_tensor(i.transpose(0, 1), v, t.size(), check_invariants=False).coalesce()
    return _Then(primitives.done(None), finish)


# --------------------------------------------------------------------------------------------------------------
# reducescatter

def _scatter_rows(total: int, parts: int) -> list[int]:
    """Horovod's split of `total` rows over `parts` ranks: the lowest ranks get one more."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def _reducescatter_start(tensors, op: ReduceOp, prescale: float, postscale: float, name: str, process_set,
                         kind: str = "reducescatter"):
    op = resolve_op(op)
    if op not in (Sum, Average):
        raise CollectiveError("Reducescatter currently only supports AVERAGE and SUM.")
    for t in tensors:
        if t.dim() == 0:
            raise ValueError("Reducescatter does not support scalar inputs")
    ps, _ = _set_and_engine(process_set, "Reducescatter")
    handle = _allreduce_start(list(tensors), op, prescale, postscale, name, process_set, "Reducescatter", kind)
    n = ps.size() if runtime.is_initialized() and runtime.is_distributed() else 1
    me = ps.rank() if n > 1 else 0

    def mine(results):
        out = []
        for r in results:
            rows = _scatter_rows(r.shape[0], n)
            out.append(r.narrow(0, sum(rows[:me]), rows[me]).clone())
        return out
    return _Then(handle, mine)


class _ReducescatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, prescale, postscale, name, process_set, *tensors):
        ctx.args = (op, prescale, postscale, process_set)
        return tuple(_reducescatter_start(list(tensors), op, prescale, postscale, name, process_set,
                                          "reducescatter" if len(tensors) == 1 else "grouped_reducescatter").wait())

    @staticmethod
    def backward(ctx, *grads):
        op, prescale, postscale, process_set = ctx.args
        scale = prescale * postscale * (coordinator.resolve_set(process_set).size() or 1 if op is Sum else 1)
        scaled = [g * scale if scale != 1.0 else g for g in grads]
        gathered, _ = _allgather_start(scaled, _name("grouped_allgather", None), process_set,
                                       "allgather" if len(scaled) == 1 else "grouped_allgather").wait()
        return (None,) * 5 + tuple(gathered)


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression=Compression.none, op=Average,
                  process_set=global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce `tensor` (the same shape on every rank) and give each rank its block of rows: rank r of n gets
    rows [sum of the earlier blocks, + dim0 // n, one more for the first dim0 % n ranks); differentiable."""
    compressor = _resolve_compression(compression)
    wire, ctx = compressor.compress(tensor)
    out = _ReducescatterFunction.apply(op, prescale_factor, postscale_factor, _name("reducescatter", name),
                                       process_set, wire)[0]
    return compressor.decompress(out, ctx)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op=Average, process_set=global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0):
    return _single(_reducescatter_start([tensor], op, prescale_factor, postscale_factor,
                                        _name("reducescatter", name), process_set))


def grouped_reducescatter(tensors, name: str | None = None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    compressor = _resolve_compression(compression)
    wires, ctxs = zip(*[compressor.compress(t) for t in tensors]) if tensors else ((), ())
    out = _ReducescatterFunction.apply(op, prescale_factor, postscale_factor, _name("grouped_reducescatter", name),
                                       process_set, *wires)
    return [compressor.decompress(o, c) for o, c in zip(out, ctxs)]


def grouped_reducescatter_async(tensors, name: str | None = None, op=Average, process_set=global_process_set,
                                prescale_factor: float = 1.0, postscale_factor: float = 1.0):
    return _Then(_reducescatter_start(list(tensors), op, prescale_factor, postscale_factor,
                                      _name("grouped_reducescatter", name), process_set,
                                      "grouped_reducescatter"), tuple)


# --------------------------------------------------------------------------------------------------------------
# allgather

@register("allgather", "grouped_allgather")
class _Allgather(Request):
    """Concatenate every rank's tensors along dim 0 (whose size may differ); a group travels as one message."""

    def __init__(self, name, tensors, kind="allgather"):
        super().__init__(name)
        self.kind = kind
        self.tensors = [t.detach().reshape(1) if t.dim() == 0 else t.detach() for t in tensors]
        self.desc = {"kind": kind, "name": self.match_name,
                     "dtype": tuple(str(t.dtype).replace("torch.", "") for t in self.tensors),
                     "ndim": tuple(t.dim() for t in self.tensors),
                     "trailing": tuple(tuple(t.shape[1:]) for t in self.tensors),
                     "device": _device(self.tensors[0]) if self.tensors else "cpu"}
        self.stages = 1 if len(self.tensors) == 1 else 2  # a group first exchanges its first dimensions

    def signature(self):
        d = self.desc
        return (d["kind"], d["name"], d["dtype"], d["ndim"], d["trailing"], d["device"])

    def header(self):
        t = self.tensors[0]
        return (t.shape[0] if len(self.tensors) == 1 else 0), t.numel(), coordinator.dtype_code(t.dtype), 0

    def describe(self):
        return self.desc

    @classmethod
    def mismatch(cls, descs):
        return coordinator.describe_differences(descs, ["kind", "dtype", "ndim", "trailing", "device"])

    def exchange(self, engine, rows):
        parts = [_as_bytes(t.contiguous()) for t in self.tensors]
        handle, dims, most = _gather_rows(engine, rows, self.desc, [t.shape[0] for t in self.tensors],
                                          torch.cat(parts) if len(parts) > 1 else parts[0], self.tensors[0].device)
        n = engine.n
        row_bytes = [int(torch.Size(t.shape[1:]).numel()) * t.element_size() for t in self.tensors]

        def finish():
            blocks = handle.wait().view(n, most)
            out = []
            for i, t in enumerate(self.tensors):
                pieces = []
                for r in range(n):
                    start = sum(dims[r][j] * row_bytes[j] for j in range(i))
                    size = dims[r][i] * row_bytes[i]
                    pieces.append(blocks[r, start:start + size])
                out.append(_from_bytes(torch.cat(pieces), t.dtype, (-1, *t.shape[1:])) if pieces else t)
            return out, dims
        return Handle([handle], finish, self.name)


def _gather_rows(engine, rows, desc, mine: list[int], payload: torch.Tensor, device):
    """Start gathering every member's rows of the described tensors (this member's: `mine` rows, `payload` its
    bytes); returns (the handle, every member's row counts, the padded bytes per member)."""
    n = engine.n
    what = f"{desc['kind']} of {desc['name']}{engine.describe_set()}"
    if len(mine) == 1:
        dims = [[int(d)] for d in rows[:, coordinator.DIM0].tolist()]
    else:  # a group first exchanges its first dimensions
        counts = torch.tensor(mine, dtype=torch.int64)
        dims = primitives.all_gather_into(counts.new_empty(n * len(mine)), counts, what,
                                          group=engine.data_pg).view(n, -1).tolist()
    row_bytes = [int(torch.Size(trailing).numel()) * torch.empty(0, dtype=getattr(torch, dt)).element_size()
                 for dt, trailing in zip(desc["dtype"], desc["trailing"])]
    totals = [sum(d * b for d, b in zip(dims[r], row_bytes)) for r in range(n)]
    most = max(totals)
    send = torch.zeros(most, dtype=torch.uint8, device=device)
    send[:payload.numel()] = payload
    gathered = send.new_empty(n * most)
    return primitives.all_gather_into(gathered, send, what, group=engine.data_pg, async_op=True), dims, most


def _allgather_start(tensors, name: str, process_set, kind: str = "allgather"):
    """Start gathering; the handle's result is the list of gathered tensors (and, as `.dims`, every rank's
    first dimensions)."""
    ps, active = _set_and_engine(process_set, "Allgather")
    if not active:
        return Handle([], lambda: ([t.detach().reshape(1) if t.dim() == 0 else t.detach().clone() for t in tensors],
                                   [[t.shape[0] if t.dim() else 1 for t in tensors]]), name)
    request = _Allgather(name, tensors, kind)
    return coordinator.submit(request, ps)


class _AllgatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        out, dims = _allgather_start(list(tensors), name, process_set,
                                     "allgather" if len(tensors) == 1 else "grouped_allgather").wait()
        ps = coordinator.resolve_set(process_set)
        me = ps.rank() if len(dims) > 1 else 0
        ctx.offsets = [sum(dims[r][i] for r in range(me)) for i in range(len(tensors))]
        ctx.rows = [dims[me][i] for i in range(len(tensors))]
        ctx.shapes = [t.shape for t in tensors]
        ctx.process_set = process_set
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        reduced = _allreduce_start(list(grads), Average, 1.0, 1.0, _name("grouped_allreduce", None),
                                   ctx.process_set, kind="grouped_allreduce").wait()
        return (None, None) + tuple(r.narrow(0, o, n).reshape(s) for r, o, n, s in
                                    zip(reduced, ctx.offsets, ctx.rows, ctx.shapes))


def allgather(tensor: torch.Tensor, name: str | None = None, process_set=global_process_set) -> torch.Tensor:
    """Every worker's `tensor` concatenated along dim 0 in rank order (sizes of dim 0 may differ); differentiable."""
    return _AllgatherFunction.apply(_name("allgather", name), process_set, tensor)[0]


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set=global_process_set):
    return _Then(_allgather_start([tensor], _name("allgather", name), process_set), lambda r: r[0][0])


def grouped_allgather(tensors, name: str | None = None, process_set=global_process_set) -> list[torch.Tensor]:
    return list(_AllgatherFunction.apply(_name("grouped_allgather", name), process_set, *tensors))


def grouped_allgather_async(tensors, name: str | None = None, process_set=global_process_set):
    return _Then(_allgather_start(list(tensors), _name("grouped_allgather", name), process_set, "grouped_allgather"),
                 lambda r: tuple(r[0]))


# --------------------------------------------------------------------------------------------------------------
# broadcast

@register("broadcast")
class _Broadcast(Request):
    """The root's tensor to every rank."""

    def __init__(self, name, tensor, root: int, root_index: int):
        super().__init__(name)
        self.tensor, self.root, self.root_index = tensor, root, root_index
        self.desc = {"kind": "broadcast", "name": self.match_name, "dtype": str(tensor.dtype).replace("torch.", ""),
                     "shape": tuple(tensor.shape), "root": root, "device": _device(tensor)}

    def signature(self):
        d = self.desc
        return (d["kind"], d["name"], d["dtype"], d["shape"], d["root"], d["device"])

    def header(self):
        return 0, self.tensor.numel(), coordinator.dtype_code(self.tensor.dtype), self.root

    def describe(self):
        return self.desc

    @classmethod
    def mismatch(cls, descs):
        return coordinator.describe_differences(descs, ["kind", "dtype", "shape", "root", "device"])

    def exchange(self, engine, rows):
        return primitives.broadcast(_as_bytes(self.tensor), self.root_index,
                                    f"broadcast of {self.name} from rank {self.root}{engine.describe_set()}",
                                    group=engine.data_pg, async_op=True, finish=lambda: self.tensor)



def check_root(root_rank: int, process_set=global_process_set) -> int:
    """The root's index within the process set (a ValueError for a rank outside it)."""
    ps = coordinator.resolve_set(process_set)
    members = _members(ps) if runtime.is_initialized() else [0]
    if root_rank not in members:
        if ps.process_set_id == 0:
            raise ValueError(f"root_rank {root_rank} is not a worker rank (there are {len(members)} workers)")
        raise ValueError(f"broadcast received invalid root rank {root_rank} for provided process set")
    return members.index(root_rank)


def _broadcast_start(tensor: torch.Tensor, root_rank: int, name: str | None, process_set=global_process_set,
                     full_name: str | None = None):
    """Overwrite `tensor` with the root's, in place, asynchronously (a contiguous tensor travels as is)."""
    name = full_name or _name("broadcast", name)
    ps, active = _set_and_engine(process_set, "Broadcast")
    index = check_root(root_rank, ps)
    if not active:
        return primitives.done(tensor)
    buf = tensor if tensor.is_contiguous() else tensor.contiguous()
    handle = coordinator.submit(_Broadcast(name, buf, root_rank, index), ps)
    if buf is tensor:
        return handle
    return _Then(handle, lambda _: tensor.copy_(buf))


class _BroadcastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root, ctx.process_set = root_rank, process_set
        return _broadcast_start(tensor.detach().clone(), root_rank, None, process_set, full_name=name).wait()

    @staticmethod
    def backward(ctx, grad):
        reduced = _allreduce_start([grad], Average, 1.0, 1.0, _name("allreduce", None), ctx.process_set).wait()[0]
        if runtime.is_initialized() and runtime.is_distributed() and runtime.rank() != ctx.root:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set=global_process_set) -> torch.Tensor:
    """The root worker's `tensor`, as a new tensor on every worker; differentiable."""
    return _BroadcastFunction.apply(tensor, root_rank, _name("broadcast", name), process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set=global_process_set) -> torch.Tensor:
    """Overwrite `tensor` with the root worker's, in place (no autograd); returns `tensor`."""
    with torch.no_grad():
        return broadcast_async_(tensor, root_rank, name, process_set).wait()


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=global_process_set):
    with torch.no_grad():
        return _broadcast_start(tensor, root_rank, name, process_set)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set=global_process_set):
    return _broadcast_start(tensor.detach().clone(), root_rank, name, process_set)


# --------------------------------------------------------------------------------------------------------------
# alltoall

@register("alltoall")
class _Alltoall(Request):
    stages = 2  # the splits first, then the data

    def __init__(self, name, tensor, splits: list[int]):
        super().__init__(name)
        self.tensor, self.splits = tensor.contiguous(), splits
        self.desc = {"kind": "alltoall", "name": self.match_name, "dtype": str(tensor.dtype).replace("torch.", ""),
                     "ndim": tensor.dim(), "trailing": tuple(tensor.shape[1:]), "device": _device(tensor)}

    def signature(self):
        d = self.desc
        return (d["kind"], d["name"], d["dtype"], d["ndim"], d["trailing"], d["device"])

    def header(self):
        return self.tensor.shape[0], self.tensor.numel(), coordinator.dtype_code(self.tensor.dtype), 0

    def describe(self):
        return self.desc

    @classmethod
    def mismatch(cls, descs):
        return coordinator.describe_differences(descs, ["kind", "dtype", "ndim", "trailing", "device"])

    def exchange(self, engine, rows):
        what = f"alltoall of {self.name}{engine.describe_set()}"
        send = torch.tensor(self.splits, dtype=torch.int64)
        received = primitives.all_to_all_single(torch.empty_like(send), send, what, output_split_sizes=[1] * engine.n,
                                                input_split_sizes=[1] * engine.n, group=engine.data_pg).tolist()
        t = self.tensor
        row = int(torch.Size(t.shape[1:]).numel()) * t.element_size()
        data = _as_bytes(t.narrow(0, 0, sum(self.splits)).contiguous()) if t.numel() else \
            torch.empty(0, dtype=torch.uint8, device=t.device)
        out = torch.empty(sum(received) * row, dtype=torch.uint8, device=t.device)
        primitives.all_to_all_single(out, data, what, output_split_sizes=[r * row for r in received],
                                     input_split_sizes=[s * row for s in self.splits], group=engine.data_pg)
        return primitives.done((_from_bytes(out, t.dtype, (-1, *t.shape[1:])),
                                torch.tensor(received, dtype=torch.int32)))


def _alltoall_splits(tensor: torch.Tensor, splits, n: int) -> list[int]:
    """Horovod's checks of alltoall's splits; None splits the first dimension evenly."""
    if splits is None:
        if tensor.dim() == 0 or tensor.shape[0] % n:
            raise ValueError("splits not provided, but first dimension of tensor is not an even multiple of the "
                             "number of workers.")
        return [tensor.shape[0] // n] * n
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1:
            raise ValueError("alltoall expects a 1D splits tensor")
        if splits.dtype not in (torch.int32, torch.int64):
            raise ValueError("alltoall expects splits to contain 32-bit integer elements.")
        splits = splits.tolist()
    splits = [int(s) for s in splits]
    if len(splits) != n:
        raise ValueError("Number of entries in splits does not equal number of workers.")
    if any(s < 0 for s in splits):
        raise ValueError(f"alltoall splits must not be negative, got {splits}")
    if sum(splits) > (tensor.shape[0] if tensor.dim() else 0):
        raise ValueError("Sum of splits entries is greater than the first dimension of tensor.")
    return splits


def _alltoall_start(tensor: torch.Tensor, splits, name: str, process_set):
    ps, active = _set_and_engine(process_set, "Alltoall")
    n = ps.size() if active else 1
    splits = _alltoall_splits(tensor, splits, n)
    if not active:
        return primitives.done((tensor.detach().narrow(0, 0, splits[0]).clone(), torch.tensor(splits, dtype=torch.int32)))
    return coordinator.submit(_Alltoall(name, tensor.detach(), splits), ps)


class _AlltoallFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        out, received = _alltoall_start(tensor, splits, name, process_set).wait()
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _):
        back, _ = _alltoall_start(grad.contiguous(), ctx.received, _name("alltoall", None), ctx.process_set).wait()
        return back, None, None, None


def alltoall(tensor: torch.Tensor, splits=None, name: str | None = None, process_set=global_process_set):
    """Send rows [sum(splits[:r]), + splits[r]) of `tensor` to rank r (equal parts when splits is None); returns
    the rows received, concatenated in rank order, and, when `splits` was given, how many came from each rank."""
    out, received = _AlltoallFunction.apply(tensor, splits, _name("alltoall", name), process_set)
    return out if splits is None else (out, received)


def alltoall_async(tensor: torch.Tensor, splits=None, name: str | None = None, process_set=global_process_set):
    """`synchronize(handle)` returns (the rows received, the received splits)."""
    return _alltoall_start(tensor, splits, _name("alltoall", name), process_set)


# --------------------------------------------------------------------------------------------------------------
# barrier, join, Python objects

@register("barrier")
class _Barrier(Request):
    """The negotiation itself is the barrier: nothing moves afterwards."""


def barrier(process_set=global_process_set) -> None:
    """Wait until every worker of the set arrives here."""
    ps, active = _set_and_engine(process_set, "Barrier")
    if active:
        coordinator.submit(_Barrier("barrier.noname"), ps).wait()


def join(device=-1) -> int:
    """This worker has run out of data: until every worker has joined, it takes part in the others'
    allreduces, DistributedOptimizer steps and barriers with zeros (their allgathers, broadcasts, alltoalls and
    reducescatters raise, as in Horovod). Returns the rank that joined last."""
    ps, active = _set_and_engine(global_process_set, "Join")
    if not active:
        return runtime.rank() if runtime.is_initialized() else 0
    return coordinator.join()


@register("broadcast_object")
class _BroadcastObject(Request):
    def __init__(self, name, payload: bytes | None, root: int, root_index: int):
        super().__init__(name)
        self.payload, self.root, self.root_index = payload, root, root_index

    def signature(self):
        return (self.kind, self.match_name, self.root)

    def header(self):
        return len(self.payload or b""), 0, 0, self.root

    def describe(self):
        return {"kind": self.kind, "name": self.match_name, "root": self.root}

    @classmethod
    def mismatch(cls, descs):
        return coordinator.describe_differences(descs, ["kind", "root"])

    def exchange(self, engine, rows):
        size = int(rows[self.root_index, coordinator.DIM0])
        buf = torch.frombuffer(bytearray(self.payload), dtype=torch.uint8) if self.payload is not None else \
            torch.empty(size, dtype=torch.uint8)
        return primitives.broadcast(buf, self.root_index, f"broadcast_object of {self.name} from rank {self.root}",
                                    group=engine.data_pg, async_op=True,
                                    finish=lambda: pickle.loads(buf.numpy().tobytes()))


def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=global_process_set):
    """The root worker's picklable `obj`, on every worker of the set."""
    ps, active = _set_and_engine(process_set, "Broadcast")
    index = check_root(root_rank, ps)
    if not active:
        return obj
    name = _name("broadcast_object", name)
    payload = pickle.dumps(obj) if runtime.rank() == root_rank else None
    return coordinator.submit(_BroadcastObject(name, payload, root_rank, index), ps).wait()


@register("allgather_object")
class _AllgatherObject(Request):
    def __init__(self, name, payload: bytes):
        super().__init__(name)
        self.payload = payload

    def header(self):
        return len(self.payload), 0, 0, 0

    def exchange(self, engine, rows):
        sizes = rows[:, coordinator.DIM0].tolist()
        most = max(sizes)
        send = torch.zeros(most, dtype=torch.uint8)
        send[:len(self.payload)] = torch.frombuffer(bytearray(self.payload), dtype=torch.uint8)
        gathered = send.new_empty(engine.n * most)

        def finish():
            blocks = gathered.view(engine.n, most)
            return [pickle.loads(blocks[r, :s].numpy().tobytes()) for r, s in enumerate(sizes)]
        return primitives.all_gather_into(gathered, send, f"allgather_object of {self.name}{engine.describe_set()}",
                                          group=engine.data_pg, async_op=True, finish=finish)


def allgather_object(obj, name: str | None = None, process_set=global_process_set) -> list:
    """Every worker's picklable `obj`, as a list in rank order."""
    ps, active = _set_and_engine(process_set, "Allgather")
    if not active:
        return [obj]
    name = _name("allgather_object", name)
    return coordinator.submit(_AllgatherObject(name, pickle.dumps(obj)), ps).wait()
