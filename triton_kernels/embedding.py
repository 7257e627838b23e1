"""SINGA's Embedding: a row gather going forward, and a deterministic scatter-add going back.

The backward sorts the indices (stably) and lets the program at the start of each run of equal indices
sum that run's gradient rows in order, in float32: every weight row is written by one program, with the
same summation order on every run (no floating-point atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_I, BLOCK_D = 16, 128


def _backward_tile(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of the backward, whose program holds one row slice: 8 elements per thread, so
    that 16-bit rows move in 16-byte vectors (4 warps over a 128-wide slice would give each thread one)."""
    block = min(1024, max(32, triton.next_power_of_2(D)))
    return block, max(1, min(4, block // 256))


@triton.jit
def _embedding_forward_kernel(idx_ptr, w_ptr, out_ptr, n, D, stride_wr, stride_wc,
                              BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    imask = i < n
    rows = tl.load(idx_ptr + i, mask=imask, other=0).to(tl.int64)
    mask = imask[:, None] & (d < D)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wr + d[None, :] * stride_wc, mask=mask, other=0.0)
    tl.store(out_ptr + i[:, None] * D + d[None, :], w, mask=mask)


@triton.jit
def _embedding_backward_kernel(sorted_ptr, order_ptr, g_ptr, dw_ptr, n, D, stride_gr, stride_gc, padding_idx,
                               SCALE_BY_FREQ: tl.constexpr, BLOCK_D: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    row = tl.load(sorted_ptr + pos)
    prev = tl.load(sorted_ptr + pos - 1, mask=pos > 0, other=-1)
    # Only the first position of a run of equal indices works; the padding row gets no gradient.
    if (prev != row) & (row != padding_idx):
        acc = tl.zeros([BLOCK_D], tl.float32)
        j = pos
        cur = row
        while cur == row:
            src = tl.load(order_ptr + j).to(tl.int64)
            acc += tl.load(g_ptr + src * stride_gr + d * stride_gc, mask=dmask, other=0.0).to(tl.float32)
            j += 1
            cur = tl.load(sorted_ptr + j, mask=j < n, other=-1)
        if SCALE_BY_FREQ:
            acc = acc / (j - pos).to(tl.float32)
        tl.store(dw_ptr + row.to(tl.int64) * D + d, acc.to(dw_ptr.dtype.element_ty), mask=dmask)


def embedding_forward(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[idx] for a flat index tensor; weight may have any strides. Returns (n, D) contiguous."""
    n, D = idx.numel(), weight.shape[1]
    out = torch.empty((n, D), device=weight.device, dtype=weight.dtype)
    if n and D:
        _embedding_forward_kernel[(triton.cdiv(n, BLOCK_I), triton.cdiv(D, BLOCK_D))](
            idx, weight, out, n, D, weight.stride(0), weight.stride(1), BLOCK_I=BLOCK_I, BLOCK_D=BLOCK_D)
    return out


def embedding_backward(idx: torch.Tensor, grad: torch.Tensor, num_embeddings: int, padding_idx: int | None,
                       scale_grad_by_freq: bool) -> torch.Tensor:
    """Dense weight gradient: sum of grad rows per index (n, D) -> (num_embeddings, D), deterministic."""
    n, D = grad.shape
    dw = torch.zeros((num_embeddings, D), device=grad.device, dtype=grad.dtype)
    if n and D:
        sorted_idx, order = torch.sort(idx, stable=True)
        block, warps = _backward_tile(D)
        _embedding_backward_kernel[(n, triton.cdiv(D, block))](
            sorted_idx, order, grad, dw, n, D, grad.stride(0), grad.stride(1),
            -1 if padding_idx is None else padding_idx, SCALE_BY_FREQ=scale_grad_by_freq, BLOCK_D=block,
            num_warps=warps)
    return dw
