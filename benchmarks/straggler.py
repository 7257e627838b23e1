"""Straggler benchmark: one worker group slowed 3x; Downpour (asynchronous) against Sandblaster (synchronous).

Both frameworks train the digits MLP with two workers and one parameter-server process. Every step of
worker 0 takes `--delay` seconds of sleep, every step of worker 1 three times that (the straggler).
Sandblaster waits for the straggler at every step; Downpour's fast group keeps updating the servers.
The table gives the time each takes to reach `--target` test accuracy and the server updates per second;
the plot (accuracy against wall time) and the CSV land in benchmarks/results/.

    python -m benchmarks.straggler [--seconds 20] [--target 95] [--delay 0.01]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks.common import RESULTS, print_table, write_csv


def _train(strategy: str, seconds: float, delay: float, target: float) -> dict:
    import singa_dist as sd
    from examples.datasets import digits, shard

    x, y, x_test, y_test = digits()
    x, y = shard(x, y, sd.rank(), sd.size())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  model.named_parameters(), strategy=strategy)
    sleep = delay * (3 if sd.rank() == 1 else 1)  # worker 1 is the straggler
    curve, steps, start = [], 0, time.perf_counter()
    reached = None
    while time.perf_counter() - start < seconds:
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 31, 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            time.sleep(sleep)
            opt.step()
            steps += 1
            if steps % 5 == 0:
                with torch.no_grad():  # values just pulled from the servers
                    acc = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
                now = time.perf_counter() - start
                curve.append((now, acc))
                if reached is None and acc >= target:
                    reached = now
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    updates = max(opt.strategy.versions)  # updates the server applied, from every group
    opt.strategy.close()
    return {"rank": sd.rank(), "curve": curve, "reached": reached, "steps": steps, "updates": updates,
            "seconds": elapsed}


def _process(args: tuple):
    """One process of the job: a server serves, a worker trains and returns its record."""
    import singa_dist as sd

    if sd.role().is_server:
        from singa_dist.ps.server import serve
        serve()
        return None
    return _train(*args)


def run(strategy: str, seconds: float, delay: float, target: float) -> list[dict]:
    import singa_dist as sd

    topology = (sd.ClusterTopology.downpour(2, 1, nservers=1) if strategy == "downpour"
                else sd.ClusterTopology.sandblaster(2, 1))
    env = {"SINGA_TOPOLOGY": topology.to_json(), "SINGA_PROC_WORLD_SIZE": str(topology.nprocs),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    results = sd.run(_process, np=topology.nprocs, args=((strategy, seconds, delay, target),), env=env,
                     timeout=seconds + 120)
    return [r for r in results if r is not None]  # workers come first, in rank order


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per framework")
    parser.add_argument("--target", type=float, default=95.0, help="test accuracy to reach (percent)")
    parser.add_argument("--delay", type=float, default=0.01, help="sleep per step of the fast worker (s)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    rows, curves = [], {}
    for strategy in ("sandblaster", "downpour"):
        workers = run(strategy, args.seconds, args.delay, args.target)
        fast = workers[0]  # worker 0's values are the servers' freshest in both frameworks
        curves[strategy] = fast["curve"]
        rows.append({"framework": strategy, "target_acc": args.target,
                     "time_to_target_s": fast["reached"],
                     "final_acc": fast["curve"][-1][1] if fast["curve"] else None,
                     "updates_per_s": fast["updates"] / fast["seconds"],
                     "fast_steps": fast["steps"], "slow_steps": workers[1]["steps"],
                     "delay_fast_s": args.delay, "delay_slow_s": 3 * args.delay})
    sb, dp = rows[0]["time_to_target_s"], rows[1]["time_to_target_s"]
    for row in rows:
        row["speedup_vs_sandblaster"] = (sb / row["time_to_target_s"]) if sb and row["time_to_target_s"] else None
    print_table(rows, ["framework", "time_to_target_s", "final_acc", "updates_per_s", "fast_steps", "slow_steps",
                       "speedup_vs_sandblaster"])
    path = write_csv("straggler", rows)
    print(f"wrote {path}")
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy, curve in curves.items():
            ax.plot([t for t, _ in curve], [a for _, a in curve], label=strategy)
        ax.axhline(args.target, color="gray", linestyle="--", linewidth=0.8, label=f"target {args.target:g}%")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(50, 100)
        ax.set_title("digits MLP, worker 1 slowed 3x")
        ax.legend()
        fig.tight_layout()
        RESULTS.mkdir(parents=True, exist_ok=True)
        fig.savefig(RESULTS / "straggler.png", dpi=120)
        print(f"wrote {RESULTS / 'straggler.png'}")
    if dp is None or sb is None:
        print("note: a framework did not reach the target; raise --seconds")


if __name__ == "__main__":
    main()
