"""A scaling model measured on this machine, checked against measured runs, and its predictions up to 1024 workers.

    python -m benchmarks.scaling [--quick] [--repeats 2] [--reps 10] [--no-shaped] [--rate-mbit 1000] [--refit]

1. Measures: one process's compute time per step for the two models of benchmarks/dist_overhead.py ("few_large":
   4 Linear(1024, 1024), 16 MiB of gradients; "many_small": 100 Linear(32, 32), 200 tensors) and the zoo's models;
   in worlds of 2, 3 and 4 workers (sd.run: Gloo, one intra-op thread each), taking turns repetition by
   repetition, the compute time with that many processes sharing the cores and the step time of AllReduce,
   Sandblaster (1 server), Downpour (one worker per group, 1 server) and Hogwild (sync_freq 2); in the 2-worker
   worlds single all-reduces of 4 KiB to 16 MiB (Gloo's alpha and bandwidth) and round trips to a parameter
   server (torch.distributed.rpc's).
2. The same AllReduce worlds with one rank per network namespace, the namespaces joined by veth pairs to a bridge,
   every veth shaped by `tc tbf` to --rate-mbit (skipped, with the reason, where `ip netns`/`tc` are not permitted).
3. Fits the links (benchmarks/cost_model.py) and two CPU constants per framework (per tensor and per byte, from
   the 2-worker worlds) and predicts every measured step from the compute time measured in the same world and the
   contention for the cores; prints predicted against measured step time and the relative error (goal: within
   10%); rows appended to benchmarks/results/scaling.csv, raw measurements in scaling_measurements.json (--refit
   fits them again without measuring).
4. Predicts step time and scaling efficiency from 1 to 1024 workers at 10, 25, 100 and 400 Gbit/s for the zoo's
   models and ResNet-50 / BERT-sized parameter counts, and for the published settings of Horovod and SINGA's
   DistOpt; writes benchmarks/results/scaling_efficiency.png, scaling_prediction.csv and scaling_wins.csv.

`--timeline-png PNG --trace JSON [--trace-framework sandblaster]` records a short run's timeline and draws it
(`--timeline-from JSON` draws an existing trace): one row per rank or server, spans coloured by kind.
See docs/scaling.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import cost_model
from benchmarks.common import RESULTS, machine, print_table, write_csv

KINDS = ("few_large", "many_small")
SWEEP_BYTES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)
SWEEP_BLOCK = 5  # all-reduces of one size timed back to back after a barrier
HOGWILD_SYNC_FREQ = 2
GBITS = (10, 25, 100, 400)
WORKERS = tuple(2 ** i for i in range(11))  # 1 .. 1024

# Models for the predictions: gradient bytes (fp32) and a compute time per step on a current GPU. The GPU step
# times are assumptions stated here (typical fp32 throughput at the batch named), not measured on this machine.
PREDICTED_MODELS = {
    "ResNet-50 (25.6M, 32 img, 100 ms)": (25.6e6 * 4, 0.100),
    "BERT-base (110M, 32 seq, 150 ms)": (110e6 * 4, 0.150),
    "BERT-large (340M, 16 seq, 250 ms)": (340e6 * 4, 0.250),
}
BUCKET_BYTES = 25e6  # AllReduce's bucket size in the predictions (DDP's and the CUDA default)
# Published points. Horovod: ResNet-101 (44.5M), 90% at 512 GPUs, 25 Gbit/s RoCE, P100 at ~ 0.45 s per 64 images.
# SINGA DistOpt: ResNet-50 on K80s, 45 img/s on one, ~71% at 128; batch 32 per GPU (0.71 s), link speed
# not given: 10 Gbit/s assumed.
PUBLISHED = [
    {"who": "Horovod", "model": "ResNet-101", "param_bytes": 44.5e6 * 4, "compute_s": 0.45, "gbit": 25,
     "alpha": 10e-6, "workers": 512, "efficiency": 0.90},
    {"who": "SINGA DistOpt", "model": "ResNet-50", "param_bytes": 25.6e6 * 4, "compute_s": 32 / 45, "gbit": 10,
     "alpha": 50e-6, "workers": 128, "efficiency": 0.71},
]


# ----------------------------------------------------------------------------------------------------------------
# Measurements (every function below named *_rank runs on each process of a world)

def _times_ms(fn, reps: int, block: int = 1, barrier=None) -> list[float]:
    """Per repetition: `block` calls of fn after a barrier, in ms per call; returns all repetitions."""
    out = []
    for _ in range(reps):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        out.append((time.perf_counter() - t0) * 1e3 / block)
    return out


def compute_alone(kinds, reps: int) -> dict:
    """This process alone, one thread: step, forward and backward time per model (ms)."""
    import torch
    from benchmarks.dist_overhead import _step_fn, fresh_model

    torch.set_num_threads(1)
    out = {}
    for kind in kinds:
        model, x, y = fresh_model(kind, False, 0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        step = _step_fn(model, opt, x, y)
        for _ in range(3):
            step()
        steps = _times_ms(step, reps)
        fwd = _times_ms(lambda: model(x), reps)
        out[kind] = {"step_ms": statistics.median(steps), "forward_ms": statistics.median(fwd),
                     "tensors": len(list(model.parameters())),
                     "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    return out


def _echo(payload, answer_elems: int):
    """On a parameter server: take a message, answer with answer_elems floats (one RPC round trip)."""
    import torch

    return torch.zeros(answer_elems)


def measure_rank(framework: str, kinds, reps: int, sweep: bool) -> dict | None:
    """One world's measurements on every worker, taking turns repetition by repetition (so that changing load from
    other processes on the host affects them alike): a step without communication (the compute time with the
    world's processes sharing the cores), a step of the framework and, in an AllReduce world, single all-reduces
    of each size in SWEEP_BYTES (Gloo's alpha and bandwidth). Worker rank 0 returns them."""
    import torch
    import torch.distributed as dist
    import singa_dist as sd
    from benchmarks.dist_overhead import _step_fn, fresh_model

    barrier = sd.barrier
    result = {"framework": framework, "workers": sd.size(), "compute_ms": {}, "step_ms": {}, "buckets": {},
              "bytes_sent": {}, "sweep": [], "sweep_compute_ms": [], "compute_ranks_ms": {}}
    block = HOGWILD_SYNC_FREQ  # steps timed together: a whole Hogwild exchange period, and less barrier skew
    for kind in kinds:
        model, x, y = fresh_model(kind, False, sd.rank())
        local = _step_fn(model, torch.optim.SGD(model.parameters(), lr=1e-3), x, y)
        model, x, y = fresh_model(kind, False, sd.rank())
        strategy = sd.AllReduce() if framework == "allreduce" else framework
        opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                      named_parameters=model.named_parameters(), strategy=strategy)
        step = _step_fn(model, opt, x, y)
        for _ in range(2 * block + 1):
            local()
            step()
        tensors = {}
        if sweep and framework == "allreduce" and kind == kinds[0]:
            group = sd.workers_process_group()
            tensors = {n: torch.ones(n // 4) for n in SWEEP_BYTES}
            times = {n: [] for n in SWEEP_BYTES}
        compute, steps = [], []
        for _ in range(reps):
            compute += _times_ms(local, 1, block, barrier)
            steps += _times_ms(step, 1, block, barrier)
            for n, t in tensors.items():
                times[n] += _times_ms(lambda: dist.all_reduce(t, group=group), 1, SWEEP_BLOCK, barrier)
        result["compute_ms"][kind], result["step_ms"][kind] = compute, steps
        # Every worker's compute too: with more processes than cores some get a core to themselves and some share
        # one, and a synchronous step waits for the slowest (predict_measured).
        result["compute_ranks_ms"][kind] = sd.allgather_object(compute)
        if tensors:
            result["sweep"] = [(n, sd.size(), statistics.median(times[n]) / 1e3) for n in SWEEP_BYTES]
            result["sweep_compute_ms"] = compute
        result["buckets"][kind] = len(getattr(opt.strategy, "buckets", []) or [1])
        result["bytes_sent"][kind] = getattr(opt.strategy, "bytes_sent_last_step", None)
        if sweep and framework == "sandblaster" and kind == kinds[0]:
            if sd.rank() == 0:
                result["sweep"] = _rpc_sweep(reps)
            result["sweep_compute_ms"] = compute
        opt.strategy.close()
    return result if sd.rank() == 0 else None


def _rpc_sweep(reps: int) -> list:
    """Round trips to the first parameter server: n bytes out and 4 back, then 4 out and n back (seconds)."""
    import torch
    import singa_dist as sd
    from singa_dist.ps import transport

    server = sd.size()  # the servers are the last processes of the job
    samples = []
    for nbytes in SWEEP_BYTES:
        for payload, answer in ((torch.ones(nbytes // 4), 1), (torch.ones(1), nbytes // 4)):
            def call():
                transport.wait(server, transport.call_async(server, _echo, payload, answer), "the transport sweep")
            for _ in range(2):
                call()
            samples.append((nbytes, statistics.median(_times_ms(call, reps)) / 1e3))
    return samples


def run_world(framework: str, workers: int, kinds, reps: int, sweep: bool) -> dict:
    import singa_dist as sd

    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    nprocs = workers
    if framework in ("sandblaster", "downpour"):
        env.update(SINGA_STRATEGY=framework, SINGA_SERVERS="1")
        if framework == "downpour":
            env["SINGA_WORKER_GROUPS"] = str(workers)
        nprocs += 1
    elif framework == "hogwild":
        env.update(SINGA_STRATEGY="hogwild", SINGA_SYNC_FREQ=str(HOGWILD_SYNC_FREQ))
    return sd.run(measure_rank, np=nprocs, args=(framework, kinds, reps, sweep), env=env, timeout=600)[0]


# ----------------------------------------------------------------------------------------------------------------
# Shaped links: one rank per network namespace, veth pairs to a bridge, every veth shaped by tc

def _ip(*args, check: bool = True):
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise PermissionError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out


def tbf_burst_bytes(rate_mbit: int) -> int:
    """The token bucket of every shaped veth: at least one timer tick of traffic (10 ms here), or tbf caps the rate
    below `rate`; what it holds passes at once, unshaped (cost_model.shaped_share)."""
    return max(64, rate_mbit * 1000 // 8 // 100) * 1024  # tc's "kb" is 1024 bytes


@contextlib.contextmanager
def shaped_namespaces(count: int, rate_mbit: int):
    """`count` network namespaces, each with interface sg0 (address 10.233.<x>.<i+1>) on a veth pair to one
    bridge, both ends shaped to rate_mbit by tc's token bucket filter. Yields (namespace names, addresses);
    everything made is deleted on the way out, processes left inside killed. PermissionError where not allowed."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise PermissionError("iproute2's `ip` and `tc` are not installed")
    tag = str(os.getpid())[-5:]
    subnet = f"10.233.{os.getpid() % 200 + 20}"
    hub = f"sgscale_hub{tag}"
    names = [f"sgscale_{i}_{tag}" for i in range(count)]
    made = []
    shape = ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", f"{tbf_burst_bytes(rate_mbit) // 1024}kb", "latency",
             "100ms"]

    def tc(ns, *args):
        out = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise PermissionError(f"tc {' '.join(args)} in {ns}: {out.stderr.strip() or out.returncode}")

    try:
        for ns in [hub, *names]:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            a, b = f"sgs{tag}a{i}", f"sgs{tag}b{i}"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", hub)
            _ip("-n", ns, "link", "set", a, "name", "sg0")
            _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", "sg0")
            _ip("-n", ns, "link", "set", "sg0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "set", b, "master", "br0")
            _ip("-n", hub, "link", "set", b, "up")
            tc(ns, "qdisc", "add", "dev", "sg0", *shape)  # what the rank sends
            tc(hub, "qdisc", "add", "dev", b, *shape)  # what it receives
        yield names, [f"{subnet}.{i + 1}" for i in range(count)]
    finally:
        for ns in made:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _ip("netns", "del", ns, check=False)


def _shaped_rank_main(argv) -> None:
    """`python -m benchmarks.scaling --shaped-rank KINDS REPS SWEEP`: one rank of a shaped world (torchrun-style
    environment); rank 0 prints its measurements as one JSON line."""
    import torch
    import singa_dist as sd

    torch.set_num_threads(1)
    kinds, reps, sweep = argv[0].split(","), int(argv[1]), argv[2] == "1"
    sd.init()
    try:
        result = measure_rank("allreduce", kinds, reps, sweep)
    finally:
        sd.shutdown()
    if result is not None:
        print("SCALING " + json.dumps(result), flush=True)


def run_shaped_world(namespaces, addresses, kinds, reps: int, sweep: bool) -> dict:
    from singa_dist.environment import free_port

    port = free_port()
    procs = []
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "WORLD_SIZE": str(len(namespaces)),
            "MASTER_ADDR": addresses[0], "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "sg0",
            "TP_SOCKET_IFNAME": "sg0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    try:
        for rank, ns in enumerate(namespaces):
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.scaling", "--shaped-rank",
                   ",".join(kinds), str(reps), "1" if sweep else "0"]
            procs.append(subprocess.Popen(cmd, env={**base, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        try:
            outs = [p.communicate(timeout=600) for p in procs]
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"a shaped-link world did not finish within {exc.timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait()
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a shaped-link rank failed (status {p.returncode}):\n{out[-2000:]}{err[-4000:]}")
    line = next(line for line in outs[0][0].splitlines() if line.startswith("SCALING "))
    return json.loads(line[len("SCALING "):])


# ----------------------------------------------------------------------------------------------------------------
# Predictions of the measured runs

def _tensors(kind: str, alone: dict) -> int:
    if "tensors" in alone[kind]:
        return alone[kind]["tensors"]
    from benchmarks.dist_overhead import make_model
    return len(list(make_model(kind, False).parameters()))


def synchronous_compute_ms(world: dict, kind: str) -> float:
    """The compute time a synchronous step waits for: per repetition the slowest worker's, median over the
    repetitions (rank 0's median where a run stored no other rank's). With 3 processes on 2 cores a short step
    runs on a core of its own on one rank and on a shared one on the others: rank 0's alone is no measure."""
    ranks = world.get("compute_ranks_ms", {}).get(kind)
    if not ranks:
        return statistics.median(world["compute_ms"][kind])
    if len({len(r) for r in ranks}) != 1:
        raise ValueError(f"{world['framework']} x{world['workers']}: the ranks' compute samples of {kind} differ in "
                         f"number ({[len(r) for r in ranks]})")
    return statistics.median(max(rep) for rep in zip(*ranks))


def predict_measured(world: dict, alone: dict, links: dict, overhead: bool = True) -> list[dict]:
    """Predicted against measured step time of every model in one world's measurements (overhead=False: without the
    fitted CPU overhead per tensor and per byte).

    links: fit_links(). Compute is the time measured in the world itself (a synchronous one's slowest worker's,
    synchronous_compute_ms). The CPU's other work is scaled by what
    shares it: on loopback the cores that compute also copy the bytes, so a world with more busy processes than
    cores moves them contention(procs, cores) times slower than the 2-process sweep did; a shaped link's wire is
    its own limit, and the RPC's transfers are waits. The CPU overhead is charged per push on a parameter server
    (it takes every worker's push in turn), elsewhere once per step at the world's contention (Hogwild's per tensor
    on the (p-1)/p of the slices it exchanges; Sandblaster's per-byte once per step: its one update and the
    workers' own copies). Each row's `overhead_scale` and `byte_scale` are those factors for the per-tensor and
    the per-byte constant."""
    fw, p, network = world["framework"], world["workers"], world["network"]
    rows = []
    needed = "shaped" if network == "shaped" else "gloo" if fw == "allreduce" else "rpc"
    if needed not in links:  # its fit world failed or was not measured
        return []
    cores = links["cores"]
    server = fw in ("sandblaster", "downpour")
    procs = p + 1 if server else p  # one server process beside the workers
    contention = cost_model.contention(procs, cores)
    for kind, steps in world["step_ms"].items():
        compute_ms = synchronous_compute_ms(world, kind) if fw in ("allreduce", "sandblaster") else \
            statistics.median(world["compute_ms"][kind])
        base = alone[kind]
        work = cost_model.Workload(kind, base["param_bytes"], compute_ms / 1e3,
                                   backward_share=max(0.0, 1 - base["forward_ms"] / base["step_ms"]),
                                   buckets=world["buckets"][kind])
        link = links[needed]
        # The sweeps ran with 2 busy processes. Contention slows the copies (CPU work), not alpha (a wait for the
        # peer); a server's transfers are its pushes in turn (the load), as the workers wait while it works, and a
        # Hogwild process sends its p-1 deltas at once and blocks until they are answered: its cores serve others.
        relative = contention / cost_model.contention(2, cores)
        c = 1.0 if network == "shaped" or server or fw == "hogwild" else relative
        link = cost_model.Link(link.alpha, link.bandwidth / c, link.burst)
        per_tensor, per_byte = links["overhead"].get((network, fw), (0.0, 0.0)) if overhead else (0.0, 0.0)
        cpu = per_tensor * _tensors(kind, alone) + per_byte * base["param_bytes"]
        if fw == "allreduce":
            # Gloo's all-reduce copies on the cores the backward pass uses: it hides behind backward only where the
            # wire, not the CPU, is the limit (a shaped link).
            # A ring step also waits for its receiver to get a core, as much longer than in the sweep as the
            # contention is (cost_model.ring_allreduce_s).
            pred = cost_model.step_s("allreduce_ring", work, p, link, overlap=1.0 if network == "shaped" else 0.0,
                                     hop_contention=relative)
        elif fw == "sandblaster":
            # Its byte work beyond the wire runs once per step, not per push: the server's one update (average,
            # optimizer, the values answered) and each worker's own copies (into its message, out of the answer).
            pred = cost_model.step_s("sandblaster", work, p, link, servers=1,
                                     server_push_s=per_tensor * _tensors(kind, alone),
                                     server_update_s=per_byte * base["param_bytes"])
        elif fw == "downpour":
            pred = cost_model.step_s("downpour", work, p, link, servers=1, groups=p, server_push_s=cpu)
        else:
            pred = cost_model.step_s("hogwild", work, p, link, sync_freq=HOGWILD_SYNC_FREQ)
        # Per step: pushes per server; AllReduce's hooks and copies at the cores' share. Hogwild: each slice's
        # exchange work (read, delta, pack, a master's merge, apply) covers the (p-1)/p of the slices a process does
        # not master (and as a master, the others' deltas of its 1/p), but its bytes beyond the wire are the
        # whole replica's, every step at any p: compared with and copied to the last step's (hogwild.Hogwild.step).
        # Sandblaster's bytes beyond the wire: once per step (above).
        scale = float(p) if server else contention * (p - 1) / p if fw == "hogwild" else contention
        byte_scale = contention if fw == "hogwild" else 1.0 if fw == "sandblaster" else scale
        if not server:
            pred += per_tensor * _tensors(kind, alone) * scale + per_byte * base["param_bytes"] * byte_scale
        measured = statistics.median(steps)
        rows.append({"repeat": world["repeat"], "network": network, "framework": fw, "workers": p, "model": kind,
                     "compute_ms": compute_ms, "measured_ms": measured,
                     "spread_ms": f"{min(steps):.1f}-{max(steps):.1f}", "predicted_ms": pred * 1e3,
                     "error": pred * 1e3 / measured - 1, "fit_point": p == 2,
                     "slowdown": compute_ms / base["step_ms"], "overhead_scale": scale, "byte_scale": byte_scale})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Predictions at scale, the plot and where each framework wins

def scaled_options(framework: str, p: int) -> dict:
    """The settings the predictions use per framework: Sandblaster with one server per 8 workers, Downpour with
    groups of 8 workers (one server per group), Hogwild exchanging every 8 steps."""
    if framework == "sandblaster":
        return {"servers": max(1, p // 8)}
    if framework == "downpour":
        groups = max(1, p // 8)
        return {"servers": groups, "groups": groups}
    if framework == "hogwild":
        return {"sync_freq": 8}
    return {}


def zoo_workloads(reps: int) -> dict:
    """The zoo's models (examples/) at their scripts' default batch: gradient bytes and the step time of one
    process on this machine's CPU, one thread."""
    import torch
    import torch.nn.functional as F
    from examples import char_rnn, digits_cnn, digits_mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rnn = char_rnn.CharRNN(65, 512)
    cases = {
        "zoo digits_mlp (batch 64)": (digits_mlp.build_model(), torch.randn(64, 64), torch.randint(0, 10, (64,))),
        "zoo digits_cnn (batch 64)": (digits_cnn.build_model(), torch.randn(64, 1, 8, 8),
                                      torch.randint(0, 10, (64,))),
        "zoo char_rnn (512 units, 16x50)": (rnn, torch.randint(0, 65, (16, 50)), torch.randint(0, 65, (16, 50))),
    }
    out = {}
    for name, (model, x, y) in cases.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            logits = model(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
            opt.step()
        for _ in range(2):
            step()
        out[name] = (sum(p.numel() * p.element_size() for p in model.parameters()),
                     statistics.median(_times_ms(step, reps)) / 1e3)
    return out


def predict_scale(alpha: float, efficiency: float, zoo: dict) -> list[dict]:
    models = {name: cost_model.Workload(name, b, s, 0.6, math.ceil(b / BUCKET_BYTES))
              for name, (b, s) in {**PREDICTED_MODELS, **zoo}.items()}
    rows = []
    for name, work in models.items():
        for gbit in GBITS:
            link = cost_model.Link.gbit(gbit, alpha, efficiency)
            for framework in cost_model.FRAMEWORKS:
                for compression in (None, "fp16"):
                    if compression and framework not in ("allreduce_ring", "sandblaster"):
                        continue
                    for p in WORKERS:
                        options = scaled_options(framework, p)
                        step = cost_model.step_s(framework, work, p, link, compression=compression, **options)
                        rows.append({"model": name, "gbit": gbit, "framework": framework + ("+fp16" if compression
                                                                                             else ""),
                                     "workers": p, "step_ms": step * 1e3, "efficiency": work.compute_s / step})
    return rows


def published_points(efficiency: float) -> list[dict]:
    out = []
    for pub in PUBLISHED:
        work = cost_model.Workload(pub["model"], pub["param_bytes"], pub["compute_s"], 0.6,
                                   math.ceil(pub["param_bytes"] / BUCKET_BYTES))
        link = cost_model.Link.gbit(pub["gbit"], pub["alpha"], efficiency)
        # The backward pass hides the buckets fully (Horovod, NCCL on its own stream) or not at all: the two bounds.
        out.append({**pub, "predicted": cost_model.efficiency("allreduce_ring", work, pub["workers"], link),
                    "predicted_no_overlap": cost_model.efficiency("allreduce_ring", work, pub["workers"], link,
                                                                  overlap=0.0)})
    return out


SYNCHRONOUS = ("allreduce_ring", "allreduce_tree", "sandblaster")


def wins_table(rows: list[dict]) -> list[dict]:
    """For each model, link and worker count: the synchronous framework with the highest predicted efficiency, and
    the best of all (Downpour and Hogwild train on stale values: more steps to the same accuracy, which this
    throughput model does not count)."""
    best = {}
    for r in rows:
        key = (r["model"], r["gbit"], r["workers"])
        sync = r["framework"].split("+")[0] in SYNCHRONOUS
        entry = best.setdefault(key, {"sync": None, "any": None})
        for which in ("sync", "any") if sync else ("any",):
            if entry[which] is None or r["efficiency"] > entry[which]["efficiency"]:
                entry[which] = r
    return [{"model": m, "gbit": g, "workers": p, "synchronous_winner": e["sync"]["framework"],
             "synchronous_efficiency": e["sync"]["efficiency"], "overall_winner": e["any"]["framework"],
             "overall_efficiency": e["any"]["efficiency"]}
            for (m, g, p), e in sorted(best.items(), key=lambda kv: kv[0])]


def plot_efficiency(rows: list[dict], published: list[dict], path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GBITS), figsize=(4.2 * len(GBITS), 4), sharey=True)
    frameworks = sorted({r["framework"] for r in rows})
    for ax, gbit in zip(axes, GBITS):
        for fw in frameworks:
            pts = [(r["workers"], r["efficiency"]) for r in rows
                   if r["model"] == model and r["gbit"] == gbit and r["framework"] == fw]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=fw)
        for pub in published:
            if pub["gbit"] == gbit:
                ax.scatter([pub["workers"]], [pub["efficiency"]], marker="*", s=160, color="black", zorder=5)
                ax.scatter([pub["workers"]] * 2, [pub["predicted"], pub["predicted_no_overlap"]], marker="x", s=80,
                           color="red", zorder=5)
                ax.annotate(f"{pub['who']} {pub['efficiency']:.0%}\n(model {pub['predicted_no_overlap']:.0%}-"
                            f"{pub['predicted']:.0%})",
                            (pub["workers"], pub["efficiency"]), textcoords="offset points", xytext=(-60, -32),
                            fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{gbit} Gbit/s")
        ax.set_xlabel("workers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"predicted scaling efficiency\n{model}")
    axes[0].set_ylim(0, 1.05)
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.text(0.01, 0.01, "black star: published efficiency at its setting; red x: this model's prediction for it, "
             "communication hidden behind backward fully (upper) or not at all (lower)", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Timeline screenshot

KIND_COLOURS = {"forward": "#4e79a7", "backward": "#f28e2b", "step": "#bab0ac", "update": "#76b7b2",
                "gather": "#edc948", "scatter": "#b07aa1", "comm": "#e15759", "wait": "#9c755f",
                "negotiate": "#59a14f", "compress": "#ff9da7", "decompress": "#ff9da7", "push": "#e15759",
                "pull": "#76b7b2", "apply": "#59a14f"}


def render_timeline(trace_path, png_path, *, max_ms: float | None = None, title: str | None = None,
                    dpi: int = 110) -> int:
    """Draw a Chrome trace (singa_dist.timeline's file) as a PNG: one row per process (rank or server), spans
    coloured by kind (`cat`); in each row the training loop's lane (a server's updates) on top, the communication
    lanes (buckets, negotiation, pushes) below, spans nested in others drawn thinner. Time runs from the first
    forward pass (set-up before it is left out); max_ms: draw only that many ms. Returns the number of spans drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M" and "name" in e.get("args", {})]
    names = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    top_lanes = {(e["pid"], e.get("tid")) for e in meta if e.get("name") == "thread_name"
                 and e["args"]["name"] in ("training loop", "updates")}
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise ValueError(f"{trace_path}: no complete ('X') events to draw")
    forwards = [e["ts"] for e in spans if e.get("cat") == "forward"]
    start = min(forwards) if forwards else min(e["ts"] for e in spans)
    spans = [e for e in spans if e["ts"] + e.get("dur", 0) >= start
             and (max_ms is None or (e["ts"] - start) / 1e3 < max_ms)]
    pids = sorted({e["pid"] for e in spans})
    row = {pid: i for i, pid in enumerate(pids)}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(pids)))
    seen = set()

    def top(e):
        return (e["pid"], e.get("tid")) in top_lanes or (not top_lanes and e.get("tid", 0) == 0)

    for e in sorted(spans, key=lambda e: -e.get("dur", 0)):  # long spans first, nested ones drawn on top
        kind = e.get("cat", "other")
        seen.add(kind)
        band = top(e)
        depth = sum(1 for o in spans if o is not e and o["pid"] == e["pid"] and top(o) == band
                    and o["ts"] <= e["ts"] and o["ts"] + o.get("dur", 0) >= e["ts"] + e.get("dur", 0)
                    and o.get("dur", 0) > e.get("dur", 0))
        height = 0.42 * 0.65 ** min(depth, 3)
        centre = row[e["pid"]] + (-0.2 if band else 0.24)
        ax.broken_barh([((max(e["ts"], start) - start) / 1e3, max(e.get("dur", 0) / 1e3, 1e-3))],
                       (centre - height / 2, height), facecolors=KIND_COLOURS.get(kind, "#cccccc"), edgecolor="none")
    ax.set_yticks(range(len(pids)), [names.get(pid, f"process {pid}") for pid in pids])
    ax.set_ylim(len(pids) - 0.5, -0.5)
    ax.set_xlabel("ms from the first forward pass (each row: training loop above, communication lanes below)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=KIND_COLOURS.get(k, "#cccccc"), label=k) for k in sorted(seen)], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return len(spans)


def record_trace_rank(framework: str, path: str, steps: int) -> None:
    """A short run of the few_large model with the timeline on (every worker). AllReduce starts the timeline after
    3 warm-up steps; Sandblaster records from the environment (SINGA_TIMELINE), so that its servers record too."""
    import torch
    import singa_dist as sd
    from benchmarks.dist_overhead import _step_fn, fresh_model

    model, x, y = fresh_model("few_large", False, sd.rank())
    strategy = sd.AllReduce() if framework == "allreduce" else framework
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                  named_parameters=model.named_parameters(), strategy=strategy)
    step = _step_fn(model, opt, x, y)
    if framework == "allreduce":
        for _ in range(3):
            step()
        sd.start_timeline(path)
    for _ in range(steps):
        step()
    if framework == "allreduce":
        sd.stop_timeline()
    opt.strategy.close()


# ----------------------------------------------------------------------------------------------------------------

def _timeline(args) -> None:
    import singa_dist as sd

    if args.trace:
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        nprocs = 2
        if args.trace_framework == "sandblaster":  # 2 workers and 1 server, all recording from the start
            env.update(SINGA_STRATEGY="sandblaster", SINGA_SERVERS="1", SINGA_TIMELINE=os.path.abspath(args.trace))
            nprocs = 3
        sd.run(record_trace_rank, np=nprocs, args=(args.trace_framework, os.path.abspath(args.trace), 4), env=env,
               timeout=300)
    trace = args.trace or args.timeline_from
    if trace is None:
        raise SystemExit("--timeline-png needs --trace JSON (record one) or --timeline-from JSON (an existing trace)")
    spans = render_timeline(trace, args.timeline_png, max_ms=args.timeline_ms, title=args.timeline_title)
    print(f"{spans} spans of {trace} drawn to {args.timeline_png}")


def fit_links(worlds, alone: dict, cores: int, rate_mbit: int | None = None) -> dict:
    """The fitted constants of one run: the links (Gloo's and the RPC's from the loopback sweeps, the shaped link's
    from its sweep, with the token bucket's burst of its rate_mbit), the host's cores and, per framework and
    network, the CPU time per tensor and per gradient byte a step spends beyond the model (hooks, negotiation,
    copies into buckets and messages, a server's unpacking, update and answer, Hogwild's deltas and replica),
    taken from the 2-worker world only: what its measured steps exceed the prediction without it."""
    links = {"cores": cores, "overhead": {}}
    for world in worlds:
        if world["framework"] == "allreduce" and world["sweep"]:
            samples = [tuple(s) for s in world["sweep"]]
            burst = tbf_burst_bytes(rate_mbit) if world["network"] == "shaped" and rate_mbit else 0
            if burst:
                # A block starts with the bucket full (the sizes go up, and the one it saves most on, 1 MiB, follows
                # a block far under the burst): each all-reduce's first burst/SWEEP_BLOCK bytes a link carries are
                # unshaped, and only the rest tells the rate.
                samples = [(n * cost_model.shaped_share(2 * (q - 1) / q * n, burst / SWEEP_BLOCK), q, t)
                           for n, q, t in samples]
            link = cost_model.fit_link(samples, "ring")
            if burst:
                link = cost_model.Link(link.alpha, link.bandwidth, burst)
            links["shaped" if world["network"] == "shaped" else "gloo"] = link
        if world["framework"] == "sandblaster" and world["sweep"]:
            links["rpc"] = cost_model.fit_link([tuple(s) for s in world["sweep"]], "p2p")
    for world in worlds:
        if world["workers"] == 2:
            rows = predict_measured(world, alone, links, overhead=False)
            if rows:
                links["overhead"][world["network"], world["framework"]] = fit_overhead(rows, alone)
    return links


def fit_overhead(rows: list[dict], alone: dict) -> tuple[float, float]:
    """(seconds per tensor, seconds per gradient byte) of CPU work beyond the model and the wire, per unit of each
    row's overhead_scale and byte_scale (a push on a server, or a step at the world's contention), from what the
    measured steps exceed the prediction without it (cost_model.fit_overhead)."""
    features = [(_tensors(r["model"], alone) * r["overhead_scale"],
                 alone[r["model"]]["param_bytes"] * r["byte_scale"]) for r in rows]
    return cost_model.fit_overhead(features, [(r["measured_ms"] - r["predicted_ms"]) / 1e3 for r in rows],
                                   [r["measured_ms"] / 1e3 for r in rows])


def measure_all(plan, kinds, reps: int, repeats: int, shaped: bool, rate_mbit: int, started: float,
                save) -> dict:
    """Every measurement of a run, as plain data, handed to save() after each world (so that --refit can fit them
    again, also after an interrupted run). A world that fails is reported and left out."""
    raw = {"date": machine()["date"], "reps": reps, "repeats": repeats, "rate_mbit": rate_mbit,
           "alone": compute_alone(kinds, reps), "cores": os.cpu_count(),
           "zoo": zoo_workloads(reps), "worlds": [], "failed": []}

    def measured(world, network, repeat, what):
        raw["worlds"].append({**world, "network": network, "repeat": repeat})
        save(raw)
        print(f"[{time.perf_counter() - started:5.0f} s] {what} measured", flush=True)

    for repeat in range(repeats):
        for framework, workers in plan:
            sweep = workers == 2 and framework in ("allreduce", "sandblaster")
            try:
                world = run_world(framework, workers, kinds, reps, sweep)
            except RuntimeError as exc:
                raw["failed"].append(f"loopback {framework} x{workers}: {str(exc).splitlines()[0]}")
                print(f"loopback {framework} x{workers} failed, left out:\n{exc}", flush=True)
                continue
            measured(world, "loopback", repeat, f"loopback {framework} x{workers}")
        if not shaped:
            continue
        try:
            with shaped_namespaces(4, rate_mbit) as (names, addresses):
                for workers in sorted({w for fw, w in plan if fw == "allreduce"}):
                    world = run_shaped_world(names[:workers], addresses[:workers], kinds, reps, workers == 2)
                    measured(world, "shaped", repeat, f"shaped allreduce x{workers}")
        except PermissionError as exc:
            print(f"shaped links skipped: network namespaces or tc not permitted here ({exc})")
            shaped = False
        except RuntimeError as exc:
            raw["failed"].append(f"shaped allreduce: {str(exc).splitlines()[0]}")
            print(f"a shaped-link world failed, left out:\n{exc}", flush=True)
    return raw


LOOPBACK_PLAN = (("allreduce", 2), ("allreduce", 3), ("allreduce", 4), ("sandblaster", 2), ("sandblaster", 3),
                 ("downpour", 2), ("downpour", 3), ("hogwild", 2), ("hogwild", 3), ("hogwild", 4))
QUICK_PLAN = (("allreduce", 2), ("allreduce", 3), ("sandblaster", 2), ("sandblaster", 3), ("hogwild", 2),
              ("hogwild", 3))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--shaped-rank":
        return _shaped_rank_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run, fewer repetitions, the few_large model only")
    parser.add_argument("--repeats", type=int, default=None, help="measured runs of every world (default 2, quick 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 10, quick 5)")
    parser.add_argument("--no-shaped", action="store_true", help="skip the shaped-link worlds")
    parser.add_argument("--rate-mbit", type=int, default=1000, help="rate of the shaped veth links (Mbit/s)")
    parser.add_argument("--alpha-us", type=float, default=20.0,
                        help="per-message latency of the links in the predictions at scale (microseconds)")
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: fit and predict again from benchmarks/results/scaling_measurements.json")
    parser.add_argument("--timeline-png", metavar="PNG", help="only render a timeline: --trace or --timeline-from")
    parser.add_argument("--trace", metavar="JSON", help="with --timeline-png: record a 2-rank AllReduce trace here")
    parser.add_argument("--trace-framework", choices=("allreduce", "sandblaster"), default="allreduce",
                        help="with --trace: 2 AllReduce ranks, or 2 Sandblaster workers and 1 server")
    parser.add_argument("--timeline-from", metavar="JSON", help="with --timeline-png: an existing Chrome trace")
    parser.add_argument("--timeline-title", default=None, help="a title over the timeline")
    parser.add_argument("--timeline-ms", type=float, default=None, help="draw only the first this many ms")
    args = parser.parse_args(argv)
    if args.timeline_png:
        return _timeline(args)
    for name in ("repeats", "reps", "rate_mbit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    kinds = ("few_large",) if args.quick else KINDS
    reps = args.reps or (5 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 2)
    started = time.perf_counter()

    raw_path = RESULTS / "scaling_measurements.json"
    if args.refit:
        with open(raw_path) as f:
            raw = json.load(f)
        print(f"fitting the measurements of {os.path.relpath(raw_path)} ({raw['date']}) again")
    else:
        def save(raw):
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(raw_path, "w") as f:
                json.dump(raw, f)
        raw = measure_all(QUICK_PLAN if args.quick else LOOPBACK_PLAN, kinds, reps, repeats, not args.no_shaped,
                          args.rate_mbit, started, save)
    reps, repeats, rate_mbit = raw["reps"], raw["repeats"], raw["rate_mbit"]
    rows, fitted = [], []
    for repeat in range(repeats):
        worlds = [w for w in raw["worlds"] if w["repeat"] == repeat]
        links = fit_links(worlds, raw["alone"], raw.get("cores") or os.cpu_count(), rate_mbit)
        fitted.append(links)
        for world in worlds:
            rows += predict_measured(world, raw["alone"], links)

    info = machine()
    print(f"\n{info['device']}, torch {info['torch']}, Gloo and torch.distributed.rpc, one thread per process, "
          f"{reps} timed repetitions x {HOGWILD_SYNC_FREQ} steps, {repeats} run(s)")
    for i, links in enumerate(fitted):
        described = [f"{name}: alpha {links[name].alpha * 1e6:.0f} us, B {links[name].bandwidth / 1e6:.0f} MB/s"
                     for name in ("gloo", "rpc", "shaped") if name in links]
        overheads = [f"{network} {fw} {per_tensor * 1e6:.0f} us/tensor + {per_byte * 1e9:.2f} ns/B"
                     for (network, fw), (per_tensor, per_byte) in links["overhead"].items()]
        print(f"run {i}: fitted links {'; '.join(described)}; CPU overhead {', '.join(overheads)}")
    print_table(rows, ["repeat", "network", "framework", "workers", "model", "compute_ms", "measured_ms", "spread_ms",
                       "predicted_ms", "error"])
    for failed in raw.get("failed", []):
        print(f"left out (failed): {failed}")
    checked = [r for r in rows if not r["fit_point"]]
    if not checked:
        raise SystemExit("no measured world to check the predictions against")
    errors = [abs(r["error"]) for r in checked]
    within = sum(e <= 0.10 for e in errors)
    print(f"prediction error (leaving out the {len(rows) - len(checked)} fit points): median "
          f"{statistics.median(errors):.1%}, largest {max(errors):.1%}; {within} of {len(errors)} within 10%")
    for network in sorted({r["network"] for r in rows}):
        for fw in dict.fromkeys(r["framework"] for r in rows if r["network"] == network):
            errs = [f"{r['workers']}:{r['error']:+.0%}{'*' if r['fit_point'] else ''}" for r in rows
                    if r["network"] == network and r["framework"] == fw]
            print(f"  {network:8s} {fw:11s} workers:error {' '.join(errs)}  (* fit point)")
    # the overhead scales stay out: the CSV's columns are those of its first rows
    path = write_csv("scaling", [{k: v for k, v in r.items() if k not in ("overhead_scale", "byte_scale")}
                                 for r in rows])
    print(f"rows appended to {os.path.relpath(path)}")

    # Predictions at scale: the measured link efficiency (shaped link: fitted B over its rate) on faster links.
    shaped_links = [links["shaped"] for links in fitted if "shaped" in links]
    efficiency = (min(1.0, statistics.median(link.bandwidth for link in shaped_links) * 8 / (rate_mbit * 1e6))
                  if shaped_links else 0.9)
    zoo = raw["zoo"]
    predicted = predict_scale(args.alpha_us * 1e-6, efficiency, zoo)
    published = published_points(efficiency)
    wins = wins_table(predicted)
    for name, table in (("scaling_prediction", predicted), ("scaling_wins", wins)):
        with contextlib.suppress(FileNotFoundError):
            (RESULTS / f"{name}.csv").unlink()  # a fresh table per run (the measured rows accumulate)
        write_csv(name, table)
    png = RESULTS / "scaling_efficiency.png"
    plot_efficiency(predicted, published, png, "ResNet-50 (25.6M, 32 img, 100 ms)")
    print(f"\npredictions at scale: alpha {args.alpha_us:g} us, link efficiency {efficiency:.2f} "
          f"({'measured on the shaped link' if shaped_links else 'assumed'})")
    for pub in published:
        print(f"{pub['who']}: {pub['model']}, {pub['workers']} workers, {pub['gbit']} Gbit/s: published "
              f"{pub['efficiency']:.0%}, predicted {pub['predicted']:.0%} (buckets hidden behind backward) to "
              f"{pub['predicted_no_overlap']:.0%} (not hidden)")
    print_table([w for w in wins if w["workers"] in (8, 64, 512, 1024)],
                ["model", "gbit", "workers", "synchronous_winner", "synchronous_efficiency", "overall_winner",
                 "overall_efficiency"])
    print(f"{os.path.relpath(png)}, {os.path.relpath(RESULTS / 'scaling_prediction.csv')} and "
          f"{os.path.relpath(RESULTS / 'scaling_wins.csv')} written; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
