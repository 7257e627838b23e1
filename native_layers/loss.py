"""SINGA's loss layers: `SoftmaxCrossEntropy` (SoftmaxLoss; nn.CrossEntropyLoss's arguments and results) and
`EuclideanLoss` (0.5 * squared distance per sample).

SoftmaxCrossEntropy keeps only each row's log-sum-exp for the backward, never the (rows x classes)
log-probabilities that torch's log_softmax + nll_loss keep.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .convert import register_conversion
from .dispatch import kernels, use_triton_float

_REDUCTIONS = ("mean", "sum", "none")


def _rows_torch(x, target, weight, ignore_index, smoothing):
    """The same per-row quantities as the Triton forward (see triton_kernels/cross_entropy.py), in torch."""
    R, C = x.shape
    lse = torch.logsumexp(x, dim=1)
    w = weight.to(x.dtype) if weight is not None else None
    if target.dim() == 2:
        c = (1 - smoothing) * target.to(x.dtype) + smoothing / C
        if w is not None:
            c = c * w
        coef = c.sum(1)
        return lse * coef - (c * x).sum(1), lse, coef, torch.ones_like(lse)
    keep = target != ignore_index
    t = torch.where(keep, target, 0)
    x_t = x.gather(1, t[:, None]).squeeze(1)
    w_t = w[t] if w is not None else torch.ones_like(lse)
    loss = (1 - smoothing) * w_t * (lse - x_t)
    coef = (1 - smoothing) * w_t
    if smoothing > 0:
        sum_w = w.sum() if w is not None else C
        loss = loss + smoothing / C * (lse * sum_w - (x @ w if w is not None else x.sum(1)))
        coef = coef + smoothing / C * sum_w
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(keep, loss, zero), lse, torch.where(keep, coef, zero), torch.where(keep, w_t, zero)


def _grad_torch(x, target, weight, lse, coef, scale, ignore_index, smoothing):
    R, C = x.shape
    g = torch.exp(x - lse[:, None]) * coef[:, None]
    w = weight.to(x.dtype) if weight is not None else torch.ones(C, dtype=x.dtype, device=x.device)
    if target.dim() == 2:
        g = g - w * ((1 - smoothing) * target.to(x.dtype) + smoothing / C)
        return g * scale.reshape(-1, 1)
    keep = target != ignore_index
    t = torch.where(keep, target, 0)
    if smoothing > 0:
        g = g - smoothing / C * w
    g = g.scatter_add(1, t[:, None], -((1 - smoothing) * w[t])[:, None])
    return g * (scale.reshape(-1, 1) * keep[:, None].to(x.dtype))


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of softmax(x) on a 2-d x (rows x classes) and class indices or probabilities."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, smoothing, reduction):
        triton = use_triton_float(x)
        if triton:
            loss, lse, coef, valid = kernels("cross_entropy").cross_entropy_forward(
                x, target, weight, ignore_index, smoothing)
        else:
            xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # accumulate in float32
            loss, lse, coef, valid = _rows_torch(xc, target, weight, ignore_index, smoothing)
        if reduction == "none":
            out, denom = loss, None
        elif reduction == "sum":
            out, denom = loss.sum(), None
        else:
            # Index targets: divided by the summed weights of the rows kept (torch's nll_loss); probabilities:
            # by the number of rows. An empty or fully ignored batch gives nan, as in torch.
            denom = valid.sum()
            out = loss.sum() / denom
        ctx.triton, ctx.ignore_index, ctx.smoothing, ctx.reduction = triton, ignore_index, smoothing, reduction
        ctx.save_for_backward(x, target, weight, lse, coef, denom)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, lse, coef, denom = ctx.saved_tensors
        scale = grad_out.float() if grad_out.dtype != torch.float64 else grad_out
        if ctx.reduction == "mean":
            scale = scale / denom
        grad_x = grad_t = None
        if ctx.needs_input_grad[0]:
            if ctx.triton:
                grad_x = kernels("cross_entropy").cross_entropy_backward(
                    x, target, weight, lse, coef, scale, ctx.ignore_index, ctx.smoothing)
            else:
                xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                grad_x = _grad_torch(xc, target, weight, lse.to(xc.dtype), coef.to(xc.dtype), scale.to(xc.dtype),
                                     ctx.ignore_index, ctx.smoothing).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # Probability targets: d loss / d q_j = -(1 - e) w_j log p_j (rare; torch ops on every device).
            logp = x.to(lse.dtype) - lse[:, None]
            w = weight.to(logp.dtype) if weight is not None else 1.0
            grad_t = (-(1 - ctx.smoothing) * w * logp * scale.reshape(-1, 1)).to(target.dtype)
        return grad_x, grad_t, None, None, None, None


def softmax_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                          ignore_index: int = -100, reduction: str = "mean",
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy's contract: input (C), (N, C) or (N, C, d1, ...); target class
    indices (N, d1, ...) or class probabilities shaped like input."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"SoftmaxCrossEntropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"SoftmaxCrossEntropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if input.dim() == 0:
        raise ValueError("SoftmaxCrossEntropy: input must have a class dimension")
    prob = target.is_floating_point()
    single = input.dim() == 1
    x = input.unsqueeze(0) if single else input
    t = target.unsqueeze(0) if single else target
    C = x.shape[1]
    if prob:
        if t.shape != x.shape:
            raise ValueError(f"SoftmaxCrossEntropy: probability target of shape {tuple(target.shape)} must match "
                             f"the input's {tuple(input.shape)}")
        t2 = t.movedim(1, -1).reshape(-1, C)
    else:
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"SoftmaxCrossEntropy: target must hold class indices (integers) or probabilities "
                            f"(floats), got {target.dtype}")
        if t.shape != x.shape[:1] + x.shape[2:]:
            raise ValueError(f"SoftmaxCrossEntropy: target of shape {tuple(target.shape)} does not match the "
                             f"input's {tuple(input.shape)} (expected {tuple(x.shape[:1] + x.shape[2:])})")
        t2 = t.reshape(-1).long()
        bad = ((t2 < 0) | (t2 >= C)) & (t2 != ignore_index)
        if bad.any():
            raise IndexError(f"SoftmaxCrossEntropy: target {t2[bad][0].item()} is out of bounds for {C} classes")
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        raise ValueError(f"SoftmaxCrossEntropy: weight must be a 1-d tensor of {C} values")
    x2 = x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, C)
    out = SoftmaxCrossEntropyFunction.apply(x2, t2, weight, ignore_index, float(label_smoothing), reduction)
    if reduction == "none":
        out = out.reshape(()) if single else out.reshape(x.shape[:1] + x.shape[2:])
    return out


class SoftmaxCrossEntropy(nn.CrossEntropyLoss):
    """SINGA's SoftmaxLoss as a drop-in nn.CrossEntropyLoss (same arguments, same results)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                     self.label_smoothing)


