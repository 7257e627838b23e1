"""SINGA's Dropout, seed-based: the keep mask is a function of (seed, element index) from Philox, so the
backward regenerates it instead of reading a stored mask. Forward and backward are the same kernel:
out = in * keep / (1 - p), applied to the input going forward and to the output gradient going back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per random stream; each program covers 4 streams (one Philox call gives 4 numbers)


@triton.jit
def _dropout_kernel(x_ptr, out_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.rand4x(seed, pid * BLOCK + lane)
    base = pid * (4 * BLOCK) + lane
    for j in tl.static_range(4):
        if j == 0:
            r = r0
        elif j == 1:
            r = r1
        elif j == 2:
            r = r2
        else:
            r = r3
        offs = base + j * BLOCK
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(r >= p, x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep(seed) / (1 - p) on a contiguous copy of x (or into `out`, which may be x itself)."""
    xc = x.contiguous()
    y = torch.empty_like(xc) if out is None else out
    n = xc.numel()
    if n:
        scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
        _dropout_kernel[(triton.cdiv(n, 4 * BLOCK),)](xc, y, n, float(p), scale, seed, BLOCK=BLOCK)
    return y
