"""Soak: many short jobs back to back, and long runs whose memory must not grow.

    python -m benchmarks.soak [--jobs 200] [--runs 50] [--steps 10000] [--part launch|run|long] [--no-csv]

- launch: `--jobs` short jobs through singa-launch, one after another, cycling through the strategies
  (AllReduce, Sandblaster, Downpour, Hogwild, Hybrid): each must exit 0 with every worker's answer right,
  within its timeout (no hang), with no "address already in use" anywhere in its output (no port collision),
  and with no process of it alive once the launcher has returned;
- run: `--runs` calls of sd.run from one Python process, as a notebook would make them: the same checks;
- long: `--steps` training steps under each strategy; every process's resident memory (workers and servers)
  is sampled from outside once a second, and its growth from the end of the first quarter of the run to the
  end is reported (MiB and percent).
A row per part and strategy goes to benchmarks/results/soak.csv. Exit status 0 when everything held.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.faults import LAUNCH, ROOT, marked

# name -> singa-launch flags (2 workers unless the strategy needs more)
STRATEGIES = {
    "allreduce": ["-np", "2"],
    "sandblaster": ["-np", "2", "--strategy", "sandblaster", "--servers", "1"],
    "downpour": ["-np", "2", "--strategy", "downpour", "--worker-groups", "2", "--servers", "1"],
    "hogwild": ["-np", "2", "--strategy", "hogwild", "--sync-freq", "4"],
    "hybrid": ["-np", "4", "--strategy", "hybrid", "--worker-groups", "2", "--servers", "1"],
}

SHORT = textwrap.dedent("""
    import torch
    import singa_dist as sd
    from benchmarks.soak import short_job
    torch.set_num_threads(1)
    sd.init()
    total, params = short_job()
    ok = total == sd.size() * (sd.size() - 1) / 2 and all(torch.isfinite(p).all() for p in params)
    print(f"SOAK {sd.rank()} {'ok' if ok else 'WRONG'}", flush=True)
""")


LONG = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn
    import singa_dist as sd
    torch.set_num_threads(1)
    sd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), named_parameters=model.named_parameters())
    gen = torch.Generator().manual_seed(sd.rank())
    x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    steps, progress = int(sys.argv[1]), sys.argv[2]
    for step in range(steps):
        if sd.rank() == 0 and step % 100 == 0:
            with open(progress + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(progress + ".tmp", progress)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    print(f"SOAK {sd.rank()} {'ok' if torch.isfinite(loss) else 'WRONG'} loss {loss.item():.4f}", flush=True)
""")


