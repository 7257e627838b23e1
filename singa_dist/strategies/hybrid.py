"""Hybrid: SINGA's hybrid framework, synchronous inside a worker group and asynchronous between groups.

Inside a group the workers all-reduce their gradients through the group's process group, which uses NCCL
when the tensors live on GPUs (e.g. the GPUs of one machine) and Gloo otherwise; between groups the
update goes through the parameter servers as in Downpour (pull frequency and staleness bound included).
"""
from __future__ import annotations

from .. import runtime
from .downpour import Downpour


class Hybrid(Downpour):
    name = "hybrid"

    def setup(self, optimizer, named_parameters, **kwargs):
        if runtime.is_initialized() and runtime.is_distributed() and runtime.topology().nworkers_per_group < 2:
            raise RuntimeError("hybrid all-reduces inside worker groups of several workers; this topology has one "
                               "worker per group (use the downpour strategy, or --workers-per-group 2 or more)")
        super().setup(optimizer, named_parameters, **kwargs)
