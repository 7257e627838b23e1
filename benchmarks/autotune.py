"""Step time of AllReduce with its bucket size tuned (bucket_mb="auto") against its default size and DDP.

    python -m benchmarks.autotune [--np 2] [--reps 60] [--small]

Starts --np ranks on this host (Gloo, one intra-op thread each) and, for each of benchmarks/dist_overhead.py's
two models ("many_small": 100 Linear(32, 32); "few_large": 4 Linear(1024, 1024), 16 MiB of gradients):
1. trains the tuned AllReduce alone until it has settled on a size (its trials time consecutive steps);
2. then times a full step (zero_grad, forward, backward, optimizer step) of torch DDP, AllReduce with its
   default size and the tuned AllReduce, taking turns step by step, and reports each one's median.
Prints the table (ratios against DDP and against the default size) and the sizes tried with their times, and
appends the rows to benchmarks/results/autotune.csv.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from benchmarks.common import machine, print_table, write_csv
from benchmarks.dist_overhead import _step_fn, fresh_model, make_model


def measure(kinds, reps: int, small: bool) -> list[dict] | None:
    """Runs on every rank; returns rank 0's rows."""
    import singa_dist as sd

    rows = []
    for kind in kinds:
        fresh = functools.partial(fresh_model, kind, small, sd.rank())

        nbytes = sum(p.numel() * p.element_size() for p in make_model(kind, small).parameters())
        methods, optimizers = {}, {}
        model, x, y = fresh()
        ddp = nn.parallel.DistributedDataParallel(model, process_group=sd.workers_process_group())
        methods["torch DDP"] = _step_fn(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3), x, y)
        for name, bucket_mb in (("allreduce, default size", None), ("allreduce, tuned", "auto")):
            model, x, y = fresh()
            opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                          named_parameters=model.named_parameters(),
                                          strategy=sd.AllReduce(bucket_mb=bucket_mb))
            methods[name], optimizers[name] = _step_fn(model, opt, x, y), opt
        tuned = optimizers["allreduce, tuned"].strategy
        start, tuning_steps = time.perf_counter(), 0
        while tuned.tuner is not None:  # alone: each trial times consecutive steps
            methods["allreduce, tuned"]()
            tuning_steps += 1
        tuning_s = time.perf_counter() - start
        times = {name: [] for name in methods}
        for step in methods.values():
            for _ in range(3):
                step()
        for _ in range(reps):
            for name, step in methods.items():
                sd.barrier()  # every rank times the same method
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
        median = {name: statistics.median(t) for name, t in times.items()}
        tried = "; ".join(f"{e['bucket_mb']:g} MB x{e['buckets']}: "
                          + (f"{e['step_ms']:.2f} ms" if e["step_ms"] is not None else "only layout")
                          for e in tuned.autotune_log)
        for name in methods:
            opt = optimizers.get(name)
            rows.append({"model": kind, "grad_mb": round(nbytes / 2**20, 3), "world": sd.size(), "method": name,
                         "bucket_mb": opt.strategy.bucket_mb if opt else 25.0,
                         "buckets": len(opt.strategy.buckets) if opt else None,
                         "step_ms": median[name], "ratio_vs_ddp": median[name] / median["torch DDP"],
                         "ratio_vs_default": median[name] / median["allreduce, default size"],
                         "tuning_steps": tuning_steps if opt is tuned.optimizer else None,
                         "tuning_s": tuning_s if opt is tuned.optimizer else None,
                         "tried": tried if opt is tuned.optimizer else ""})
        for opt in optimizers.values():
            opt.strategy.close()
    return rows if sd.rank() == 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="number of worker ranks")
    parser.add_argument("--reps", type=int, default=60, help="timed steps per method after tuning (median reported)")
    parser.add_argument("--small", action="store_true", help="smaller models (a quick smoke run)")
    args = parser.parse_args(argv)
    import singa_dist as sd

    kinds = ["many_small", "few_large"]
    rows = sd.run(measure, np=args.np, args=(kinds, args.reps, args.small),
                  env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}, timeout=900)[0]
    print(f"\n{machine()['device']}, torch {torch.__version__}, {args.np} ranks, Gloo, one thread per rank")
    print_table(rows, ["model", "grad_mb", "method", "bucket_mb", "buckets", "step_ms", "ratio_vs_ddp",
                       "ratio_vs_default"])
    for kind in kinds:
        tuned = next(r for r in rows if r["model"] == kind and r["method"] == "allreduce, tuned")
        print(f"{kind}: tuned / DDP = {tuned['ratio_vs_ddp']:.3f}, tuned / default = {tuned['ratio_vs_default']:.3f}"
              f" (chose {tuned['bucket_mb']:g} MB after {tuned['tuning_steps']} steps, {tuned['tuning_s']:.1f} s;"
              f" tried {tuned['tried']})")
    path = write_csv("autotune", rows)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
