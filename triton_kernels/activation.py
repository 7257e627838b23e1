"""Elementwise activations of SINGA's neuron layers: ReLU, sigmoid, tanh and STanh (1.7159 tanh(2x/3)).

The backward takes the saved output y (not the input): each derivative is a function of y, so the input
need not be kept alive for the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .elementwise import empty_like_output, launch_elementwise, strided_offsets

MODES = {"relu": 1, "sigmoid": 2, "tanh": 3, "stanh": 4}
STANH_A = 1.7159
STANH_B = 2.0 / 3.0
BLOCK = 1024


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x) - 1, written so that exp never overflows (no libdevice in the interpreter)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _activation_forward_kernel(x_ptr, y_ptr, n, size1, size2, size3, sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3,
                               MODE: tl.constexpr, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + strided_offsets(i, size1, size2, size3, sx0, sx1, sx2, sx3, NDIM), mask=mask,
                other=0.0).to(tl.float32)
    if MODE == 1:
        y = tl.maximum(x, 0.0)
    elif MODE == 2:
        y = _sigmoid(x)
    elif MODE == 3:
        y = _tanh(x)
    else:
        y = 1.7159 * _tanh(x * (2.0 / 3.0))
    tl.store(y_ptr + strided_offsets(i, size1, size2, size3, sy0, sy1, sy2, sy3, NDIM),
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_kernel(y_ptr, g_ptr, dx_ptr, n, size1, size2, size3, sy0, sy1, sy2, sy3,
                                sg0, sg1, sg2, sg3, sd0, sd1, sd2, sd3,
                                MODE: tl.constexpr, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    y = tl.load(y_ptr + strided_offsets(i, size1, size2, size3, sy0, sy1, sy2, sy3, NDIM), mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(g_ptr + strided_offsets(i, size1, size2, size3, sg0, sg1, sg2, sg3, NDIM), mask=mask,
                other=0.0).to(tl.float32)
    if MODE == 1:
        d = tl.where(y > 0, g, 0.0)
    elif MODE == 2:
        d = g * y * (1.0 - y)
    elif MODE == 3:
        d = g * (1.0 - y * y)
    else:
        # y = A tanh(Bx)  =>  dy/dx = A B (1 - (y/A)^2) = B (A - y^2/A)
        d = g * (2.0 / 3.0) * (1.7159 - y * y / 1.7159)
    tl.store(dx_ptr + strided_offsets(i, size1, size2, size3, sd0, sd1, sd2, sd3, NDIM),
             d.to(dx_ptr.dtype.element_ty), mask=mask)


def activation_forward(x: torch.Tensor, mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x) elementwise, x of any strides, into a new tensor in torch's output layout for x or into
    `out` (x's shape, any non-overlapping strides; x itself for an in-place activation)."""
    y = empty_like_output(x) if out is None else out
    return launch_elementwise(_activation_forward_kernel, BLOCK, y, [x], MODE=MODES[mode], BLOCK=BLOCK)


def activation_backward(y: torch.Tensor, grad_y: torch.Tensor, mode: str) -> torch.Tensor:
    """The input gradient from the saved output y, in y's layout (the forward input's, which is the layout
    autograd accumulates into); grad_y may have any strides."""
    dx = empty_like_output(y)
    return launch_elementwise(_activation_backward_kernel, BLOCK, dx, [y, grad_y], MODE=MODES[mode], BLOCK=BLOCK)
