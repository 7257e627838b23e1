"""Handwritten digits with a multi-layer perceptron of native SINGA layers, trained data-parallel.

    singa-launch -np 2 python examples/digits_mlp.py            # AllReduce on 2 processes
    singa-launch -np 4 --strategy downpour --worker-groups 2 --servers 1 python examples/digits_mlp.py
    python examples/digits_mlp.py                               # one process

The images are the 8x8 digits that ship with scikit-learn (no download). The training loop is plain
PyTorch; the lines marked "singa" are all that distributed training adds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import native_layers as nl
import singa_dist as sd  # singa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import digits  # noqa: E402


def build_model(hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(
        nl.Linear(64, hidden), nl.ReLU(),
        nl.Linear(hidden, hidden // 2), nl.ReLU(),
        nl.Linear(hidden // 2, 10),
    )


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """The learning rate follows a cosine from its base value at the first epoch towards 0 after the last."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default=None,
                        help=f"{', '.join(sd.STRATEGIES)} (default: the launcher's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    sd.init()  # singa
    torch.manual_seed(args.seed)
    device = sd.device()  # singa: this process's GPU when there is one
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())

    model = build_model().to(device)
    loss_fn = nl.SoftmaxCrossEntropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    optimizer = sd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),  # singa
                                        strategy=args.strategy)
    sd.broadcast_parameters(model.state_dict(), root_rank=0)  # singa
    scheduler = lr_schedule(optimizer, args.epochs)

    # Every worker shuffles identically and takes its own slice of each global batch.
    rank, size = sd.rank(), sd.size()  # singa
    per_rank = max(args.batch_size // size, 1)
    steps = len(x_train) // (per_rank * size)
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps, disable=rank != 0 or args.quiet, desc="train", unit="step",
               mininterval=0.5, file=sys.stdout)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order.to(device)
        for step in range(steps):
            first = (step * size + rank) * per_rank
            idx = order[first:first + per_rank]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step == steps - 1:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        scheduler.step()
    bar.close()

    acc = accuracy(model, x_test, y_test)
    if rank == 0:
        print(f"workers={size} strategy={optimizer.strategy.name} epochs={args.epochs} "
              f"train_time={time.perf_counter() - start:.1f}s")
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()  # singa
    return acc


if __name__ == "__main__":
    main()
