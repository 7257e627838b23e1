"""Gradient compression for the AllReduce and parameter-server strategies (Horovod's names and interface).

    opt = sd.DistributedOptimizer(opt, named_parameters=..., compression=sd.Compression.fp16)

- `Compression.none`: gradients travel in their own dtype.
- `Compression.fp16` / `Compression.bf16`: cast to 16 bits for the wire and back afterwards (half the bytes;
  the relative error of each element is at most 2**-11 for fp16 and 2**-8 for bf16, in the normal range).
- `Compression.topk(ratio)`: SINGA's sparse update: each rank sends only the `ceil(ratio * n)` elements of
  largest magnitude of each fused buffer (values and their indices); the rest is kept locally as a residual
  and added to the next step's gradient (error feedback), so no gradient is ever lost, only delayed.
- `Compression.threshold(t)`: as top-k, but sends the elements whose magnitude (gradient plus residual) is
  at least `t`; how many that is varies per step and per rank.

Dense compressors follow Horovod's interface, `compress(tensor) -> (tensor, ctx)` and
`decompress(tensor, ctx) -> tensor`, so a Horovod user's own compressor class works unchanged. Sparse ones
instead pick what to send with `select(flat) -> indices`; the strategies exchange them.

The residuals are each rank's own state; `residual_state`/`load_residual_state` give them a checkpoint form
by parameter name, so that a restarted job continues with the same residuals.
"""
from __future__ import annotations

import abc
import math
import warnings

import torch


class Compressor:
    """Dense compression: the same number of elements travels, in a cheaper dtype."""

    name = "none"
    sparse = False

    @staticmethod
    def compress(tensor: torch.Tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        return tensor

    def __repr__(self) -> str:
        return f"Compression.{self.name}"


class NoneCompressor(Compressor):
    name = "none"


class _CastCompressor(Compressor):
    wire_dtype: torch.dtype = torch.float16

    @classmethod
    def compress(cls, tensor: torch.Tensor):
        if tensor.is_floating_point() and tensor.dtype != cls.wire_dtype:
            return tensor.to(cls.wire_dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)


class FP16Compressor(_CastCompressor):
    name = "fp16"
    wire_dtype = torch.float16


class BF16Compressor(_CastCompressor):
    name = "bf16"
    wire_dtype = torch.bfloat16


class SparseCompressor(Compressor, abc.ABC):
    """Sends some elements of each fused gradient buffer; the others stay behind as a local residual."""

    sparse = True
    error_feedback = True

    @abc.abstractmethod
    def select(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices (int64) of the elements of `flat` to send."""

    @staticmethod
    def compress(tensor: torch.Tensor):
        raise TypeError("sparse compression applies to DistributedOptimizer's gradients only, not to "
                        "sd.allreduce() of a tensor; use Compression.none, .fp16 or .bf16 there")

    def sparsify(self, flat: torch.Tensor, residual: torch.Tensor | None):
        """Add the residual to `flat` (in place), choose the elements to send and keep the rest in `residual`
        (error feedback). Returns (indices, values); indices are int32 while the buffer allows it, to halve
        their bytes."""
        if self.error_feedback:
            flat.add_(residual)
        index = self.select(flat)
        values = flat.index_select(0, index)
        if self.error_feedback:
            residual.copy_(flat).index_fill_(0, index, 0)
        return index.to(torch.int32 if flat.numel() < 2**31 else torch.int64), values


class TopKCompressor(SparseCompressor):
    def __init__(self, ratio: float):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"Compression.topk(ratio): ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.name = f"topk({self.ratio:g})"

    def count(self, numel: int) -> int:
        """How many elements of a buffer of `numel` are sent (the same on every rank)."""
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        magnitude = flat.abs()
        n, k = flat.numel(), self.count(flat.numel())
        if n >= 1 << 16 and k <= n // 16:
            # A full top-k over a large buffer is slow on CPU. A strided sample gives a threshold below the
            # k-th largest magnitude (aiming at about 2k candidates); the top k of the candidates are then
            # exactly the top k of the buffer. Deterministic: no random numbers are drawn.
            sample = magnitude[:: max(n // 8192, 1)]
            rank_in_sample = max(int(sample.numel() * (1 - 2.0 * k / n)), 1)
            floor = sample.kthvalue(rank_in_sample).values
            candidates = (magnitude >= floor).nonzero().view(-1)
            if candidates.numel() >= k:
                return candidates[magnitude[candidates].topk(k, sorted=False).indices]
        return magnitude.topk(k, sorted=False).indices


class ThresholdCompressor(SparseCompressor):
    def __init__(self, threshold: float):
        if not threshold > 0.0:
            raise ValueError(f"Compression.threshold(t): t must be positive, got {threshold}")
        self.threshold = float(threshold)
        self.name = f"threshold({self.threshold:g})"

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat.abs() >= self.threshold).nonzero().view(-1)


class Compression:
    """The compressions a DistributedOptimizer (or sd.AllReduce) can use: pass one as `compression=`."""

    none = NoneCompressor()
    fp16 = FP16Compressor()
    bf16 = BF16Compressor()

    @staticmethod
    def topk(ratio: float) -> TopKCompressor:
        return TopKCompressor(ratio)

    @staticmethod
    def threshold(threshold: float) -> ThresholdCompressor:
        return ThresholdCompressor(threshold)


def resolve(compression) -> Compressor:
    """None -> Compression.none; a Horovod-style class or object with compress/decompress -> itself."""
    if compression is None:
        return Compression.none
    if isinstance(compression, type) and issubclass(compression, Compressor) and not issubclass(
            compression, SparseCompressor):
        return compression()
    if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
        raise TypeError(f"compression must be one of sd.Compression.none/.fp16/.bf16/.topk(r)/.threshold(t) "
                        f"or an object with compress() and decompress(), got {compression!r}")
    return compression


def residual_state(residuals: dict[str, torch.Tensor], rank: int) -> dict:
    """The checkpoint form of rank `rank`'s error-feedback residuals (parameter name -> tensor)."""
    return {"rank": rank, "params": {n: r.detach().cpu().clone() for n, r in residuals.items()}}


def load_residual_state(state: dict | None, what: str, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s residuals from `residual_state`'s form; empty (zero residuals) with a warning when the
    checkpoint holds another rank's, since adopting them would count that rank's held-back gradient twice."""
    if not state:
        return {}
    if int(state["rank"]) != rank:
        warnings.warn(f"the checkpoint holds rank {state['rank']}'s {what} residual; rank {rank} starts with a "
                      "zero residual (save opt.state_dict() on every rank to keep each rank's own)", stacklevel=3)
        return {}
    return dict(state["params"])
