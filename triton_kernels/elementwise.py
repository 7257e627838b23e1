"""What the elementwise kernels (activations, dropout) share: output layouts like torch's, and launches over
tensors of any strides without copying them.

A launch walks the output's elements in its memory order, as TensorIterator does: dimensions are sorted by
the output's strides and merged wherever every operand is contiguous across them. When all operands share
one dense layout (contiguous, channels_last, a transpose, any permutation) that leaves one dimension of
stride 1 and the kernel runs flat over the storage (NDIM = 0); otherwise it runs over up to MAX_DIMS
dimensions with each operand's strides (slices with gaps; a layout needing more costs one copy of the
operands that differ from the output). Offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DIMS = 4


@triton.jit
def strided_offsets(i, size1, size2, size3, stride0, stride1, stride2, stride3, NDIM: tl.constexpr):
    """Memory offsets of linear indices i (int64, in iteration order) in an operand with these strides:
    dimension d has size `size<d>` (dimension 0's is implied); NDIM = 0 means flat (offset = index)."""
    if NDIM == 0:
        off = i
    else:
        # one division per dimension (the remainder from the quotient): 64-bit division is slow on a GPU
        r = i
        off = i * 0
        if NDIM >= 4:
            q = r // size3
            off += (r - q * size3) * stride3
            r = q
        if NDIM >= 3:
            q = r // size2
            off += (r - q * size2) * stride2
            r = q
        if NDIM >= 2:
            q = r // size1
            off += (r - q * size1) * stride1
            r = q
        off += r * stride0
    return off


def empty_like_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like x in the layout torch's elementwise ops give their output: x's
    own strides when x is dense in some order, else dense in x's order of strides (never a forced copy to
    contiguous)."""
    if x.is_contiguous():
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x, memory_format=torch.channels_last)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty_like(x, memory_format=torch.channels_last_3d)
    return torch.empty_like(x)  # preserve_format: x's strides if dense, else dense in x's stride order


def _iteration_space(shape, strides):
    """(sizes, per-operand strides) of the fewest dimensions that walk strides[0]'s operand in memory
    order, outermost first; size-1 dimensions dropped, neighbours merged where every operand allows."""
    order = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -strides[0][d])
    sizes, merged = [], [[] for _ in strides]
    for d in order:
        if sizes and all(m[-1] == s[d] * shape[d] for m, s in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for m, s in zip(merged, strides):
                m[-1] = s[d]
        else:
            sizes.append(shape[d])
            for m, s in zip(merged, strides):
                m.append(s[d])
    return sizes, merged


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one block of memory without gaps, in whatever order of dimensions."""
    sizes, (strides,) = _iteration_space(t.shape, [t.stride()])
    return strides in ([], [1])


def _overlaps_itself(t: torch.Tensor) -> bool:
    """True when two elements of t may share memory (an expanded tensor): writing it is undefined."""
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: t.stride(d))
    extent = 1
    for d in dims:
        if t.stride(d) < extent:
            return True
        extent = t.stride(d) * t.shape[d]
    return False


def launch_elementwise(kernel, elements_per_program: int, out: torch.Tensor, inputs, args=(), **constexprs):
    """kernel[grid](*inputs, out, *args, n, size1, size2, size3, <4 strides per input>, <4 strides of out>,
    NDIM=..., **constexprs) over out's elements in out's memory order; `out` may be one of the inputs (in
    place). A layout that needs more than MAX_DIMS dimensions costs one copy of the mismatched operands."""
    n = out.numel()
    if n == 0:
        return out
    if _overlaps_itself(out):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                           "single memory location")
    sizes, strides = _iteration_space(out.shape, [out.stride()] + [t.stride() for t in inputs])
    if len(sizes) > MAX_DIMS:
        dense = out if _is_dense(out) else empty_like_output(out)
        inputs = [t if t.stride() == dense.stride() else torch.empty_like(dense).copy_(t) for t in inputs]
        launch_elementwise(kernel, elements_per_program, dense, inputs, args, **constexprs)
        return out if dense is out else out.copy_(dense)
    if all(s == [1] for s in strides) or not sizes:
        ndim, sizes, strides = 0, [n], [[1] for _ in strides]
    else:
        ndim = len(sizes)
    sizes = sizes[1:] + [1] * (MAX_DIMS - len(sizes))
    flat = [x for s in strides[1:] + strides[:1] for x in s + [0] * (MAX_DIMS - len(s))]
    grid = (triton.cdiv(n, elements_per_program),)
    kernel[grid](*inputs, out, *args, n, *sizes, *flat, NDIM=ndim, **constexprs)
    return out
