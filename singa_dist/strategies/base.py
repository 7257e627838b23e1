"""The contract between DistributedOptimizer and a training framework."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import primitives, runtime
from ..collectives import Average, Sum
from ..compression import SparseCompressor
from ..compression import resolve as resolve_compression
from ..environment import autotune_requested
from ..shards import is_feature_split
from ..topology import strategy_kind
from .buckets import BucketTuner

# The numbers of messages per server that messages_per_server="auto" tries (those that cut the pushes differently).
AUTOTUNE_MESSAGES = (1, 2, 4, 8)


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

    messages_per_server = 1  # messages each push to one server is cut into (after set-up: the number in use)
    autotune = False
    autotune_log: list = []
    tuner: BucketTuner | None = None

    def _init_messages(self, messages_per_server, autotune_messages, autotune_warmup: int, autotune_steps: int):
        """Check and keep the push's message count (a number, None for 1, or "auto") and autotune's settings."""
        if messages_per_server is not None and messages_per_server != "auto" and (
                isinstance(messages_per_server, bool) or not isinstance(messages_per_server, int)
                or messages_per_server < 1):
            raise ValueError(f"messages_per_server must be a positive integer, None or 'auto', got "
                             f"{messages_per_server!r}")
        candidates = tuple(sorted({int(m) for m in autotune_messages}))
        if not candidates or candidates[0] < 1:
            raise ValueError(f"autotune_messages must be positive integers, got {autotune_messages!r}")
        if autotune_warmup < 1 or autotune_steps < 1:
            raise ValueError(f"autotune_warmup and autotune_steps must be at least 1, got {autotune_warmup}, "
                             f"{autotune_steps}")
        self.autotune = messages_per_server == "auto" or (messages_per_server is None and autotune_requested())
        self.messages_per_server = 1 if messages_per_server in (None, "auto") else messages_per_server
        self.autotune_messages = candidates
        self.autotune_warmup, self.autotune_steps = int(autotune_warmup), int(autotune_steps)
        self.autotune_log = []  # the counts tried: messages_per_server, step_ms, times_ms (see _tune_step)
        self.tuner = None

    # ------------------------------------------------------------------------------------------ autotune
    def _start_messages(self, tune_group, tune_size: int, reports: bool) -> None:
        """After set-up: use the fixed count, or start tuning it. `tune_group` (None: every worker) and its
        `tune_size` members agree on the choice, and the process with `reports` prints it."""
        client = getattr(self, "client", None)
        if not self.autotune:
            if client is not None:
                client.set_messages(self.messages_per_server)
            return
        self.tune_group, self.tune_size, self.reports = tune_group, tune_size, reports
        from ..ps.slicing import message_runs, slice_params  # the server code loads with a PS strategy only
        topo = runtime.topology()
        slices = slice_params([(n, p.numel()) for n, p in self.named], topo.nservers_per_group, topo.nserver_groups)
        by_server = [[s for s in slices if s.server == i] for i in range(topo.nservers_per_group)]
        counts, seen = [], set()
        # A sparse compression's selection spans a whole push: it always goes as one message per server.
        for m in (1,) if isinstance(self.compression, SparseCompressor) else self.autotune_messages:
            key = tuple(tuple(message_runs(mine, m)) for mine in by_server)
            if key not in seen:
                seen.add(key)
                counts.append(m)
        self.messages_per_server = counts[0]
        if len(counts) == 1:  # every count cuts the pushes alike: nothing to measure
            self.autotune_log = [{"messages_per_server": counts[0], "step_ms": None}]
        else:
            self.tuner = BucketTuner(counts, self.autotune_warmup, self.autotune_steps)
        if client is not None:
            client.set_messages(self.messages_per_server)

    def _tune_step(self) -> None:
        """At the end of a step: time it; after a count's last step, use the next count or settle on the fastest."""
        tuner = self.tuner
        if not tuner.step_done(time.perf_counter()):
            return
        self.autotune_log.append({"messages_per_server": tuner.candidate, "step_ms": None,
                                  "times_ms": list(tuner.times_ms[tuner.trial])})
        if tuner.advance():
            self._use_messages(tuner.candidate)
            return
        # Every member takes the same decision from the same numbers: the largest median of each count.
        medians = torch.tensor(tuner.medians_ms(), dtype=torch.float64)
        if self.tune_size > 1:
            primitives.all_reduce(medians, f"autotune: the step times of {tuner.candidates} messages per server",
                                  op=dist.ReduceOp.MAX, group=self.tune_group)
        step_ms = medians.tolist()
        for entry, ms in zip(self.autotune_log, step_ms):
            entry["step_ms"] = ms
        self.tuner = None
        self._use_messages(tuner.candidates[tuner.best(step_ms)])
        if self.reports:
            tried = ", ".join(f"{e['messages_per_server']} {e['step_ms']:.2f} ms" for e in self.autotune_log)
            print(f"[singa autotune] {self.name} messages_per_server={self.messages_per_server}: median step time "
                  f"{tried} ({self._tune_who()}, {tuner.steps} steps each after {tuner.warmup} warm-up)", flush=True)

    def _tune_who(self) -> str:
        return f"slowest of {self.tune_size} workers" if self.tune_size > 1 else "1 worker"

    def _use_messages(self, messages: int) -> None:
        self.messages_per_server = messages
        client = getattr(self, "client", None)
        if client is not None:
            client.set_messages(messages)

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


def check_remedies(staleness_lr, momentum_correction, **more) -> tuple[bool, ...]:
    """The asynchronous frameworks' remedies for asynchrony (see ps.server.asynchronous_step; `more`: a strategy's
    own, such as Downpour's dana): on or off."""
    for name, value in (("staleness_lr", staleness_lr), ("momentum_correction", momentum_correction), *more.items()):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    return (staleness_lr, momentum_correction, *more.values())


def check_relative_clip(ratio) -> float | None:
    """The asynchronous frameworks' relative gradient clip (ps.server.relative_clip_factor): None (off) or a ratio
    above 1 to the running mean of the gradient norms."""
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1):
        raise ValueError(f"relative_clip must be None or a number above 1 (times the running mean of the gradient "
                         f"norms), got {ratio!r}")
    return None if ratio is None else float(ratio)
