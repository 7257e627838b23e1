"""SINGA's Dropout layer, seed-based: only the seed is saved for the backward, never the mask.

The Triton path draws the mask from Philox(seed, element index); the CPU path from a torch.Generator
seeded with the same seed (a different stream: the masks differ between the two paths, not within one).
Seeds come from torch's default generator, so torch.manual_seed makes runs repeatable.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .convert import register_conversion
from .dispatch import kernels, use_triton_float


def _keep_mask_torch(shape, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(shape, generator=gen) >= p).to(device)


def _apply(x: torch.Tensor, p: float, seed: int, triton: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    if triton:
        return kernels("dropout").dropout(x, p, seed, out=out)
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    y = x * _keep_mask_torch(x.shape, p, seed, x.device).to(x.dtype) * scale
    return y if out is None else out.copy_(y)


class DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed, inplace):
        # The backward must draw from the same generator as the forward, so the path is fixed here.
        ctx.p, ctx.seed, ctx.triton = p, seed, use_triton_float(x)
        y = _apply(x, p, seed, ctx.triton, out=x if inplace else None)
        if inplace:
            if y is not x:
                x.copy_(y)
            ctx.mark_dirty(x)
            y = x
        if ctx.triton:
            # The Triton mask follows the output's memory order, so the backward writes a gradient with the
            # strides of the output (made dense when an in-place x has gaps).
            ctx.order = y.stride() if y is not x else torch.empty_like(x, device="meta").stride()
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # The same mask and scale, regenerated from the seed.
        out = None
        if ctx.triton:
            out = torch.empty_strided(grad_y.shape, ctx.order, dtype=grad_y.dtype, device=grad_y.device)
        return _apply(grad_y, ctx.p, ctx.seed, ctx.triton, out=out), None, None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            seed: int | None = None) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (training only)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Dropout: probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return DropoutFunction.apply(x, float(p), seed, inplace)


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments) whose backward regenerates the mask from a seed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


register_conversion(nn.Dropout, lambda m: Dropout(m.p, m.inplace))
