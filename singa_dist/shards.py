"""Shard markers: which parameters hold only this worker's share of a tensor (SINGA's `partition_dim=1`).

`singa_dist.partition` cuts the parameters of model-parallel layers and marks each piece with the `Shard`
it holds. Everything that walks a model's tensors asks here whether a tensor is replicated (the same on
every worker: broadcast it, all-reduce its gradient) or feature-split (each worker its own: leave it alone).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

SHARD_ATTR = "_singa_shard"


@dataclass(frozen=True)
class Shard:
    """What a feature-split parameter holds: rows `start:start+length` along `dim` of a tensor of `full_shape`."""

    dim: int
    full_shape: tuple
    start: int
    length: int
    sizes: tuple  # every worker's length, in rank order


# A state_dict() holds detached tensors, which lose the marker: they are recognised by their memory.
_shards_by_ptr: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def mark_shard(param: torch.Tensor, shard: Shard) -> None:
    """Record that `param` holds `shard` of a larger tensor."""
    setattr(param, SHARD_ATTR, shard)
    _shards_by_ptr[param.data_ptr()] = param


def shard_of(tensor: torch.Tensor) -> Shard | None:
    """The Shard a feature-split parameter (or a detached view of one, as in a state_dict) holds, else None."""
    found = getattr(tensor, SHARD_ATTR, None)
    if found is not None:
        return found
    if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
        return None
    param = _shards_by_ptr.get(tensor.data_ptr())
    if param is not None and param.shape == tensor.shape and param.dtype == tensor.dtype:
        return getattr(param, SHARD_ATTR, None)
    return None


def is_feature_split(tensor: torch.Tensor) -> bool:
    """True for a parameter that `partition()` split across the workers (not replicated)."""
    return shard_of(tensor) is not None


def split_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first `total % parts` parts get one more."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]
