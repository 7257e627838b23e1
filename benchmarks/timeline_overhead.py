"""What recording a timeline costs a training step: AllReduce with the timeline off against on, in one run.

    python -m benchmarks.timeline_overhead [--np 2] [--steps 200] [--repeats 3] [--small]

Starts --np ranks on this host (sd.run: Gloo, one intra-op thread each) and trains the two models of
benchmarks/dist_overhead.py ("many_small": 100 Linear(32, 32), 200 tensors; "few_large": 4 Linear(1024, 1024),
16 MiB of gradients) with sd.AllReduce, with a timeline started (sd.start_timeline) whose recording is switched
off and on between steps (`singa_dist.timeline.on`, the flag every call site checks), step by step in the order
off, on, on, off, ..., so that changing load on the host affects both settings alike; each step is timed on its
own after a barrier. Ratio = median step time with recording on / off (goal: at most 1.05); cpu_ratio = the same
for the CPU time of rank 0's training thread, which the load of other processes on the host does not change. The off steps keep
the model's two forward hooks installed (each a call that checks the flag). The whole run is repeated --repeats
times in fresh processes, for the spread. Rows are appended to benchmarks/results/timeline.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine, print_table, write_csv
from benchmarks.dist_overhead import _input_width, make_model


def measure(kinds, steps: int, small: bool, folder: str) -> list[dict]:
    """Runs on every rank; returns rank 0's rows."""
    import singa_dist as sd
    from singa_dist import timeline

    rows = []
    for kind in kinds:
        model = make_model(kind, small)
        g = torch.Generator().manual_seed(sd.rank())
        width = _input_width(model)
        x, y = torch.randn(16, width, generator=g), torch.randn(16, width, generator=g)
        opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                      named_parameters=model.named_parameters(), strategy=sd.AllReduce())

        def step():
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

        for _ in range(5):
            step()
        path = os.path.join(folder, f"{kind}.json")
        sd.start_timeline(path)
        for _ in range(3):
            step()
        times = {False: [], True: []}
        cpu = {False: [], True: []}  # this rank's main thread's CPU time: what recording adds, load or not
        # Step by step, in the order off, on, on, off, ... (every rank alike), so that changing load on the host
        # affects both settings alike. Switching the flag between steps is what start/stop_timeline do to it.
        for i in range(2 * steps):
            recording = (i % 4) in (1, 2)
            timeline.on = recording
            sd.barrier()  # every rank times the same step
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            times[recording].append((time.perf_counter() - start) * 1e3)
            cpu[recording].append((time.thread_time() - start_cpu) * 1e3)
        timeline.on = True
        sd.stop_timeline()
        events = 0
        if sd.rank() == 0:  # rank 0's spans per recorded step
            with open(path) as f:
                events = sum(1 for e in json.load(f)["traceEvents"] if e["ph"] == "X" and e["pid"] == 0)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        off_cpu, on_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
        rows.append({"model": kind, "tensors": len(list(model.parameters())), "world": sd.size(),
                     "buckets": len(opt.strategy.buckets), "steps": steps, "off_ms": off, "on_ms": on,
                     "ratio": on / off, "off_cpu_ms": off_cpu, "on_cpu_ms": on_cpu, "cpu_ratio": on_cpu / off_cpu,
                     "spans_per_step": events / (steps + 3)})
        opt.strategy.close()
    return rows


def _measure_rank(kinds, steps, small, folder):
    import singa_dist as sd

    rows = measure(kinds, steps, small, folder)
    return rows if sd.rank() == 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="number of worker ranks")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting (median reported)")
    parser.add_argument("--repeats", type=int, default=3, help="whole runs, each in fresh processes")
    parser.add_argument("--small", action="store_true", help="smaller models (a quick smoke run)")
    args = parser.parse_args(argv)
    import singa_dist as sd

    kinds = ["many_small", "few_large"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="timeline-bench-") as folder:
        for repeat in range(args.repeats):
            got = sd.run(_measure_rank, np=args.np, args=(kinds, args.steps, args.small, folder),
                         env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}, timeout=1800)[0]
            rows += [{**row, "repeat": repeat} for row in got]

    print(f"\n{machine()['device']}, torch {torch.__version__}, {args.np} ranks, Gloo, one thread per rank, "
          f"AllReduce, timeline off vs on")
    print_table(rows, ["repeat", "model", "tensors", "buckets", "steps", "off_ms", "on_ms", "ratio", "off_cpu_ms", "on_cpu_ms",
                       "cpu_ratio", "spans_per_step"])
    for kind in kinds:
        ratios = [r["ratio"] for r in rows if r["model"] == kind]
        cpu_ratios = [r["cpu_ratio"] for r in rows if r["model"] == kind]
        print(f"{kind}: timeline on / off step time = {statistics.median(ratios):.3f} (runs: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; spread {min(ratios):.3f}-{max(ratios):.3f}; goal: at most 1.05); "
              f"CPU time of the training thread {statistics.median(cpu_ratios):.3f} "
              f"({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
    path = write_csv("timeline", rows)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
