"""SINGA's LRN layer: cross-channel local response normalization, a drop-in torch.nn.LocalResponseNorm.

    y_c = x_c * (k + alpha / size * sum(x_j ** 2 for j in [c - size // 2, c + (size - 1) // 2])) ** -beta

One fused Triton kernel for the forward and one for the backward on CUDA tensors (triton_kernels/lrn.py);
on CPU tensors the same formulas in torch ops, backward included.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from .convert import register_conversion
from .dispatch import kernels, use_triton


def _window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """sum(t[:, c - before : c + after + 1]) along channels, zero outside, for a (N, C, H, W) tensor."""
    padded = F.pad(t, (0, 0, 0, 0, before, after))
    return padded.unfold(1, before + after + 1, 1).sum(-1)


class LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        triton_path = use_triton(x)
        if triton_path:
            y, scale = kernels("lrn").lrn_forward(x, size, alpha, beta, k)
        else:
            scale = k + alpha / size * _window_sum(x * x, size // 2, (size - 1) // 2)
            y = x * scale.pow(-beta)
        ctx.save_for_backward(x, scale)
        ctx.conf = (size, alpha, beta, triton_path)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        size, alpha, beta, triton_path = ctx.conf
        if triton_path:
            dx = kernels("lrn").lrn_backward(grad_y, x, scale, size, alpha, beta)
        else:
            # Channel c's window holds j when c lies in [j - (size - 1) // 2, j + size // 2].
            t = grad_y * x * scale.pow(-beta - 1)
            dx = grad_y * scale.pow(-beta) - (2 * alpha * beta / size) * x * _window_sum(t, (size - 1) // 2, size // 2)
        return dx, None, None, None, None


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """torch.nn.functional.local_response_norm with SINGA's kernels, for inputs of 3 or more dimensions."""
    if x.dim() < 3:
        raise ValueError(f"local_response_norm: expected an input of 3 or more dimensions (N, C, ...), got "
                         f"{tuple(x.shape)}")
    if size <= 0:
        raise ValueError(f"local_response_norm: size must be positive, got {size}")
    shape = x.shape
    # The kernels see (N, C, H, W): a 3-D input gains a unit W, a 5-D or larger one folds its trailing dims.
    x4 = x.unsqueeze(-1) if x.dim() == 3 else x if x.dim() == 4 else x.reshape(shape[0], shape[1], -1, 1)
    return LRNFunction.apply(x4, int(size), float(alpha), float(beta), float(k)).reshape(shape)


class LRN(nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm (AlexNet's LRN across channels) with SINGA's fused kernels; same arguments:
    size, alpha, beta, k (alpha is divided by size, as torch and SINGA define it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k)

    @classmethod
    def from_torch(cls, lrn: nn.LocalResponseNorm) -> "LRN":
        return cls(lrn.size, lrn.alpha, lrn.beta, lrn.k)


register_conversion(nn.LocalResponseNorm, LRN.from_torch)
