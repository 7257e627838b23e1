"""Step time of AllReduce with its bucket size tuned (bucket_mb="auto") against its default size and DDP, and of
Sandblaster with its messages per server tuned (messages_per_server="auto") against its default and DDP.

    python -m benchmarks.autotune [--np 2] [--reps 60] [--small] [--servers 1] [--only allreduce|sandblaster]

Starts --np ranks on this host (Gloo, one intra-op thread each) and, for each of benchmarks/dist_overhead.py's
two models ("many_small": 100 Linear(32, 32); "few_large": 4 Linear(1024, 1024), 16 MiB of gradients):
1. trains the tuned AllReduce alone until it has settled on a size (its trials time consecutive steps);
2. then times a full step (zero_grad, forward, backward, optimizer step) of torch DDP, AllReduce with its
   default size and the tuned AllReduce, taking turns step by step, and reports each one's median.
Then the same for Sandblaster in a second world of --np workers and --servers parameter servers (the last
processes; DDP runs on the workers' process group of that world): its tuned count against its default (1) and DDP.
Prints the table (ratios against DDP and against the default) and the settings tried with their times, and appends
the rows to benchmarks/results/autotune.csv (for Sandblaster, `tried` names the count in use first).
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


def _variants(framework: str):
    """(name, strategy) of the default and the tuned setting."""
    import singa_dist as sd

    if framework == "sandblaster":
        return (("sandblaster, default", lambda: sd.Sandblaster()),
                ("sandblaster, tuned", lambda: sd.Sandblaster(messages_per_server="auto")))
    return (("allreduce, default size", lambda: sd.AllReduce()),
            ("allreduce, tuned", lambda: sd.AllReduce(bucket_mb="auto")))


def _tried(strategy) -> str:
    if hasattr(strategy, "bucket_mb"):
        return "; ".join(f"{e['bucket_mb']:g} MB x{e['buckets']}: "
                         + (f"{e['step_ms']:.2f} ms" if e["step_ms"] is not None else "only layout")
                         for e in strategy.autotune_log)
    return f"messages_per_server={strategy.messages_per_server}; " + "; ".join(
        f"{e['messages_per_server']}: " + (f"{e['step_ms']:.2f} ms" if e["step_ms"] is not None else "only layout")
        for e in strategy.autotune_log)


def measure(kinds, reps: int, small: bool, framework: str = "allreduce") -> list[dict] | None:
    """Runs on every worker rank (parameter servers serve inside sd.init()); returns worker rank 0's rows."""
    import singa_dist as sd

    rows = []
    for kind in kinds:
        fresh = functools.partial(fresh_model, kind, small, sd.rank())

        nbytes = sum(p.numel() * p.element_size() for p in make_model(kind, small).parameters())
        methods, optimizers = {}, {}
        model, x, y = fresh()
        ddp = nn.parallel.DistributedDataParallel(model, process_group=sd.workers_process_group())
        methods["torch DDP"] = _step_fn(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3), x, y)
        (default_name, _), (tuned_name, _) = variants = _variants(framework)
        for name, strategy in variants:
            model, x, y = fresh()
            opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                          named_parameters=model.named_parameters(), strategy=strategy())
            methods[name], optimizers[name] = _step_fn(model, opt, x, y), opt
        tuned = optimizers[tuned_name].strategy
        start, tuning_steps = time.perf_counter(), 0
        while tuned.tuner is not None:  # alone: each trial times consecutive steps
            methods[tuned_name]()
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
        for name in methods:
            opt = optimizers.get(name)
            allreduce = opt is not None and hasattr(opt.strategy, "bucket_mb")
            rows.append({"model": kind, "grad_mb": round(nbytes / 2**20, 3), "world": sd.size(), "method": name,
                         "bucket_mb": opt.strategy.bucket_mb if allreduce else 25.0 if opt is None else None,
                         "buckets": len(opt.strategy.buckets) if allreduce else None,
                         "step_ms": median[name], "ratio_vs_ddp": median[name] / median["torch DDP"],
                         "ratio_vs_default": median[name] / median[default_name],
                         "tuning_steps": tuning_steps if name == tuned_name else None,
                         "tuning_s": tuning_s if name == tuned_name else None,
                         "tried": _tried(opt.strategy) if name == tuned_name else
                         (f"messages_per_server={opt.strategy.messages_per_server}" if opt and not allreduce else "")})
        for opt in optimizers.values():
            opt.strategy.close()
    return rows if sd.rank() == 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="number of worker ranks")
    parser.add_argument("--reps", type=int, default=60, help="timed steps per method after tuning (median reported)")
    parser.add_argument("--small", action="store_true", help="smaller models (a quick smoke run)")
    parser.add_argument("--servers", type=int, default=1, help="parameter servers of the Sandblaster world")
    parser.add_argument("--only", choices=("allreduce", "sandblaster"), help="one framework's world only")
    args = parser.parse_args(argv)
    if args.np < 1 or args.servers < 1:
        raise SystemExit(f"--np and --servers must be at least 1, got {args.np} and {args.servers}")
    import singa_dist as sd

    kinds = ["many_small", "few_large"]
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    rows = []
    if args.only != "sandblaster":
        rows += sd.run(measure, np=args.np, args=(kinds, args.reps, args.small), env=env, timeout=900)[0]
    if args.only != "allreduce":  # the last --servers processes are Sandblaster's parameter servers
        rows += sd.run(measure, np=args.np + args.servers, args=(kinds, args.reps, args.small, "sandblaster"),
                       env={**env, "SINGA_STRATEGY": "sandblaster", "SINGA_SERVERS": str(args.servers)},
                       timeout=900)[0]
    print(f"\n{machine()['device']}, torch {torch.__version__}, {args.np} ranks, Gloo, one thread per rank"
          f" (Sandblaster: {args.servers} server{'s' if args.servers > 1 else ''} beside them)")
    print_table(rows, ["model", "grad_mb", "world", "method", "bucket_mb", "buckets", "step_ms", "ratio_vs_ddp",
                       "ratio_vs_default"])
    for tuned in (r for r in rows if r["method"].endswith(", tuned")):
        chose = (f"{tuned['bucket_mb']:g} MB" if tuned["bucket_mb"] is not None
                 else tuned["tried"].split(";")[0])
        print(f"{tuned['model']}, {tuned['method']}: tuned / DDP = {tuned['ratio_vs_ddp']:.3f}, tuned / default = "
              f"{tuned['ratio_vs_default']:.3f} (chose {chose} after {tuned['tuning_steps']} steps, "
              f"{tuned['tuning_s']:.1f} s; tried {tuned['tried']})")
    path = write_csv("autotune", rows)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
