"""Fused buffers of many parameters (buckets): how AllReduce and PartialUpdate send many tensors as one.

Parameters are fused in the reverse of the optimizer's order, since backward produces the last layers'
gradients first, with one dtype and device type per bucket. A bucket's flat buffer is cut into one view per
parameter, so that the reduced gradients can become the parameters' `.grad` without a copy (as DDP's
gradient_as_bucket_view).
"""
from __future__ import annotations

import statistics

import torch

# Measured with benchmarks/dist_overhead.py: on CPU/Gloo 4 MB buckets beat 25 MB ones (more overlap).
DEFAULT_BUCKET_MB = {"cpu": 4.0, "cuda": 25.0}
# The sizes AllReduce(bucket_mb="auto") tries, in MB (only those that cut the model into different buckets).
AUTOTUNE_SIZES_MB = (0.25, 1.0, 4.0, 16.0, 64.0)


class Bucket:
    """Some parameters' tensors fused into one flat buffer, communicated as one message."""

    def __init__(self, index: int, params: list[tuple[str, torch.nn.Parameter]]):
        self.index = index
        self.params = params
        self.numels = [p.numel() for _, p in params]
        self.numel = sum(self.numels)
        self.dtype = params[0][1].dtype
        self.device = params[0][1].device
        self.nbytes = self.numel * params[0][1].element_size()
        self.buffer: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.pending = len(params)  # parameters not yet ready in this round
        self.exchange = None  # the communication in flight
        self.residual: torch.Tensor | None = None  # sparse compression's error feedback
        names = [n for n, _ in params]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} tensors)" if len(names) > 3 else "")
        self.description = f"gradient bucket {index} ({shown})"

    def _views(self) -> list[torch.Tensor]:
        if self.buffer is None:
            self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self.views = [v.view_as(p) for v, (_, p) in zip(self.buffer.split(self.numels), self.params)]
        return self.views

    def release(self) -> None:
        """Let go of the buffer (it is made again when next needed)."""
        self.buffer, self.views = None, []

    def gather_grads(self, scale: float = 1.0, skip=()) -> torch.Tensor:
        """Copy the parameters' gradients, times `scale`, into the flat buffer (zeros where a parameter has
        none, and for the parameters whose ids are in `skip`). Few large tensors are scaled while copied (one
        pass over memory, as DDP does); many small ones are copied in one call and scaled together."""
        views = self._views()
        dst, src, in_place = [], [], []
        dtype = self.dtype
        for view, (_, p) in zip(views, self.params):
            g = p.grad
            if g is None or (skip and id(p) in skip):
                view.zero_()
            elif g is view:  # (the same object: cheaper to ask than the memory it points at)
                in_place.append(view)  # backward accumulated straight into the bucket (set_to_none=False)
            else:
                dst.append(view)
                if g.is_sparse:
                    g = g.to_dense()
                src.append(g if g.dtype == dtype else g.to(dtype))
        if len(dst) <= 16:
            for d, g in zip(dst, src):
                torch.mul(g, scale, out=d) if scale != 1.0 else d.copy_(g)
            if scale != 1.0:
                for view in in_place:
                    view.mul_(scale)
        else:
            torch._foreach_copy_(dst, src)  # one call instead of one per tensor
            if scale != 1.0:
                self.buffer.mul_(scale)  # one pass over the whole bucket is cheaper than per-tensor calls
        return self.buffer

    def scatter_grads(self, skip=()) -> None:
        """Make every parameter's `.grad` (but those whose ids are in `skip`) its slice of the reduced buffer (no
        copy, as DDP's gradient_as_bucket_view): the buffer is only refilled by the next step's communication. A
        gradient that was sparse (it travelled densely: sparse_as_dense) becomes sparse again, as Horovod does, so
        that optimizers for sparse gradients (SparseAdam) take it."""
        for view, (_, p) in zip(self.views, self.params):
            if p.grad is not view and not (skip and id(p) in skip):
                p.grad = view.to_sparse() if p.grad is not None and p.grad.is_sparse else view

    @torch.no_grad()
    def gather_values(self) -> torch.Tensor:
        """Copy the parameters' values into the flat buffer."""
        torch._foreach_copy_(self._views(), [p.detach() for _, p in self.params])
        return self.buffer

    @torch.no_grad()
    def scatter_values(self) -> None:
        """Copy the flat buffer back into the parameters' values."""
        torch._foreach_copy_([p.data for _, p in self.params], self.views)


def plan_buckets(named: list[tuple[str, torch.nn.Parameter]], *, bucket_mb: float | None = None,
                 first_bucket_mb: float = 1.0, num_buckets: int | None = None) -> list[Bucket]:
    """Buckets in the reverse of `named`'s order, one dtype and device type per bucket, each of about
    `bucket_mb` MB (DEFAULT_BUCKET_MB for the device when None; the first one `first_bucket_mb`, so that
    communication starts early in the backward pass), or `num_buckets` of about equal bytes."""
    params = list(reversed(named))
    total = sum(p.numel() * p.element_size() for _, p in params)
    even = max(total / num_buckets, 1) if num_buckets else None
    open_, order = {}, []
    for name, p in params:
        key = (p.dtype, p.device.type)
        group = open_.get(key)
        if group is None:
            group = open_[key] = [[], 0, len(order)]
            order.append(group)
        group[0].append((name, p))
        group[1] += p.numel() * p.element_size()
        if even is not None:
            limit = even
        else:
            mb = bucket_mb if bucket_mb is not None else DEFAULT_BUCKET_MB.get(p.device.type, 25.0)
            limit = (min(first_bucket_mb, mb) if group[2] == 0 else mb) * 2**20
        if group[1] >= limit:  # full: the next tensor opens a new bucket
            del open_[key]
    return [Bucket(i, g[0]) for i, g in enumerate(order)]


