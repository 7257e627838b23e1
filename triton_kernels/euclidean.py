"""SINGA's EuclideanLoss: per sample 0.5 * ||x - t||^2, one program per sample (row) going forward; the
backward writes dx = s (x - t) and dt = -dx in one pass (s: the sample's scale from the reduction)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _euclidean_forward_kernel(x_ptr, t_ptr, loss_ptr, D, stride_xr, stride_xc, stride_tr, stride_tc,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, D, BLOCK):
        offs = c0 + cols
        mask = offs < D
        x = tl.load(x_ptr + row * stride_xr + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * stride_tr + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
        acc += (x - t) * (x - t)
    tl.store(loss_ptr + row, 0.5 * tl.sum(acc, axis=0))


@triton.jit
def _euclidean_backward_kernel(x_ptr, t_ptr, scale_ptr, dx_ptr, dt_ptr, D, stride_xr, stride_xc,
                               stride_tr, stride_tc, stride_scale,
                               WRITE_DX: tl.constexpr, WRITE_DT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK
    offs = c0 + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < D
    s = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    x = tl.load(x_ptr + row * stride_xr + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_tr + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
    d = s * (x - t)
    if WRITE_DX:
        tl.store(dx_ptr + row * D + offs, d.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DT:
        tl.store(dt_ptr + row * D + offs, (-d).to(dt_ptr.dtype.element_ty), mask=mask)


def _block(D: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(D)))


def euclidean_forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row 0.5 * sum((x - t)^2) in float32; x and t: (R, D), any strides."""
    R, D = x.shape
    loss = torch.empty(R, device=x.device, dtype=torch.float32)
    if R:
        _euclidean_forward_kernel[(R,)](x, t, loss, D, x.stride(0), x.stride(1), t.stride(0), t.stride(1),
                                        BLOCK=_block(D))
    return loss


def euclidean_backward(x, t, scale, need_x: bool, need_t: bool):
    """(dx, dt) for per-row scales `scale` (R values, or one broadcast); None where not needed."""
    R, D = x.shape
    dx = torch.empty((R, D), device=x.device, dtype=x.dtype) if need_x else None
    dt = torch.empty((R, D), device=t.device, dtype=t.dtype) if need_t else None
    scale = scale.reshape(-1)
    if R and D:
        block = min(1024, _block(D))
        _euclidean_backward_kernel[(R, triton.cdiv(D, block))](
            x, t, scale, dx if need_x else x, dt if need_t else x, D, x.stride(0), x.stride(1),
            t.stride(0), t.stride(1), scale.stride(0) if scale.numel() > 1 else 0,
            WRITE_DX=need_x, WRITE_DT=need_t, BLOCK=block)
    return dx, dt
