"""SINGA's Softmax layer over the last dimension of a (rows x columns) view, rows of any length.

Forward: a running max and sum per row (online softmax), then one pass that writes exp(x - lse).
Backward: dx = y * (dy - sum(dy * y)), from the saved output. Rows that fit one block are read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _softmax_forward_kernel(x_ptr, y_ptr, C, stride_xr, stride_xc, stride_yr,
                            ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    y_row = y_ptr + row * stride_yr
    if ONE_BLOCK:
        mask = cols < C
        x = tl.load(x_row + cols * stride_xc, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(y_row + cols, (e / tl.sum(e, axis=0)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m_vec = tl.full([BLOCK], -3.0e38, tl.float32)  # finite: exp(floor - floor) is 1, never nan
        s_vec = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, C, BLOCK):
            offs = c0 + cols
            x = tl.load(x_row + offs * stride_xc, mask=offs < C, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_vec, x)
            s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
        for c0 in range(0, C, BLOCK):
            offs = c0 + cols
            mask = offs < C
            x = tl.load(x_row + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + offs, tl.exp(x - lse).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_kernel(y_ptr, g_ptr, dx_ptr, C, stride_yr, stride_gr, stride_gc, stride_dr,
                             ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    y_row = y_ptr + row * stride_yr
    g_row = g_ptr + row * stride_gr
    if ONE_BLOCK:
        mask = cols < C
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
        dx = y * (g - tl.sum(g * y, axis=0))
        tl.store(dx_ptr + row * stride_dr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, C, BLOCK):
            offs = c0 + cols
            mask = offs < C
            y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + offs * stride_gc, mask=mask, other=0.0).to(tl.float32)
            acc += g * y
        dot = tl.sum(acc, axis=0)
        for c0 in range(0, C, BLOCK):
            offs = c0 + cols
            mask = offs < C
            y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + offs * stride_gc, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * stride_dr + offs, (y * (g - dot)).to(dx_ptr.dtype.element_ty), mask=mask)


def _block(C: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(C)))


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of a 2-d x with any strides; returns a contiguous tensor."""
    R, C = x.shape
    y = torch.empty((R, C), device=x.device, dtype=x.dtype)
    if R and C:
        block = _block(C)
        _softmax_forward_kernel[(R,)](x, y, C, x.stride(0), x.stride(1), y.stride(0),
                                      ONE_BLOCK=C <= block, BLOCK=block,
                                       num_warps=8 if block >= 2048 else 4)
    return y


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """y: the contiguous forward output; grad_y: any strides."""
    R, C = y.shape
    dx = torch.empty((R, C), device=y.device, dtype=y.dtype)
    if R and C:
        block = _block(C)
        _softmax_backward_kernel[(R,)](y, grad_y, dx, C, y.stride(0), grad_y.stride(0), grad_y.stride(1),
                                       dx.stride(0), ONE_BLOCK=C <= block, BLOCK=block,
                                       num_warps=8 if block >= 2048 else 4)
    return dx
