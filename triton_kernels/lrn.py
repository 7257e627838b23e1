"""Cross-channel local response normalization (AlexNet's LRN, as SINGA and torch.nn.LocalResponseNorm define it).

    scale_c = k + alpha / size * sum(x_j ** 2 for j in [c - size // 2, c + (size - 1) // 2])
    y_c = x_c * scale_c ** -beta

Forward and backward are one kernel each. The forward also writes `scale` (fp32), which the backward reads
instead of recomputing the window sums:

    dx_j = dy_j * scale_j ** -beta
           - 2 * alpha * beta / size * x_j * sum(dy_c * x_c * scale_c ** (-beta - 1) for c whose window holds j)

A program owns a tile of channels x pixels of one image; the window's neighbours are re-read from cache.
Tensors are (N, C, H, W) with explicit strides; arithmetic is fp32, offsets 64-bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_C, BLOCK_S = (16, 256) if INTERPRET else (8, 128)


@triton.jit
def _plane_offsets(ss, W, sh, sw, DENSE: tl.constexpr):
    # Offsets of flat pixel indices ss = h * W + w within one (n, c) plane. A dense plane is addressed by ss
    # itself, which lets the compiler see consecutive addresses and vectorise whatever the width.
    if DENSE:
        return ss
    return (ss // W) * sh + (ss % W) * sw


@triton.jit
def _lrn_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, C, W, HW,
    sxn, sxc, sxh, sxw,
    SIZE, alpha, beta, k,
    X_DENSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < HW
    pix = x_ptr + n * sxn + _plane_offsets(ss, W, sxh, sxw, X_DENSE)
    sumsq = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for d in range(SIZE):
        cc = cs + d - SIZE // 2
        v = tl.load(pix[None, :] + cc.to(tl.int64)[:, None] * sxc,
                    mask=((cc >= 0) & (cc < C))[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
        sumsq += v * v
    ok = (cs < C)[:, None] & s_ok[None, :]
    x = tl.load(pix[None, :] + cs.to(tl.int64)[:, None] * sxc, mask=ok, other=0.0).to(tl.float32)
    scale = k + (alpha / SIZE) * sumsq
    y = x * tl.exp(-beta * tl.log(scale))
    # y and scale are fresh contiguous (N, C, H, W) tensors.
    out = (n * C + cs.to(tl.int64))[:, None] * HW + ss[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + out, scale, mask=ok)


@triton.jit
def _lrn_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, dx_ptr, C, W, HW,
    sdyn, sdyc, sdyh, sdyw, sxn, sxc, sxh, sxw,
    SIZE, alpha, beta,
    DY_DENSE: tl.constexpr, X_DENSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < HW
    dy_pix = dy_ptr + n * sdyn + _plane_offsets(ss, W, sdyh, sdyw, DY_DENSE)
    x_pix = x_ptr + n * sxn + _plane_offsets(ss, W, sxh, sxw, X_DENSE)
    scale_pix = scale_ptr + n * C * HW + ss
    # Channel c's window holds j when c is in [j - (size - 1) // 2, j + size // 2].
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for d in range(SIZE):
        cc = (cs + d - (SIZE - 1) // 2).to(tl.int64)
        m = ((cc >= 0) & (cc < C))[:, None] & s_ok[None, :]
        g = tl.load(dy_pix[None, :] + cc[:, None] * sdyc, mask=m, other=0.0).to(tl.float32)
        xc = tl.load(x_pix[None, :] + cc[:, None] * sxc, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_pix[None, :] + cc[:, None] * HW, mask=m, other=1.0)
        acc += g * xc * tl.exp((-beta - 1.0) * tl.log(sc))
    ok = (cs < C)[:, None] & s_ok[None, :]
    c64 = cs.to(tl.int64)[:, None]
    g = tl.load(dy_pix[None, :] + c64 * sdyc, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_pix[None, :] + c64 * sxc, mask=ok, other=0.0).to(tl.float32)
    sc = tl.load(scale_pix[None, :] + c64 * HW, mask=ok, other=1.0)
    dx = g * tl.exp(-beta * tl.log(sc)) - (2.0 * alpha * beta / SIZE) * x * acc
    tl.store(dx_ptr + (n * C + c64) * HW + ss[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _grid(N, C, H, W):
    return (triton.cdiv(H * W, BLOCK_S), triton.cdiv(C, BLOCK_C), N)


def _dense_plane(t: torch.Tensor) -> bool:
    """Whether each (n, c) plane of `t` is one contiguous run of H * W elements."""
    H, W = t.shape[2:]
    return (t.stride(3) == 1 or W == 1) and (t.stride(2) == W or H == 1)


def lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float):
    """(y, scale) for a 4-D input; scale (fp32) is what the backward needs besides x."""
    N, C, H, W = x.shape
    y = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype)
    scale = torch.empty((N, C, H, W), device=x.device, dtype=torch.float32)
    if x.numel():
        _lrn_fwd_kernel[_grid(N, C, H, W)](x, y, scale, C, W, H * W, *x.stride(), size, float(alpha), float(beta),
                                           float(k), X_DENSE=_dense_plane(x), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return y, scale


def lrn_backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, size: int, alpha: float, beta: float):
    N, C, H, W = x.shape
    dx = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype)
    if x.numel():
        _lrn_bwd_kernel[_grid(N, C, H, W)](grad_y, x, scale, dx, C, W, H * W, *grad_y.stride(), *x.stride(),
                                           size, float(alpha), float(beta), DY_DENSE=_dense_plane(grad_y),
                                           X_DENSE=_dense_plane(x), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return dx
