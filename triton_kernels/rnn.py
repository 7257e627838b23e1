"""Recurrent layers (SINGA's GRU, and LSTM and vanilla RNN): one layer and one direction over a sequence.

Forward: the input projection of all time steps is one matrix product (X @ W_ih^T + biases, the project's
matmul); then each time step is one fused kernel doing h_prev @ W_hh^T and the gate non-linearities, which
writes the new state and the activated gates the backward needs. Backward through time: one fused kernel per
step takes the next step's gate gradients through W_hh (the recurrent product) and computes this step's gate
gradients; the gradients of x, W_ih, W_hh and both biases are then one matrix product each over all steps.
Nothing is accumulated with atomics, so results are deterministic.

Sequences of unequal length (a PackedSequence in padded form): `lengths` gives each sequence's length, a row
stops updating after its last step (its state is carried through unchanged), so the final state of every row
is its state at its own last step. Gate order and biases are torch's (GRU: r, z, n with b_hn inside r * (.);
LSTM: i, f, g, o). LSTM's projection (proj_size) is a per-step product after the fused kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton_kernels.activation import _sigmoid, _tanh
from triton_kernels.matmul import _precision, matmul

# Cell kinds (constexpr in the kernels) and their number of gates.
MODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gpu_tiles(block_b: int) -> dict:
    """Launch options of the step kernels on a GPU for a tile of `block_b` rows and 32 hidden units: 8 warps
    keep the four gate accumulators of a 32- or 64-row tile in registers without spilling, 4 suffice for 16
    (checked for sm_90 by tests/test_rnn.py)."""
    return dict(BLOCK_B=block_b, BLOCK_H=32, BLOCK_K=64, num_warps=8 if block_b >= 32 else 4, num_stages=2)


def _blocks(batch: int, hidden: int, k: int, device: torch.device) -> dict:
    """Tile sizes of the step kernels (tl.dot needs at least 16 each way) and their launch options."""
    np2 = triton.next_power_of_2
    if _INTERPRET:
        # About 1 ms per program instance in the interpreter: one or few large tiles.
        return dict(BLOCK_B=min(max(16, np2(batch)), 64), BLOCK_H=min(max(16, np2(hidden)), 64),
                    BLOCK_K=min(max(16, np2(k)), 128))
    # A step is a small product (batch x hidden): take the largest row tile that still gives every SM a
    # program (e.g. 16 rows for batch 64 and hidden 1024), so the step's latency is spread over the device.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for block_b in (64, 32, 16):
        if block_b <= max(16, np2(batch)) and triton.cdiv(batch, block_b) * triton.cdiv(hidden, 32) >= sms:
            return gpu_tiles(block_b)
    return gpu_tiles(16)


@triton.jit
def _step_forward_kernel(
    xw_ptr, hp_ptr, w_ptr, bhn_ptr, h_ptr, cp_ptr, c_ptr, save_ptr, len_ptr,
    t, B, H, K,
    s_xw_b, s_xw_g, s_hp_b, s_hp_k, s_w_r, s_w_k, s_h_b, s_h_h,
    MODE: tl.constexpr, MASKED: tl.constexpr, PROJ: tl.constexpr, HAS_BHN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One time step: gates = xw[t] + h_prev @ W_hh^T, then the cell's non-linearities, for a tile of rows
    (batch) and hidden units; every gate of a unit is in the same program, so the cell math is local."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]

    acc0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    gate = H * s_w_r  # rows of W_hh between one gate and the next
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = ks < K
        a = tl.load(hp_ptr + offs_b[:, None] * s_hp_b + ks[None, :] * s_hp_k,
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        # W_hh^T tile: (k, unit) of gate q is W_hh[q * H + unit, k]
        wp = w_ptr + ks[:, None] * s_w_k + offs_h[None, :] * s_w_r
        wmask = mask_k[:, None] & mask_h[None, :]
        if DOT_FP32:
            a = a.to(tl.float32)
        w = tl.load(wp, mask=wmask, other=0.0)
        if DOT_FP32:
            w = w.to(tl.float32)
        acc0 = tl.dot(a, w, acc0, input_precision=PRECISION, out_dtype=tl.float32)
        if MODE >= 2:
            w = tl.load(wp + gate, mask=wmask, other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            acc1 = tl.dot(a, w, acc1, input_precision=PRECISION, out_dtype=tl.float32)
            w = tl.load(wp + 2 * gate, mask=wmask, other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            acc2 = tl.dot(a, w, acc2, input_precision=PRECISION, out_dtype=tl.float32)
        if MODE == 2:
            w = tl.load(wp + 3 * gate, mask=wmask, other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            acc3 = tl.dot(a, w, acc3, input_precision=PRECISION, out_dtype=tl.float32)

    xp = xw_ptr + offs_b[:, None] * s_xw_b + offs_h[None, :] * s_xw_g
    xgate = H * s_xw_g
    # Saved gates and the cell state are float32, contiguous: (B, 4H) and (B, H).
    sp = save_ptr + offs_b[:, None] * (4 * H) + offs_h[None, :]
    cidx = offs_b[:, None] * H + offs_h[None, :]
    hp_h = hp_ptr + offs_b[:, None] * s_hp_b + offs_h[None, :] * s_hp_k  # h_prev at this tile's units
    x0 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        h = _tanh(x0 + acc0)
    elif MODE == 1:
        h = tl.maximum(x0 + acc0, 0.0)
    elif MODE == 2:
        i = _sigmoid(x0 + acc0)
        f = _sigmoid(tl.load(xp + xgate, mask=mask, other=0.0).to(tl.float32) + acc1)
        g = _tanh(tl.load(xp + 2 * xgate, mask=mask, other=0.0).to(tl.float32) + acc2)
        o = _sigmoid(tl.load(xp + 3 * xgate, mask=mask, other=0.0).to(tl.float32) + acc3)
        c_prev = tl.load(cp_ptr + cidx, mask=mask, other=0.0)
        c = f * c_prev + i * g
        h = o * _tanh(c)
        tl.store(sp, i, mask=mask)
        tl.store(sp + H, f, mask=mask)
        tl.store(sp + 2 * H, g, mask=mask)
        tl.store(sp + 3 * H, o, mask=mask)
    else:
        r = _sigmoid(x0 + acc0)
        z = _sigmoid(tl.load(xp + xgate, mask=mask, other=0.0).to(tl.float32) + acc1)
        hn = acc2
        if HAS_BHN:
            hn += tl.load(bhn_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        n = _tanh(tl.load(xp + 2 * xgate, mask=mask, other=0.0).to(tl.float32) + r * hn)
        h_prev = tl.load(hp_h, mask=mask, other=0.0).to(tl.float32)
        h = (1.0 - z) * n + z * h_prev
        tl.store(sp, r, mask=mask)
        tl.store(sp + H, z, mask=mask)
        tl.store(sp + 2 * H, n, mask=mask)
        tl.store(sp + 3 * H, hn, mask=mask)
    if MASKED:
        # Rows whose sequence has ended keep their state (with a projection the caller keeps h).
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
        if PROJ:
            h = tl.where(valid, h, 0.0)
        else:
            h = tl.where(valid, h, tl.load(hp_h, mask=mask, other=0.0).to(tl.float32))
        if MODE == 2:
            c = tl.where(valid, c, c_prev)
    tl.store(h_ptr + offs_b[:, None] * s_h_b + offs_h[None, :] * s_h_h, h.to(h_ptr.dtype.element_ty), mask=mask)
    if MODE == 2:
        tl.store(c_ptr + cidx, c, mask=mask)


@triton.jit
def _step_backward_kernel(
    dy_ptr, carry_ptr, dgn_ptr, w_ptr, save_ptr, hp_ptr, h_ptr, cp_ptr, c_ptr, dc_ptr, dcp_ptr,
    dgx_ptr, dgh_ptr, carry_out_ptr, len_ptr,
    t, B, H, K,
    s_dy_b, s_dy_h, s_w_r, s_w_k, s_h_b, s_h_h,
    MODE: tl.constexpr, MASKED: tl.constexpr, HAS_DY: tl.constexpr, HAS_CARRY: tl.constexpr,
    REC: tl.constexpr, HAS_DC: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step back: dh = dy[t] + carry + dgates_h[t+1] @ W_hh, then this step's gate gradients.

    `carry` is the part of dh that bypasses W_hh (GRU's z * dh, and the whole dh of an ended row); the gate
    gradients go to dgx (for x and W_ih) and dgh (for h_prev and W_hh; the same buffer except for GRU)."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]
    cidx = offs_b[:, None] * H + offs_h[None, :]

    dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_DY:
        dh += tl.load(dy_ptr + offs_b[:, None] * s_dy_b + offs_h[None, :] * s_dy_h, mask=mask, other=0.0).to(tl.float32)
    if HAS_CARRY:
        dh += tl.load(carry_ptr + cidx, mask=mask, other=0.0)
    if REC:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = ks < K
            a = tl.load(dgn_ptr + offs_b[:, None] * K + ks[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + ks[:, None] * s_w_r + offs_h[None, :] * s_w_k,
                        mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            dh = tl.dot(a, w, dh, input_precision=PRECISION, out_dtype=tl.float32)

    sp = save_ptr + offs_b[:, None] * (4 * H) + offs_h[None, :]
    gx = dgx_ptr + offs_b[:, None] * K + offs_h[None, :]
    gh = dgh_ptr + offs_b[:, None] * K + offs_h[None, :]
    valid = mask  # broadcast to the tile below when MASKED
    if MASKED:
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None] & mask_h[None, :]
    carry = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if MODE <= 1:
        h = tl.load(h_ptr + offs_b[:, None] * s_h_b + offs_h[None, :] * s_h_h, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            d0 = dh * (1.0 - h * h)
        else:
            d0 = tl.where(h > 0, dh, 0.0)
        tl.store(gx, tl.where(valid, d0, 0.0).to(dgx_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:
        i = tl.load(sp, mask=mask, other=0.0)
        f = tl.load(sp + H, mask=mask, other=0.0)
        g = tl.load(sp + 2 * H, mask=mask, other=0.0)
        o = tl.load(sp + 3 * H, mask=mask, other=0.0)
        c = tl.load(c_ptr + cidx, mask=mask, other=0.0)
        c_prev = tl.load(cp_ptr + cidx, mask=mask, other=0.0)
        dc_next = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        if HAS_DC:
            dc_next = tl.load(dc_ptr + cidx, mask=mask, other=0.0)
        tc = _tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        ty = dgx_ptr.dtype.element_ty
        tl.store(gx, tl.where(valid, dc * g * i * (1.0 - i), 0.0).to(ty), mask=mask)
        tl.store(gx + H, tl.where(valid, dc * c_prev * f * (1.0 - f), 0.0).to(ty), mask=mask)
        tl.store(gx + 2 * H, tl.where(valid, dc * i * (1.0 - g * g), 0.0).to(ty), mask=mask)
        tl.store(gx + 3 * H, tl.where(valid, dh * tc * o * (1.0 - o), 0.0).to(ty), mask=mask)
        tl.store(dcp_ptr + cidx, tl.where(valid, dc * f, dc_next), mask=mask)
    else:
        r = tl.load(sp, mask=mask, other=0.0)
        z = tl.load(sp + H, mask=mask, other=0.0)
        n = tl.load(sp + 2 * H, mask=mask, other=0.0)
        hn = tl.load(sp + 3 * H, mask=mask, other=0.0)
        h_prev = tl.load(hp_ptr + offs_b[:, None] * s_h_b + offs_h[None, :] * s_h_h, mask=mask, other=0.0)
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        dz = dh * (h_prev.to(tl.float32) - n) * z * (1.0 - z)
        carry = dh * z
        ty = dgx_ptr.dtype.element_ty
        dr = tl.where(valid, dr, 0.0).to(ty)
        dz = tl.where(valid, dz, 0.0).to(ty)
        tl.store(gx, dr, mask=mask)
        tl.store(gx + H, dz, mask=mask)
        tl.store(gx + 2 * H, tl.where(valid, dn, 0.0).to(ty), mask=mask)
        tl.store(gh, dr, mask=mask)
        tl.store(gh + H, dz, mask=mask)
        tl.store(gh + 2 * H, tl.where(valid, dn * r, 0.0).to(ty), mask=mask)
    if MASKED:
        carry = tl.where(valid, carry, dh)
    tl.store(carry_out_ptr + cidx, carry, mask=mask)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # The interpreter has no bfloat16 arithmetic; bf16 x bf16 products are exact in float32 anyway.
    return _INTERPRET and dtype == torch.bfloat16


def rnn_forward(mode: str, x: torch.Tensor, lengths: torch.Tensor | None, h0: torch.Tensor,
                c0: torch.Tensor | None, w_ih, w_hh, b_ih, b_hh, w_hr):
    """One layer, one direction, time-major: x (T, B, I), h0 (B, P or H), c0 (B, H) for LSTM.

    Returns (hs, cs, saved, hu): hs (T + 1, B, P or H) with hs[0] = h0 (the outputs are hs[1:], the final
    state hs[T]), cs (T + 1, B, H) float32 cell states (LSTM), saved (T, B, 4H) float32 activated gates
    (LSTM: i, f, g, o; GRU: r, z, n, W_hn h + b_hn) and hu (T, B, H) the unprojected LSTM outputs."""
    T, B, I = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    dtype = x.dtype
    if mode == "gru":
        # b_hr and b_hz add to the gates as b_ir and b_iz do; only b_hn stays inside r * (.).
        bias = None if b_ih is None else torch.cat([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
    else:
        bias = None if b_ih is None else b_ih + b_hh
    xw = matmul(x.reshape(T * B, I), w_ih.t(), bias=bias).view(T, B, G * H)
    hs = torch.empty((T + 1, B, h0.shape[1]), device=x.device, dtype=dtype)
    hs[0] = h0
    cs = saved = hu = None
    if mode == "lstm":
        cs = torch.empty((T + 1, B, H), device=x.device, dtype=torch.float32)
        cs[0] = c0
    if mode in ("lstm", "gru"):
        saved = torch.empty((T, B, 4 * H), device=x.device, dtype=torch.float32)
    proj = w_hr is not None
    if proj:
        hu = torch.empty((T, B, H), device=x.device, dtype=dtype)
        valid = lengths[None, :, None] > torch.arange(T, device=x.device)[:, None, None] if lengths is not None \
            else None
    if B == 0 or H == 0:
        return hs, cs, saved, hu
    K = w_hh.shape[1]
    tiles = _blocks(B, H, K, x.device)
    grid = (triton.cdiv(B, tiles["BLOCK_B"]), triton.cdiv(H, tiles["BLOCK_H"]))
    dummy = hs
    for t in range(T):
        h_out = hu[t] if proj else hs[t + 1]
        _step_forward_kernel[grid](
            xw[t], hs[t], w_hh, b_hh[2 * H:] if (mode == "gru" and b_hh is not None) else dummy, h_out,
            cs[t] if cs is not None else dummy, cs[t + 1] if cs is not None else dummy,
            saved[t] if saved is not None else dummy, lengths if lengths is not None else dummy,
            t, B, H, K,
            xw.stride(1), xw.stride(2), hs.stride(1), hs.stride(2), w_hh.stride(0), w_hh.stride(1),
            h_out.stride(0), h_out.stride(1),
            MODE=MODES[mode], MASKED=lengths is not None, PROJ=proj, HAS_BHN=mode == "gru" and b_hh is not None,
            PRECISION=_precision(dtype), DOT_FP32=_dot_fp32(dtype), **tiles,
        )
        if proj:
            h = matmul(hu[t], w_hr.t())
            hs[t + 1] = h if valid is None else torch.where(valid[t], h, hs[t])
    return hs, cs, saved, hu


def rnn_backward(mode: str, x, lengths, hs, cs, saved, hu, w_ih, w_hh, w_hr, dy, dh_n, dc_n,
                 need_x: bool, need_w: bool, need_b: bool):
    """Back through time for what rnn_forward computed; dy (T, B, P or H), dh_n, dc_n may be None.

    Returns dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr (None where not asked for)."""
    T, B, I = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    P = hs.shape[2]
    dev, dtype = x.device, x.dtype
    dgx = torch.zeros((T, B, G * H), device=dev, dtype=dtype)
    dgh = torch.zeros_like(dgx) if mode == "gru" else dgx
    # Ping-pong buffers for the carried gradients (float32, contiguous)
    carry = [torch.zeros((B, P), device=dev, dtype=torch.float32) for _ in range(2)]
    if dh_n is not None:
        carry[0].copy_(dh_n)
    dcs = None
    if mode == "lstm":
        dcs = [torch.zeros((B, H), device=dev, dtype=torch.float32) for _ in range(2)]
        if dc_n is not None:
            dcs[0].copy_(dc_n)
    proj = w_hr is not None
    dhp = torch.zeros((T, B, P), device=dev, dtype=dtype) if proj else None
    # With a projection the kernel's carry (of width H) is not used: the carry of width P is kept here.
    scratch = torch.empty((B, H), device=dev, dtype=torch.float32) if proj else None
    if B > 0 and H > 0:
        tiles = _blocks(B, H, G * H, dev)
        grid = (triton.cdiv(B, tiles["BLOCK_B"]), triton.cdiv(H, tiles["BLOCK_H"]))
        dummy = carry[0]
        for t in range(T - 1, -1, -1):
            cin, cout = carry[(T - 1 - t) % 2], carry[(T - t) % 2]
            dcin, dcout = (dcs[(T - 1 - t) % 2], dcs[(T - t) % 2]) if dcs is not None else (dummy, dummy)
            if proj:
                # dh of the projected output, then through W_hr; the kernel sees the unprojected dh only.
                dh = cin.clone()
                if dy is not None:
                    dh += dy[t]
                if t < T - 1:
                    dh += matmul(dgh[t + 1], w_hh, out_dtype=torch.float32)
                valid = lengths[:, None] > t if lengths is not None else None
                dhp[t] = dh if valid is None else torch.where(valid, dh, 0.0)
                dg_in = matmul(dhp[t], w_hr)
            else:
                dg_in = dy[t] if dy is not None else dummy
            _step_backward_kernel[grid](
                dg_in, cin, dgh[t + 1] if t < T - 1 else dummy, w_hh,
                saved[t] if saved is not None else dummy, hs[t], hs[t + 1],
                cs[t] if cs is not None else dummy, cs[t + 1] if cs is not None else dummy, dcin, dcout,
                dgx[t], dgh[t], scratch if proj else cout, lengths if lengths is not None else dummy,
                t, B, H, G * H,
                dg_in.stride(0), dg_in.stride(1), w_hh.stride(0), w_hh.stride(1), hs.stride(1), hs.stride(2),
                MODE=MODES[mode], MASKED=lengths is not None and not proj, HAS_DY=proj or dy is not None,
                HAS_CARRY=not proj, REC=not proj and t < T - 1, HAS_DC=dcs is not None,
                PRECISION=_precision(dtype), DOT_FP32=_dot_fp32(dtype), **tiles,
            )
            if proj:
                # The kernel ran unmasked here: ended rows get no gate gradient, their whole dh goes to h_prev.
                if valid is not None:
                    keep = ~valid
                    dgx[t].masked_fill_(keep, 0.0)
                    cout.copy_(torch.where(keep, dh, 0.0))
                    dcout.copy_(torch.where(keep, dcin, dcout))
                else:
                    cout.zero_()
        final = carry[T % 2]
        dc0 = dcs[T % 2] if dcs is not None else None
    else:
        final, dc0 = carry[0], (dcs[0] if dcs is not None else None)
    dh0 = final.clone()
    if T > 0 and B > 0:
        dh0 += matmul(dgh[0], w_hh, out_dtype=torch.float32)
    dx = dw_ih = dw_hh = db_ih = db_hh = dw_hr = None
    gx, gh = dgx.view(T * B, G * H), dgh.view(T * B, G * H)
    if need_x:
        dx = matmul(gx, w_ih).view(T, B, I)
    if need_w or need_b:
        # Every step's weight gradient in one product each; the bias gradients are their row sums.
        dw_ih, db_ih = matmul(gx.t(), x.reshape(T * B, I), bias_grad=True)
        dw_hh, db_hh = matmul(gh.t(), hs[:-1].reshape(T * B, P), bias_grad=True) if mode == "gru" \
            else (matmul(gh.t(), hs[:-1].reshape(T * B, P)), db_ih)
        db_ih, db_hh = db_ih.to(dtype), db_hh.to(dtype)
        if proj:
            dw_hr = matmul(dhp.view(T * B, P).t(), hu.view(T * B, H))
    return dx, dh0.to(dtype), None if dc0 is None else dc0.to(dtype), dw_ih, dw_hh, db_ih, db_hh, dw_hr
