"""Which files of singa_dist one training step passes through, strategy by strategy: a map for readers.

    python -m benchmarks.step_path [--strategy allreduce downpour ...]

For each strategy a small job runs on this host (AllReduce and PartialUpdate: 2 workers; Sandblaster: 2
workers and 1 server; Downpour and Hybrid: 2 worker groups of 2 workers and 1 server; Hogwild: 2 workers).
Worker 0 takes three steps, then one more (zero_grad, forward, backward, step) under `sys.setprofile`, and
prints the singa_dist files whose Python functions ran in that step, in the order first entered, with the
functions. Only worker 0's own thread is seen: a parameter server's side of the step (its RPC handlers) runs
in other processes and threads, and is listed in docs/architecture.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

CASES = {  # strategy -> (processes, the topology's settings: SINGA_* variables)
    "allreduce": (2, {}),
    "partial_update": (2, {}),
    "sandblaster": (3, {"SINGA_SERVERS": "1"}),
    "downpour": (5, {"SINGA_SERVERS": "1", "SINGA_WORKER_GROUPS": "2"}),
    "hybrid": (5, {"SINGA_SERVERS": "1", "SINGA_WORKER_GROUPS": "2"}),
    "hogwild": (2, {}),
}


def _trace_rank(strategy: str) -> list[tuple[str, list[str]]] | None:
    import singa_dist as sd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy=strategy)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    package = os.path.dirname(sd.__file__)
    seen: dict[str, list[str]] = {}

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(package):
                names = seen.setdefault(os.path.relpath(path, os.path.dirname(package)), [])
                if frame.f_code.co_name not in names:
                    names.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return list(seen.items()) if sd.rank() == 0 else None


def trace(strategy: str) -> list[tuple[str, list[str]]]:
    import singa_dist as sd

    nprocs, settings = CASES[strategy]
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "SINGA_STRATEGY": strategy, **settings}
    return sd.run(_trace_rank, np=nprocs, args=(strategy,), env=env, timeout=300)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", nargs="+", default=["allreduce", "downpour"], choices=list(CASES))
    args = parser.parse_args(argv)
    for strategy in args.strategy:
        files = trace(strategy)
        print(f"\n{strategy}: one step on worker 0 passes through {len(files)} files of singa_dist")
        for path, functions in files:
            print(f"  {path:34s} {', '.join(functions)}")


if __name__ == "__main__":
    main()
