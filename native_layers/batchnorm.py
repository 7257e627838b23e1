"""SINGA's BatchNorm layer: `BatchNorm1d`/`2d`/`3d`, drop-in for torch's (arguments, state_dict keys incl.
num_batches_tracked, running statistics and momentum, including momentum=None for a cumulative average).

Statistics and their gradients are computed in float32 per channel over the batch (and spatial) values;
the backward keeps x and the batch mean and 1/std, as torch does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .convert import register_conversion
from .dispatch import kernels, use_triton_float


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class BatchNormFunction(torch.autograd.Function):
    """Batch norm of x: (N, C, S). With `batch_stats`, normalises by the batch's statistics and blends them
    into the running buffers with `factor`; otherwise normalises by the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, factor, eps):
        N, C, S = x.shape
        R = N * S
        triton = use_triton_float(x)
        cdt = _compute_dtype(x)
        # Statistics are of x - pivot (pivot: a value of the channel in the batch), so a large mean with a
        # small spread loses nothing in float32; the mean is pivot + mean.
        pivot = torch.zeros(C, device=x.device, dtype=cdt)
        if batch_stats:
            if R == 0:
                mean = torch.zeros(C, device=x.device, dtype=cdt)
                var = torch.ones(C, device=x.device, dtype=cdt)
            elif triton:
                pivot, mean, var = kernels("batchnorm").batch_stats(x)
            else:
                pivot = x[0, :, 0].to(cdt)
                xc = x.to(cdt) - pivot[:, None]
                mean, var = xc.mean((0, 2)), xc.var((0, 2), unbiased=False)
            if running_mean is not None and R > 0:
                with torch.no_grad():
                    running_mean.mul_(1 - factor).add_((pivot + mean).to(running_mean.dtype), alpha=factor)
                    unbiased = var * (R / (R - 1))
                    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        else:
            mean, var = running_mean.to(cdt), running_var.to(cdt)
        invstd = torch.rsqrt(var + eps)
        if triton:
            y = kernels("batchnorm").forward(x, pivot, mean, invstd, weight, bias)
        else:
            y = (x.to(cdt) - pivot[:, None] - mean[:, None]) * invstd[:, None]
            if weight is not None:
                y = y * weight.to(cdt)[:, None] + bias.to(cdt)[:, None]
            y = y.to(x.dtype)
        ctx.batch_stats, ctx.triton = batch_stats, triton
        ctx.save_for_backward(x, weight, pivot, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, pivot, mean, invstd = ctx.saved_tensors
        N, C, S = x.shape
        R = N * S
        if R == 0:
            zeros = torch.zeros(C, device=x.device, dtype=weight.dtype) if weight is not None else None
            return torch.zeros_like(x), zeros, zeros, None, None, None, None, None
        if ctx.triton:
            k = kernels("batchnorm")
            sum_g, sum_gx = k.grad_sums(x, grad_y, pivot, mean, invstd)
            grad_x = k.backward_input(x, grad_y, pivot, mean, invstd, weight, sum_g, sum_gx, ctx.batch_stats) \
                if ctx.needs_input_grad[0] else None
        else:
            cdt = mean.dtype
            g = grad_y.to(cdt)
            xhat = (x.to(cdt) - pivot[:, None] - mean[:, None]) * invstd[:, None]
            sum_g, sum_gx = g.sum((0, 2)), (g * xhat).sum((0, 2))
            k = invstd if weight is None else invstd * weight.to(cdt)
            if ctx.batch_stats:
                g = g - sum_g[:, None] / R - xhat * (sum_gx / R)[:, None]
            grad_x = (g * k[:, None]).to(x.dtype)
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
    x3 = x.reshape(N, C, S)
    y = BatchNormFunction.apply(x3, weight, bias, running_mean, running_var, training, momentum, eps)
    return y.reshape(x.shape)


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
