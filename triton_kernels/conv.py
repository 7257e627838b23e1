"""2-D convolution as implicit GEMM: forward, input gradient and weight gradient kernels.

Tensors are NCHW as torch gives them; every kernel takes explicit strides, so non-contiguous and
channels-last inputs need no copy. No im2col buffer is built: each program gathers its tile of the virtual
im2col matrix straight from the input. The reduction runs over (kh, kw) outside and channel blocks inside,
so the address of a tile is an outer sum of a row part and a column part; with fewer than 16 channels per
group (first layers, depthwise) it runs flat over (kh, kw, channel) instead. Accumulation is fp32, offsets
are 64-bit. The weight gradient splits its long reduction (batch x output pixels) across programs and writes
fp32 partial sums that a second kernel adds in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in pairs]


# Tile shapes for the GPU; under the interpreter one large tile keeps the number of programs small.
_GEMM_CONFIGS = _configs([
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
    (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 4, 5), (256, 64, 32, 8, 3),
])
# Below this many channels per group the reduction runs flat over (kh, kw, channel) instead of over
# (kh, kw) with channel blocks inside, which would be mostly masked padding.
FLAT_K_BELOW = 16
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}


def _tuned(kernel, key):
    """`kernel` autotuned over _GEMM_CONFIGS on the GPU; the bare kernel (fixed tile) in the interpreter."""
    if INTERPRET:
        return kernel
    return triton.autotune(configs=_GEMM_CONFIGS, key=key)(kernel)


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped ordering: neighbouring programs share rows of A, so their loads hit L2.
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW,
    sxn, sxc, sxh, sxw, swk, swc, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = (n, oh, ow), columns = output channels of the group, reduction = (kh, kw, c).
    g = tl.program_id(1)
    M = N * OH * OW
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K_G, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K_G
    n = rows // (OH * OW)
    ohw = rows % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    co = (g * K_G + cols).to(tl.int64)
    x_rows = x_ptr + n * sxn + (g * C_G).to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (a first layer, depthwise): one flat reduction over (kh, kw, c), so a tile
        # is not mostly padding channels.
        R = KH * KW * C_G
        for r0 in range(0, R, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < R
            c = (r % C_G).to(tl.int64)
            kh = (r // C_G) // KW
            kw = (r // C_G) % KW
            ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
            iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
            ok = row_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_rows[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=ok, other=0.0)
            b = tl.load(w_ptr + (co * swk)[None, :] + (c * swc + kh * swh + kw * sww)[:, None],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        for kh in range(KH):
            ih = oh * stride_h - pad_h + kh * dil_h
            for kw in range(KW):
                iw = ow * stride_w - pad_w + kw * dil_w
                ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_rows = x_rows + ih * sxh + iw * sxw
                b_cols = w_ptr + co * swk + kh * swh + kw * sww
                for c0 in range(0, C_G, BLOCK_K):
                    cs = c0 + tl.arange(0, BLOCK_K)
                    c_ok = cs < C_G
                    a = tl.load(a_rows[:, None] + cs[None, :].to(tl.int64) * sxc,
                                mask=ok[:, None] & c_ok[None, :], other=0.0)
                    b = tl.load(b_cols[None, :] + cs[:, None].to(tl.int64) * swc,
                                mask=c_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv2d_dgrad_kernel(
    dy_ptr, y_ptr, w_ptr, dx_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW,
    sdyn, sdyc, sdyh, sdyw, syn, syc, syh, syw, swk, swc, swh, sww, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RELU: tl.constexpr, FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = (n, ih, iw), columns = input channels of the group, reduction = (kh, kw, k): each
    # input pixel gathers from the output pixels whose window covers it (oh * stride = ih + pad - kh * dil).
    g = tl.program_id(1)
    M = N * H * W
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_G, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < C_G
    n = rows // (H * W)
    hw = rows % (H * W)
    ih = hw // W
    iw = hw % W
    ci = (g * C_G + cols).to(tl.int64)
    k_first = (g * K_G).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few output channels per group (depthwise): one flat reduction over (kh, kw, k).
        R = KH * KW * K_G
        for r0 in range(0, R, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < R
            kk = k_first + r % K_G
            kh = (r // K_G) // KW
            kw = (r // K_G) % KW
            th = (ih + pad_h)[:, None] - (kh * dil_h)[None, :]
            tw = (iw + pad_w)[:, None] - (kw * dil_w)[None, :]
            oh = th // stride_h
            ow = tw // stride_w
            ok = (row_ok[:, None] & r_ok[None, :] & (th >= 0) & (th % stride_h == 0) & (oh < OH)
                  & (tw >= 0) & (tw % stride_w == 0) & (ow < OW))
            a = tl.load(dy_ptr + (n * sdyn)[:, None] + (kk * sdyc)[None, :] + oh * sdyh + ow * sdyw, mask=ok,
                        other=0.0)
            if RELU:
                y = tl.load(y_ptr + (n * syn)[:, None] + (kk * syc)[None, :] + oh * syh + ow * syw, mask=ok,
                            other=0.0)
                a = tl.where(y > 0, a, tl.zeros_like(a))
            b = tl.load(w_ptr + (kk * swk + kh * swh + kw * sww)[:, None] + (cols.to(tl.int64) * swc)[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        for kh in range(KH):
            th = ih + pad_h - kh * dil_h
            oh = th // stride_h
            ok_h = (th >= 0) & (th % stride_h == 0) & (oh < OH)
            for kw in range(KW):
                tw = iw + pad_w - kw * dil_w
                ow = tw // stride_w
                ok = row_ok & ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
                dy_rows = dy_ptr + n * sdyn + oh * sdyh + ow * sdyw
                y_rows = y_ptr + n * syn + oh * syh + ow * syw
                b_cols = w_ptr + cols.to(tl.int64) * swc + kh * swh + kw * sww
                for k0 in range(0, K_G, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < K_G
                    kk = k_first + ks
                    a_mask = ok[:, None] & k_ok[None, :]
                    a = tl.load(dy_rows[:, None] + (kk * sdyc)[None, :], mask=a_mask, other=0.0)
                    if RELU:
                        y = tl.load(y_rows[:, None] + (kk * syc)[None, :], mask=a_mask, other=0.0)
                        a = tl.where(y > 0, a, tl.zeros_like(a))
                    b = tl.load(b_cols[None, :] + (kk * swk)[:, None], mask=k_ok[:, None] & col_ok[None, :],
                                other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    dx = dx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv2d_wgrad_kernel(
    dy_ptr, y_ptr, x_ptr, dw_part_ptr, db_part_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW, K_OUT, CHUNK,
    sdyn, sdyc, sdyh, sdyw, syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RELU: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = output channels of the group, columns = (c, kh, kw) as the weight is laid out,
    # reduction = (n, oh, ow), of which this program (split s) covers [s * CHUNK, (s + 1) * CHUNK).
    g = tl.program_id(1)
    split = tl.program_id(2)
    CKK = C_G * KH * KW
    P = N * OH * OW
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(K_G, BLOCK_M), tl.cdiv(CKK, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < K_G
    col_ok = cols < CKK
    co = (g * K_G + rows).to(tl.int64)
    c = cols // (KH * KW)
    khw = cols % (KH * KW)
    kh = khw // KW
    kw = khw % KW
    x_cols = x_ptr + (g * C_G + c).to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, P)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < end
        n = p // (OH * OW)
        ohw = p % (OH * OW)
        oh = ohw // OW
        ow = ohw % OW
        a_mask = row_ok[:, None] & p_ok[None, :]
        a = tl.load(dy_ptr + (co * sdyc)[:, None] + (n * sdyn + oh * sdyh + ow * sdyw)[None, :], mask=a_mask,
                    other=0.0)
        if RELU:
            y = tl.load(y_ptr + (co * syc)[:, None] + (n * syn + oh * syh + ow * syw)[None, :], mask=a_mask,
                        other=0.0)
            a = tl.where(y > 0, a, tl.zeros_like(a))
        ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
        iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
        b_mask = p_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_cols[None, :] + (n * sxn)[:, None] + ih * sxh + iw * sxw, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            db += tl.sum(a.to(tl.float32), axis=1)
    part = dw_part_ptr + split.to(tl.int64) * K_OUT * CKK
    tl.store(part + (co * CKK)[:, None] + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    if HAS_BIAS:
        # Every column tile sees the same rows of dy; the first one writes the bias partial sums.
        if pid_n == 0:
            tl.store(db_part_ptr + split.to(tl.int64) * K_OUT + co, db, mask=row_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, NUMEL, SPLITS, BLOCK: tl.constexpr):
    # Second pass of the split-K weight gradient: partial sums added in split order, then cast.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        total += tl.load(part_ptr + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


_fwd = _tuned(_conv2d_fwd_kernel,
               key=["N", "C_G", "K_G", "KH", "KW", "OH", "OW", "stride_h", "HAS_BIAS", "RELU", "FLAT_K", "PRECISION"])
_dgrad = _tuned(_conv2d_dgrad_kernel,
                key=["N", "C_G", "K_G", "KH", "KW", "H", "W", "stride_h", "RELU", "FLAT_K", "PRECISION"])
_wgrad = _tuned(_conv2d_wgrad_kernel,
                key=["N", "C_G", "K_G", "KH", "KW", "OH", "OW", "CHUNK", "RELU", "HAS_BIAS", "PRECISION"])


def _meta() -> dict:
    return dict(_INTERPRET_META) if INTERPRET else {}


def _precision(dtype: torch.dtype) -> str:
    # fp32 on the GPU follows torch's cuDNN setting (TF32 by default), so both sides compute alike.
    if dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _channels_inner(t: torch.Tensor) -> torch.Tensor:
    """`t` with channels innermost (channels-last) on the GPU, so that a tile's reduction over channels reads
    contiguous, vectorisable memory; one copy of an activation is cheap beside the convolution. The
    interpreter keeps the caller's strides, which is how the tests cover arbitrary layouts."""
    if INTERPRET or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d expects a 4-D input and weight, got input {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"conv2d: input ({x.dtype}), weight ({weight.dtype}) and bias must have one dtype")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"conv2d: input with {x.shape[1]} channels does not match weight {tuple(weight.shape)} "
                         f"with groups={groups}")


