"""DistributedOptimizer: wraps any torch.optim optimizer so that its steps follow a SINGA training framework.

The wrapper is the user's own optimizer object, re-classed to a subclass of its class (so `isinstance`,
learning-rate schedulers and `param_groups` keep working) whose gradient hooks hand each gradient to the
strategy as soon as backward has accumulated it, and whose `step()` lets the strategy finish.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import metrics as _metrics
from . import runtime, strategies, timeline
from .collectives import Adasum, Average
from .coordinator import global_process_set
from .functions import check_consistency
from .strategies.allreduce import AllReduce


class _DistributedOptimizer:
    """Mixed in front of the user's optimizer class by DistributedOptimizer()."""

    def _singa_setup(self, named_parameters, strategy, compression, backward_passes_per_step, op, interval=None):
        named = _named_parameters(self, named_parameters)
        # Before any training: workers with different models would otherwise hang or mix data later. (Workers of
        # an elastic job start at different times: they check when they meet, in the state's sync.)
        # A replacement worker group of an asynchronous job is checked by the servers as it opens their tables.
        if not runtime.is_elastic() and not runtime.is_replacement():
            check_consistency(named, "parameter")
        self._singa_strategy = strategy
        self._singa_named = named
        self._singa_skip_sync = False
        self._singa_user_synced = False
        self._singa_strategy.setup(self, named, backward_passes_per_step=backward_passes_per_step,
                                   compression=compression, op=op)
        report = interval is not None and (not runtime.is_initialized() or runtime.rank() == 0)
        self._singa_meter = strategy.meter = _metrics.Meter(
            strategy, interval, params=[p for _, p in named], passes=backward_passes_per_step, report=report,
            path=(os.environ.get(_metrics.FILE_VARIABLE) or None) if report else None)
        if interval is not None:
            runtime.on_shutdown(self._singa_meter.close)  # the last window's report
        self._singa_hooks = []
        self._singa_backward = [0, 0]  # timeline: the first gradient hook's start and the latest one's end
        for name, p in named:
            if p.requires_grad:
                self._singa_hooks.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._singa_timed_grad_ready(name, param) if timeline.on
                    else self._singa_strategy.grad_ready(name, param)))

    def _singa_timed_grad_ready(self, name, param) -> None:
        """A gradient hook while the timeline records: the backward span runs from the first gradient hook of the
        step to the end of the last one."""
        backward = self._singa_backward
        if not backward[0]:
            backward[0] = timeline.now()
        self._singa_strategy.grad_ready(name, param)
        timeline.poll()
        backward[1] = timeline.now()

    @property
    def strategy(self) -> strategies.Strategy:
        return self._singa_strategy

    def synchronize(self) -> None:
        """Wait for the gradients' communication; afterwards `.grad` holds the synchronised gradients."""
        self._singa_strategy.synchronize()
        self._singa_user_synced = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside this block step() does not synchronise again (call synchronize() before it yourself)."""
        if not self._singa_strategy.allows_skip_synchronize:
            raise AssertionError("Skipping synchronization is not supported when using Adasum optimizer.")
        self._singa_skip_sync = True
        try:
            yield
        finally:
            self._singa_skip_sync = False

    def step(self, closure=None):
        parent = super(_DistributedOptimizer, self)
        if self._singa_user_synced and not self._singa_skip_sync:
            warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                          "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                          "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your "
                          "code.", stacklevel=2)
        self._singa_user_synced = False
        runtime.count_step()
        if timeline.on:
            result = self._singa_timed_step(closure, parent)
        else:
            result = self._singa_strategy.step(closure, parent.step)
        meter = self._singa_meter
        meter.steps += 1
        if meter.timed:
            meter.step_done()
        return result

    def _singa_timed_step(self, closure, parent):
        """step() while the timeline records: the backward pass that ended, this step, its local update."""
        t0 = timeline.now()
        backward = self._singa_backward
        if backward[0]:
            timeline.record("backward", backward[0], backward[1])
            backward[0] = backward[1] = 0
        if timeline.mark_cycles():
            timeline.instant("step")

        def local_step(closure=None):
            start = timeline.now()
            result = parent.step(closure)
            timeline.span("update", start)
            return result

        try:
            return self._singa_strategy.step(closure, local_step)
        finally:
            timeline.step_done(t0)

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        self._singa_strategy.zero_grad_done()

    def state_dict(self):
        state = super().state_dict()
        extra = self._singa_strategy.state_dict()
        if extra:
            state["singa_strategy"] = extra
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("singa_strategy", {})
        super().load_state_dict(state_dict)
        self._singa_strategy.load_state_dict(extra)

    def remove_hooks(self) -> None:
        for hook in self._singa_hooks:
            hook.remove()
        self._singa_hooks = []


def _named_parameters(optimizer: torch.optim.Optimizer, named_parameters) -> list[tuple[str, torch.nn.Parameter]]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return [(f"param.{i}", p) for i, p in enumerate(params)]
    if isinstance(named_parameters, torch.nn.Module):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         "model.named_parameters(); got the model itself")
    named = list(named_parameters)
    # As Horovod checks: a bare parameter would otherwise be unpacked along its first dimension.
    odd = next((item for item in named if not (isinstance(item, tuple) and len(item) == 2
                                               and isinstance(item[0], str))), None)
    if odd is not None:
        what = "a parameter" if isinstance(odd, torch.Tensor) else f"a {type(odd).__name__}"
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         f"model.named_parameters(); got {what} among them (model.parameters() gives no names)")
    names = [n for n, _ in named]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"named_parameters has duplicate names: {', '.join(dup)}")
    given = {id(p) for _, p in named}
    unnamed = [i for i, p in enumerate(params) if id(p) not in given]
    if unnamed:
        raise ValueError(
            f"named_parameters does not name {len(unnamed)} of the optimizer's parameters (indices {unnamed[:5]}): "
            "pass model.named_parameters() for the model the optimizer updates")
    in_opt = {id(p) for p in params}
    # Keep the optimizer's own order: every rank then walks its parameters identically.
    by_id = {id(p): n for n, p in named if id(p) in in_opt}
    return [(by_id[id(p)], p) for p in params]


_classes: dict[type, type] = {}


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None, strategy=None,
                         compression=None, backward_passes_per_step: int = 1, op=Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                         sparse_as_dense: bool = False, process_set=global_process_set, metrics=None):
    """Make `optimizer` distributed; returns the same object, now an instance of a subclass of its class.

    strategy: "allreduce", "adasum", "partial_update", "sandblaster", "downpour", "hogwild", "hybrid", a
              Strategy object (e.g. sd.AllReduce(bucket_mb=8)), or None for the strategy the launcher was given.
    compression: gradient compression for strategies that communicate gradients (sd.Compression.*).
    backward_passes_per_step: gradients are accumulated locally over this many backward passes and
              communicated once.
    op: sd.Average (default) or sd.Sum over the workers' gradients; sd.Adasum combines each worker's update
              with Horovod's Adasum (the "adasum" strategy).
    Horovod's arguments, for the allreduce strategy: gradient_predivide_factor f divides the gradients by f
    before the sum and multiplies them by f/size after it (op=Average only); groups (an int, or lists of
    parameters each fused into one message; num_groups is its older name); sparse_as_dense (sparse gradients
    travel densely); process_set (average over that set's workers; the others train on their own).
    metrics: seconds between live-metrics reports (`optimizer.strategy.stats()`, and on rank 0 a printed line
              and a CSV row, see docs/metrics.md); None: SINGA_METRICS (singa-launch --metrics) decides; 0: off.
    """
    runtime.require_init("DistributedOptimizer()")
    interval = (_metrics.interval_from_environment() if metrics is None
                else _metrics.parse_interval(metrics, "DistributedOptimizer(metrics=...)"))
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("this optimizer is already a DistributedOptimizer")
    strategy = _make_strategy(strategy, op, backward_passes_per_step, gradient_predivide_factor, num_groups,
                              groups, sparse_as_dense, process_set)
    if strategy.name == "adasum" and op is Average:
        op = Adasum  # the default op under `singa-launch --strategy adasum` (or strategy="adasum"): Adasum is its op
    base = type(optimizer)
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(base.__name__, (_DistributedOptimizer, base),
                                    {"__doc__": base.__doc__, "_singa_user_class": base})
    optimizer.__class__ = cls
    try:
        optimizer._singa_setup(named_parameters, strategy, compression, backward_passes_per_step, op, interval)
    except BaseException:
        optimizer.__class__ = base
        raise
    _settle_the_job_strategy(strategy.name)
    return optimizer


def _settle_the_job_strategy(name: str) -> None:
    """The script's strategy wins over the one the job was started for: say so, and let separate parameter
    servers that this strategy does not use go now instead of idling until the end (every worker makes the
    same DistributedOptimizer at the same point, so they all let them go together)."""
    topology = runtime.topology()
    started_for = runtime.job_strategy()
    runtime.note_strategy(name)
    if name == started_for or not runtime.is_distributed():
        return
    kind = topology.kind
    if started_for != "allreduce" or kind.parameter_servers:
        warnings.warn(f"this job was started for the {started_for} strategy (singa-launch --strategy, SINGA_STRATEGY "
                      f"or sd.init(strategy=...)) but this DistributedOptimizer trains with {name}: the script's "
                      "choice is used", stacklevel=3)
    mine = strategies.STRATEGIES.get(name)
    if topology.server_worker_separate and topology.nservers and not (mine and mine.parameter_servers):
        from .ps import transport
        transport.release_servers()


def _make_strategy(strategy, op, backward_passes_per_step, gradient_predivide_factor, num_groups, groups,
                   sparse_as_dense, process_set) -> strategies.Strategy:
    """The strategy object, with Horovod's arguments checked as Horovod checks them and handed to AllReduce."""
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step <= 0:
        raise ValueError(f"backward_passes_per_step must be > 0 (a whole number of backward passes), "
                         f"got {backward_passes_per_step!r}")
    if gradient_predivide_factor != 1.0 and op is not Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning, stacklevel=3)
        groups = num_groups if groups is None else groups
    options = {}
    if gradient_predivide_factor != 1.0:
        options.update(prescale_factor=1.0 / gradient_predivide_factor, postscale_factor=gradient_predivide_factor)
    if groups is not None:
        options["groups"] = groups
    if sparse_as_dense:
        options["sparse_as_dense"] = True
    if process_set is not None and process_set is not global_process_set:
        options["process_set"] = process_set
    if op is Adasum:
        if strategy not in (None, "adasum") and not isinstance(strategy, strategies.strategy_class("adasum")):
            raise ValueError(f"op=Adasum is the adasum strategy; it does not combine with strategy={strategy!r}")
        if "process_set" in options:
            raise NotImplementedError("Adasum does not support non-global process sets yet.")
        strategy = strategy if isinstance(strategy, strategies.Strategy) else "adasum"
        options = {}
    if isinstance(strategy, strategies.Strategy):
        if options:
            raise ValueError(f"{', '.join(sorted(options))} configure the allreduce strategy: give them to the "
                             f"strategy object (sd.AllReduce(...)), not to DistributedOptimizer as well")
        return strategy
    name = (strategy if strategy is not None else strategies.default_name()).lower()
    if options and name != "allreduce":
        raise ValueError(f"{', '.join(sorted(options))} configure the allreduce strategy, not {name}")
    return AllReduce(**options) if name == "allreduce" else strategies.make(name)


def _synchronize_before_unscale(unscale_):
    """GradScaler.unscale_ (and so GradScaler.step) must see the synchronised gradients, not local ones."""

    def patched(self, optimizer):
        if isinstance(optimizer, _DistributedOptimizer):
            optimizer.strategy.synchronize()
        return unscale_(self, optimizer)
    patched._singa_original = unscale_
    patched.__doc__ = unscale_.__doc__
    return patched


if not hasattr(torch.amp.GradScaler.unscale_, "_singa_original"):
    torch.amp.GradScaler.unscale_ = _synchronize_before_unscale(torch.amp.GradScaler.unscale_)
