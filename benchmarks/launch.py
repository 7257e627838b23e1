"""singa-launch against torchrun: time to the first training step, and teardown, for 1, 2 and 4 processes.

    python -m benchmarks.launch [--procs 1 2 4] [--reps 3]

- start -> first step: from starting the launcher to rank 0 finishing its first step (a Gloo all_reduce of
  a small model's gradients, after init_process_group);
- teardown (done): from rank 0 finishing its work to the launcher's exit, every rank ending normally;
- teardown (failure): from the last rank exiting with status 1 to the launcher's exit, the other ranks
  blocked and stopped by the launcher.
Both launchers run the same script with `torch.distributed` directly. Medians of --reps runs; results are
appended to benchmarks/results/launch.csv. Goal (issue 7): singa-launch at most 1.1x torchrun's times.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from benchmarks.common import print_table, write_csv

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model(torch.randn(32, 64)).sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    if rank == 0:
        print(f"FIRST_STEP {time.time():.6f}", flush=True)
    dist.barrier()
    if sys.argv[1] == "fail":
        if rank == size - 1:
            print(f"FAILED_AT {time.time():.6f}", flush=True)
            os._exit(1)
        time.sleep(120)
    dist.destroy_process_group()
    if rank == 0:
        print(f"DONE {time.time():.6f}", flush=True)
""")


LAUNCHERS = ("torchrun", "singa-launch")


def launcher_command(launcher: str, nprocs: int, script: str, mode: str) -> list[str]:
    if launcher == "singa-launch":
        return [sys.executable, "-m", "launchers.launch", "-np", str(nprocs), script, mode]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
            script, mode]


def _stamp(name: str, text: str) -> float:
    match = re.search(rf"{name} (\d+\.\d+)", text)
    if match is None:
        raise RuntimeError(f"no {name} in the output:\n{text[-2000:]}")
    return float(match.group(1))


def run_once(launcher: str, nprocs: int, script: str, mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(launcher_command(launcher, nprocs, script, mode), capture_output=True, text=True,
                          env=env, timeout=300, start_new_session=True)
    end = time.time()
    out = proc.stdout + proc.stderr
    if (proc.returncode == 0) != (mode == "ok"):
        raise RuntimeError(f"{launcher} -np {nprocs} ({mode}) exited with {proc.returncode}:\n{out[-2000:]}")
    row = {"first_step_s": _stamp("FIRST_STEP", out) - start}
    row["teardown_s"] = end - _stamp("DONE" if mode == "ok" else "FAILED_AT", out)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "step.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        rows = []
        for nprocs in args.procs:
            runs = {launcher: {"ok": [], "fail": []} for launcher in LAUNCHERS}
            for _ in range(args.reps):  # interleaved, so that a change in the machine's load hits both alike
                for launcher in LAUNCHERS:
                    for mode in ("ok", "fail"):
                        runs[launcher][mode].append(run_once(launcher, nprocs, script, mode))
            measured = {}
            for launcher in LAUNCHERS:
                ok, fail = runs[launcher]["ok"], runs[launcher]["fail"]
                measured[launcher] = {
                    "first_step_s": statistics.median(r["first_step_s"] for r in ok + fail),
                    "teardown_done_s": statistics.median(r["teardown_s"] for r in ok),
                    "teardown_failure_s": statistics.median(r["teardown_s"] for r in fail),
                }
            for metric in ("first_step_s", "teardown_done_s", "teardown_failure_s"):
                singa, torchrun = measured["singa-launch"][metric], measured["torchrun"][metric]
                rows.append({"benchmark": "launch", "nprocs": nprocs, "metric": metric, "singa_launch": singa,
                             "torchrun": torchrun, "ratio": singa / torchrun, "reps": args.reps})
    print_table(rows, ["nprocs", "metric", "singa_launch", "torchrun", "ratio"])
    path = write_csv("launch", rows)
    print(f"results appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
