"""The cost model behind `python -m benchmarks.scaling`: what a training step of each framework costs, from the
compute time of one step and an alpha-beta link (a message of n bytes takes alpha + n/B seconds).

Pure formulas and the least-squares fit, no processes: tests/test_scaling.py checks them against hand-computed
values. Units: seconds, bytes, bytes per second. p is the number of workers (not counting separate servers).

What each framework sends per step (docs/allreduce.md, docs/parameter_server.md):
- AllReduce: every gradient byte once, in `buckets` fused buffers, each a ring all-reduce
  2(p-1)/p·n/B + 2(p-1)·alpha (or a tree, 2·log2(p)·(alpha + n/B)); buckets start while backward still runs. With
  more busy processes than cores a ring step also waits for its receiver's core; behind a token bucket (a shaped
  link) the bytes within its burst pass unshaped.
- Sandblaster with s servers: each worker pushes n bytes (n/s to each server) and pulls n bytes back in step();
  each server's link carries p·n/s each way, so the step waits for max(n, p·n/s)/B each way, for the server's
  CPU work on each of the p/s pushes it takes in turn (server_push_s) and for the work done once per step, its
  one update and the workers' own copies (server_update_s).
- Downpour with g groups: ring all-reduce inside each group of p/g workers, then the group's first worker pushes
  and pulls n bytes; groups do not wait for each other, but the s servers' links carry all g groups' traffic.
- Hogwild with sync_freq f: every f steps each process sends the deltas of the (p-1)/p of the parameters it does not
  master and gets fresh values back, and as a master takes the others' deltas and answers them.
- Compression scales the bytes: fp16/bf16 halve them; top-k(r) sends r of the elements with an int32 index each,
  gathered from every worker (an all-gather) instead of reduced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FRAMEWORKS = ("allreduce_ring", "allreduce_tree", "sandblaster", "downpour", "hogwild")


@dataclass(frozen=True)
class Link:
    """alpha: seconds per message (software and wire latency); bandwidth: bytes per second each way; burst: the
    bytes a token bucket (tc tbf) in front of the link lets through at once, unshaped, when full (0: none)."""
    alpha: float
    bandwidth: float
    burst: float = 0.0

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"Link: alpha must be at least 0 seconds, got {self.alpha!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"Link: bandwidth must be positive bytes/s, got {self.bandwidth!r}")
        if not self.burst >= 0:
            raise ValueError(f"Link: burst must be at least 0 bytes, got {self.burst!r}")

    @classmethod
    def gbit(cls, gbit_per_s: float, alpha: float, efficiency: float = 1.0) -> "Link":
        """A link of `gbit_per_s` Gbit/s of which the transport gets `efficiency` (its measured share)."""
        return cls(alpha, gbit_per_s * 1e9 / 8 * efficiency)


@dataclass(frozen=True)
class Workload:
    """One worker's step: compute_s (forward + backward + update, alone on its device), the share of it that is
    backward (the window in which bucketed all-reduce overlaps), the gradient bytes and AllReduce's bucket count."""
    name: str
    param_bytes: float
    compute_s: float
    backward_share: float = 0.6
    buckets: int = 1
    elem_bytes: int = 4

    def __post_init__(self):
        if self.param_bytes < 0 or self.compute_s <= 0:
            raise ValueError(f"Workload {self.name!r}: param_bytes must be >= 0 and compute_s > 0, got "
                             f"{self.param_bytes!r} and {self.compute_s!r}")
        if not 0 <= self.backward_share <= 1 or self.buckets < 1:
            raise ValueError(f"Workload {self.name!r}: backward_share must lie in [0, 1] and buckets be >= 1, got "
                             f"{self.backward_share!r} and {self.buckets!r}")


def _check_p(p: int) -> None:
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"the number of workers must be a positive integer, got {p!r}")


def ring_allreduce_s(nbytes: float, p: int, link: Link, hop_contention: float = 1.0) -> float:
    """One ring all-reduce of nbytes over p workers: reduce-scatter then all-gather, 2(p-1) steps of n/p bytes,
    each alpha + n/p/B. hop_contention: with more busy processes than cores a step's receiver also waits for a
    core, alpha·hop_contention in all; that wait overlaps the chunk's time on the wire, so a step costs
    max(alpha·hop_contention, alpha + n/p/B) (1: 2(p-1)/p·n/B + 2(p-1)·alpha)."""
    _check_p(p)
    if hop_contention < 1:
        raise ValueError(f"hop_contention must be at least 1, got {hop_contention!r}")
    if p == 1:
        return 0.0
    return 2 * (p - 1) * max(link.alpha * hop_contention, link.alpha + nbytes / p / link.bandwidth)


def tree_allreduce_s(nbytes: float, p: int, link: Link) -> float:
    """One all-reduce as a binary-tree reduce then broadcast: 2·ceil(log2 p) steps of the whole message."""
    _check_p(p)
    if p == 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * (link.alpha + nbytes / link.bandwidth)


