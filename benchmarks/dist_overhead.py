"""Step time of the AllReduce strategy against torch DistributedDataParallel, and bytes sent per step.

    python -m benchmarks.dist_overhead [--np 2] [--reps 30] [--small]

Starts --np ranks on this host (Gloo, one intra-op thread each) and, in one run, times a full training step
(zero_grad, forward, backward, optimizer step) of two models with the same world size:
- "many_small": 100 Linear(32, 32) layers (200 small tensors): per-tensor overheads dominate;
- "few_large": 4 Linear(1024, 1024) layers (8 tensors, 16 MiB of gradients): bandwidth dominates.
For each: no communication at all (the floor), torch DDP, the negotiation alone (one gradient step's header
exchange, which every AllReduce step includes), sd.AllReduce with each compression and with partial update. Prints the table (ratio = step time / DDP step time; goal: AllReduce/none at most 1.0) and
appends the rows to benchmarks/results/dist_overhead.csv.

A second world with separate parameter servers (ClusterTopology.sandblaster) times Sandblaster on the same
models; its server processes serve from sd.init() on.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import machine, print_table, write_csv


def make_model(kind: str, small: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "many_small":
        layers = []
        for _ in range(25 if small else 100):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        return nn.Sequential(*layers)
    width = 256 if small else 1024
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())])


def _input_width(model: nn.Module) -> int:
    return next(m for m in model if isinstance(m, nn.Linear)).in_features


def fresh_model(kind: str, small: bool, rank: int):
    """A new model of `kind` and this rank's batch for it (input and target)."""
    model = make_model(kind, small)
    g = torch.Generator().manual_seed(rank)
    width = _input_width(model)
    return model, torch.randn(16, width, generator=g), torch.randn(16, width, generator=g)


def _variants():
    import singa_dist as sd

    return {
        "allreduce/none": lambda: dict(strategy=sd.AllReduce()),
        "allreduce/none, 25 MB buckets": lambda: dict(strategy=sd.AllReduce(bucket_mb=25)),
        "allreduce/fp16": lambda: dict(strategy=sd.AllReduce(), compression=sd.Compression.fp16),
        "allreduce/bf16": lambda: dict(strategy=sd.AllReduce(), compression=sd.Compression.bf16),
        "allreduce/topk(0.01)": lambda: dict(strategy=sd.AllReduce(), compression=sd.Compression.topk(0.01)),
        "allreduce/threshold(1e-3)": lambda: dict(strategy=sd.AllReduce(),
                                                  compression=sd.Compression.threshold(1e-3)),
        "allreduce/partial(4)": lambda: dict(strategy=sd.AllReduce(partial_update_chunks=4)),
    }


def _step_fn(model, opt, x, y):
    def step():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return step


def _negotiation_step():
    """What AllReduce's negotiation costs a step on its own: one gradient round announced and settled."""
    from singa_dist import coordinator

    count = [0]

    def step():
        count[0] += 1
        coordinator.submit(coordinator.GradientRound(0, count[0], "a benchmark round")).wait()
    return step


def measure(kinds, reps: int, small: bool, strategy_only: str | None = None) -> list[dict]:
    """Runs on every worker rank; returns rank 0's rows.

    The methods take turns step by step (A, B, C, A, B, C, ...) and each one's median step time is reported,
    so that changing load from other processes on the host affects them alike.
    """
    import singa_dist as sd

    rows = []
    for kind in kinds:
        fresh = functools.partial(fresh_model, kind, small, sd.rank())

        params = list(make_model(kind, small).parameters())
        nbytes = sum(p.numel() * p.element_size() for p in params)
        methods = {}  # name -> (step function, optimizer or None, bytes of a dense step)
        if strategy_only is None:
            model, x, y = fresh()
            methods["local (no communication)"] = (
                _step_fn(model, torch.optim.SGD(model.parameters(), lr=1e-3), x, y), None, 0)
            model, x, y = fresh()
            ddp = nn.parallel.DistributedDataParallel(model, process_group=sd.workers_process_group())
            methods["torch DDP"] = (_step_fn(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3), x, y), None, nbytes)
            methods["negotiation alone (one step's header)"] = (_negotiation_step(), None, 0)
            variants = _variants()
        else:
            variants = {strategy_only: lambda: dict(strategy=strategy_only)}
        for name, options in variants.items():
            model, x, y = fresh()
            opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                          named_parameters=model.named_parameters(), **options())
            methods[name] = (_step_fn(model, opt, x, y), opt, None)
        times = {name: [] for name in methods}
        for step, _, _ in methods.values():
            for _ in range(3):
                step()
        for _ in range(reps):
            for name, (step, _, _) in methods.items():
                sd.barrier()  # every rank times the same method
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
        ddp_ms = statistics.median(times["torch DDP"]) if "torch DDP" in times else None
        for name, (_, opt, dense) in methods.items():
            ms = statistics.median(times[name])
            sent = getattr(opt.strategy, "bytes_sent_last_step", None) if opt is not None else dense
            rows.append({"model": kind, "tensors": len(params), "grad_mb": round(nbytes / 2**20, 3), "method": name,
                         "world": sd.size(), "step_ms": ms, "ratio_vs_ddp": ms / ddp_ms if ddp_ms else None,
                         "bytes_per_step": sent, "bytes_vs_dense": sent / nbytes if sent is not None else None})
            if opt is not None:
                opt.strategy.close()
    return rows


def _measure_rank(kinds, reps, small, strategy_only):
    """One worker of the run (servers serve inside sd.init()); worker rank 0 returns the rows."""
    import singa_dist as sd

    rows = measure(kinds, reps, small, strategy_only)
    return rows if sd.rank() == 0 else None


def run_world(nprocs: int, env: dict, kinds, reps, small, strategy_only=None) -> list[dict]:
    import singa_dist as sd

    results = sd.run(_measure_rank, np=nprocs, args=(kinds, reps, small, strategy_only),
                     env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **env}, timeout=900)
    return results[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="number of worker ranks")
    parser.add_argument("--reps", type=int, default=100, help="timed steps per method (median reported)")
    parser.add_argument("--small", action="store_true", help="smaller models (a quick smoke run)")
    parser.add_argument("--servers", type=int, default=1, help="parameter servers for the Sandblaster run")
    args = parser.parse_args(argv)
    kinds = ["many_small", "few_large"]

    rows = run_world(args.np, {}, kinds, args.reps, args.small)
    # The same job shape under Sandblaster: the last processes are parameter servers.
    sb_rows = run_world(args.np + args.servers, {"SINGA_STRATEGY": "sandblaster", "SINGA_SERVERS": str(args.servers)},
                        kinds, args.reps, args.small, "sandblaster")
    for row in sb_rows:
        row["method"] = f"sandblaster ({args.servers} server{'s' if args.servers > 1 else ''})"
        ddp = next(r for r in rows if r["model"] == row["model"] and r["method"] == "torch DDP")
        row["ratio_vs_ddp"] = row["step_ms"] / ddp["step_ms"]
    rows += sb_rows

    print(f"\n{machine()['device']}, torch {torch.__version__}, {args.np} ranks, Gloo, one thread per rank")
    print_table(rows, ["model", "tensors", "grad_mb", "method", "step_ms", "ratio_vs_ddp", "bytes_per_step",
                       "bytes_vs_dense"])
    for kind in kinds:
        ours = next(r for r in rows if r["model"] == kind and r["method"] == "allreduce/none")
        print(f"{kind}: AllReduce / DDP step time = {ours['ratio_vs_ddp']:.3f} (goal: at most 1.0)")
    path = write_csv("dist_overhead", rows)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
