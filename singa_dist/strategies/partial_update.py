"""Partial update: SINGA's `backward_and_partial_update`, AllReduce's synchronous neighbour.

Gradients are not communicated at all. Each worker applies its own local gradients with the wrapped
optimizer, then the *values* of one chunk of the parameters (about 1/n of the bytes, in AllReduce's bucket
order) are averaged across the workers; the chunk cycles with every step, so each parameter is
re-synchronised every n steps. The very first step averages every parameter. Optimizer state (momentum,
Adam moments) stays local. A chunk travels as AllReduce's buckets do: one fused buffer per dtype and device
(`strategies/buckets.py`).
"""
from __future__ import annotations

from .. import primitives, runtime
from ..compression import NoneCompressor, resolve as resolve_compression
from ..shards import is_feature_split
from .base import Strategy, check_op
from .buckets import Bucket, by_dtype, plan_buckets, split_evenly


class PartialUpdate(Strategy):
    """Local steps, then one chunk of the parameters' values averaged per step, cycling through n chunks."""

    name = "partial_update"

    def __init__(self, chunks: int = 4, bucket_mb: float | None = None, compression=None):
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"partial update needs a positive number of chunks, got {chunks!r}")
        self.partial_update_chunks = chunks
        self.bucket_mb = bucket_mb
        self.compression = compression
        self.bytes_sent_last_step = 0  # payload bytes this rank put on the wire in the last step
        self.bytes_sent_total = 0
        self.optimizer = None
        self.partial_step = 0

    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        if self.optimizer is not None:
            raise RuntimeError("this PartialUpdate strategy already serves an optimizer; create one per optimizer")
        check_op(op, self.name)
        compressor = resolve_compression(compression if compression is not None else self.compression)
        if not isinstance(compressor, NoneCompressor):
            raise ValueError("partial update averages parameter values, uncompressed; use compression=none with it")
        named = [(n, p) for n, p in named_parameters if p.requires_grad and not is_feature_split(p)]
        order = [item for bucket in plan_buckets(named, bucket_mb=self.bucket_mb) for item in bucket.params]
        self.chunks = [[Bucket(i, group) for i, group in enumerate(by_dtype(chunk))]
                       for chunk in split_evenly(order, self.partial_update_chunks)]
        self.optimizer = optimizer
        self.size = runtime.size() if runtime.is_initialized() else 1
        self.active = primitives.is_active()

    def synchronize(self) -> None:
        """Nothing to wait for: gradients stay local."""

    def step(self, closure, local_step):
        loss = local_step(closure)
        if self.active:
            self._average_chunk()
        return loss

    def _average_chunk(self) -> None:
        """Average the values of this step's chunk (every parameter on the first step)."""
        if self.partial_step == 0:
            buckets = [b for chunk in self.chunks for b in chunk]
        else:
            buckets = self.chunks[(self.partial_step - 1) % len(self.chunks)]
        self.partial_step += 1
        sent = 0
        for bucket in buckets:
            flat = bucket.gather_values()
            primitives.all_reduce(flat, f"partial update of {len(bucket.params)} parameters "
                                        f"({bucket.params[0][0]}, ...)")
            flat.div_(self.size)
            bucket.scatter_values()
            bucket.release()
            sent += flat.numel() * flat.element_size()
        self.bytes_sent_last_step = sent
        self.bytes_sent_total += sent

    def traffic(self) -> tuple[int, int]:
        return self.bytes_sent_total, self.bytes_sent_total  # an all-reduce: each rank gets back what it gave

    def state_dict(self) -> dict:
        return {"partial_update_step": self.partial_step}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"partial_update_step"}
        if unknown:
            raise ValueError(f"PartialUpdate strategy state has unknown keys {sorted(unknown)}")
        self.partial_step = int(state.get("partial_update_step", self.partial_step))
