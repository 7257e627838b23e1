"""SINGA's loss layers: `SoftmaxCrossEntropy` (SoftmaxLoss; nn.CrossEntropyLoss's arguments and results) and
`EuclideanLoss` (0.5 * squared distance per sample).

On CUDA tensors SoftmaxCrossEntropy keeps only each row's log-sum-exp for the backward, never the
(rows x classes) log-probabilities that torch's log_softmax + nll_loss keep. On CPU tensors both losses are
torch's own ops (F.cross_entropy, F.mse_loss), the same math; half precisions are computed in float32 there,
as the kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import register_conversion
from .dispatch import kernels, use_triton_float

_REDUCTIONS = ("mean", "sum", "none")


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """The Triton kernels' cross-entropy of softmax(x) on a 2-d x (rows x classes) and class indices or
    probabilities."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, smoothing, reduction):
        loss, lse, coef, valid = kernels("cross_entropy").cross_entropy_forward(x, target, weight, ignore_index,
                                                                                smoothing)
        if reduction == "none":
            out, denom = loss, None
        elif reduction == "sum":
            out, denom = loss.sum(), None
        else:
            # Index targets: divided by the summed weights of the rows kept (torch's nll_loss); probabilities:
            # by the number of rows. An empty or fully ignored batch gives nan, as in torch.
            denom = valid.sum()
            out = loss.sum() / denom
        ctx.ignore_index, ctx.smoothing, ctx.reduction = ignore_index, smoothing, reduction
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
            grad_x = kernels("cross_entropy").cross_entropy_backward(x, target, weight, lse, coef, scale,
                                                                     ctx.ignore_index, ctx.smoothing)
        if ctx.needs_input_grad[1]:
            # Probability targets: d loss / d q_j = -(1 - e) w_j log p_j (rare; in torch ops).
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
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        raise ValueError(f"SoftmaxCrossEntropy: weight must be a 1-d tensor of {C} values")
    if not use_triton_float(input):
        try:
            return _cross_entropy_torch(input, target, weight, ignore_index, reduction, label_smoothing)
        except IndexError:
            if not prob:  # torch checks the targets itself; this names the one out of bounds
                _check_classes(t2, C, ignore_index)
            raise
    if not prob:
        _check_classes(t2, C, ignore_index)
    x2 = x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, C)
    out = SoftmaxCrossEntropyFunction.apply(x2, t2, weight, ignore_index, float(label_smoothing), reduction)
    if reduction == "none":
        out = out.reshape(()) if single else out.reshape(x.shape[:1] + x.shape[2:])
    return out


def _check_classes(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bad.any():
        raise IndexError(f"SoftmaxCrossEntropy: target {target[bad][0].item()} is out of bounds for {classes} classes")


def _cross_entropy_torch(x, target, weight, ignore_index, reduction, smoothing):
    """torch's cross-entropy (its log_softmax and nll_loss kernels and their derivatives)."""
    xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    target = target.to(xc.dtype) if target.is_floating_point() else target.long()
    weight = weight.to(xc.dtype) if weight is not None else None
    return F.cross_entropy(xc, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=smoothing).to(x.dtype)


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
    """The Triton kernels' per-row 0.5 * ||x - t||^2 on 2-d x and t, reduced by `reduction`."""

    @staticmethod
    def forward(ctx, x, t, reduction):
        rows = kernels("euclidean").euclidean_forward(x, t)
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
        dx, dt = kernels("euclidean").euclidean_backward(x, t, scale, need_x, need_t)
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
    if not use_triton_float(x2):
        # torch's fused squared error and its derivative; float32 inside for half precisions, as the kernels.
        xc, tc = (x2.float(), t2.float()) if x2.dtype in (torch.float16, torch.bfloat16) else (x2, t2)
        if reduction == "none":
            return (0.5 * F.mse_loss(xc, tc, reduction="none").sum(1)).to(input.dtype)
        return (F.mse_loss(xc, tc, reduction="sum") / (2 * x2.shape[0] if reduction == "mean" else 2)).to(input.dtype)
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
