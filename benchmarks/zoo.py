"""Images per second of the model zoo's networks with native layers against the same networks in torch eager
and, with the same world size, torch DDP: full training steps (zero_grad, forward, backward, SGD step).

    python -m benchmarks.zoo [--np 2] [--reps 10] [--models cifar10_convnet,resnet20,...] [--batch 32]

For each model (examples/: cifar10_convnet, alexnet, vgg11_bn and vgg16_bn, resnet20, resnet18, resnet50):
- "native": the example's model, one process;
- "torch eager": the same model and weights with every native layer turned back into its torch.nn class
  (checked: the same outputs), one process;
- "native + AllReduce": the native model under sd.DistributedOptimizer on --np ranks;
- "torch DDP": the torch model under DistributedDataParallel on the same ranks;
each with --batch images per process. The two distributed methods take turns step by step, so changing load
from other processes affects them alike. Images: 32x32 for the CIFAR nets, on a GPU 224x224 for the ImageNet
nets (alexnet, resnet18, resnet50) and 64x64 on a CPU (224 would take minutes a step there).
Prints the table (ratio = native / torch images per second in the same setting) and the time an epoch of
CIFAR-10 (50,000 images, at the size its example trains on) or ImageNet (1,281,167 at 224x224) takes at the
native one-process rate, and appends the rows to benchmarks/results/zoo.csv. On a CPU, native layers run torch's own ops: the ratios should be about 1.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from benchmarks.common import machine, print_table, write_csv

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
CIFAR_IMAGES, IMAGENET_IMAGES = 50_000, 1_281_167

# name -> (example module, builder arguments, CIFAR-sized)
MODELS = {
    "cifar10_convnet": ("cifar10_convnet", lambda m, side: m.build_model(10, 3, side), True),
    "resnet20": ("resnet", lambda m, side: m.build_model("resnet20", 10), True),
    "vgg11_bn": ("vgg", lambda m, side: m.build_model("vgg11_bn", 10, side), True),
    "vgg16_bn": ("vgg", lambda m, side: m.build_model("vgg16_bn", 10, side), True),
    "alexnet": ("alexnet", lambda m, side: m.build_model(1000, side), False),
    "resnet18": ("resnet", lambda m, side: m.build_model("resnet18", 1000), False),
    "resnet50": ("resnet", lambda m, side: m.build_model("resnet50", 1000), False),
}


def image_side(name: str, cuda: bool) -> int:
    return 32 if MODELS[name][2] else (224 if cuda else 64)


def epoch_of(name: str, side: int) -> str | None:
    """The dataset whose epoch the example trains at this image size: CIFAR-10 (32x32, AlexNet's 64x64) or
    ImageNet (224x224); None for the ImageNet nets at the CPU's 64x64."""
    if side == 224:
        return "ImageNet"
    return "CIFAR-10" if side == 32 or (name == "alexnet" and side == 64) else None


def build_native(name: str, side: int) -> torch.nn.Module:
    import importlib

    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    module_name, build, _ = MODELS[name]
    torch.manual_seed(0)
    return build(importlib.import_module(module_name), side)


def to_torch(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose native layers are their torch.nn classes again (a native layer subclasses its
    torch.nn counterpart and keeps its attributes, so the class is all that changes)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if type(m).__module__.startswith("native_layers."):
            m.__class__ = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
    return twin


def batch_for(name: str, batch: int, side: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, side, side, generator=g)
    if name == "cifar10_convnet":
        x = x * 60  # pixel values minus the mean image
    y = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


def step_fn(model, opt, x, y):
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def check_same(native, torch_model, x) -> None:
    native.eval(), torch_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(native(x), torch_model(x), rtol=1e-4, atol=1e-4)
    native.train(), torch_model.train()


def time_alternating(methods: dict, reps: int, sync=None) -> dict:
    """Median seconds of each method's step, the methods taking turns step by step after 2 warm-up steps each."""
    for step in methods.values():
        for _ in range(2):
            step()
    times = {name: [] for name in methods}
    for _ in range(reps):
        for name, step in methods.items():
            if sync:
                sync()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_local(names, batch: int, reps: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in names:
        side = image_side(name, device.type == "cuda")
        native = build_native(name, side).to(device)
        eager = to_torch(native)
        x, y = batch_for(name, batch, side, device)
        check_same(native, eager, x)
        secs = time_alternating({
            "native": step_fn(native, torch.optim.SGD(native.parameters(), lr=1e-3, momentum=0.9), x, y),
            "torch eager": step_fn(eager, torch.optim.SGD(eager.parameters(), lr=1e-3, momentum=0.9), x, y),
        }, reps)
        for method, s in secs.items():
            rows.append({"model": name, "image": side, "method": method, "world": 1, "batch_per_process": batch,
                         "step_ms": s * 1e3, "images_per_s": batch / s,
                         "ratio_vs_torch": secs["torch eager"] / s if method == "native" else 1.0})
        del native, eager
    return rows


def _measure_rank(names, batch: int, reps: int):
    """One rank of the distributed run; rank 0 returns the rows."""
    import singa_dist as sd

    torch.set_num_threads(1)
    device = sd.device()
    rows = []
    for name in names:
        side = image_side(name, device.type == "cuda")
        native = build_native(name, side).to(device)
        eager = to_torch(native)
        x, y = batch_for(name, batch, side, device, seed=sd.rank())
        opt = sd.DistributedOptimizer(torch.optim.SGD(native.parameters(), lr=1e-3, momentum=0.9),
                                      named_parameters=native.named_parameters(), strategy=sd.AllReduce())
        ddp = torch.nn.parallel.DistributedDataParallel(eager, process_group=sd.workers_process_group())
        secs = time_alternating({
            "native + AllReduce": step_fn(native, opt, x, y),
            "torch DDP": step_fn(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9), x, y),
        }, reps, sync=sd.barrier)
        for method, s in secs.items():
            rows.append({"model": name, "image": side, "method": method, "world": sd.size(),
                         "batch_per_process": batch, "step_ms": s * 1e3, "images_per_s": batch * sd.size() / s,
                         "ratio_vs_torch": secs["torch DDP"] / s if method != "torch DDP" else 1.0})
        opt.strategy.close()
        del native, eager, ddp
    return rows if sd.rank() == 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="ranks of the distributed methods")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per method (median reported)")
    parser.add_argument("--batch", type=int, default=32, help="images per process and step")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as each rank of the distributed methods

    rows = measure_local(names, args.batch, args.reps)
    if args.np > 1:
        import singa_dist as sd

        results = sd.run(_measure_rank, np=args.np, args=(names, args.batch, args.reps),
                         env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"},
                         timeout=3600)
        rows += results[0]
    load = round(os.getloadavg()[0], 1)  # other processes on the host slow every method alike, but not the epochs
    for row in rows:
        row["host_load"] = load
        dataset = epoch_of(row["model"], row["image"]) if row["method"] == "native" else None
        row["epoch_of"] = dataset
        row["epoch_s"] = ((CIFAR_IMAGES if dataset == "CIFAR-10" else IMAGENET_IMAGES) / row["images_per_s"]
                          if dataset else None)
    print(f"\n{machine()['device']}, torch {torch.__version__}, {args.batch} images per process, "
          f"{'GPU' if torch.cuda.is_available() else 'one thread per process'}")
    print_table(rows, ["model", "image", "method", "world", "step_ms", "images_per_s", "ratio_vs_torch", "epoch_of",
                      "epoch_s"])
    path = write_csv("zoo", rows)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
