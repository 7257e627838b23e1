"""Collectives on tensors and objects among the workers."""
from __future__ import annotations


class ReduceOp:
    """How gradients and tensors from the workers combine (Horovod's names)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"singa_dist.{self.name}"


Average = ReduceOp("Average")
Sum = ReduceOp("Sum")
