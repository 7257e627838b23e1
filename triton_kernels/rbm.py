"""Sampling of SINGA's RBM units (RBMVis, RBMHid): one Gibbs half-step draws the units from their
conditional distribution given the other layer. The probabilities or means come from the matrix-multiply
kernel (`matmul.py`, bias and sigmoid in its epilogue); this kernel draws the samples from them.

Random numbers are Philox(seed, element index), as in Dropout: a sample is a function of the seed and the
element's rank in the output's memory order, so a chain is reproducible from its seeds.
- bernoulli units: 1 where u < p, else 0 (u uniform in [0, 1))
- gaussian units (unit variance): mean + n (n standard normal)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .elementwise import empty_like_output, launch_elementwise, strided_offsets

UNITS = {"bernoulli": 0, "gaussian": 1}
BLOCK = 1024


@triton.jit
def _rbm_sample_kernel(p_ptr, out_ptr, seed, n, size1, size2, size3, sp0, sp1, sp2, sp3, so0, so1, so2, so3,
                       UNIT: tl.constexpr, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    p = tl.load(p_ptr + strided_offsets(i, size1, size2, size3, sp0, sp1, sp2, sp3, NDIM), mask=mask,
                other=0.0).to(tl.float32)
    if UNIT == 0:
        y = tl.where(tl.rand(seed, i) < p, 1.0, 0.0)
    else:
        y = p + tl.randn(seed, i)
    tl.store(out_ptr + strided_offsets(i, size1, size2, size3, so0, so1, so2, so3, NDIM),
             y.to(out_ptr.dtype.element_ty), mask=mask)


def sample(p: torch.Tensor, seed: int, unit: str = "bernoulli") -> torch.Tensor:
    """Samples of units with probabilities (bernoulli) or means (gaussian) `p`, any strides; a new tensor
    in torch's output layout for p, in p's dtype. The same seed gives the same samples."""
    if unit not in UNITS:
        raise ValueError(f"RBM: unit must be one of {tuple(UNITS)}, got {unit!r}")
    out = empty_like_output(p)
    return launch_elementwise(_rbm_sample_kernel, BLOCK, out, [p], (seed,), UNIT=UNITS[unit], BLOCK=BLOCK)
