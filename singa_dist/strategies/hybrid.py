"""Hybrid: SINGA's hybrid framework, synchronous inside a worker group and asynchronous between groups.

Inside a group the workers all-reduce their gradients through the group's process group, which uses NCCL
when the tensors live on GPUs (e.g. the GPUs of one machine) and Gloo otherwise; between groups the
update goes through the parameter servers as in Downpour (pull frequency, staleness bound and the remedies for
asynchrony included: staleness_lr and dana on, momentum_correction off, warmup_steps 0, relative_clip 2.0).
"""
from __future__ import annotations

from .downpour import Downpour


class Hybrid(Downpour):
    """Downpour whose worker groups have several workers each (the strategy table requires at least two)."""

    name = "hybrid"
