"""SINGA's SoftmaxLoss: softmax and cross-entropy fused, one kernel each way, rows of any length.

The forward streams each row once, keeping a running max and sum (online log-sum-exp), and saves only the
row's log-sum-exp and one coefficient; the backward streams the logits again and writes the gradient
(softmax minus target), so no (rows x classes) intermediate is ever stored.

Per row, with lse = log sum_j exp(x_j), C classes, smoothing e and class weights w (1 without weights):
- class-index target t:  loss = (1-e) w_t (lse - x_t) + e/C (lse sum_j w_j - sum_j w_j x_j)
  (0 where t == ignore_index); d loss / d x_j = p_j A - (1-e) w_t [j == t] - e/C w_j, A = (1-e) w_t + e/C sum w
- probability target q:  c_j = w_j ((1-e) q_j + e/C), loss = lse sum c - sum c x, d/dx_j = p_j sum c - c_j
These are torch.nn.functional.cross_entropy's definitions, ignore_index and weights included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOOR = -3.0e38  # finite start for the running max: exp(floor - floor) stays 1, never nan


def _block(C: int) -> int:
    return min(4096, max(16, triton.next_power_of_2(C)))


def _warps(C: int) -> int:
    # wide rows: more threads per row, so each holds few values of a block in registers
    return 8 if _block(C) >= 2048 else 4


@triton.jit
def _ce_forward_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, coef_ptr, valid_ptr,
    C, stride_xr, stride_xc, stride_tr, stride_tc, ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    cols = tl.arange(0, BLOCK).to(tl.int64)
    m_vec = tl.full([BLOCK], -3.0e38, tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    coef_vec = tl.zeros([BLOCK], tl.float32)   # sum of c_j (or w_j)
    coefx_vec = tl.zeros([BLOCK], tl.float32)  # sum of c_j x_j (or w_j x_j)
    for c0 in range(0, C, BLOCK):
        offs = c0 + cols
        mask = offs < C
        x = tl.load(x_row + offs * stride_xc, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
        if PROB_TARGET or SMOOTH:
            if HAS_WEIGHT:
                c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                c = tl.where(mask, 1.0, 0.0)
            if PROB_TARGET:
                q = tl.load(t_ptr + row * stride_tr + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
                c = c * ((1.0 - smoothing) * q + smoothing / C)
            coef_vec += c
            coefx_vec += c * tl.where(mask, x, 0.0)
    m = tl.max(m_vec, axis=0)
    lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
    sum_c = tl.sum(coef_vec, axis=0)
    sum_cx = tl.sum(coefx_vec, axis=0)
    if PROB_TARGET:
        loss = lse * sum_c - sum_cx
        coef = sum_c
        valid = 1.0
    else:
        t = tl.load(t_ptr + row * stride_tr)
        keep = t != ignore_index
        t_safe = tl.where(keep, t, 0).to(tl.int64)
        x_t = tl.load(x_row + t_safe * stride_xc).to(tl.float32)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t_safe).to(tl.float32)
        else:
            w_t = 1.0
        loss = (1.0 - smoothing) * w_t * (lse - x_t)
        coef = (1.0 - smoothing) * w_t
        if SMOOTH:
            loss += smoothing / C * (lse * sum_c - sum_cx)
            coef += smoothing / C * sum_c
        loss = tl.where(keep, loss, 0.0)
        coef = tl.where(keep, coef, 0.0)
        valid = tl.where(keep, w_t, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(coef_ptr + row, coef)
    tl.store(valid_ptr + row, valid)


@triton.jit
def _ce_backward_kernel(
    x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, scale_ptr, dx_ptr,
    C, stride_xr, stride_xc, stride_tr, stride_tc, stride_scale, stride_dr, ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    cols = tl.arange(0, BLOCK).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    a = tl.load(coef_ptr + row)
    scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    if not PROB_TARGET:
        t = tl.load(t_ptr + row * stride_tr)
        keep = t != ignore_index
        scale = tl.where(keep, scale, 0.0)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + tl.where(keep, t, 0).to(tl.int64)).to(tl.float32)
        else:
            w_t = 1.0
    for c0 in range(0, C, BLOCK):
        offs = c0 + cols
        mask = offs < C
        x = tl.load(x_row + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * a
        if PROB_TARGET or SMOOTH:
            if HAS_WEIGHT:
                c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                c = tl.full([BLOCK], 1.0, tl.float32)
            if PROB_TARGET:
                q = tl.load(t_ptr + row * stride_tr + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
                g -= c * ((1.0 - smoothing) * q + smoothing / C)
            else:
                g -= smoothing / C * c
        if not PROB_TARGET:
            g -= tl.where(offs == t, (1.0 - smoothing) * w_t, 0.0)
        tl.store(dx_ptr + row * stride_dr + offs, (g * scale).to(dx_ptr.dtype.element_ty), mask=mask)


def cross_entropy_forward(x, target, weight, ignore_index: int, smoothing: float):
    """x: (R, C) any strides; target: (R,) class indices or (R, C) probabilities.

    Returns per-row float32 (loss, lse, coef, valid); `valid` is the row's weight in a mean (0 if ignored).
    """
    R, C = x.shape
    prob = target.dim() == 2
    loss, lse, coef, valid = (torch.empty(R, device=x.device, dtype=torch.float32) for _ in range(4))
    if R == 0:
        return loss, lse, coef, valid
    st = (target.stride(0), target.stride(1)) if prob else (target.stride(0), 0)
    _ce_forward_kernel[(R,)](
        x, target, weight if weight is not None else x, loss, lse, coef, valid,
        C, x.stride(0), x.stride(1), st[0], st[1], ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smoothing > 0, BLOCK=_block(C),
        num_warps=_warps(C),
    )
    return loss, lse, coef, valid


def cross_entropy_backward(x, target, weight, lse, coef, scale, ignore_index: int, smoothing: float):
    """d loss / d x for rows scaled by `scale` (a float tensor of R values, or one value broadcast)."""
    R, C = x.shape
    dx = torch.empty((R, C), device=x.device, dtype=x.dtype)
    if R == 0:
        return dx
    prob = target.dim() == 2
    st = (target.stride(0), target.stride(1)) if prob else (target.stride(0), 0)
    scale = scale.reshape(-1)
    _ce_backward_kernel[(R,)](
        x, target, weight if weight is not None else x, lse, coef, scale, dx,
        C, x.stride(0), x.stride(1), st[0], st[1], scale.stride(0) if scale.numel() > 1 else 0, dx.stride(0),
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smoothing > 0, BLOCK=_block(C),
        num_warps=_warps(C),
    )
    return dx