def layout(buckets: list[Bucket]) -> tuple:
    """Which parameters share a bucket: two plans with the same layout communicate the same way."""
    return tuple(tuple(name for name, _ in b.params) for b in buckets)


class BucketTuner:
    """Horovod's autotuner for the fusion threshold alone: each candidate bucket size is used for `warmup` steps,
    then for `steps` steps whose times (from one step's end to the next's) are kept; the candidate with the
    lowest median wins. Pure bookkeeping: the strategy re-plans its buckets between steps and makes the ranks
    agree on the times (singa_dist.strategies.allreduce). The parameter-server strategies tune their messages per
    server with it (the candidates are then counts: `candidates`, `candidate`)."""

    def __init__(self, sizes_mb: list[float], warmup: int, steps: int):
        if warmup < 1 or steps < 1:
            raise ValueError(f"autotune needs at least one warm-up and one measured step, got {warmup} and {steps}")
        self.sizes_mb = list(sizes_mb)
        self.warmup, self.steps = warmup, steps
        self.trial = 0  # index of the size in use
        self.taken = 0  # steps taken with it
        self.last_end: float | None = None
        self.times_ms: list[list[float]] = [[] for _ in self.sizes_mb]

    @property
    def size_mb(self) -> float:
        return self.sizes_mb[self.trial]

    @property
    def candidates(self) -> list:
        return self.sizes_mb

    @property
    def candidate(self):
        return self.sizes_mb[self.trial]

    def step_done(self, now: float) -> bool:
        """A step ended at `now` (seconds); True when the size in use has had all its steps."""
        self.taken += 1
        if self.taken > self.warmup and self.last_end is not None:
            self.times_ms[self.trial].append((now - self.last_end) * 1e3)
        self.last_end = now
        return self.taken >= self.warmup + self.steps

    def advance(self) -> bool:
        """Move on to the next size; False when every size was tried."""
        if self.trial + 1 >= len(self.sizes_mb):
            return False
        self.trial += 1
        self.taken = 0
        return True

    def medians_ms(self) -> list[float]:
        return [statistics.median(t) if t else float("inf") for t in self.times_ms]

    @staticmethod
    def best(step_ms: list[float]) -> int:
        """The index of the fastest size (the smaller size on a tie)."""
        return min(range(len(step_ms)), key=lambda i: (step_ms[i], i))


def plan_groups(named: list[tuple[str, torch.nn.Parameter]], groups) -> list[Bucket]:
    """Buckets as Horovod's `groups` says: an int n cuts the parameters (in `named`'s order) into n runs of
    near-equal count; a list of lists of parameters makes each list a bucket and every other parameter a bucket
    of its own. Buckets keep one dtype and device type each and go out in the reverse of `named`'s order (of
    each bucket's last parameter), as backward produces them."""
    position = {id(p): i for i, (_, p) in enumerate(named)}
    if isinstance(groups, int):
        d, r = divmod(len(named), groups)
        runs = [named[i * d + min(i, r):(i + 1) * d + min(i + 1, r)] for i in range(groups)]
    else:
        runs, seen = [], set()
        for group in groups:
            run = []
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError("groups must consist of torch.Tensor.")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups.")
                seen.add(id(p))
                if id(p) in position:
                    run.append(named[position[id(p)]])
            runs.append(run)
        runs += [[item] for item in named if id(item[1]) not in seen]
    runs = [sorted(run, key=lambda item: position[id(item[1])]) for run in runs if run]
    runs.sort(key=lambda run: -position[id(run[-1][1])])
    parts = [part for run in runs for part in by_dtype(run)]
    return [Bucket(i, part) for i, part in enumerate(parts)]


def split_evenly(named: list[tuple[str, torch.nn.Parameter]], n: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Up to n non-empty runs of consecutive parameters of about equal bytes."""
    chunks, current, current_bytes = [], [], 0
    left_bytes, left_chunks = sum(p.numel() * p.element_size() for _, p in named), min(n, len(named))
    for i, (name, p) in enumerate(named):
        current.append((name, p))
        current_bytes += p.numel() * p.element_size()
        params_left = len(named) - i - 1
        if left_chunks > 1 and (current_bytes >= left_bytes / left_chunks or params_left == left_chunks - 1):
            chunks.append(current)
            left_bytes -= current_bytes
            left_chunks -= 1
            current, current_bytes = [], 0
    if current:
        chunks.append(current)
    return chunks


def by_dtype(named: list[tuple[str, torch.nn.Parameter]]) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """`named` grouped by (dtype, device), each group in the given order."""
    groups: dict = {}
    for name, p in named:
        groups.setdefault((p.dtype, p.device), []).append((name, p))
    return list(groups.values())
