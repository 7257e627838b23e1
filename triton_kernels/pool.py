"""2-D max and average pooling: forward kernels over output pixels, backward kernels over input pixels.

Backward gathers: each input pixel visits the output windows that cover it and adds their share, so no two
programs write the same element and no atomics are needed. Max pooling records, like torch, the flat index
h * W + w of each window's maximum within its input plane; its backward routes the gradient through those
indices. Tensors are NCHW with explicit strides, arithmetic is fp32, offsets are 64-bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter every program costs about a millisecond: one big block covers a test image.
BLOCK = 4096 if INTERPRET else 256


@triton.jit
def _nchw(offs, C, H, W):
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    return n, c, h, w


@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, y_ptr, idx_ptr, TOTAL, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    n, c, oh, ow = _nchw(offs, C, OH, OW)
    base = x_ptr + n * sxn + c * sxc
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    best_idx = tl.full((BLOCK,), -1, dtype=tl.int64)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        ok_h = ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            inside = ok_h & (iw >= 0) & (iw < W)
            v = tl.load(base + ih * sxh + iw * sxw, mask=inside, other=float("-inf")).to(tl.float32)
            # As torch: the first in-image tap starts, a larger value or a NaN (v != v) replaces it.
            take = inside & ((v > best) | (v != v) | (best_idx < 0))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, ih * W + iw, best_idx)
    tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + offs, best_idx, mask=ok)


@triton.jit
def _max_pool2d_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr, TOTAL, C, H, W, OH, OW,
    sdyn, sdyc, sdyh, sdyw,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    n, c, ih, iw = _nchw(offs, C, H, W)
    plane = n * C + c
    me = ih * W + iw
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in range(KH):
        th = ih + pad_h - kh * dil_h
        oh = th // stride_h
        ok_h = ok & (th >= 0) & (th % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + pad_w - kw * dil_w
            ow = tw // stride_w
            cover = ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            # A window that picked this pixel through two of its taps is counted once: only the tap that
            # lands on the pixel itself is visited, and each window has one tap per pixel.
            winner = tl.load(idx_ptr + (plane * OH + oh) * OW + ow, mask=cover, other=-1)
            g = tl.load(dy_ptr + n * sdyn + c * sdyc + oh * sdyh + ow * sdyw, mask=cover & (winner == me),
                        other=0.0)
            acc += g.to(tl.float32)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _avg_divisor(oh, ow, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w,
                 COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR: tl.constexpr):
    # torch's rule: the window clipped to the padded image, or to the image itself without padding counts.
    h0 = oh * stride_h - pad_h
    w0 = ow * stride_w - pad_w
    h1 = tl.minimum(h0 + KH, H + pad_h)
    w1 = tl.minimum(w0 + KW, W + pad_w)
    if DIVISOR > 0:
        div = tl.zeros_like(h0).to(tl.float32) + DIVISOR
    elif COUNT_INCLUDE_PAD:
        div = ((h1 - h0) * (w1 - w0)).to(tl.float32)
    else:
        div = ((tl.minimum(h1, H) - tl.maximum(h0, 0)) * (tl.minimum(w1, W) - tl.maximum(w0, 0))).to(tl.float32)
    return div


@triton.jit
def _avg_pool2d_fwd_kernel(
    x_ptr, y_ptr, TOTAL, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    KH, KW, stride_h, stride_w, pad_h, pad_w,
    COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    n, c, oh, ow = _nchw(offs, C, OH, OW)
    base = x_ptr + n * sxn + c * sxc
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh
        ok_h = ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw
            v = tl.load(base + ih * sxh + iw * sxw, mask=ok_h & (iw >= 0) & (iw < W), other=0.0)
            acc += v.to(tl.float32)
    div = _avg_divisor(oh, ow, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w, COUNT_INCLUDE_PAD, DIVISOR)
    tl.store(y_ptr + offs, (acc / div).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _avg_pool2d_bwd_kernel(
    dy_ptr, dx_ptr, TOTAL, C, H, W, OH, OW,
    sdyn, sdyc, sdyh, sdyw,
    KH, KW, stride_h, stride_w, pad_h, pad_w,
    COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    n, c, ih, iw = _nchw(offs, C, H, W)
    base = dy_ptr + n * sdyn + c * sdyc
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in range(KH):
        th = ih + pad_h - kh
        oh = th // stride_h
        ok_h = ok & (th >= 0) & (th % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + pad_w - kw
            ow = tw // stride_w
            cover = ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            g = tl.load(base + oh * sdyh + ow * sdyw, mask=cover, other=0.0).to(tl.float32)
            div = _avg_divisor(oh, ow, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w, COUNT_INCLUDE_PAD, DIVISOR)
            acc += tl.where(cover, g / div, 0.0)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=ok)


def max_pool2d_forward(x, kernel, stride, padding, dilation, out_hw):
    """(y, indices): the max of each window and its flat index h * W + w in the input plane (int64)."""
    N, C, H, W = x.shape
    OH, OW = out_hw
    y = torch.empty((N, C, OH, OW), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, C, OH, OW), device=x.device, dtype=torch.int64)
    if y.numel():
        _max_pool2d_fwd_kernel[(triton.cdiv(y.numel(), BLOCK),)](
            x, y, idx, y.numel(), C, H, W, OH, OW, *x.stride(),
            kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            BLOCK=BLOCK)
    return y, idx


def max_pool2d_backward(grad_y, indices, x_shape, kernel, stride, padding, dilation):
    N, C, H, W = x_shape
    OH, OW = grad_y.shape[2:]
    dx = torch.empty(x_shape, device=grad_y.device, dtype=grad_y.dtype)
    indices = indices.contiguous()
    if dx.numel():
        _max_pool2d_bwd_kernel[(triton.cdiv(dx.numel(), BLOCK),)](
            grad_y, indices, dx, dx.numel(), C, H, W, OH, OW, *grad_y.stride(),
            kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            BLOCK=BLOCK)
    return dx


def avg_pool2d_forward(x, kernel, stride, padding, out_hw, count_include_pad=True, divisor_override=None):
    N, C, H, W = x.shape
    OH, OW = out_hw
    y = torch.empty((N, C, OH, OW), device=x.device, dtype=x.dtype)
    if y.numel():
        _avg_pool2d_fwd_kernel[(triton.cdiv(y.numel(), BLOCK),)](
            x, y, y.numel(), C, H, W, OH, OW, *x.stride(),
            kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
            COUNT_INCLUDE_PAD=count_include_pad, DIVISOR=divisor_override or 0, BLOCK=BLOCK)
    return y


def avg_pool2d_backward(grad_y, x_shape, kernel, stride, padding, count_include_pad=True, divisor_override=None):
    N, C, H, W = x_shape
    OH, OW = grad_y.shape[2:]
    dx = torch.empty(x_shape, device=grad_y.device, dtype=grad_y.dtype)
    if dx.numel():
        _avg_pool2d_bwd_kernel[(triton.cdiv(dx.numel(), BLOCK),)](
            grad_y, dx, dx.numel(), C, H, W, OH, OW, *grad_y.stride(),
            kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
            COUNT_INCLUDE_PAD=count_include_pad, DIVISOR=divisor_override or 0, BLOCK=BLOCK)
    return dx
