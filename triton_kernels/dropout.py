"""SINGA's Dropout, seed-based: the keep mask is a function of (seed, element index) from Philox, so the
backward regenerates it instead of reading a stored mask. The index is the element's rank in the output's
memory order (see `dropout`). Forward and backward are the same kernel:
out = in * keep / (1 - p), applied to the input going forward and to the output gradient going back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .elementwise import empty_like_output, launch_elementwise, strided_offsets

BLOCK = 1024  # elements per random stream; each program covers 4 streams (one Philox call gives 4 numbers)


@triton.jit
def _dropout_kernel(x_ptr, out_ptr, p, scale, seed, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                    so0, so1, so2, so3, NDIM: tl.constexpr, BLOCK: tl.constexpr):
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
        i = base + j * BLOCK
        mask = i < n
        x = tl.load(x_ptr + strided_offsets(i, size1, size2, size3, sx0, sx1, sx2, sx3, NDIM), mask=mask,
                    other=0.0).to(tl.float32)
        y = tl.where(r >= p, x * scale, 0.0)
        tl.store(out_ptr + strided_offsets(i, size1, size2, size3, so0, so1, so2, so3, NDIM),
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep(seed) / (1 - p), x of any strides, into a new tensor in torch's output layout for x or into
    `out` (x's shape, any non-overlapping strides; x itself for an in-place dropout).

    Element k in out's memory order gets random number k, so the keep mask depends on out's order of
    strides and on nothing else: the backward passes an `out` with the forward output's strides (or any in
    the same order), and then regenerates the forward's mask whatever the layout of the gradient."""
    y = empty_like_output(x) if out is None else out
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return launch_elementwise(_dropout_kernel, 4 * BLOCK, y, [x], (float(p), scale, seed), BLOCK=BLOCK)
