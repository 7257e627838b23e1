"""Adasum: each worker's *update* (not its gradient) is combined with Horovod's Adasum operation.

`DistributedOptimizer(opt, op=sd.Adasum)` (or `strategy="adasum"`) follows Horovod's Adasum optimizer: when a
parameter's gradient is ready, the wrapped optimizer steps that parameter alone on this worker's gradient,
and the change it made (the delta) is combined across the workers with Adasum,

    adasum(a, b) = (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b,

pairwise in a binary tree over the ranks (see collectives.adasum_tree), per parameter. `step()` then sets each
parameter to its value before the local step plus the combined delta. Orthogonal updates add up; identical
ones count once; the learning rate need not grow with the number of workers. As in Horovod, the number of
workers must be a power of two. The optimizer's own state (momentum, Adam's moments) stays local.
"""
from __future__ import annotations

import torch

from .. import primitives, runtime
from ..collectives import Adasum, _check_adasum, allreduce_async
from ..compression import resolve as resolve_compression
from ..coordinator import global_process_set
from ..functions import user_optimizer_class
from .base import Strategy


class AdasumUpdate(Strategy):
    """The wrapped optimizer's per-parameter updates, combined with Adasum (Horovod's Adasum optimizer)."""

    name = "adasum"
    allows_skip_synchronize = False

    def __init__(self, compression=None):
        self.compression = compression
        self.optimizer = None

    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        if op is not None and op is not Adasum:
            raise ValueError(f"the adasum strategy combines updates with sd.Adasum, got op={op!r}")
        self.optimizer = optimizer
        self.passes = int(backward_passes_per_step)
        self.compressor = resolve_compression(compression if compression is not None else self.compression)
        self.named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.active = primitives.is_active()
        if self.active:
            _check_adasum(global_process_set, runtime.size())
        self.counts = {id(p): 0 for _, p in self.named}
        self.pending: dict[int, tuple] = {}  # parameter id -> (handle, value before the local step, ctx)
        for _, p in self.named:  # as Horovod: every parameter has a gradient from the start
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def grad_ready(self, name, param):
        if not self.active:
            return
        count = self.counts[id(param)] + 1
        if count > self.passes:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call to step(). Increase "
                f"backward_passes_per_step to accumulate gradients locally. (rank {runtime.rank()}: parameter "
                f"'{name}')")
        self.counts[id(param)] = count
        if count == self.passes:
            self._launch(name, param)

    @torch.no_grad()
    def _launch(self, name: str, param: torch.nn.Parameter) -> None:
        """Step this parameter alone, then start combining its delta with the other workers'."""
        start = param.detach().clone()
        groups = self.optimizer.param_groups
        stashed = [g["params"] for g in groups]
        for g in groups:
            g["params"] = [p for p in g["params"] if p is param]
        try:
            user_optimizer_class(self.optimizer).step(self.optimizer)
        finally:
            for g, params in zip(groups, stashed):
                g["params"] = params
        delta = param.detach() - start
        param.copy_(start)
        wire, ctx = self.compressor.compress(delta)
        self.pending[id(param)] = (allreduce_async(wire, name=f"adasum.{name}", op=Adasum), start, ctx)

    def synchronize(self) -> None:
        """Nothing to wait for before step(): the deltas are combined inside it."""

    @torch.no_grad()
    def step(self, closure, local_step):
        if not self.active:
            return local_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, p in self.named:
            if id(p) not in self.pending:
                self._launch(name, p)
        for _, p in self.named:
            handle, start, ctx = self.pending.pop(id(p))
            p.copy_(start + self.compressor.decompress(handle.wait(), ctx))
            self.counts[id(p)] = 0
        return loss

    def zero_grad_done(self) -> None:
        if self.pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause a "
                                 "race condition.")