def _workers(flags: list[str]) -> int:
    return int(flags[flags.index("-np") + 1])


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _progress(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _launch(folder: Path, mark: str, flags: list[str], script: str, args: list[str], timeout: float,
            sample: bool = False) -> dict:
    """Run one job; return its exit status, output, seconds, leftover processes and memory samples: for each
    process, (step rank 0 has reached, resident MiB) once a second."""
    path = folder / "job.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SINGA_FAULT_CASE": mark,
           "SINGA_TIMEOUT": "60"}
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(LAUNCH + flags + [str(path), *args], cwd=str(ROOT), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        samples: dict[int, list[tuple[float, float]]] = {}
        hung = False
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                hung = True
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            if sample:
                now = _progress(folder / "progress")
                for pid in marked(mark):
                    if pid == proc.pid:
                        continue
                    rss = _rss_mib(pid)
                    if rss is not None:
                        samples.setdefault(pid, []).append((now, rss))
            time.sleep(1.0 if sample else 0.05)
        seconds = time.monotonic() - start
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    time.sleep(0.2)
    left = marked(mark)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return {"code": proc.returncode, "text": text, "seconds": seconds, "left": len(left), "hung": hung,
            "samples": samples}


def _collision(text: str) -> bool:
    low = text.lower()
    return "address already in use" in low or "eaddrinuse" in low


def soak_launch(jobs: int) -> list[dict]:
    names = list(STRATEGIES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="singa-soak-") as folder:
        for i in range(jobs):
            name = names[i % len(names)]
            r = _launch(Path(folder), f"soak{os.getpid()}j{i}", STRATEGIES[name], SHORT, [], timeout=120)
            r["ok"] = (r["code"] == 0 and not r["hung"] and r["left"] == 0 and not _collision(r["text"])
                       and r["text"].count(" ok") == _workers(STRATEGIES[name]) and "WRONG" not in r["text"])
            runs[name].append(r)
            if not r["ok"]:
                print(f"job {i} ({name}) FAILED: exit {r['code']}, {r['left']} left, hung {r['hung']}:\n"
                      + textwrap.indent(r["text"][-2000:], "    "), flush=True)
            elif (i + 1) % 25 == 0:
                print(f"{i + 1} jobs done", flush=True)
    rows = []
    for name, rs in runs.items():
        if not rs:
            continue
        secs = sorted(r["seconds"] for r in rs)
        rows.append({"part": "launch", "strategy": name, "count": len(rs), "held": sum(r["ok"] for r in rs),
                     "hung": sum(r["hung"] for r in rs), "leftover": sum(r["left"] for r in rs),
                     "port_collisions": sum(_collision(r["text"]) for r in rs),
                     "median_s": round(statistics.median(secs), 2), "max_s": round(secs[-1], 2)})
    return rows


def short_job():
    """Three steps of a small model, then the sum of the ranks; the same under singa-launch and sd.run."""
    import torch
    import torch.nn as nn
    import singa_dist as sd
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 8)).sum().backward()
        opt.step()
    return sd.allreduce(torch.tensor([float(sd.rank())]), op=sd.Sum, name="ranks").item(), \
        [p.detach().clone() for p in model.parameters()]


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def soak_run(runs: int) -> list[dict]:
    import torch
    import singa_dist as sd
    mark = f"soak{os.getpid()}run"
    os.environ["SINGA_FAULT_CASE"] = mark  # the processes sd.run starts carry it
    secs, held, errors, left_total = [], 0, [], 0
    try:
        for i in range(runs):
            start = time.monotonic()
            try:
                results = sd.run(short_job, np=2, timeout=120)
                ok = [r[0] for r in results] == [1.0, 1.0] and all(
                    torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
            except Exception as exc:  # noqa: BLE001 - reported below
                ok = False
                errors.append(f"run {i}: {type(exc).__name__}: {str(exc)[:300]}")
            secs.append(time.monotonic() - start)
            time.sleep(0.2)
            # multiprocessing's resource tracker: one helper of this process, for its whole life, by design
            left = [pid for pid in marked(mark) if not _is_resource_tracker(pid)]
            left_total += len(left)
            for pid in left:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            held += ok and not left
    finally:
        os.environ.pop("SINGA_FAULT_CASE", None)
    for e in errors:
        print(e, flush=True)
    secs.sort()
    return [{"part": "run", "strategy": "allreduce", "count": runs, "held": held, "hung": 0, "leftover": left_total,
             "port_collisions": sum("address already in use" in e.lower() for e in errors),
             "median_s": round(statistics.median(secs), 2), "max_s": round(secs[-1], 2)}]


def soak_long(steps: int, growth_mib: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="singa-soak-") as folder:
        for name, flags in STRATEGIES.items():
            progress = Path(folder) / "progress"
            progress.unlink(missing_ok=True)
            r = _launch(Path(folder), f"soak{os.getpid()}{name}", flags, LONG, [str(steps), str(progress)],
                        timeout=1800, sample=True)
            growth = []
            for pid, series in r["samples"].items():
                # From the first sample past a quarter of the steps (start-up is over) to the highest of the last
                # samples taken at 90% of the steps or later.
                early = [rss for step, rss in series if step >= steps // 4]
                late = [rss for step, rss in series if step >= steps * 9 // 10]
                if not early or not late:
                    continue
                quarter, end = early[0], max(late)
                growth.append((end - quarter, 100 * (end - quarter) / quarter, quarter, end))
            worst = max(growth, default=(0.0, 0.0, 0.0, 0.0))
            ok = (r["code"] == 0 and not r["hung"] and r["left"] == 0 and "WRONG" not in r["text"]
                  and r["text"].count(" ok") == _workers(flags) and bool(growth) and worst[0] <= growth_mib)
            if not ok:
                print(f"long run ({name}) FAILED: exit {r['code']}, growth {worst}:\n"
                      + textwrap.indent(r["text"][-2000:], "    "), flush=True)
            rows.append({"part": f"long ({steps} steps)", "strategy": name, "count": len(growth), "held": int(ok),
                         "hung": int(r["hung"]), "leftover": r["left"], "port_collisions": int(_collision(r["text"])),
                         "median_s": round(r["seconds"], 1), "max_s": round(r["seconds"], 1),
                         "rss_quarter_mib": round(worst[2], 1), "rss_end_mib": round(worst[3], 1),
                         "growth_mib": round(worst[0], 2), "growth_pct": round(worst[1], 2)})
            print(f"long {name}: {r['seconds']:.0f} s, worst growth {worst[0]:.2f} MiB ({worst[1]:.2f}%) "
                  f"over {len(growth)} processes", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--growth-mib", type=float, default=8.0,
                        help="most a process's resident memory may grow after the first quarter of a long run")
    parser.add_argument("--part", choices=("launch", "run", "long"), action="append",
                        help="only these parts (default: all)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    parts = args.part or ["launch", "run", "long"]
    rows = []
    if "launch" in parts:
        rows += soak_launch(args.jobs)
    if "run" in parts:
        rows += soak_run(args.runs)
    if "long" in parts:
        rows += soak_long(args.steps, args.growth_mib)
    from benchmarks.common import print_table, write_csv
    columns = ["part", "strategy", "count", "held", "hung", "leftover", "port_collisions", "median_s", "max_s"]
    if any("growth_mib" in r for r in rows):
        columns += ["rss_quarter_mib", "rss_end_mib", "growth_mib", "growth_pct"]
    print()
    print_table(rows, columns)
    bad = [r for r in rows if r["held"] != (r["count"] if not r["part"].startswith("long") else 1)]
    print(f"\nsoak: {'held' if not bad else 'FAILED: ' + ', '.join(r['part'] + ' ' + r['strategy'] for r in bad)}")
    if not args.no_csv and rows:
        write_csv("soak", [{c: r.get(c, "") for c in columns + ["rss_quarter_mib", "rss_end_mib", "growth_mib",
                                                                "growth_pct"]} for r in rows])
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