def _from_cross_entropy(m: nn.CrossEntropyLoss) -> SoftmaxCrossEntropy:
    return SoftmaxCrossEntropy(weight=m.weight, ignore_index=m.ignore_index, reduction=m.reduction,
                               label_smoothing=m.label_smoothing)


register_conversion(nn.CrossEntropyLoss, _from_cross_entropy)


class EuclideanLossFunction(torch.autograd.Function):
    """Per-row 0.5 * ||x - t||^2 on 2-d x and t, reduced by `reduction`."""

    @staticmethod
    def forward(ctx, x, t, reduction):
        if use_triton_float(x):
            rows = kernels("euclidean").euclidean_forward(x, t)
        else:
            d = (x.float() - t.float()) if x.dtype in (torch.float16, torch.bfloat16) else x - t
            rows = 0.5 * (d * d).sum(1)
        ctx.reduction = reduction
        ctx.save_for_backward(x, t)
        if reduction == "none":
            return rows.to(x.dtype)
        out = rows.sum() if reduction == "sum" else rows.mean()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, t = ctx.saved_tensors
        scale = grad_out.float() if grad_out.dtype != torch.float64 else grad_out
        if ctx.reduction == "mean":
            scale = scale / x.shape[0]
        need_x, need_t = ctx.needs_input_grad[:2]
        if use_triton_float(x):
            dx, dt = kernels("euclidean").euclidean_backward(x, t, scale, need_x, need_t)
        else:
            d = (x.to(scale.dtype) - t.to(scale.dtype)) * scale.reshape(-1, 1)
            dx = d.to(x.dtype) if need_x else None
            dt = (-d).to(t.dtype) if need_t else None
        return dx, dt, None


def euclidean_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """0.5 * ||input_i - target_i||^2 per sample i (the first dimension), averaged ("mean", SINGA's),
    summed ("sum") or kept per sample ("none")."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"EuclideanLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if input.shape != target.shape:
        raise ValueError(f"EuclideanLoss: input {tuple(input.shape)} and target {tuple(target.shape)} differ")
    if input.dim() == 0:
        raise ValueError("EuclideanLoss: input needs a batch dimension")
    features = math.prod(input.shape[1:])
    x2 = input.reshape(input.shape[0], features)
    t2 = target.reshape(target.shape[0], features)
    if not target.dtype == input.dtype:
        t2 = t2.to(input.dtype)
    return EuclideanLossFunction.apply(x2, t2, reduction)


class EuclideanLoss(nn.Module):
    """SINGA's EuclideanLoss: 0.5 * squared L2 distance per sample, averaged over the batch by default
    (nn.MSELoss(reduction="sum") / 2 / batch)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"EuclideanLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return euclidean_loss(input, target, self.reduction)