def allgather_s(nbytes_each: float, p: int, link: Link) -> float:
    """A ring all-gather: p-1 steps, each passing one worker's nbytes_each on."""
    _check_p(p)
    return (p - 1) * (link.alpha + nbytes_each / link.bandwidth)


def compression_ratio(compression, elem_bytes: int = 4) -> float:
    """Bytes sent per dense gradient byte: None/"none" 1, "fp16"/"bf16" 2/elem_bytes, ("topk", r) r·(elem+4)/elem."""
    if compression in (None, "none"):
        return 1.0
    if compression in ("fp16", "bf16"):
        return 2 / elem_bytes
    if isinstance(compression, tuple) and len(compression) == 2 and compression[0] == "topk":
        ratio = compression[1]
        if not 0 < ratio <= 1:
            raise ValueError(f"compression ('topk', r): r must lie in (0, 1], got {ratio!r}")
        return ratio * (elem_bytes + 4) / elem_bytes
    raise ValueError(f"unknown compression {compression!r}: use None, 'none', 'fp16', 'bf16' or ('topk', ratio)")


def _sparse(compression) -> bool:
    return isinstance(compression, tuple)


def shaped_share(wire_bytes: float, credit: float) -> float:
    """The share of wire_bytes (what one link carries) that waits for a token bucket's rate when the bucket holds
    `credit` bytes of tokens as they start: that much passes at once, unshaped."""
    return max(0.0, wire_bytes - credit) / wire_bytes if wire_bytes > 0 else 1.0


def allreduce_comm_s(work: Workload, p: int, link: Link, algorithm: str = "ring", compression=None,
                     hop_contention: float = 1.0) -> float:
    """All of a step's bucket exchanges one after another (what the backward pass may hide). hop_contention: the
    ring's (ring_allreduce_s)."""
    nbytes = work.param_bytes * compression_ratio(compression, work.elem_bytes)
    if _sparse(compression):  # top-k: every worker's selection is gathered, not reduced
        return sum(allgather_s(nbytes / work.buckets, p, link) for _ in range(work.buckets)) if p > 1 else 0.0
    if algorithm == "ring":
        # The bucket refills at the rate while the step computes, and what it holds then passes unshaped.
        nbytes *= shaped_share(2 * (p - 1) / p * nbytes, min(link.burst, link.bandwidth * work.compute_s))
        return work.buckets * ring_allreduce_s(nbytes / work.buckets, p, link, hop_contention)
    if algorithm == "tree":
        return work.buckets * tree_allreduce_s(nbytes / work.buckets, p, link)
    raise ValueError(f"all-reduce algorithm must be 'ring' or 'tree', got {algorithm!r}")


def exposed_s(comm_s: float, work: Workload, overlap: float = 1.0) -> float:
    """The communication a step waits for when buckets start during backward: the first bucket is ready after
    1/k of the backward pass, so `overlap` (the share of that window communication really gets; 1 with a
    separate engine, less where compute and communication share CPU cores) of the remaining backward hides it.
    The last bucket is always exposed."""
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must lie in [0, 1], got {overlap!r}")
    window = overlap * work.backward_share * work.compute_s * (1 - 1 / work.buckets)
    return max(comm_s / work.buckets, comm_s - window)


def contention(procs: int, cores: int) -> float:
    """How many times slower a CPU-bound phase runs when `procs` busy processes share `cores` cores: 1 while each
    has a core of its own, procs/cores beyond (the scheduler shares the cores out evenly)."""
    if procs < 1 or cores < 1:
        raise ValueError(f"contention: procs and cores must be at least 1, got {procs!r} and {cores!r}")
    return max(1.0, procs / cores)


def ps_exchange_s(nbytes_push: float, nbytes_pull: float, clients: int, servers: int, link: Link,
                  messages: int = 1, server_push_s: float = 0.0) -> float:
    """One push and one pull of a client (worker or group leader) while `clients` push at once to `servers`
    servers: each way, the slower of the client's own link and a server's link carrying clients/servers shares.
    server_push_s: a server's CPU time per push (unpack, apply, pack the answer); a server takes its pushes in
    turn, so a step waits for clients/servers of them."""
    if servers < 1 or clients < 1:
        raise ValueError(f"clients and servers must be at least 1, got {clients!r} and {servers!r}")
    load = max(1.0, clients / servers)
    return (2 * messages * link.alpha + load * nbytes_push / link.bandwidth
            + load * nbytes_pull / link.bandwidth + load * server_push_s)


