"""The contract between DistributedOptimizer and a training framework."""
from __future__ import annotations

import torch

from .. import runtime
from ..collectives import Average, Sum
from ..compression import resolve as resolve_compression
from ..shards import is_feature_split
from ..topology import strategy_kind


class Strategy:
    """How one framework synchronises training. DistributedOptimizer calls, in this order:

    1. `setup(optimizer, named_parameters, backward_passes_per_step=..., compression=..., op=...)` once;
    2. `grad_ready(name, param)` from a hook each time a parameter's `.grad` has been accumulated in a
       backward pass (communication may start here, overlapping the rest of the backward);
    3. `synchronize()` when the user asks for the synchronised gradients (e.g. to clip them), and
    4. `step(closure, local_step)` for every optimizer step: `local_step(closure)` runs the wrapped
       torch optimizer's own update on this process; a parameter-server strategy sends the gradients to
       the servers and pulls the new values instead.
    `state_dict()`/`load_state_dict()` carry the strategy's own state (the servers' parameters and
    optimizer state for a parameter-server strategy) for checkpoints; `close()` releases resources.
    `traffic()` and `staleness_log()` are what `stats()` reads (singa_dist.metrics, docs/metrics.md).
    """

    name = "base"
    allows_skip_synchronize = True  # optimizer.skip_synchronize() means something for this framework
    meter = None  # the metrics.Meter DistributedOptimizer gives the strategy it trains with

    def stats(self) -> dict:
        """What this strategy's optimizer has done: steps and bytes since it was made, and with metrics on
        (singa-launch --metrics, SINGA_METRICS, DistributedOptimizer(metrics=...)) the rates of the latest
        window: steps/s, samples/s, the share of time spent waiting on communication, bytes per step and the
        parameter servers' staleness. Rates are None until measured (metrics off, or no step yet)."""
        if self.meter is None:
            raise RuntimeError(f"stats(): this {type(self).__name__} strategy is not in a DistributedOptimizer yet")
        return self.meter.stats()

    def set_batch_size(self, n: int) -> None:
        """Samples per backward pass on this worker, for samples/s (otherwise counted from the model's forward)."""
        if self.meter is None:
            raise RuntimeError(f"set_batch_size(): this {type(self).__name__} strategy is not in a "
                               "DistributedOptimizer yet")
        self.meter.set_batch_size(n)

    def traffic(self) -> tuple[int, int]:
        """Payload bytes this process has sent and received for training since set-up (the size of the tensors
        handed to the exchanges; a ring all-reduce moves about 2(n-1)/n of that each way)."""
        return 0, 0

    def staleness_log(self) -> list[int] | None:
        """For each update this process pushed to parameter servers, how many versions behind the values it
        computed on were; None for a strategy without servers."""
        return None

    def setup(self, optimizer: torch.optim.Optimizer, named_parameters: list[tuple[str, torch.nn.Parameter]],
              *, backward_passes_per_step: int = 1, compression=None, op=None) -> None:
        raise NotImplementedError

    def grad_ready(self, name: str, param: torch.nn.Parameter) -> None:
        """Called after `param.grad` was accumulated in a backward pass. Default: nothing to start early."""

    def synchronize(self) -> None:
        raise NotImplementedError

    def step(self, closure, local_step):
        raise NotImplementedError

    def zero_grad_done(self) -> None:
        """Called after the optimizer's zero_grad()."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} strategy keeps no state, got keys {sorted(state)}")

    def close(self) -> None:
        """Release communication resources; called by singa_dist.shutdown()."""


class ParameterServerStrategy(Strategy):
    """What the parameter-server frameworks (Sandblaster, Downpour, Hybrid, Hogwild) share."""

    def _begin_setup(self, optimizer, named_parameters, compression, op) -> bool:
        """Record the optimizer and parameters; True when this process trains alone (no job to talk to).
        In a job, the job's topology must be one this framework runs on (the strategy table says which)."""
        self.compression = resolve_compression(compression)  # what goes to the servers (a lone process sends none)
        self.optimizer = optimizer
        self.named = list(named_parameters)
        split = [n for n, p in self.named if is_feature_split(p)]
        if split:
            # The servers hold one copy of each parameter; a shard differs on every worker.
            raise ValueError(f"the {self.name} strategy cannot train feature-split parameters ({', '.join(split[:3])}"
                             f"{', ...' if len(split) > 3 else ''}) of a partitioned model; use AllReduce")
        self.average = check_op(op, self.name) is not Sum
        # A lone process is its own server: the same updates, with no one to talk to.
        self.local = not runtime.is_initialized() or runtime.proc_size() == 1
        if not self.local:
            topology = runtime.topology()
            unfit = strategy_kind(self.name).unfit(topology)
            if unfit:
                if topology.strategy != self.name:
                    unfit += (f" (this job was started for {topology.strategy}: start it with "
                              f"`singa-launch --strategy {self.name} ...`)")
                raise RuntimeError(unfit)
        return self.local

    @staticmethod
    def _run_closure(closure):
        """Evaluate the user's closure (loss and backward) before the gradients go to the servers."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    group_bytes_sent = 0  # exchanges inside the worker group (all-reduce of gradients, broadcast of values)
    group_bytes_received = 0

    def traffic(self) -> tuple[int, int]:
        return (self.bytes_sent_total + self.group_bytes_sent, self.bytes_received_total + self.group_bytes_received)

    def staleness_log(self) -> list[int] | None:
        client = getattr(self, "client", None)
        return client.staleness_seen if client is not None else []

    @property
    def bytes_sent_last_step(self) -> int:
        """Gradient payload bytes this process pushed to the servers in its last step (0 if it pushes none)."""
        client = getattr(self, "client", None)
        return client.bytes_sent_last_step if client is not None else 0

    @property
    def bytes_sent_total(self) -> int:
        client = getattr(self, "client", None)
        return client.bytes_sent_total if client is not None else 0

    @property
    def bytes_received_total(self) -> int:
        """Bytes of parameter values this process received from the servers."""
        client = getattr(self, "client", None)
        return client.bytes_received_total if client is not None else 0


def check_op(op, strategy: str):
    """The op gradients are combined with: sd.Average (the default) or sd.Sum."""
    op = Average if op is None else op
    if op is not Average and op is not Sum:
        raise ValueError(f"the {strategy} strategy combines gradients with sd.Average or sd.Sum, got {op!r}")
    return op
