"""Downpour's update rule under a fixed order of the worker groups' pushes, in one process and deterministic.

The digits MLP or CNN of benchmarks/async_accuracy.py (same data split, seeds, batches, optimizer and schedule) with
2 worker groups whose pushes go, in a chosen order, to the servers' own table (`singa_dist.ps.server._Table`, the
update rule of a real server); each group computes on the values its last push was answered with. The order:
`alternate` (each group in turn: every update one version stale, as the real runs' groups mostly are), `random`,
or `burst` (a group pushes again with probability 0.8). Prints the final test accuracy per seed (the servers'
values) and, with --log, the mean loss, largest update norm and mean staleness per epoch, so that a run that is
thrown back (a loss spike with a large update) can be told from a slow one.

    nice -n 10 python -m benchmarks.async_interleaving --order alternate --seeds 10 [--relative-clip none] [--log]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import types

import torch

import native_layers as nl
from benchmarks.async_accuracy import MODELS
from examples import digits_cnn, digits_mlp
from examples.datasets import digits
from singa_dist.ps import server

GROUPS, PER_GROUP = 2, 32  # the benchmark's 2 groups, global batch 64


def push_order(order: str, updates: int, seed: int) -> list[int]:
    """Which group pushes at each update; every group pushes `updates` times."""
    rng, counts, out = random.Random(seed), [0] * GROUPS, []
    while min(counts) < updates:
        if order == "alternate":
            g = len(out) % GROUPS
        elif order == "burst" and out and rng.random() < 0.8:
            g = out[-1]
        else:
            g = rng.randrange(GROUPS)
        if counts[g] >= updates:
            g = counts.index(min(counts))
        out.append(g)
        counts[g] += 1
    return out


def train(model_name: str, seed: int, order: str, *, dana: bool, relative_clip: float | None, epochs: int = 10):
    """Final test accuracy (%) and, per update, (group, loss, update norm, staleness)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits(image=model_name == "cnn")
    build = (digits_cnn if model_name == "cnn" else digits_mlp).build_model
    model = build()
    replicas = [build() for _ in range(GROUPS)]
    for r in replicas:
        r.load_state_dict(model.state_dict())
    settings = MODELS[model_name]
    optimizers = [torch.optim.SGD(r.parameters(), lr=settings["lr"], momentum=0.9,
                                  weight_decay=settings["weight_decay"]) for r in replicas]
    if model_name == "cnn":
        schedules = [torch.optim.lr_scheduler.MultiStepLR(o, [int(epochs * 0.6), int(epochs * 0.85)], 0.1)
                     for o in optimizers]
    else:
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs) for o in optimizers]
    options = [[{k: v for k, v in o.param_groups[0].items() if k != "params"}] for o in optimizers]
    values = [p.detach().reshape(-1).clone() for p in model.parameters()]
    table = server._Table({
        "slices": [types.SimpleNamespace(id=i) for i in range(len(values))], "values": values,
        "param_group": [0] * len(values), "optimizer_class": torch.optim.SGD, "defaults": dict(optimizers[0].defaults),
        "group_options": options[0], "replicas": 1, "staleness": None, "clients": GROUPS, "staleness_lr": True,
        "momentum_correction": False, "dana": dana, "relative_clip": relative_clip})
    for g in range(GROUPS):
        table.register(g)
    loss_fn = nl.SoftmaxCrossEntropy()
    steps = len(x_train) // (PER_GROUP * GROUPS)
    counts, orders, log = [0] * GROUPS, {}, []
    for g in push_order(order, epochs * steps, seed):
        epoch, step = divmod(counts[g], steps)
        if step == 0:
            orders[g] = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
            if epoch:
                schedules[g].step()
                options[g] = [{k: v for k, v in optimizers[g].param_groups[0].items() if k != "params"}]
        idx = orders[g][(step * GROUPS + g) * PER_GROUP:][:PER_GROUP]
        replicas[g].zero_grad()
        loss = loss_fn(replicas[g](x_train[idx]), y_train[idx])
        loss.backward()
        before = [p.detach().clone() for p in table.params]
        future, done = table.push(g, [p.grad.reshape(-1).clone() for p in replicas[g].parameters()], options[g],
                                  want=True, average=True)
        server._complete(done)
        _, answer, stale = future.wait()
        with torch.no_grad():
            for p, v in zip(replicas[g].parameters(), answer):
                p.copy_(v.view_as(p))
        norm = math.sqrt(sum(float((p - b).pow(2).sum()) for p, b in zip(table.params, before)))
        log.append((g, float(loss), norm, stale))
        counts[g] += 1
    with torch.no_grad():
        for p, v in zip(model.parameters(), table.values()):
            p.copy_(v.view_as(p))
        model.eval()
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    return accuracy, log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=list(MODELS))
    parser.add_argument("--order", default="alternate", choices=["alternate", "random", "burst"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-dana", action="store_true")
    parser.add_argument("--relative-clip", default="2", help="a ratio, or 'none'")
    parser.add_argument("--log", action="store_true", help="per epoch: mean loss / largest update norm / staleness")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = None if args.relative_clip.lower() == "none" else float(args.relative_clip)
    accs = []
    for seed in range(args.seeds):
        acc, log = train(args.model, seed, args.order, dana=not args.no_dana, relative_clip=clip)
        accs.append(acc)
        print(f"seed {seed}: {acc:.2f}%", flush=True)
        if args.log:
            per = len(log) // 10
            print("  " + " ".join(f"{statistics.mean(r[1] for r in log[e * per:(e + 1) * per]):.2f}/"
                                  f"{max(r[2] for r in log[e * per:(e + 1) * per]):.2f}/"
                                  f"{statistics.mean(r[3] for r in log[e * per:(e + 1) * per]):.1f}"
                                  for e in range(10)))
    print(f"{args.model} {args.order} dana={not args.no_dana} relative_clip={clip}: mean {statistics.mean(accs):.2f} "
          f"spread {max(accs) - min(accs):.2f}")


if __name__ == "__main__":
    main()