def step_s(framework: str, work: Workload, p: int, link: Link, *, servers: int = 1, groups: int = 1,
           sync_freq: int = 1, compression=None, overlap: float = 1.0, server_update_s: float = 0.0,
           compute_s: float | None = None, server_push_s: float = 0.0, hop_contention: float = 1.0) -> float:
    """Predicted time of one worker's step with p workers. compute_s overrides work.compute_s (e.g. the compute
    time measured with p processes sharing cores); server_update_s: what a step pays once however many push (a
    Sandblaster server's one update on its slices, the workers' own copies made in parallel); server_push_s: a
    server's CPU time per push, paid for every push it takes (ps_exchange_s); hop_contention: how much longer a
    ring step waits for its receiver's core (ring_allreduce_s)."""
    _check_p(p)
    compute = work.compute_s if compute_s is None else compute_s
    work = Workload(work.name, work.param_bytes, compute, work.backward_share, work.buckets, work.elem_bytes)
    if p == 1 and framework != "sandblaster" and framework != "downpour":
        return compute  # alone: nothing to exchange (a parameter server still answers one worker)
    dense = work.param_bytes
    sent = dense * compression_ratio(compression, work.elem_bytes)
    if framework in ("allreduce_ring", "allreduce_tree"):
        comm = allreduce_comm_s(work, p, link, framework.split("_")[1], compression, hop_contention)
        return compute + exposed_s(comm, work, overlap)
    if framework == "sandblaster":
        return compute + ps_exchange_s(sent, dense, p, servers, link, server_push_s=server_push_s) + server_update_s
    if framework == "downpour":
        if groups < 1 or p % groups:
            raise ValueError(f"downpour: {p} workers cannot form {groups} equal worker groups")
        inside = p // groups
        # In-group all-reduce runs in synchronize(), after backward: nothing overlaps it.
        allreduce = ring_allreduce_s(dense, inside, link) if inside > 1 else 0.0
        return (compute + allreduce + ps_exchange_s(sent, dense, groups, servers, link, server_push_s=server_push_s)
                + server_update_s)
    if framework == "hogwild":
        if sync_freq < 1:
            raise ValueError(f"hogwild: sync_freq must be at least 1, got {sync_freq!r}")
        share = (p - 1) / p
        # Out: this process's deltas and, as a master, its answers; in: the fresh values and the others' deltas.
        sync = share * (sent + dense) / link.bandwidth + 2 * link.alpha
        return compute + sync / sync_freq
    raise ValueError(f"unknown framework {framework!r}; one of {', '.join(FRAMEWORKS)}")


def efficiency(framework: str, work: Workload, p: int, link: Link, **options) -> float:
    """Scaling efficiency: throughput with p workers over p times the throughput of one worker alone, i.e. the
    compute time over the step time (1.0 at p=1 for the frameworks without servers)."""
    return work.compute_s / step_s(framework, work, p, link, **options)


def fit_link(samples, algorithm: str = "ring") -> Link:
    """Least-squares alpha and B from measured collectives: samples are (nbytes, p, seconds) of single all-reduces
    (ring: t = 2(p-1)·alpha + 2(p-1)/p·n/B; tree: t = 2·ceil(log2 p)·(alpha + n/B)) or, with algorithm="p2p",
    (nbytes, seconds) of single messages (t = alpha + n/B)."""
    import numpy as np

    rows, times = [], []
    for sample in samples:
        if algorithm == "p2p":
            n, t = sample
            rows.append((1.0, n))
        else:
            n, p, t = sample
            _check_p(p)
            if p == 1:
                continue
            if algorithm == "ring":
                rows.append((2 * (p - 1), 2 * (p - 1) / p * n))
            elif algorithm == "tree":
                steps = 2 * math.ceil(math.log2(p))
                rows.append((steps, steps * n))
            else:
                raise ValueError(f"fit_link: algorithm must be 'ring', 'tree' or 'p2p', got {algorithm!r}")
        times.append(t)
    if len(rows) < 2:
        raise ValueError(f"fit_link needs at least 2 measurements with p > 1, got {len(rows)}")
    a = np.array(rows, dtype=float)
    t = np.array(times, dtype=float)
    # Relative least squares (each row divided by its time): small messages count as much as large ones.
    (alpha, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    if inv_bw <= 0:
        raise ValueError("fit_link: the times do not grow with the message size; measure larger messages")
    return Link(max(float(alpha), 0.0), 1.0 / float(inv_bw))


def fit_overhead(features, excess_s, measured_s) -> tuple[float, ...]:
    """Non-negative least squares for CPU constants: excess_s[i] ~ sum_j features[i][j] * coef[j], each row weighted
    by 1 / measured_s[i] (the relative error of the step it belongs to, so a small model counts as much as a large
    one, and a row whose excess is negative pulls the constants down by no more than its step's share). A
    coefficient the unconstrained fit makes negative is dropped and the rest fitted again."""
    import numpy as np

    a = np.array(features, dtype=float)
    t = np.array(excess_s, dtype=float)
    w = np.array(measured_s, dtype=float)
    if a.ndim != 2 or len(a) != len(t) or len(t) != len(w) or len(t) == 0:
        raise ValueError(f"fit_overhead: features, excess_s and measured_s must be non-empty rows of one length, got "
                         f"{len(a)}, {len(t)} and {len(w)}")
    if not (w > 0).all():
        raise ValueError(f"fit_overhead: measured_s must be positive, got {measured_s!r}")
    keep = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while keep:
        sub = np.linalg.lstsq(a[:, keep] / w[:, None], t / w, rcond=None)[0]
        if sub.min() >= 0:
            coef[keep] = sub
            break
        keep.pop(int(np.argmin(sub)))  # the most negative term explains nothing physical here
    return tuple(float(c) for c in coef)
