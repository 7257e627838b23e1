"""SINGA's BatchNorm over an (N, C, S) view: statistics per channel c over the N*S values it holds.

Reductions run in two stages so both few-channel (convolutional) and many-channel (dense) inputs keep the
GPU busy: a grid of (channel block, row slice) programs writes per-slice partial results in float32, which
are combined in a fixed order afterwards (deterministic, no atomics). Means and variances combine with
Chan's parallel form of Welford's update, stable where sum-of-squares would cancel.

Tiles are (rows x channels) for (N, C) inputs, whose channels are contiguous, and (channels x rows) for
(N, C, S) inputs with S > 1, whose rows are: R_AXIS names the tile axis that runs over rows, so adjacent
threads always read adjacent addresses.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the programs a reduction aims for
TARGET_PROGRAMS = 8 if _INTERPRET else 1024


def _tiling(S: int) -> dict:
    """R_AXIS and (rows, channels) per tile: channels inner for (N, C), rows inner for (N, C, S > 1)."""
    if S == 1:
        return dict(R_AXIS=0, BLOCK_R=64, BLOCK_C=32 if _INTERPRET else 64)
    return dict(R_AXIS=1, BLOCK_R=64 if _INTERPRET else 256, BLOCK_C=8 if _INTERPRET else 16)


@triton.jit
def _tile(ptr, r, c, R, C, S, stride_n, stride_c, stride_s, R_AXIS: tl.constexpr):
    """Addresses and mask of rows r (flat over N and S) and channels c of an (N, C, S) tensor, rows along
    tile axis R_AXIS."""
    n = r // S
    s = r - n * S
    rr = tl.expand_dims(n * stride_n + s * stride_s, 1 - R_AXIS)
    cc = tl.expand_dims(c * stride_c, R_AXIS)
    mask = tl.expand_dims(r < R, 1 - R_AXIS) & tl.expand_dims(c < C, R_AXIS)
    return ptr + rr + cc, mask


@triton.jit
def _per_channel(v, R_AXIS: tl.constexpr):
    """A per-channel vector shaped to broadcast over a tile."""
    return tl.expand_dims(v, R_AXIS)


@triton.jit
def _bn_partial_stats_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, R, C, S, stride_n, stride_c, stride_s,
                             rows_per_program, R_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial count, mean and M2 of x - pivot, the pivot being each channel's first value."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pivot = tl.load(x_ptr + c * stride_c, mask=c < C, other=0.0).to(tl.float32)
    start = pid_r.to(tl.int64) * rows_per_program
    stop = tl.minimum(start + rows_per_program, R)
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ptrs, mask = _tile(x_ptr, r, c, stop, C, S, stride_n, stride_c, stride_s, R_AXIS)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - _per_channel(pivot, R_AXIS)
        n_b = tl.sum(mask.to(tl.float32), axis=R_AXIS)
        mean_b = tl.sum(tl.where(mask, x, 0.0), axis=R_AXIS) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - _per_channel(mean_b, R_AXIS), 0.0)
        m2_b = tl.sum(d * d, axis=R_AXIS)
        n_new = count + n_b
        delta = mean_b - mean
        frac = n_b / tl.maximum(n_new, 1.0)
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = n_new
    out = pid_r.to(tl.int64) * C + c
    cmask = c < C
    tl.store(count_ptr + out, count, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _bn_partial_grad_kernel(x_ptr, g_ptr, pivot_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_gx_ptr, R, C, S,
                            stride_n, stride_c, stride_s, gstride_n, gstride_c, gstride_s, rows_per_program,
                            R_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums over rows of g and of g * xhat, xhat = ((x - pivot) - mean) * invstd."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    pivot = tl.load(pivot_ptr + c, mask=cmask, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    start = pid_r.to(tl.int64) * rows_per_program
    stop = tl.minimum(start + rows_per_program, R)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ptrs, mask = _tile(x_ptr, r, c, stop, C, S, stride_n, stride_c, stride_s, R_AXIS)
        gptrs, _ = _tile(g_ptr, r, c, stop, C, S, gstride_n, gstride_c, gstride_s, R_AXIS)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gptrs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - _per_channel(pivot, R_AXIS) - _per_channel(mean, R_AXIS)) * _per_channel(invstd, R_AXIS)
        sum_g += tl.sum(g, axis=R_AXIS)
        sum_gx += tl.sum(g * tl.where(mask, xhat, 0.0), axis=R_AXIS)
    out = pid_r.to(tl.int64) * C + c
    tl.store(sum_g_ptr + out, sum_g, mask=cmask)
    tl.store(sum_gx_ptr + out, sum_gx, mask=cmask)


@triton.jit
def _bn_forward_kernel(x_ptr, y_ptr, pivot_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, R, C, S,
                       stride_n, stride_c, stride_s, AFFINE: tl.constexpr,
                       R_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = c < C
    pivot = tl.load(pivot_ptr + c, mask=cmask, other=0.0)
    scale = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    shift = -tl.load(mean_ptr + c, mask=cmask, other=0.0) * scale
    if AFFINE:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        scale = scale * w
        shift = shift * w + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    ptrs, mask = _tile(x_ptr, r, c, R, C, S, stride_n, stride_c, stride_s, R_AXIS)
    yptrs, _ = _tile(y_ptr, r, c, R, C, S, C * S, S, 1, R_AXIS)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - _per_channel(pivot, R_AXIS)
    y = x * _per_channel(scale, R_AXIS) + _per_channel(shift, R_AXIS)
    tl.store(yptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_kernel(x_ptr, g_ptr, dx_ptr, pivot_ptr, mean_ptr, invstd_ptr, w_ptr, sum_g_ptr, sum_gx_ptr, R, C, S,
                        stride_n, stride_c, stride_s, gstride_n, gstride_c, gstride_s,
                        AFFINE: tl.constexpr, BATCH_STATS: tl.constexpr,
                        R_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = w invstd (g - mean(g) - xhat mean(g xhat)) with batch statistics, w invstd g with fixed ones."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = c < C
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    k = invstd
    if AFFINE:
        k = k * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    ptrs, mask = _tile(x_ptr, r, c, R, C, S, stride_n, stride_c, stride_s, R_AXIS)
    gptrs, _ = _tile(g_ptr, r, c, R, C, S, gstride_n, gstride_c, gstride_s, R_AXIS)
    dptrs, _ = _tile(dx_ptr, r, c, R, C, S, C * S, S, 1, R_AXIS)
    g = tl.load(gptrs, mask=mask, other=0.0).to(tl.float32)
    if BATCH_STATS:
        pivot = tl.load(pivot_ptr + c, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        mean_g = tl.load(sum_g_ptr + c, mask=cmask, other=0.0) / R
        mean_gx = tl.load(sum_gx_ptr + c, mask=cmask, other=0.0) / R
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - _per_channel(pivot, R_AXIS) - _per_channel(mean, R_AXIS)) * _per_channel(invstd, R_AXIS)
        g = g - _per_channel(mean_g, R_AXIS) - xhat * _per_channel(mean_gx, R_AXIS)
    tl.store(dptrs, (g * _per_channel(k, R_AXIS)).to(dx_ptr.dtype.element_ty), mask=mask)


def _row_split(R: int, C: int, tiles: dict) -> tuple[int, int]:
    """(programs along rows, rows per program) for a reduction over R rows of C channels."""
    block_r = tiles["BLOCK_R"]
    col_programs = triton.cdiv(C, tiles["BLOCK_C"])
    parts = max(1, min(triton.cdiv(R, block_r), triton.cdiv(TARGET_PROGRAMS, col_programs)))
    rows = triton.cdiv(triton.cdiv(R, parts), block_r) * block_r
    return triton.cdiv(R, rows), rows


def batch_stats(x: torch.Tensor):
    """Per channel (float32): pivot (the first value), mean of x - pivot, biased variance; x: (N, C, S).

    Shifting by a value from the data keeps the sums small: a large mean with a small spread stays exact.
    """
    N, C, S = x.shape
    R = N * S
    tiles = _tiling(S)
    parts, rows = _row_split(R, C, tiles)
    count, mean, m2 = (torch.empty((parts, C), device=x.device, dtype=torch.float32) for _ in range(3))
    _bn_partial_stats_kernel[(triton.cdiv(C, tiles["BLOCK_C"]), parts)](
        x, count, mean, m2, R, C, S, x.stride(0), x.stride(1), x.stride(2), rows, **tiles)
    pivot = x[0, :, 0].float().contiguous()
    if parts == 1:
        return pivot, mean[0], m2[0] / R
    # Chan's combination of the slices, in a fixed order.
    total_mean = (count * mean).sum(0) / R
    total_m2 = m2.sum(0) + (count * (mean - total_mean) ** 2).sum(0)
    return pivot, total_mean, total_m2 / R


def forward(x, pivot, mean, invstd, weight, bias):
    """((x - pivot) - mean) * invstd * weight + bias per channel; returns a contiguous (N, C, S) tensor."""
    N, C, S = x.shape
    y = torch.empty((N, C, S), device=x.device, dtype=x.dtype)
    R = N * S
    if R and C:
        tiles = _tiling(S)
        _bn_forward_kernel[(triton.cdiv(C, tiles["BLOCK_C"]), triton.cdiv(R, tiles["BLOCK_R"]))](
            x, y, pivot, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            R, C, S, x.stride(0), x.stride(1), x.stride(2), AFFINE=weight is not None, **tiles)
    return y


def grad_sums(x, g, pivot, mean, invstd):
    """Per-channel sums of g and of g * xhat (float32): the bias and weight gradients."""
    N, C, S = x.shape
    R = N * S
    tiles = _tiling(S)
    parts, rows = _row_split(R, C, tiles)
    sum_g, sum_gx = (torch.empty((parts, C), device=x.device, dtype=torch.float32) for _ in range(2))
    _bn_partial_grad_kernel[(triton.cdiv(C, tiles["BLOCK_C"]), parts)](
        x, g, pivot, mean, invstd, sum_g, sum_gx, R, C, S, x.stride(0), x.stride(1), x.stride(2),
        g.stride(0), g.stride(1), g.stride(2), rows, **tiles)
    return sum_g.sum(0), sum_gx.sum(0)


def backward_input(x, g, pivot, mean, invstd, weight, sum_g, sum_gx, batch_stats: bool):
    N, C, S = x.shape
    dx = torch.empty((N, C, S), device=x.device, dtype=x.dtype)
    R = N * S
    if R and C:
        tiles = _tiling(S)
        _bn_backward_kernel[(triton.cdiv(C, tiles["BLOCK_C"]), triton.cdiv(R, tiles["BLOCK_R"]))](
            x, g, dx, pivot, mean, invstd, weight if weight is not None else mean, sum_g, sum_gx, R, C, S,
            x.stride(0), x.stride(1), x.stride(2), g.stride(0), g.stride(1), g.stride(2),
            AFFINE=weight is not None, BATCH_STATS=batch_stats, **tiles)
    return dx
