"""2-D convolution as implicit GEMM: forward, input gradient and weight gradient kernels.

Tensors are NCHW as torch gives them; every kernel takes explicit strides, so non-contiguous and
channels-last inputs need no copy. No im2col buffer is built: each program gathers its tile of the virtual
im2col matrix straight from the input. The reduction runs over (kh, kw) outside and channel blocks inside,
so the address of a tile is an outer sum of a row part and a column part; with fewer than 16 channels per
group (first layers, depthwise) it runs flat over (kh, kw, channel) instead. The input gradient of a strided
convolution runs one stride phase (ih % stride, iw % stride) per program, over the taps that reach that
phase and no others. Accumulation is fp32; pixel numbers and every address offset are 64-bit (a batch of
images may hold more than 2**31 elements; one image's pixels are counted in 32 bits). The weight gradient
splits its long reduction (batch x output pixels) across programs and writes fp32 partial sums that a second
kernel adds in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Order in which the forward and input-gradient kernels store their (pixel, channel) accumulator tile.
# Triton 3.7 and later keep few addresses per thread when the tile is stored transposed, as (channel, pixel):
# in NCHW neighbouring pixels are adjacent, so the stores coalesce; stored untransposed their 128x128 tiles
# spill registers. Triton 3.6 is the other way round: its transposed store spills and the direct one does not.
# tests/test_kernels_compile.py checks the tiles under each release.
CHANNEL_MAJOR_STORE = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


# GPU tiles, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for an H100 (sm_90): 64- to 256-row wgmma
# tiles, reduction steps of 32 or 64, 3-4 pipeline stages. Each compiles for sm_90 without register spills
# (tests/test_kernels_compile.py checks): implicit GEMM's gathered, masked loads hold registers a dense GEMM
# does not, which rules out the largest tiles (256x128 and up). Forward and input gradient:
_GEMM_TILES = [
    (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (256, 64, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
]
# These spill with 4-byte (fp32 / TF32) operands, so only 16-bit convolutions try them.
_GEMM_TILES_16BIT = [(128, 64, 64, 4, 3), (64, 128, 64, 4, 3)]
# The weight gradient gathers its (pixel, (c, kh, kw)) operand one element at a time; its large tiles need
# 8 warps to stay spill-free.
_WGRAD_TILES = [
    (128, 128, 32, 8, 3), (256, 64, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
]
# Below this many channels per group the reduction runs flat over (kh, kw, channel) instead of over
# (kh, kw) with channel blocks inside, which would be mostly masked padding.
FLAT_K_BELOW = 16
# Under the interpreter one large tile keeps the number of programs small.
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}


def _tuned(kernel, key, tiles, tiles_16bit=()):
    """`kernel` autotuned on the GPU over `tiles`, plus `tiles_16bit` when its operands (the first argument's
    dtype) are 16-bit; the bare kernel (fixed tile) in the interpreter. `key` holds the shape arguments; the
    autotuner adds the tensors' dtypes to it itself."""
    if INTERPRET:
        return kernel
    shared = len(tiles)

    def prune(configs, named_args, **kwargs):
        return configs if next(iter(named_args.values())).element_size() == 2 else configs[:shared]

    return triton.autotune(configs=_configs(list(tiles) + list(tiles_16bit)), key=key,
                           prune_configs_by={"early_config_prune": prune})(kernel)


