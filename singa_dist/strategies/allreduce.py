"""AllReduce: synchronous data parallelism where every worker reduces a share (SINGA's AllReduce framework).

In SINGA's topology this is one worker group of n workers with one server beside each worker; here the
"servers" are the ring/tree of a torch.distributed all-reduce (Gloo on CPU, NCCL on GPU).

How a step goes:
- Parameters are fused into buckets of about `bucket_mb` MB (one dtype and device type per bucket), in the
  reverse of the optimizer's order, since backward produces the last layers' gradients first
  (`strategies/buckets.py`).
- Each gradient hook marks its parameter ready; a bucket is sent (asynchronous all-reduce on the workers'
  group) as soon as it and every earlier bucket are ready, so buckets go out in the same order on every rank
  and communication overlaps the rest of the backward pass.
- When the backward pass ends (an autograd engine callback, as DDP's reducer), `synchronize()` sends whatever is
  left, with zeros for parameters that got no gradient on this rank (a parameter unused on some ranks therefore
  counts as zero there, and nothing deadlocks), waits, and writes the reduced gradients back to `.grad`: what
  runs between `backward()` and `step()` (clipping, GradScaler.unscale_, logging) sees them. An explicit
  `synchronize()` then costs nothing; `step()` calls it only when no backward pass finished the round.
- With `backward_passes_per_step=k` a parameter is ready after its k-th gradient of the step: gradients are
  summed locally over the k passes (as `.grad` accumulation does) and communicated once, at the end of the k-th
  pass. A pass more before `step()` raises Horovod's AssertionError.
- Feature-split parameters of a partitioned model (singa_dist.partition) are not replicated: they are not
  communicated, and under Average their gradient (that of every worker's loss) is divided by the number of ranks.

Compression (`compression=`): dense ones (none, fp16, bf16, Horovod-style compressors) change the dtype on
the wire; sparse ones (topk, threshold) send chosen elements and their indices with an all-gather, and keep
the rest as a local residual added to the next step (error feedback). The residual is part of the
optimizer's `state_dict()` (this rank's, by parameter name), so a restarted job continues with it.

Autotune (`bucket_mb="auto"`, `singa-launch --autotune`): during the first steps each candidate bucket size that
cuts the model differently is used for a few warm-up and a few measured steps; the ranks agree on the times (one
all-reduce of their medians, the largest counting) and keep the fastest. Buckets are re-planned only at the end
of a step, when no bucket is in flight, so the gradients are those of a fixed size.

Partial update (SINGA's `backward_and_partial_update`) is its own strategy beside this one:
`singa_dist.strategies.partial_update` (`AllReduce(partial_update_chunks=n)` gives it too).
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from .. import coordinator, primitives, runtime, timeline
from ..collectives import Average, Sum, allreduce, sparse_allreduce_async
from ..compression import SparseCompressor, load_residual_state, residual_state
from ..compression import resolve as resolve_compression
from ..environment import autotune_requested, fusion_threshold_mb
from ..shards import is_feature_split
from .base import Strategy, check_op
from .buckets import AUTOTUNE_SIZES_MB, DEFAULT_BUCKET_MB, Bucket, BucketTuner, layout, plan_buckets, plan_groups


class _DenseExchange:
    """All-reduce of a bucket, possibly in a cheaper dtype. The buffer arrives already divided by the number
    of ranks for Average (so that a sum of many ranks cannot overflow fp16 either)."""

    def __init__(self, bucket: Bucket, compressor, pg):
        self.bucket, self.compressor = bucket, compressor
        t0 = timeline.now() if timeline.on else 0
        self.wire, self.ctx = compressor.compress(bucket.buffer)
        if t0 and self.wire is not bucket.buffer:
            timeline.span("compress", t0, tensor=bucket.description)
        self.bytes_sent = self.bytes_received = self.wire.numel() * self.wire.element_size()
        self.handle = primitives.all_reduce(self.wire, bucket.description, group=pg, async_op=True)
        self.comm = timeline.CommSpan(self.handle, bucket.description) if t0 else None

    def finish(self) -> None:
        self.handle.wait()
        if self.comm is not None:
            self.comm.done()
        t0 = timeline.now() if timeline.on else 0
        out = self.compressor.decompress(self.wire, self.ctx)
        if out is not self.bucket.buffer:
            self.bucket.buffer.copy_(out)
            if t0:
                timeline.span("decompress", t0, tensor=self.bucket.description)


class _SparseExchange:
    """Top-k or threshold sparsification with error feedback: all-gather (indices, values) of every rank."""

    def __init__(self, bucket: Bucket, compressor: SparseCompressor, op, size: int, pg, residual=None):
        self.bucket, self.op, self.size, self.pg = bucket, op, size, pg
        flat = bucket.buffer
        if compressor.error_feedback and bucket.residual is None and residual is None:
            bucket.residual = torch.zeros_like(flat)
        t0 = timeline.now() if timeline.on else 0
        self.index, self.values = compressor.sparsify(flat, bucket.residual if residual is None else residual)
        if t0:
            timeline.span("compress", t0, tensor=bucket.description)
        self.comm = timeline.CommSpan(None, bucket.description, "allgather") if t0 else None
        self.fixed = hasattr(compressor, "count")  # top-k sends the same count everywhere
        self.counts = None
        self.bytes_sent = self.bytes_received = 0
        if self.fixed:
            self._gather(self.values.numel())
        else:  # first agree on the largest count, then pad to it
            self.count = torch.tensor([self.values.numel()], dtype=torch.int64, device=flat.device)
            self.counts = torch.empty(size, dtype=torch.int64, device=flat.device)
            self.bytes_sent += self.count.element_size()
            self.bytes_received += self.counts.numel() * self.counts.element_size()
            self.handles = [primitives.all_gather_into(self.counts, self.count, bucket.description, group=pg,
                                                       async_op=True)]

    def _gather(self, most: int) -> None:
        values, index = self.values, self.index
        if values.numel() < most:
            pad = most - values.numel()
            values = torch.cat([values, values.new_zeros(pad)])
            index = torch.cat([index, index.new_zeros(pad)])  # zeros added at index 0 change nothing
        self.bytes_sent += values.numel() * values.element_size() + index.numel() * index.element_size()
        self.all_values = values.new_empty(most * self.size)
        self.all_index = index.new_empty(most * self.size)
        self.bytes_received += (self.all_values.numel() * self.all_values.element_size()
                                + self.all_index.numel() * self.all_index.element_size())
        what = self.bucket.description
        self.handles = [primitives.all_gather_into(self.all_values, values, what, group=self.pg, async_op=True),
                        primitives.all_gather_into(self.all_index, index, what, group=self.pg, async_op=True)]

    def wait(self) -> None:
        for h in self.handles:
            h.wait()

    def second_stage(self) -> None:
        """Threshold only: once the counts are known, send the padded values and indices."""
        if self.counts is not None:
            self.wait()
            self._gather(int(self.counts.max()))
            self.counts = None

    def finish(self) -> None:
        self.wait()
        if self.comm is not None:
            self.comm.done()
        t0 = timeline.now() if timeline.on else 0
        buf = self.bucket.buffer
        buf.zero_().index_add_(0, self.all_index.long(), self.all_values)
        if self.op is Average:
            buf.div_(self.size)
        if t0:
            timeline.span("decompress", t0, tensor=self.bucket.description)


class AllReduce(Strategy):
    """Synchronous data parallelism by all-reduce of fused gradient buckets.

    bucket_mb: size of a fused bucket in MB (Horovod's fusion threshold, DDP's bucket_cap_mb); 0: no fusion, a
                 bucket per tensor. Default, when neither it, num_buckets nor groups is given: Horovod's
                 HOROVOD_FUSION_THRESHOLD (bytes; horovodrun's and singa-launch's --fusion-threshold-mb) where it
                 is set, else "auto" when SINGA_AUTOTUNE=1 (singa-launch --autotune; a threshold given holds the
                 size, as Horovod's autotune holds what was set), else 25 for CUDA tensors (DDP's choice for NCCL)
                 and 4 for CPU tensors, where smaller buckets overlap Gloo's all-reduce better with backward
                 (benchmarks/dist_overhead.py). "auto": the size is tuned during the first steps
                 (autotune_sizes_mb, each for autotune_warmup + autotune_steps steps), then fixed. After
                 set-up, `bucket_mb` is the size in use and `autotune_log` the sizes tried with their times.
    first_bucket_mb: the first bucket (the last layers, whose gradients come first) is smaller, so that
                 communication starts early in the backward pass (as DDP does).
    compression: sd.Compression.none/.fp16/.bf16/.topk(ratio)/.threshold(t) (or give it to DistributedOptimizer).
    partial_update_chunks: n > 0 gives SINGA's partial update instead: `PartialUpdate(chunks=n)`.
    num_buckets: instead of a size, cut the parameters into this many buckets of about equal bytes.
    groups: Horovod's: an int n (n buckets of near-equal parameter counts) or lists of parameters, each list
                 one bucket (every other parameter a bucket of its own).
    prescale_factor / postscale_factor: multiply gradients before / after the reduction (Horovod's
                 gradient_predivide_factor is prescale 1/f, postscale f).
    sparse_as_dense: sparse gradients (nn.Embedding(sparse=True)) travel densely in the buckets; otherwise each
                 is gathered as indices and values (Horovod's sparse allreduce) and stays sparse.
    process_set: average over the workers of this set only (the others train on their own).
    autotune_sizes_mb, autotune_warmup, autotune_steps: the candidate sizes of bucket_mb="auto" (those that
                 cut the model into the same buckets as a smaller one are skipped), the steps each one is
                 used before timing, and the steps timed (the median counts).
    """

    name = "allreduce"

    def __new__(cls, bucket_mb: float | str | None = None, compression=None, partial_update_chunks: int = 0,
                *args, **kwargs):
        if partial_update_chunks < 0:
            raise ValueError(f"partial_update_chunks must be 0 (off) or positive, got {partial_update_chunks}")
        if partial_update_chunks and cls is AllReduce:
            if args or kwargs:
                raise ValueError("partial update takes bucket_mb and compression only (it sends no gradients)")
            if bucket_mb == "auto":
                raise ValueError("partial update does not tune bucket_mb: give a size or None")
            from .partial_update import PartialUpdate
            return PartialUpdate(partial_update_chunks, bucket_mb=bucket_mb, compression=compression)
        return super().__new__(cls)

    def __init__(self, bucket_mb: float | str | None = None, compression=None, partial_update_chunks: int = 0,
                 num_buckets: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                 first_bucket_mb: float = 1.0, groups=None, sparse_as_dense: bool = False, process_set=None,
                 autotune_sizes_mb=AUTOTUNE_SIZES_MB, autotune_warmup: int = 2, autotune_steps: int = 8):
        if isinstance(bucket_mb, str) and bucket_mb != "auto":
            raise ValueError(f"bucket_mb must be a size in MB, None or 'auto', got {bucket_mb!r}")
        if bucket_mb == "auto" and (num_buckets is not None or groups is not None):
            raise ValueError("bucket_mb='auto' tunes the bucket size: it does not combine with num_buckets or groups")
        unset = bucket_mb is None and num_buckets is None and groups is None
        threshold = fusion_threshold_mb() if unset else None
        self.autotune = bucket_mb == "auto" or (unset and threshold is None and autotune_requested())
        if bucket_mb == "auto":
            bucket_mb = None
        if threshold is not None:
            bucket_mb = threshold
        sizes = tuple(float(x) for x in autotune_sizes_mb)
        if not sizes or any(not x > 0 for x in sizes):
            raise ValueError(f"autotune_sizes_mb must be sizes above 0, got {autotune_sizes_mb!r}")
        if autotune_warmup < 1 or autotune_steps < 1:
            raise ValueError(f"autotune_warmup and autotune_steps must be at least 1, got {autotune_warmup}, "
                             f"{autotune_steps}")
        self.autotune_sizes_mb = tuple(sorted(set(sizes)))
        self.autotune_warmup, self.autotune_steps = int(autotune_warmup), int(autotune_steps)
        self.autotune_log: list[dict] = []  # the sizes tried: bucket_mb, buckets, step_ms (see _tune_step)
        self.tuner: BucketTuner | None = None
        if (bucket_mb is not None and not bucket_mb >= 0) or not first_bucket_mb > 0:
            raise ValueError(f"bucket_mb must be 0 or more and first_bucket_mb positive, got {bucket_mb}, "
                             f"{first_bucket_mb}")
        if num_buckets is not None and num_buckets < 1:
            raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
        if groups is not None and not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
            raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
        self.bucket_mb = None if bucket_mb is None else float(bucket_mb)  # after set-up: the size in use
        self.planned_mb = self.bucket_mb  # what the buckets are planned with (None: each device's default)
        self.first_bucket_mb = float(first_bucket_mb)
        self.compression = compression
        self.num_buckets = num_buckets
        self.groups = groups
        self.prescale_factor = float(prescale_factor)
        self.postscale_factor = float(postscale_factor)
        self.sparse_as_dense = bool(sparse_as_dense)
        self.process_set = process_set
        self.bytes_sent_last_step = 0  # payload bytes this rank put on the wire in the last synchronize()
        self.bytes_sent_total = 0
        self.bytes_received_total = 0  # ...and got back (the reduced buckets; every rank's part when gathered)
        self.optimizer = None

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        if self.optimizer is not None:
            raise RuntimeError("this AllReduce strategy already serves an optimizer; create one per optimizer")
        self.op = check_op(op, self.name)
        if compression is not None and self.compression is not None and compression is not self.compression:
            raise ValueError(f"compression given twice: {self.compression!r} to AllReduce and {compression!r} "
                             "to DistributedOptimizer")
        self.compressor = resolve_compression(compression if compression is not None else self.compression)
        self.optimizer = optimizer
        self.passes = int(backward_passes_per_step)
        self._bind()
        if self.active:
            runtime.on_shutdown(self.close, weak=True)  # lets go of the process group, see close()
        if runtime.is_elastic():
            runtime.on_reset(self._rejoin, phase="join", weak=True)
        # Feature-split parameters (singa_dist.partition) are not replicated: never all-reduced.
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.named = [(n, p) for n, p in named if not is_feature_split(p)]
        self.feature_split = {id(p): p for _, p in named if is_feature_split(p)}
        self.sparse: dict[int, str] = {}  # parameters whose gradients are sparse -> their names
        self.dense_seen: set[int] = set()  # parameters seen with a dense gradient
        self.sparse_handles: dict[int, object] = {}
        self._plan()
        if self.autotune and self.active:
            self._start_tuning()
        self.counts = {id(p): 0 for _, p in self.named}
        self.next_launch = 0
        self.synced = False  # synchronize() ran since the last gradient arrived
        self.round_open = False  # some gradient arrived since the last synchronize()
        self.round = None  # this round's announcement to the other ranks (see coordinator.GradientRound)
        self.rounds = 0
        self.finish_task = -1  # the backward pass (autograd graph task) at whose end this round finishes
        self.awaiting_step = False  # a backward pass finished the round; step() has not come yet
        self.average_over_active = False  # inside sd.join(): Average over the ranks that have not joined
        self.replicas_checked = runtime.is_elastic()  # (an elastic job's state.sync() makes them one)

    def _bind(self) -> None:
        """The ranks this strategy reduces over, and their groups (again after an elastic job's reset())."""
        self.set = coordinator.resolve_set(self.process_set)
        self.active = primitives.is_active() and bool(self.set.included()) and (self.set.size() or 1) > 1
        self.size = self.set.size() if self.active else 1
        self.engine = coordinator.engine_of(self.set) if self.active else None
        self.pg = self.engine.strategy_pg if self.active else None

    def _rejoin(self) -> None:
        """An elastic job moved to a new round: reduce over its workers from the next step on; the round in
        progress (rolled back by singa_dist.elastic) is forgotten."""
        self._bind()
        for bucket in self.buckets:
            bucket.exchange = None
        self.sparse_handles = {}
        self.counts = {id(p): 0 for _, p in self.named}
        self.next_launch = 0
        self.synced = False
        self.round_open = False
        self.round = None
        self.finish_task = -1
        self.awaiting_step = False
        if self.active:
            coordinator.register_round_owner(self.plan_hash, self)

    def _plan(self) -> None:
        """Buckets of the parameters whose gradients are dense (sparse ones travel on their own)."""
        dense = [(n, p) for n, p in self.named if id(p) not in self.sparse]
        if self.groups is not None:
            self.buckets = plan_groups(dense, self.groups)
        else:
            self.buckets = plan_buckets(dense, bucket_mb=self.planned_mb, first_bucket_mb=self.first_bucket_mb,
                                        num_buckets=self.num_buckets)
        if self.planned_mb is not None:
            self.bucket_mb = self.planned_mb
        elif self.num_buckets is None and self.groups is None and self.buckets:
            self.bucket_mb = DEFAULT_BUCKET_MB.get(self.buckets[0].device.type, 25.0)
        self.bucket_of = {id(p): b for b in self.buckets for _, p in b.params}
        self.plan_hash = coordinator.signature_hash(
            tuple((b.dtype, tuple(b.numels), tuple(n for n, _ in b.params)) for b in self.buckets) +
            (self.compressor.name, self.op.name, self.passes, tuple(sorted(self.sparse.values()))))
        if self.buckets:
            more = len(self.buckets) - 1
            self.round_label = self.buckets[0].description + (f" and {more} more bucket{'s' * (more > 1)}"
                                                               if more else "")
        else:
            self.round_label = "a gradient step (no dense gradients)"
        if self.active:
            coordinator.register_round_owner(self.plan_hash, self)

    # ----------------------------------------------------------------------------------------- backward
    def _open_round(self) -> None:
        """The first gradient of a round: tell the other ranks (a joined rank then takes part with zeros)."""
        self.synced = False
        self.round_open = True
        self.rounds += 1
        self.round = coordinator.submit(coordinator.GradientRound(self.plan_hash, self.rounds, self.round_label),
                                        self.set)

    def grad_ready(self, name, param):
        if not self.active:
            return
        key = id(param)
        if self.awaiting_step:
            self._too_many_passes(name, self.passes + 1)
        if not self.round_open:
            self._open_round()
        task = torch._C._current_graph_task_id()
        if task != self.finish_task and task >= 0:
            # As DDP's reducer: the round finishes when this backward pass does, so that what runs between
            # backward() and step() (clipping, GradScaler.unscale_, logging) sees the reduced gradients.
            self.finish_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        if key in self.feature_split:
            return
        count = self.counts[key] + 1
        if count > self.passes:
            self._too_many_passes(name, count)
        self.counts[key] = count
        if count < self.passes:
            return
        if key in self.sparse or (key not in self.dense_seen and self._first_sparse(key, param)):
            self._sparse_ready(name, param)
            return
        bucket = self.bucket_of[key]
        bucket.pending -= 1
        if bucket.pending == 0 and bucket.index == self.next_launch:
            self._launch_ready()

    def _first_sparse(self, key: int, param) -> bool:
        """Whether a parameter's gradient is sparse (and travels so); a parameter once seen with a dense gradient
        is not asked again (its layout does not change from step to step)."""
        if param.grad is not None and param.grad.is_sparse and not self.sparse_as_dense:
            return True
        if param.grad is not None and not param.grad.is_sparse:
            self.dense_seen.add(key)
        return False

    def _too_many_passes(self, name: str, count: int) -> None:
        raise AssertionError(
            "Gradients were computed more than backward_passes_per_step times before call to step(). Increase "
            f"backward_passes_per_step to accumulate gradients locally. (rank {runtime.rank()}: parameter "
            f"'{name}' got its gradient in {count} backward passes, backward_passes_per_step={self.passes})")

    def _backward_done(self) -> None:
        """The end of a backward pass that produced gradients: after the step's last pass (backward_passes_per_step),
        the round is finished now and `.grad` holds the reduced gradients."""
        self.finish_task = -1
        if self.round_open and not self.synced and max(self.counts.values(), default=self.passes) >= self.passes:
            self.synchronize()
            self.awaiting_step = True

    def _sparse_ready(self, name, param) -> None:
        """A sparse gradient is gathered as indices and values (Horovod's sparse allreduce)."""
        key = id(param)
        if key not in self.sparse:
            # First seen sparse (the same parameter on every rank, in the same round): from the next round on
            # it leaves its bucket; in this one its place there travels as zeros.
            self.sparse[key] = name
            bucket = self.bucket_of[key]
            bucket.pending -= 1
            self.replan = True
            if bucket.pending == 0 and bucket.index == self.next_launch:
                self._launch_ready()
        grad = param.grad if param.grad is not None else torch.zeros_like(param).to_sparse()
        self.sparse_handles[key] = sparse_allreduce_async(grad * self.prescale_factor if self.prescale_factor != 1
                                                          else grad, f"sparse.{name}", self.op, self.set)

    def _launch_ready(self) -> None:
        # Only in bucket order: every rank must issue the same collectives in the same sequence.
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    def _launch(self, bucket: Bucket, shadow: bool = False) -> None:
        sparse = isinstance(self.compressor, SparseCompressor)
        scale = self.prescale_factor
        if self.op is Average and not sparse:  # sparse sums divide afterwards: the residual keeps raw units
            scale /= self.size
        if shadow:
            bucket._views()
            bucket.buffer.zero_()
        else:
            t0 = timeline.now() if timeline.on else 0
            bucket.gather_grads(scale, skip=self.sparse)
            if t0:
                timeline.span("gather", t0, tensor=bucket.description)
        if sparse:
            bucket.exchange = _SparseExchange(bucket, self.compressor, self.op, self.size, self._group(),
                                              residual=torch.zeros_like(bucket.buffer) if shadow else None)
        else:
            bucket.exchange = _DenseExchange(bucket, self.compressor, self._group())

    # -------------------------------------------------------------------------------------- synchronize
    def synchronize(self) -> None:
        self._finish_round(write_back=True)
        if self.active and not self.replicas_checked:  # after the first round: a missing rank is named by it
            self.replicas_checked = True
            self._check_replicas()

    def _finish_round(self, write_back: bool) -> None:
        if not self.active or self.synced:
            self.synced = True
            return
        if not self.round_open:  # synchronize() without a backward pass: the round still takes place
            self._open_round()
        # The announcement first: with a joined rank, this is where it learns of the round and takes part.
        round_, self.round = self.round, None
        try:
            active = round_.wait()
        except BaseException:
            self._abandon_round()  # another rank is elsewhere: its buckets would never come
            raise
        self._complete_round(write_back, active)

    def _abandon_round(self) -> None:
        for bucket in self.buckets:
            if bucket.exchange is not None:
                for handle in getattr(bucket.exchange, "handles", [getattr(bucket.exchange, "handle", None)]):
                    primitives.untrack(handle)
            bucket.exchange = None
            bucket.pending = len(bucket.params)
        self.sparse_handles.clear()
        for key in self.counts:
            self.counts[key] = 0
        self.next_launch = 0
        self.synced = True
        self.round_open = False

    def _complete_round(self, write_back: bool, active: int | None = None) -> None:
        while self.next_launch < len(self.buckets):
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1
        sent = received = 0
        for bucket in self.buckets:
            if isinstance(bucket.exchange, _SparseExchange):
                bucket.exchange.second_stage()
        for bucket in self.buckets:
            bucket.exchange.finish()
            sent += bucket.exchange.bytes_sent
            received += bucket.exchange.bytes_received
            bucket.exchange = None
            if write_back:
                t0 = timeline.now() if timeline.on else 0
                scale = self.postscale_factor
                if self.average_over_active and self.op is Average and active and active < self.size:
                    scale *= self.size / active  # the joined ranks' zeros do not count (sd.join)
                if scale != 1.0:
                    bucket.buffer.mul_(scale)
                bucket.scatter_grads(skip=self.sparse)
                if t0:
                    timeline.span("scatter", t0, tensor=bucket.description)
            bucket.pending = len(bucket.params)
        for key, handle in list(self.sparse_handles.items()):
            grad = handle.wait()
            if write_back:
                param = next(p for _, p in self.named if id(p) == key)
                param.grad = grad * self.postscale_factor if self.postscale_factor != 1 else grad
        self.sparse_handles.clear()
        if write_back and self.op is Average:
            # Each holds the gradient of every worker's loss; Average means that of their mean.
            for p in self.feature_split.values():
                if p.grad is not None:
                    p.grad.div_(self.size)
        self.bytes_sent_last_step = sent
        self.bytes_sent_total += sent
        self.bytes_received_total += received
        for key in self.counts:
            self.counts[key] = 0
        self.next_launch = 0
        self.synced = True
        self.round_open = False
        if getattr(self, "replan", False):
            self.replan = False
            self._plan()

    def _check_replicas(self) -> None:
        """After the first gradient round, before the first update: warn when the ranks' parameters differ (no
        broadcast_parameters() after building the model, as Horovod scripts do; DDP copies rank 0's at
        construction). Averaged gradients would then move every replica alike and keep them apart for good. One
        small sum over the ranks: (count, s, s^2, a, a^2) of each rank's sum s and sum of magnitudes a of its
        parameters; they agree when the variances are zero. A joined rank adds zeros and is not counted."""
        with torch.no_grad():
            s = sum(float(p.detach().double().sum()) for _, p in self.named)
            a = sum(float(p.detach().double().abs().sum()) for _, p in self.named)
        total = allreduce(torch.tensor([1.0, s, s * s, a, a * a], dtype=torch.float64), op=Sum,
                          name="DistributedOptimizer.replica_check", process_set=self.process_set)
        n, sums = float(total[0]), total[1:].tolist()
        spread = [max(sums[i + 1] / n - (sums[i] / n) ** 2, 0.0) for i in (0, 2)]
        if any(v > 1e-12 * max((sums[i] / n) ** 2, 1e-30) for v, i in zip(spread, (0, 2))):
            warnings.warn(
                f"rank {runtime.rank()}: the ranks' parameters differ before the first step, so every rank trains a "
                "model of its own (averaged gradients move them alike). Start them from one state: "
                "broadcast_parameters(model.state_dict(), root_rank=0) and broadcast_optimizer_state(optimizer, "
                "root_rank=0) after building them.", UserWarning, stacklevel=5)

    def shadow_round(self) -> primitives.Handle:
        """This rank has joined: take part in the others' round with zeros (no gradient of its own changes). The
        buckets are started now; the handle finishes them."""
        for bucket in self.buckets:
            self._launch(bucket, shadow=True)
        for bucket in self.buckets:
            if isinstance(bucket.exchange, _SparseExchange):
                bucket.exchange.second_stage()  # (threshold compression: waits for the others' counts)
        exchanges = [bucket.exchange for bucket in self.buckets]
        for bucket in self.buckets:
            bucket.exchange = None

        def finish():
            for exchange in exchanges:
                exchange.finish()
        return primitives.Handle([], finish, "a gradient step taken part in with zeros")

    def zero_grad_done(self) -> None:
        # Gradients zeroed between backward and step: finish the round's communication (other ranks take
        # part in it) so every rank keeps issuing the same collectives, drop its result, and say so.
        if self.active and self.round_open and not self.synced:
            self._finish_round(write_back=False)
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause a "
                                 "race condition.")

    # --------------------------------------------------------------------------------------------- step
    def step(self, closure, local_step):
        if closure is not None:
            def synchronized_closure():
                self.awaiting_step = False  # (an optimizer such as LBFGS evaluates the closure several times)
                with torch.enable_grad():
                    loss = closure()
                self.synchronize()
                return loss
            result = local_step(synchronized_closure)
        else:
            if not getattr(self.optimizer, "_singa_skip_sync", False):
                self.synchronize()
            result = local_step(None)
        self.awaiting_step = False
        if self.tuner is not None:
            self._tune_step()
        return result

    # ------------------------------------------------------------------------------------------ autotune
    def _start_tuning(self) -> None:
        """The candidate sizes that cut the model into different buckets, smallest first; the first is used now."""
        dense = [(n, p) for n, p in self.named if id(p) not in self.sparse]
        sizes, seen = [], set()
        for mb in self.autotune_sizes_mb:
            key = layout(plan_buckets(dense, bucket_mb=mb, first_bucket_mb=self.first_bucket_mb))
            if key not in seen:
                seen.add(key)
                sizes.append(mb)
        if len(sizes) == 1:  # every size gives the same buckets: nothing to measure
            self._replan(sizes[0])
            self.autotune_log = [{"bucket_mb": sizes[0], "buckets": len(self.buckets), "step_ms": None}]
            return
        self.tuner = BucketTuner(sizes, self.autotune_warmup, self.autotune_steps)
        self._replan(self.tuner.size_mb)

    def _tune_step(self) -> None:
        """At the end of a step: time it; after a size's last step, use the next size or settle on the fastest."""
        if self.round_open and not self.synced:
            return  # buckets are in flight (step() inside skip_synchronize() without synchronize()): not a step
        if self.buckets and self.buckets[0].device.type == "cuda":
            torch.cuda.synchronize(self.buckets[0].device)  # the step's kernels belong to its time
        tuner = self.tuner
        if not tuner.step_done(time.perf_counter()):
            return
        self.autotune_log.append({"bucket_mb": tuner.size_mb, "buckets": len(self.buckets), "step_ms": None,
                                  "times_ms": list(tuner.times_ms[tuner.trial])})
        if tuner.advance():
            self._replan(tuner.size_mb)
            return
        # Every rank takes the same decision from the same numbers: the largest median of each size (the ranks
        # wait for each other, so the slowest one's time is the step's).
        device = self.buckets[0].device if self.buckets else torch.device("cpu")
        medians = torch.tensor(tuner.medians_ms(), dtype=torch.float64, device=device)
        primitives.all_reduce(medians, f"autotune: the step times of bucket sizes {tuner.sizes_mb} MB",
                              op=dist.ReduceOp.MAX, group=self._group())
        step_ms = medians.tolist()
        for entry, ms in zip(self.autotune_log, step_ms):
            entry["step_ms"] = ms
        best = tuner.best(step_ms)
        self.tuner = None
        self._replan(tuner.sizes_mb[best])
        if self.set.rank() == 0:
            tried = ", ".join(f"{e['bucket_mb']:g} MB ({e['buckets']} bucket{'s' * (e['buckets'] != 1)}) "
                              f"{e['step_ms']:.2f} ms" for e in self.autotune_log)
            print(f"[singa autotune] bucket_mb={self.bucket_mb:g}: median step time {tried} "
                  f"(slowest of {self.size} ranks, {tuner.steps} steps each after {tuner.warmup} warm-up)",
                  flush=True)

    def _replan(self, mb: float) -> None:
        """Buckets of about `mb` MB from the next step on (no bucket may be in flight); residuals carried over."""
        if mb == self.planned_mb and self.optimizer is not None and self.buckets:
            return
        residuals = self._residuals()
        for bucket in self.buckets:
            bucket.release()
        self.planned_mb = mb
        self._plan()
        if residuals:
            self._set_residuals(residuals)

    def traffic(self) -> tuple[int, int]:
        return self.bytes_sent_total, self.bytes_received_total

    # ---------------------------------------------------------------------------------------- checkpoints
    def _residuals(self) -> dict:
        """Sparse compression's residual of each parameter, by name (empty without one)."""
        residuals = {}
        for bucket in self.buckets if self.optimizer is not None else []:
            if bucket.residual is not None:
                residuals.update((name, r.view_as(p)) for (name, p), r in
                                 zip(bucket.params, bucket.residual.split(bucket.numels)))
        return residuals

    def _set_residuals(self, saved: dict) -> None:
        for bucket in self.buckets:
            # Parameters without a saved residual start at zero.
            bucket.residual = torch.cat([saved[name].reshape(-1).to(bucket.dtype) if name in saved
                                         else torch.zeros(n, dtype=bucket.dtype) for (name, _), n in
                                         zip(bucket.params, bucket.numels)]).to(bucket.device)

    def state_dict(self) -> dict:
        residuals = self._residuals()
        return {"residual": residual_state(residuals, self._rank())} if residuals else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"residual"}
        if unknown:
            raise ValueError(f"AllReduce strategy state has unknown keys {sorted(unknown)}")
        if self.optimizer is None or not isinstance(self.compressor, SparseCompressor):
            return
        # Parameters the checkpoint has no residual for (or every one, for another rank's) start at zero.
        self._set_residuals(load_residual_state(state.get("residual"), self.compressor.name, self._rank()))

    @staticmethod
    def _rank() -> int:
        return runtime.rank() if runtime.is_initialized() else 0

    def close(self) -> None:
        """Let go of the buffers and of the process group (singa_dist.shutdown() calls this), so that the
        group's threads end when the runtime destroys it; the strategy cannot communicate afterwards."""
        for bucket in self.buckets if self.optimizer is not None else []:
            bucket.exchange = None
            bucket.release()
            bucket.residual = None
        self.pg = None
        self.engine = None

    def _group(self):
        if self.pg is None:
            raise RuntimeError(f"this {type(self).__name__} strategy was closed (close() or singa_dist.shutdown()); "
                               "after init() again, wrap the optimizer in a new DistributedOptimizer")
        return self.pg
