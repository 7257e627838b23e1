"""How gradients (or Hogwild's deltas) travel to a parameter server: per slice, compressed or not.

A worker packs the slices it sends to one server into a packet; the server unpacks it into one tensor per
slice, or None for a slice whose parameter had no gradient (the server's optimizer then skips the slice,
as torch's optimizers skip a parameter whose `.grad` is None). Packets:

- dense: `("dense", [None | (wire, ctx)])`, each slice through the compressor's `compress` (none, fp16,
  bf16, or a Horovod-style compressor), undone by its `decompress` on the server;
- sparse: `("sparse", present, index, values)`, the slices that have a gradient laid end to end, of which
  top-k or threshold sends some elements; the rest stays in the sender's per-slice residual (error feedback).
"""
from __future__ import annotations

import torch

from .. import runtime
from ..compression import SparseCompressor, load_residual_state, residual_state


def payload_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Packer:
    """A sender's side: packs slices for the servers and keeps the sparse compressions' residuals."""

    def __init__(self, compressor):
        self.compressor = compressor
        self.sparse = isinstance(compressor, SparseCompressor)
        self.compresses = getattr(compressor, "name", None) != "none"  # (the timeline shows compression then)
        self.residuals: dict[int, torch.Tensor] = {}  # slice id -> what error feedback still holds back

    def pack(self, slice_ids: list[int], tensors: list[torch.Tensor | None]) -> tuple[tuple, int]:
        """The packet for one server and the bytes of its payload. `tensors` are host copies (packing may
        change them in place)."""
        if not self.sparse:
            entries = [None if t is None else self.compressor.compress(t) for t in tensors]
            return ("dense", entries), payload_bytes(e[0] for e in entries if e is not None)
        present = [t is not None for t in tensors]
        ids = [sid for sid, t in zip(slice_ids, tensors) if t is not None]
        parts = [t for t in tensors if t is not None]
        if not parts:
            return ("sparse", present, None, None), 0
        dtype = parts[0].dtype
        for t in parts[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.to(dtype) for t in parts])
        residual = None
        if self.compressor.error_feedback:
            residual = torch.cat([self.residuals[sid].to(dtype) if sid in self.residuals
                                  else torch.zeros(t.numel(), dtype=dtype) for sid, t in zip(ids, parts)])
        index, values = self.compressor.sparsify(flat, residual)
        if residual is not None:
            for sid, t, r in zip(ids, parts, residual.split([t.numel() for t in parts])):
                self.residuals[sid] = r.to(t.dtype)
        return ("sparse", present, index, values), payload_bytes((index, values))

    def residual_state(self, slices, params) -> dict | None:
        """The residuals' checkpoint form, per parameter name (zeros where a slice has none yet)."""
        if not self.residuals:
            return None
        full = {}
        for s in slices:
            p = params[s.param]
            flat = full.setdefault(s.name, (torch.zeros(p.numel(), dtype=p.dtype), p.shape))[0]
            if s.id in self.residuals:
                flat[s.start:s.end] = self.residuals[s.id]
        return residual_state({name: flat.view(shape) for name, (flat, shape) in full.items()}, runtime.rank())

    def load_residual_state(self, state: dict | None, slices) -> None:
        """Take this sender's residuals back from `residual_state`'s form (nothing to do without sparsity)."""
        if self.sparse:
            saved = load_residual_state(state, self.compressor.name, runtime.rank())
            self.residuals = {s.id: saved[s.name].reshape(-1)[s.start:s.end].clone()
                              for s in slices if s.name in saved}


def unpack(compressor, packet: tuple, numels: list[int]) -> list[torch.Tensor | None]:
    """On the server: one tensor (or None) per slice of the packet; `numels` are the slices' sizes."""
    if packet[0] == "dense":
        return [None if e is None else compressor.decompress(*e) for e in packet[1]]
    _, present, index, values = packet
    sizes = [n for n, p in zip(numels, present) if p]
    out: list[torch.Tensor | None] = [None] * len(numels)
    if not sizes:
        return out
    flat = values.new_zeros(sum(sizes))
    flat[index.long()] = values
    parts = iter(flat.split(sizes))
    return [next(parts) if p else None for p in present]
