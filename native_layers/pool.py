"""SINGA's Pooling layer (max and average): `MaxPool2d` and `AvgPool2d`, drop-in for torch.nn's.

Triton kernels on CUDA tensors (triton_kernels/pool.py), whose backward passes gather per input pixel, so
they are deterministic; on CPU tensors torch's own pooling ops and their derivatives (deterministic too). The
Functions also run torch's aten ops on CPU tensors, for callers that apply them directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from .convert import register_conversion
from .dispatch import kernels, use_triton

aten = torch.ops.aten


def _pool_out_size(size, kernel, stride, pad, dilation, ceil_mode):
    """torch's rule: with ceil_mode the last window may overhang, but must start inside the image or left pad."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pool_args(name, x, kernel_size, stride, padding, dilation, ceil_mode):
    kernel = _pair(kernel_size)
    stride = _pair(stride) if stride is not None and stride != [] and stride != () else kernel
    padding, dilation = _pair(padding), _pair(dilation)
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
        raise ValueError(f"{name}: kernel_size {kernel}, stride {stride} and dilation {dilation} must be positive")
    for p, k in zip(padding, kernel):
        if p < 0 or p > k // 2:
            raise ValueError(f"{name}: padding should be at least 0 and at most half of the kernel size, got "
                             f"padding={padding} for kernel_size={kernel}")
    out_hw = tuple(_pool_out_size(x.shape[-2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
                   for i in range(2))
    if min(out_hw) <= 0:
        raise ValueError(f"{name}: input {tuple(x.shape)} is too small for kernel_size {kernel} "
                         f"(output would be {out_hw})")
    return kernel, stride, padding, dilation, out_hw


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, out_hw):
        triton_path = use_triton(x)
        if triton_path:
            y, idx = kernels("pool").max_pool2d_forward(x, kernel, stride, padding, dilation, out_hw)
        else:
            y, idx = aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, idx)
        ctx.conf = (kernel, stride, padding, dilation, ceil_mode, triton_path)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_idx):
        x, idx = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode, triton_path = ctx.conf
        if triton_path:
            dx = kernels("pool").max_pool2d_backward(grad_y, idx, x.shape, kernel, stride, padding, dilation)
        else:
            dx = aten.max_pool2d_with_indices_backward(grad_y, x, kernel, stride, padding, dilation, ceil_mode, idx)
        return dx, None, None, None, None, None, None


class AvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, out_hw):
        triton_path = use_triton(x)
        if triton_path:
            y = kernels("pool").avg_pool2d_forward(x, kernel, stride, padding, out_hw, count_include_pad,
                                                   divisor_override)
        else:
            y = aten.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.x_shape = x.shape
        ctx.save_for_backward(x if not triton_path else None)
        ctx.conf = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, triton_path)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, triton_path = ctx.conf
        if triton_path:
            return (kernels("pool").avg_pool2d_backward(grad_y, ctx.x_shape, kernel, stride, padding,
                                                        count_include_pad, divisor_override),
                    None, None, None, None, None, None, None)
        dx = aten.avg_pool2d_backward(grad_y, x, kernel, stride, padding, ceil_mode, count_include_pad,
                                      divisor_override)
        return dx, None, None, None, None, None, None, None


def _batched(x, name):
    if x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got {tuple(x.shape)}")
    return x.unsqueeze(0) if x.dim() == 3 else x


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool2d with SINGA's kernels (indices: flat h * W + w, as torch's)."""
    xb = _batched(x, "max_pool2d")
    kernel, stride, padding, dilation, out_hw = _pool_args("max_pool2d", xb, kernel_size, stride, padding,
                                                           dilation, ceil_mode)
    if not use_triton(x):
        # torch's op and derivative: an autograd Function would only add its own overhead on small planes.
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices)
    y, idx = MaxPool2dFunction.apply(xb, kernel, stride, padding, dilation, ceil_mode, out_hw)
    if x.dim() == 3:
        y, idx = y.squeeze(0), idx.squeeze(0)
    return (y, idx) if return_indices else y


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d with SINGA's kernels."""
    if divisor_override is not None and divisor_override <= 0:
        raise ValueError(f"avg_pool2d: divisor_override must be positive, got {divisor_override}")
    xb = _batched(x, "avg_pool2d")
    kernel, stride, padding, _, out_hw = _pool_args("avg_pool2d", xb, kernel_size, stride, padding, 1, ceil_mode)
    if not use_triton(x):
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    y = AvgPool2dFunction.apply(xb, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, out_hw)
    return y.squeeze(0) if x.dim() == 3 else y


class MaxPool2d(nn.MaxPool2d):
    """torch.nn.MaxPool2d with SINGA's kernels; same arguments (return_indices included)."""

    def forward(self, x: torch.Tensor):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                          self.return_indices)

    @classmethod
    def from_torch(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)


class AvgPool2d(nn.AvgPool2d):
    """torch.nn.AvgPool2d with SINGA's kernels; same arguments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                          self.divisor_override)

    @classmethod
    def from_torch(cls, pool: nn.AvgPool2d) -> "AvgPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
                   pool.divisor_override)


register_conversion(nn.MaxPool2d, MaxPool2d.from_torch)
register_conversion(nn.AvgPool2d, AvgPool2d.from_torch)