def out_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, out_hw, relu=False):
    """y = conv(x, weight) + bias (then ReLU if `relu`); `padding` = (top, left), `out_hw` = (OH, OW)."""
    _check(x, weight, bias, groups)
    N, C, H, W = x.shape
    K, C_G, KH, KW = weight.shape
    OH, OW = out_hw
    y = torch.empty((N, K, OH, OW), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    K_G = K // groups
    x, weight = _channels_inner(x), _channels_inner(weight)
    grid = lambda meta: (triton.cdiv(N * OH * OW, meta["BLOCK_M"]) * triton.cdiv(K_G, meta["BLOCK_N"]), groups)
    _fwd[grid](
        x, weight, bias if bias is not None else weight, y,
        N, H, W, OH, OW, C_G, K_G, KH, KW,
        *x.stride(), *weight.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        HAS_BIAS=bias is not None, RELU=relu, FLAT_K=C_G < FLAT_K_BELOW, PRECISION=_precision(x.dtype), **_meta(),
    )
    return y


def conv2d_input_grad(grad_y, y, weight, x_shape, stride, padding, dilation, groups, relu=False):
    """Gradient of conv2d with respect to its input; with `relu`, `y` is the fused output whose mask applies."""
    N, C, H, W = x_shape
    K, C_G, KH, KW = weight.shape
    OH, OW = grad_y.shape[2:]
    dx = torch.empty(x_shape, device=grad_y.device, dtype=grad_y.dtype)
    if dx.numel() == 0:
        return dx
    grad_y = _channels_inner(grad_y)
    y = y if relu else grad_y
    grid = lambda meta: (triton.cdiv(N * H * W, meta["BLOCK_M"]) * triton.cdiv(C_G, meta["BLOCK_N"]), groups)
    _dgrad[grid](
        grad_y, y, weight, dx,
        N, H, W, OH, OW, C_G, K // groups, KH, KW,
        *grad_y.stride(), *y.stride(), *weight.stride(), *dx.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        RELU=relu, FLAT_K=K // groups < FLAT_K_BELOW, PRECISION=_precision(grad_y.dtype), **_meta(),
    )
    return dx


def _num_splits(tiles: int, reduction: int, device: torch.device) -> int:
    """How many programs share the reduction of each weight-gradient tile: enough to fill the GPU twice over,
    while each still reduces at least 512 pixels. Depends only on shapes, so results are reproducible."""
    if INTERPRET:
        return max(1, min(2, triton.cdiv(reduction, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(tiles, 1)), triton.cdiv(reduction, 512), 64))


def conv2d_weight_grad(grad_y, y, x, weight_shape, stride, padding, dilation, groups, has_bias, relu=False):
    """(grad_weight, grad_bias or None), reduced deterministically from split-K partial sums."""
    N, C, H, W = x.shape
    K, C_G, KH, KW = weight_shape
    OH, OW = grad_y.shape[2:]
    K_G = K // groups
    CKK = C_G * KH * KW
    P = N * OH * OW
    # Tiles counted at a typical 64x64 tile; the split count must not depend on the autotuner's choice.
    splits = _num_splits(triton.cdiv(K_G, 64) * triton.cdiv(CKK, 64) * groups, P, grad_y.device)
    chunk = triton.cdiv(triton.cdiv(P, splits), 64) * 64
    splits = triton.cdiv(P, chunk) if P else 1
    # Every partial is written by exactly one program; only an empty batch leaves them to the allocation.
    alloc = torch.empty if P else torch.zeros
    dw_part = alloc((splits, K, CKK), device=x.device, dtype=torch.float32)
    db_part = alloc((splits, K), device=x.device, dtype=torch.float32) if has_bias else dw_part
    y = y if relu else grad_y
    if P:
        grid = lambda meta: (triton.cdiv(K_G, meta["BLOCK_M"]) * triton.cdiv(CKK, meta["BLOCK_N"]), groups, splits)
        _wgrad[grid](
            grad_y, y, x, dw_part, db_part,
            N, H, W, OH, OW, C_G, K_G, KH, KW, K, chunk,
            *grad_y.stride(), *y.stride(), *x.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            RELU=relu, HAS_BIAS=has_bias, PRECISION=_precision(x.dtype), **_meta(),
        )
    dw = _sum_splits(dw_part, x.dtype).view(weight_shape)
    db = _sum_splits(db_part, x.dtype) if has_bias else None
    return dw, db


def _sum_splits(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    numel = part[0].numel()
    out = torch.empty(part.shape[1:], device=part.device, dtype=dtype)
    block = 4096 if INTERPRET else 1024
    _sum_splits_kernel[(triton.cdiv(numel, block),)](part, out, numel, part.shape[0], BLOCK=block)
    return out
