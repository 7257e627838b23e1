"""Matrix multiply for SINGA's InnerProduct (Linear): C = A @ B with fused prologue and epilogue.

One kernel serves the three products of a dense layer:
- forward      y  = act(x @ W^T + b)          epilogue: bias, then ReLU/sigmoid/tanh
- input grad   dx = (dy * act'(y)) @ W        prologue: the activation's derivative, from the saved output
- weight grad  dW = (dy * act'(y))^T @ x      same prologue, and the bias gradient as the row sums of A

Operands are passed with explicit strides (a transpose is a stride swap, non-contiguous inputs need no
copy), accumulation is in float32, and programs are ordered in groups of rows so tiles of B stay in cache.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton_kernels.activation import _sigmoid, _tanh

# Activation codes shared with native_layers (constexpr in the kernels).
ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2, "tanh": 3}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:
        # The interpreter costs about 1 ms per program instance: few, large tiles and no tuning.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)]
    # At least 4 warps: Hopper's warp-group MMA (wgmma) needs whole warp groups.
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 4, 4),
              (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 5, 4), (128, 256, 32, 3, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


SHARED_MEMORY_BYTES = 232448  # the most an H100 block may use (227 KiB)


def config_fits(config, element_size: int, prologue: bool) -> bool:
    """Whether a tile configuration suits operands of `element_size` bytes without running out of shared
    memory or spilling registers (checked for sm_90 by tests/test_kernels_sm90_codegen.py)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    stages = max(config.num_stages, 1)
    if stages * (bm * bk + bk * bn) * element_size > SHARED_MEMORY_BYTES:
        return False
    # A prologue activation scales the A tile in registers before the MMA: it must stay small per thread.
    return not prologue or bm * bk * element_size <= 64 * 32 * config.num_warps


def _prune_configs(configs, named_args, **kwargs):
    a = named_args.get("a_ptr")
    size = a.element_size() if hasattr(a, "element_size") else 2
    prologue = bool(kwargs.get("PRO_ACT", named_args.get("PRO_ACT", 0)))
    return [c for c in configs if config_fits(c, size, prologue)] or configs[-1:]


@triton.jit
def _act_derivative(y, ACT: tl.constexpr):
    """d act / d z written in terms of the output y = act(z), so only the output needs saving."""
    if ACT == 1:
        d = (y > 0).to(tl.float32)
    elif ACT == 2:
        d = y * (1.0 - y)
    else:
        d = 1.0 - y * y
    return d


@triton.jit
def _apply_act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = _sigmoid(z)
    elif ACT == 3:
        z = _tanh(z)
    return z


@triton.autotune(configs=_configs(), key=["M", "N", "K", "PRO_ACT", "EPI_ACT", "HAS_BIAS", "BIAS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, y_ptr, dbias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_ym, stride_yk,
    HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, PRO_ACT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks share each column-block of B while it is in L2.
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a_mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PRO_ACT != 0:
            y = tl.load(y_ptr + offs_m[:, None] * stride_ym + ks[None, :] * stride_yk, mask=a_mask, other=0.0)
            a32 = a.to(tl.float32) * _act_derivative(y.to(tl.float32), PRO_ACT)
            if BIAS_GRAD:
                row_sum += tl.sum(a32, axis=1)
            a = a32.to(b.dtype)
        elif BIAS_GRAD:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = _apply_act(acc, EPI_ACT)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if BIAS_GRAD:
        # Every column-block computes the same row sums; the first one writes them (no atomics).
        if pid_n == 0:
            tl.store(dbias_ptr + offs_m, row_sum, mask=mask_m)


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own switch, so a native Linear is as exact as nn.Linear on the same host.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def matmul(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None, activation: str | None = None,
           prologue_activation: str | None = None, prologue_output: torch.Tensor | None = None,
           bias_grad: bool = False, out_dtype: torch.dtype | None = None):
    """act(a @ b + bias), or (a * act'(prologue_output)) @ b; a: (M, K), b: (K, N), any strides.

    With `bias_grad` also returns the row sums of the (prologue-scaled) a in float32: the bias gradient
    when a is the transposed output gradient. Returns c, or (c, row_sums) when `bias_grad`.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: operands have dtypes {a.dtype} and {b.dtype}; they must match")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    dbias = torch.empty((M,), device=a.device, dtype=torch.float32) if bias_grad else c
    pro = ACTIVATIONS[prologue_activation]
    if pro and (prologue_output is None or prologue_output.shape != a.shape):
        raise ValueError("matmul: the prologue activation needs the saved output, shaped like a")
    y = prologue_output if pro else a
    if M == 0 or N == 0:
        return (c, dbias) if bias_grad else c
    if K == 0:
        # An empty reduction: the epilogue still applies to the zero product.
        c.zero_()
        if bias is not None:
            c += bias.to(c.dtype)
        if activation:
            c = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation](c)
        return (c, dbias.zero_()) if bias_grad else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, y, dbias,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, EPI_ACT=ACTIVATIONS[activation], PRO_ACT=pro, BIAS_GRAD=bias_grad,
        PRECISION=_precision(a.dtype),
        # The interpreter has no bfloat16 arithmetic; bf16 x bf16 products are exact in float32 anyway.
        DOT_FP32=_INTERPRET and a.dtype == torch.bfloat16,
    )
    return (c, dbias) if bias_grad else c
