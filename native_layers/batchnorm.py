"""SINGA's BatchNorm layer: `BatchNorm1d`/`2d`/`3d`, drop-in for torch's (arguments, state_dict keys incl.
num_batches_tracked, running statistics and momentum, including momentum=None for a cumulative average).

On CUDA tensors Triton kernels compute the statistics and their gradients in float32 per channel over the
batch (and spatial) values; the backward keeps x and the batch mean and 1/std, as torch does. On CPU
tensors the layer is torch's own batch norm, the same math; where a channel's batch mean lies far from zero
in units of its spread, it runs on x minus one of the channel's values (see `_batch_norm_torch`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import register_conversion
from .dispatch import kernels, use_triton_float


class BatchNormFunction(torch.autograd.Function):
    """Batch norm of x: (N, C, S) on the Triton kernels. With `batch_stats`, normalises by the batch's statistics
    and blends them into the running buffers with `factor`; otherwise normalises by the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, factor, eps):
        N, C, S = x.shape
        R = N * S
        k = kernels("batchnorm")
        # Statistics are of x - pivot (pivot: a value of the channel in the batch), so a large mean with a
        # small spread loses nothing in float32; the mean is pivot + mean.
        pivot = torch.zeros(C, device=x.device, dtype=torch.float32)
        if batch_stats:
            if R == 0:
                mean = torch.zeros(C, device=x.device, dtype=torch.float32)
                var = torch.ones(C, device=x.device, dtype=torch.float32)
            else:
                pivot, mean, var = k.batch_stats(x)
            if running_mean is not None and R > 0:
                with torch.no_grad():
                    running_mean.mul_(1 - factor).add_((pivot + mean).to(running_mean.dtype), alpha=factor)
                    unbiased = var * (R / (R - 1))
                    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        else:
            mean, var = running_mean.float(), running_var.float()
        invstd = torch.rsqrt(var + eps)
        y = k.forward(x, pivot, mean, invstd, weight, bias)
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(x, weight, pivot, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, pivot, mean, invstd = ctx.saved_tensors
        N, C, S = x.shape
        if N * S == 0:
            zeros = torch.zeros(C, device=x.device, dtype=weight.dtype) if weight is not None else None
            return torch.zeros_like(x), zeros, zeros, None, None, None, None, None
        k = kernels("batchnorm")
        sum_g, sum_gx = k.grad_sums(x, grad_y, pivot, mean, invstd)
        grad_x = k.backward_input(x, grad_y, pivot, mean, invstd, weight, sum_g, sum_gx, ctx.batch_stats) \
            if ctx.needs_input_grad[0] else None
        grad_w = sum_gx.to(weight.dtype) if weight is not None else None
        grad_b = sum_g.to(weight.dtype) if weight is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.batch_norm's contract on x: (N, C, *)."""
    if x.dim() < 2:
        raise ValueError(f"BatchNorm: input must be (N, C, ...), got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    if training and N * S == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if not training and running_mean is None:
        raise ValueError("BatchNorm: evaluation without running statistics needs training=True")
    if (weight is None) != (bias is None):
        raise ValueError("BatchNorm: give both weight and bias, or neither")
    if not use_triton_float(x):
        return _batch_norm_torch(x, running_mean, running_var, weight, bias, training, momentum, eps)
    y = BatchNormFunction.apply(x.reshape(N, C, S), weight, bias, running_mean, running_var, training, momentum, eps)
    return y.reshape(x.shape)


# torch's float32 batch statistics lose about |mean| / std ulps per channel (its mean is accumulated in float32
# and it normalises as x * a + b): exact enough up to this ratio, beyond which x is shifted first.
PIVOT_RATIO = 8.0


def _batch_norm_torch(x, running_mean, running_var, weight, bias, batch_stats, factor, eps):
    """torch's batch norm (its fused kernels and derivative), exact in float32 for any mean: in training, a
    channel whose mean is more than PIVOT_RATIO standard deviations from zero is normalised as x - pivot,
    pivot being one of its values, which loses nothing when the spread is small next to the mean.

    Normalising by running statistics needs no shift: their own float32 rounding costs about as much."""
    if not batch_stats or x.dtype == torch.float64 or x.numel() == 0:
        return F.batch_norm(x, running_mean, running_var, weight, bias, batch_stats, factor, eps)
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
    if (mean * invstd).abs_().max().item() <= PIVOT_RATIO:
        return y
    pivot = x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)]
    shifted = x - pivot.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))
    y, shifted_mean, shifted_invstd = torch.native_batch_norm(shifted, weight, bias, None, None, True, 0.0, eps)
    if running_mean is not None:
        # The first try blended torch's statistics into the running ones: replace them by the exact ones.
        n = x.numel() // x.shape[1]
        running_mean.add_(pivot + shifted_mean - mean, alpha=factor)
        running_var.add_(shifted_invstd.pow(-2) - invstd.pow(-2), alpha=factor * n / (n - 1))
    return y


class _NativeBatchNorm:
    """forward() of torch's _BatchNorm (num_batches_tracked, cumulative momentum) on the native function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                          self.weight, self.bias, batch_stats, factor, self.eps)


class BatchNorm1d(_NativeBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d on (N, C) or (N, C, L) inputs."""


class BatchNorm2d(_NativeBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d on (N, C, H, W) inputs."""


class BatchNorm3d(_NativeBatchNorm, nn.BatchNorm3d):
    """nn.BatchNorm3d on (N, C, D, H, W) inputs."""


def _converter(cls):
    def build(m: nn.modules.batchnorm._BatchNorm):
        new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, device=_device_of(m), dtype=_dtype_of(m))
        # Share parameters and buffers: the converted layer is the same layer, not a copy.
        for name, p in m.named_parameters(recurse=False):
            new.register_parameter(name, p)
        for name, b in m.named_buffers(recurse=False):
            new.register_buffer(name, b)
        return new
    return build


def _device_of(m):
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return t.device if t is not None else None


def _dtype_of(m):
    t = next(iter(m.parameters()), None)
    return t.dtype if t is not None else None


register_conversion(nn.BatchNorm1d, _converter(BatchNorm1d))
register_conversion(nn.BatchNorm2d, _converter(BatchNorm2d))
register_conversion(nn.BatchNorm3d, _converter(BatchNorm3d))