@triton.jit
def _store_tile(out_ptr, acc, channel_offs, pixel_offs, col_ok, row_ok, CHANNEL_MAJOR: tl.constexpr):
    # acc is a (pixel, channel) tile; stored in the order CHANNEL_MAJOR_STORE gives for this Triton release.
    if CHANNEL_MAJOR:
        tl.store(out_ptr + channel_offs[:, None] + pixel_offs[None, :], tl.trans(acc).to(out_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & row_ok[None, :])
    else:
        tl.store(out_ptr + pixel_offs[:, None] + channel_offs[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


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
def _pixels(first, BLOCK: tl.constexpr, HEIGHT, WIDTH):
    """(n, h, w) of the BLOCK pixels numbered from `first` (int64) in an (N, HEIGHT, WIDTH) grid: n as int64,
    h and w as int32. Only the scalar division is 64-bit; the rest fits in 32 bits because one image does."""
    hw = HEIGHT * WIDTH
    n0 = first // hw
    r = (first - n0 * hw).to(tl.int32) + tl.arange(0, BLOCK)
    n = n0 + r // hw
    r = r % hw
    return n, r // WIDTH, r % WIDTH


@triton.jit
def _first_tap(offset, dil, stride, tap_step, KSIZE):
    """The first tap k with (offset - k * dil) % stride == 0, or KSIZE if there is none. Those taps are
    k, k + tap_step, k + 2 * tap_step, ... (tap_step = stride / gcd(stride, dil)), so the search stops there."""
    first = offset * 0 + KSIZE  # a tensor: KSIZE may be a constant (triton specialises 1)
    for k in range(tap_step):
        first = tl.minimum(first, tl.where((offset - k * dil) % stride == 0, k, KSIZE))
    return first


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW,
    sxn, sxc, sxh, sxw, swk, swc, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    CHANNEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = (n, oh, ow), columns = output channels of the group, reduction = (kh, kw, c).
    g = tl.program_id(1)
    num_m = tl.cdiv(tl.cast(N, tl.int64) * OH * OW, BLOCK_M)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, tl.cdiv(K_G, BLOCK_N), GROUP_M)
    n, oh, ow = _pixels(pid_m * BLOCK_M, BLOCK_M, OH, OW)
    row_ok = n < N
    cols = pid_n.to(tl.int32) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K_G
    co = (g * K_G + cols).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # Row part of every address, tap (0, 0); a tap adds a scalar offset, a channel block a column part.
    x_rows = x_ptr + n * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw + (g * C_G).to(tl.int64) * sxc
    w_cols = w_ptr + co * swk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (a first layer, depthwise): one flat reduction over (kh, kw, c), so a tile
        # is not mostly padding channels.
        R = KH * KW * C_G
        for r0 in range(0, R, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < R
            c = r % C_G
            kh = (r // C_G) // KW
            kw = (r // C_G) % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            ok = row_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_cols = c.to(tl.int64) * sxc + (kh * dil_h).to(tl.int64) * sxh + (kw * dil_w).to(tl.int64) * sxw
            a = tl.load(x_rows[:, None] + x_cols[None, :], mask=ok, other=0.0)
            w_rows = c.to(tl.int64) * swc + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww
            b = tl.load(w_cols[None, :] + w_rows[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        for kh in range(KH):
            ih = ih0 + kh * dil_h
            ok_h = row_ok & (ih >= 0) & (ih < H)
            for kw in range(KW):
                iw = iw0 + kw * dil_w
                ok = ok_h & (iw >= 0) & (iw < W)
                a_rows = x_rows + (tl.cast(kh * dil_h, tl.int64) * sxh + tl.cast(kw * dil_w, tl.int64) * sxw)
                b_cols = w_cols + (tl.cast(kh, tl.int64) * swh + tl.cast(kw, tl.int64) * sww)
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
    _store_tile(y_ptr, acc, co * syc, n * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw, col_ok, row_ok,
                CHANNEL_MAJOR)


@triton.jit
def _conv2d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW,
    sdyn, sdyc, sdyh, sdyw, swk, swc, swh, sww, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_step_h, tap_step_w,
    FLAT_K: tl.constexpr, PRECISION: tl.constexpr, CHANNEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = input pixels (n, ih, iw), columns = input channels of the group, reduction = (kh, kw, k)
    # over the output pixels whose window covers the input pixel: oh * stride = ih + pad - kh * dil. With a
    # stride, only the taps with (ih + pad - kh * dil) % stride == 0 contribute, and which ones depends only on
    # ih % stride: the input is split into stride_h * stride_w phases (program_id 2), and a program reduces
    # over its phase's taps alone, so no dot is spent on a tap that cannot reach its pixels.
    g = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // stride_w
    pw = phase % stride_w
    # The phase's pixels: ih = ph + jh * stride_h, iw = pw + jw * stride_w, for jh < PH and jw < PW.
    PH = tl.cdiv(H - ph, stride_h)
    PW = tl.cdiv(W - pw, stride_w)
    num_m = tl.cdiv(tl.cast(N, tl.int64) * PH * PW, BLOCK_M)
    num_n = tl.cdiv(C_G, BLOCK_N)
    pid = tl.program_id(0)
    if pid >= num_m * num_n:
        return  # the grid is sized for the first (largest) phase
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    n, jh, jw = _pixels(pid_m * BLOCK_M, BLOCK_M, PH, PW)
    row_ok = n < N
    cols = pid_n.to(tl.int32) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_G
    k_first = g * K_G
    kh0 = _first_tap(ph + pad_h, dil_h, stride_h, tap_step_h, KH)
    kw0 = _first_tap(pw + pad_w, dil_w, stride_w, tap_step_w, KW)
    # A tap's output pixel is (jh + dh, jw + dw) with dh = (ph + pad_h - kh * dil_h) / stride_h, exact.
    dy_rows = dy_ptr + n * sdyn + jh.to(tl.int64) * sdyh + jw.to(tl.int64) * sdyw
    w_cols = w_ptr + cols.to(tl.int64) * swc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few output channels per group (depthwise): one flat reduction over the phase's (kh, kw, k).
        TH = tl.cdiv(KH - kh0, tap_step_h)
        TW = tl.cdiv(KW - kw0, tap_step_w)
        R = TH * TW * K_G
        for r0 in range(0, R, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < R
            kk = k_first + r % K_G
            kh = kh0 + (r // K_G) // TW * tap_step_h
            kw = kw0 + (r // K_G) % TW * tap_step_w
            dh = (ph + pad_h - kh * dil_h) // stride_h
            dw = (pw + pad_w - kw * dil_w) // stride_w
            oh = jh[:, None] + dh[None, :]
            ow = jw[:, None] + dw[None, :]
            ok = row_ok[:, None] & r_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            kk = kk.to(tl.int64)
            a = tl.load(dy_rows[:, None] + (kk * sdyc + dh.to(tl.int64) * sdyh + dw.to(tl.int64) * sdyw)[None, :],
                        mask=ok, other=0.0)
            b = tl.load(w_cols[None, :] + (kk * swk + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww)[:, None],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        dy_rows += k_first.to(tl.int64) * sdyc
        w_cols += k_first.to(tl.int64) * swk
        for kh in range(kh0, KH, tap_step_h):
            dh = (ph + pad_h - kh * dil_h) // stride_h
            ok_h = row_ok & (jh + dh >= 0) & (jh + dh < OH)
            for kw in range(kw0, KW, tap_step_w):
                dw = (pw + pad_w - kw * dil_w) // stride_w
                ok = ok_h & (jw + dw >= 0) & (jw + dw < OW)
                a_rows = dy_rows + (tl.cast(dh, tl.int64) * sdyh + tl.cast(dw, tl.int64) * sdyw)
                b_cols = w_cols + (tl.cast(kh, tl.int64) * swh + tl.cast(kw, tl.int64) * sww)
                for k0 in range(0, K_G, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < K_G
                    a = tl.load(a_rows[:, None] + (ks.to(tl.int64) * sdyc)[None, :], mask=ok[:, None] & k_ok[None, :],
                                other=0.0)
                    b = tl.load(b_cols[None, :] + (ks.to(tl.int64) * swk)[:, None],
                                mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    # Every pixel of the phase is written, zeros where no tap reaches it.
    ih = ph + jh * stride_h
    iw = pw + jw * stride_w
    ci = (g * C_G + cols).to(tl.int64)
    _store_tile(dx_ptr, acc, ci * sxc, n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, col_ok, row_ok,
                CHANNEL_MAJOR)


@triton.jit
def _conv2d_wgrad_kernel(
    dy_ptr, x_ptr, dw_part_ptr, db_part_ptr,
    N, H, W, OH, OW, C_G, K_G, KH, KW, K_OUT, CHUNK,
    sdyn, sdyc, sdyh, sdyw, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # GEMM view: rows = output channels of the group, columns = (c, kh, kw) as the weight is laid out,
    # reduction = (n, oh, ow), of which this program (split s) covers [s * CHUNK, (s + 1) * CHUNK).
    g = tl.program_id(1)
    split = tl.program_id(2)
    CKK = C_G * KH * KW
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
    # Column part of the input address; a pixel block adds the row part of its tap-(0, 0) input pixel.
    x_cols = (x_ptr + (g * C_G + c).to(tl.int64) * sxc + (kh * dil_h).to(tl.int64) * sxh
              + (kw * dil_w).to(tl.int64) * sxw)
    dy_rows = dy_ptr + co * sdyc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, tl.cast(N, tl.int64) * OH * OW)
    for p0 in range(start, end, BLOCK_K):
        n, oh, ow = _pixels(p0, BLOCK_K, OH, OW)
        p_ok = tl.arange(0, BLOCK_K) < end - p0
        a = tl.load(dy_rows[:, None] + (n * sdyn + oh.to(tl.int64) * sdyh + ow.to(tl.int64) * sdyw)[None, :],
                    mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        b_mask = p_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = n * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        b = tl.load(x_cols[None, :] + x_rows[:, None], mask=b_mask, other=0.0)
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
    part = part_ptr + offs
    for _ in range(SPLITS):
        total += tl.load(part, mask=ok, other=0.0)
        part += NUMEL  # pointer arithmetic is 64-bit; SPLITS * NUMEL may not fit in 32 bits
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


# Keys: every shape argument that changes the GEMM (rows, columns, reduction length) or, for the input
# gradient, how many taps each stride phase has.
_fwd = _tuned(_conv2d_fwd_kernel, ["N", "C_G", "K_G", "KH", "KW", "OH", "OW", "stride_h", "HAS_BIAS", "RELU",
                                   "FLAT_K", "PRECISION"], _GEMM_TILES, _GEMM_TILES_16BIT)
_dgrad = _tuned(_conv2d_dgrad_kernel, ["N", "C_G", "K_G", "KH", "KW", "H", "W", "stride_h", "stride_w", "dil_h",
                                       "dil_w", "FLAT_K", "PRECISION"], _GEMM_TILES, _GEMM_TILES_16BIT)
_wgrad = _tuned(_conv2d_wgrad_kernel, ["N", "C_G", "K_G", "KH", "KW", "OH", "OW", "CHUNK", "HAS_BIAS", "PRECISION"],
                _WGRAD_TILES)


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
        HAS_BIAS=bias is not None, RELU=relu, FLAT_K=C_G < FLAT_K_BELOW, PRECISION=_precision(x.dtype),
        CHANNEL_MAJOR=CHANNEL_MAJOR_STORE, **_meta(),
    )
    return y


def conv2d_grad_output(grad_y, y=None):
    """The output gradient as both backward kernels take it: channels innermost on the GPU and, after a fused
    ReLU whose output is `y`, zero where y <= 0. One pass serves both gradients, and the kernels then read
    no activation but dy."""
    if y is None:
        return _channels_inner(grad_y)
    layout = torch.preserve_format if INTERPRET else torch.channels_last
    return torch.where(y > 0, grad_y, grad_y.new_zeros(()), out=torch.empty_like(grad_y, memory_format=layout))


def conv2d_input_grad(grad_y, weight, x_shape, stride, padding, dilation, groups):
    """Gradient of conv2d with respect to its input, from `conv2d_grad_output`'s dy."""
    N, C, H, W = x_shape
    K, C_G, KH, KW = weight.shape
    OH, OW = grad_y.shape[2:]
    dx = torch.empty(x_shape, device=grad_y.device, dtype=grad_y.dtype)
    if dx.numel() == 0:
        return dx
    weight = _channels_inner(weight)
    sh, sw = stride
    # One phase per (ih % sh, iw % sw); taps reaching a phase are tap_step apart (see the kernel).
    tap_step = (sh // math.gcd(sh, dilation[0]), sw // math.gcd(sw, dilation[1]))
    grid = lambda meta: (triton.cdiv(N * triton.cdiv(H, sh) * triton.cdiv(W, sw), meta["BLOCK_M"])
                         * triton.cdiv(C_G, meta["BLOCK_N"]), groups, sh * sw)
    _dgrad[grid](
        grad_y, weight, dx,
        N, H, W, OH, OW, C_G, K // groups, KH, KW,
        *grad_y.stride(), *weight.stride(), *dx.stride(),
        sh, sw, padding[0], padding[1], dilation[0], dilation[1], *tap_step,
        FLAT_K=K // groups < FLAT_K_BELOW, PRECISION=_precision(grad_y.dtype),
        CHANNEL_MAJOR=CHANNEL_MAJOR_STORE, **_meta(),
    )
    return dx


def _num_splits(tiles: int, reduction: int, device: torch.device) -> int:
    """How many programs share the reduction of each weight-gradient tile: enough to fill the GPU twice over,
    while each still reduces at least 512 pixels. Depends only on shapes, so results are reproducible."""
    if INTERPRET:
        return max(1, min(2, triton.cdiv(reduction, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(tiles, 1)), triton.cdiv(reduction, 512), 64))


def conv2d_weight_grad(grad_y, x, weight_shape, stride, padding, dilation, groups, has_bias):
    """(grad_weight, grad_bias or None) from `conv2d_grad_output`'s dy, reduced deterministically from split-K
    partial sums."""
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
    if P:
        grid = lambda meta: (triton.cdiv(K_G, meta["BLOCK_M"]) * triton.cdiv(CKK, meta["BLOCK_N"]), groups, splits)
        _wgrad[grid](
            grad_y, x, dw_part, db_part,
            N, H, W, OH, OW, C_G, K_G, KH, KW, K, chunk,
            *grad_y.stride(), *x.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            HAS_BIAS=has_bias, PRECISION=_precision(x.dtype), **_meta(),
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
