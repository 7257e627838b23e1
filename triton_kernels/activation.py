"""Elementwise activations of SINGA's neuron layers: ReLU, sigmoid, tanh and STanh (1.7159 tanh(2x/3)).

The backward takes the saved output y (not the input): each derivative is a function of y, so the input
need not be kept alive for the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _activation_forward_kernel(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        y = tl.maximum(x, 0.0)
    elif MODE == 2:
        y = _sigmoid(x)
    elif MODE == 3:
        y = _tanh(x)
    else:
        y = 1.7159 * _tanh(x * (2.0 / 3.0))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_kernel(y_ptr, g_ptr, dx_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        d = tl.where(y > 0, g, 0.0)
    elif MODE == 2:
        d = g * y * (1.0 - y)
    elif MODE == 3:
        d = g * (1.0 - y * y)
    else:
        # y = A tanh(Bx)  =>  dy/dx = A B (1 - (y/A)^2) = B (A - y^2/A)
        d = g * (2.0 / 3.0) * (1.7159 - y * y / 1.7159)
    tl.store(dx_ptr + offs, d.to(dx_ptr.dtype.element_ty), mask=mask)


def activation_forward(x: torch.Tensor, mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x) elementwise; `out` (contiguous, like x) may be x itself for an in-place ReLU."""
    xc = x.contiguous()
    y = torch.empty_like(xc) if out is None else out
    n = xc.numel()
    if n:
        _activation_forward_kernel[(triton.cdiv(n, BLOCK),)](xc, y, n, MODE=MODES[mode], BLOCK=BLOCK)
    return y


def activation_backward(y: torch.Tensor, grad_y: torch.Tensor, mode: str) -> torch.Tensor:
    yc, gc = y.contiguous(), grad_y.contiguous()
    dx = torch.empty_like(yc)
    n = yc.numel()
    if n:
        _activation_backward_kernel[(triton.cdiv(n, BLOCK),)](yc, gc, dx, n, MODE=MODES[mode], BLOCK=BLOCK)
    return dx
