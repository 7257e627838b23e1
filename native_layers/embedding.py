"""SINGA's Embedding layer: nn.Embedding's arguments and state_dict, with a deterministic backward.

The weight gradient sums each index's gradient rows in a fixed order (sorted indices, one writer per row),
so two runs give bit-identical gradients. max_norm renormalises the looked-up rows in place before the
lookup, as torch does (with torch's own op: it changes the weight, it is not part of the layer's math).
On CPU tensors a float32 or float64 weight goes through torch's own embedding (F.embedding), whose CPU
gradient is deterministic too; half precisions keep this layer's float32 accumulation of the gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import register_conversion
from .dispatch import kernels, use_triton_float


class EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, padding_idx, scale_grad_by_freq, sparse):
        if use_triton_float(weight):
            out = kernels("embedding").embedding_forward(idx, weight)
        else:
            out = weight.index_select(0, idx)
        ctx.padding_idx, ctx.scale_grad_by_freq, ctx.sparse = padding_idx, scale_grad_by_freq, sparse
        ctx.num_embeddings = weight.shape[0]
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        if ctx.sparse:
            return None, _sparse_grad(idx, grad, ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq), \
                None, None, None
        if use_triton_float(grad):
            dw = kernels("embedding").embedding_backward(idx, grad, ctx.num_embeddings, ctx.padding_idx,
                                                         ctx.scale_grad_by_freq)
        else:
            # index_add_ on CPU adds in index order: deterministic
            g = grad.to(torch.float32) if grad.dtype in (torch.float16, torch.bfloat16) else grad
            if ctx.scale_grad_by_freq:
                g = g / torch.bincount(idx, minlength=ctx.num_embeddings)[idx].to(g.dtype)[:, None]
            dw = torch.zeros((ctx.num_embeddings, grad.shape[1]), dtype=g.dtype, device=grad.device)
            dw.index_add_(0, idx, g)
            if ctx.padding_idx is not None:
                dw[ctx.padding_idx] = 0
            dw = dw.to(grad.dtype)
        return None, dw, None, None, None


def _sparse_grad(idx, grad, num_embeddings, padding_idx, scale_grad_by_freq):
    """torch's sparse Embedding gradient: one (uncoalesced) entry per looked-up row."""
    g = grad
    if scale_grad_by_freq:
        g = g / torch.bincount(idx, minlength=num_embeddings)[idx].to(g.dtype)[:, None]
    if padding_idx is not None:
        g = g.masked_fill((idx == padding_idx)[:, None], 0)
    return torch.sparse_coo_tensor(idx[None, :], g, (num_embeddings, grad.shape[1]), check_invariants=False)


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> torch.Tensor:
    """torch.nn.functional.embedding's contract: rows of `weight` looked up by the integer `input`."""
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"Embedding: indices must be int64 or int32, got {input.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"Embedding: weight must be 2-d, got shape {tuple(weight.shape)}")
    num = weight.shape[0]
    if padding_idx is not None:
        if not -num <= padding_idx < num:
            raise ValueError(f"Embedding: padding_idx {padding_idx} is outside the {num} embeddings")
        padding_idx = padding_idx % num
    torch_path = weight.dtype in (torch.float32, torch.float64) and not use_triton_float(weight)
    if torch_path and max_norm is None:
        try:
            return F.embedding(input, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
        except IndexError:
            pass  # torch checks the indices itself; the check below names the one out of range
    idx = input.reshape(-1).long()
    if idx.numel():
        bad = (idx < 0) | (idx >= num)
        if bad.any():
            raise IndexError(f"Embedding: index {idx[bad][0].item()} is out of range for {num} embeddings")
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, idx, max_norm, norm_type)
    if torch_path:
        return F.embedding(input, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    out = EmbeddingFunction.apply(idx, weight, padding_idx, scale_grad_by_freq, sparse)
    return out.reshape(*input.shape, weight.shape[1])


class Embedding(nn.Embedding):
    """nn.Embedding (same arguments and state_dict) with a deterministic weight gradient."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                         self.scale_grad_by_freq, self.sparse)


def _from_torch(m: nn.Embedding) -> Embedding:
    new = Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                    norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                    _weight=m.weight, _freeze=not m.weight.requires_grad)
    new.register_parameter("weight", m.weight)  # the same Parameter: optimizers built earlier still apply
    return new


register_conversion(nn.Embedding, _from_torch)
