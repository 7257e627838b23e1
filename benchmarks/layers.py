"""Forward and backward time, and peak memory, of each native layer against the torch eager layer.

    python -m benchmarks.layers [--small | --cpu-sizes] [--threads N] [--only NAME] [--dtype float32]

Cases come from the `cases()` functions of benchmarks/layer_cases_*.py; each returns LayerCase objects.
Each case is first checked against the torch layer (same parameters, same inputs, forward and every gradient);
a disagreement beyond TOLERANCE is marked in the table and makes the run exit with an error at the end. Prints a
ratio table (torch time / native time: above 1 means the native layer is faster) and appends the rows to
benchmarks/results/layers.csv with the device and versions. Without a GPU it runs the CPU paths
at small sizes (a smoke run, not a performance figure); --cpu-sizes times the CPU paths at sizes a CPU
trains at (e.g. ResNet-18's 32x64x28x28 activations), which is the CPU performance figure.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import peak_memory_mb, print_table, time_ms, write_csv


@dataclass
class LayerCase:
    layer: str  # e.g. "Linear"
    shape: str  # e.g. "256x4096->4096"
    make_native: Callable[[], torch.nn.Module]
    make_torch: Callable[[], torch.nn.Module]
    make_inputs: Callable[[], tuple]  # fresh inputs; tensors that need gradients have requires_grad set
    # Bytes a memory-bound forward must move at least (inputs read once, outputs written once); 0 if not.
    min_bytes_forward: int = 0
    # Whether the native and torch outputs can be compared (not for dropout: the two draw different masks).
    deterministic: bool = True


# Largest error allowed before timing, relative to the reference's largest magnitude: float32 leaves room for
# TF32 (which torch's cuDNN convolutions use by default), the 16-bit types for their rounding.
TOLERANCE = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def check(case: LayerCase) -> tuple[float, float]:
    """(forward error, gradient error) of the native layer against the torch layer on the benchmark's inputs,
    with the torch layer given the native one's parameters; each relative to the torch result's largest
    magnitude, the gradient error the worst over the inputs and parameters. NaN where not comparable."""
    if not case.deterministic:
        return float("nan"), float("nan")
    native, ref = case.make_native(), case.make_torch()
    ours_p, ref_p = list(native.parameters()), list(ref.parameters())
    if [p.shape for p in ours_p] != [p.shape for p in ref_p]:
        raise ValueError(f"{case.layer} {case.shape}: the native and torch layers have different parameters")
    with torch.no_grad():
        for p, q in zip(ours_p, ref_p):
            q.copy_(p)
    inputs = case.make_inputs()
    twins = [tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                   for t in inputs) for _ in range(2)]
    out, out_ref = native(*twins[0]), ref(*twins[1])
    fwd_err = _relative_error(out, out_ref)
    # The same random upstream gradient for both: ones would hide errors that cancel.
    upstream = _upstream(out_ref)
    out.backward(upstream)
    out_ref.backward(upstream)
    pairs = [(a, b) for a, b in zip(twins[0], twins[1]) if isinstance(a, torch.Tensor) and a.requires_grad]
    pairs += list(zip(ours_p, ref_p))
    grad_err = max((_relative_error(a.grad, b.grad) for a, b in pairs if b.grad is not None), default=0.0)
    return fwd_err, grad_err


def _upstream(out: torch.Tensor) -> torch.Tensor | None:
    """The gradient backward starts from: dense and random as in training (the gradient of out.sum() would be
    a zero-stride tensor of ones that kernels read as one number); None for a loss, which starts from 1."""
    return torch.randn_like(out, memory_format=torch.contiguous_format) if out.dim() else None


# Native and torch are timed in turn, one repetition each, and each keeps its median: load from other work on
# the machine (a shared CPU) then falls on both alike instead of on whichever ran while it lasted.
REPS = 30


def _timers(module: torch.nn.Module, case: LayerCase):
    """Forward (as in training, building the graph) and backward alone, as functions to time."""
    inputs = case.make_inputs()
    out = module(*inputs)
    upstream = _upstream(out)
    return lambda: module(*inputs), lambda: out.backward(upstream, retain_graph=True)


def _peak_mb(module: torch.nn.Module, case: LayerCase) -> float:
    def step():
        out = module(*case.make_inputs())
        out.backward(_upstream(out))

    return peak_memory_mb(step)


def _measure(native: torch.nn.Module, ref: torch.nn.Module, case: LayerCase) -> tuple[dict, dict]:
    """Forward and backward times, and peak memory of both, of the native and the torch layer."""
    timers = [_timers(native, case), _timers(ref, case)]
    samples = [{"forward_ms": [], "backward_ms": []} for _ in timers]
    for fwd, bwd in timers:
        time_ms(fwd, reps=1)  # warm-up (time_ms runs each a few times first; this one timing is dropped)
        time_ms(bwd, reps=1)
    for _ in range(REPS):
        for (fwd, bwd), times in zip(timers, samples):
            times["forward_ms"].append(time_ms(fwd, warmup=0, reps=1))
            times["backward_ms"].append(time_ms(bwd, warmup=0, reps=1))
    results = [{name: statistics.median(t) for name, t in times.items()} for times in samples]
    for module, result in zip((native, ref), results):
        result["peak_mb"] = _peak_mb(module, case)
    return results[0], results[1]


# The sizes a run times: "full" (a GPU's training sizes), "cpu" (a CPU's), "small" (a smoke run in seconds).
SIZES = ("full", "cpu", "small")


def discover_cases(device: torch.device, dtype: torch.dtype, sizes: str) -> list[LayerCase]:
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {SIZES}, got {sizes!r}")
    cases = []
    here = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("layer_cases_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            cases.extend(module.cases(device, dtype, sizes))
    return cases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--small", action="store_true", help="small sizes, a smoke run (default without a GPU)")
    size_group.add_argument("--cpu-sizes", action="store_true",
                            help="sizes a CPU trains at (batch 32 convolutions, 256x1024 dense layers)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--only", help="run only the layers whose name contains this")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = "small" if args.small else "cpu" if args.cpu_sizes else "small" if device.type == "cpu" else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows, wrong = [], []
    for case in discover_cases(device, dtype, sizes):
        if args.only and args.only.lower() not in case.layer.lower():
            continue
        # Correct first, then timed: a wrong result is reported and its speed is still measured.
        fwd_err, grad_err = check(case)
        correct = not (fwd_err > TOLERANCE[dtype] or grad_err > TOLERANCE[dtype])
        if not correct:
            wrong.append(f"{case.layer} {case.shape}: forward error {fwd_err:.2e}, gradient error {grad_err:.2e}")
        native, ref = _measure(case.make_native(), case.make_torch(), case)
        row = {"layer": case.layer, "shape": case.shape, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "native_fwd_ms": native["forward_ms"], "torch_fwd_ms": ref["forward_ms"],
               "fwd_speedup": ref["forward_ms"] / native["forward_ms"],
               "native_bwd_ms": native["backward_ms"], "torch_bwd_ms": ref["backward_ms"],
               "bwd_speedup": ref["backward_ms"] / native["backward_ms"],
               "fwd_bwd_speedup": (ref["forward_ms"] + ref["backward_ms"]) / (native["forward_ms"]
                                                                               + native["backward_ms"]),
               "native_peak_mb": native["peak_mb"], "torch_peak_mb": ref["peak_mb"],
               "fwd_err": fwd_err, "grad_err": grad_err, "correct": "yes" if correct else "NO"}
        if case.min_bytes_forward and device.type == "cuda":
            row["fwd_GBps"] = case.min_bytes_forward / native["forward_ms"] / 1e6
        rows.append(row)
        print_table([row], list(row))
    if not rows:
        raise SystemExit("no benchmark cases found")
    print()
    print_table(rows, ["layer", "shape", "dtype", "fwd_speedup", "bwd_speedup", "fwd_bwd_speedup", "native_peak_mb",
                       "torch_peak_mb", "correct"])
    path = write_csv("layers", rows)
    print(f"results appended to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    if wrong:
        raise SystemExit(f"{len(wrong)} native layer(s) disagree with torch beyond {TOLERANCE[dtype]:g} "
                         f"({args.dtype}):\n  " + "\n  ".join(wrong))


if __name__ == "__main__":
    main()
