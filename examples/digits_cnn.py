"""A small convolutional net in the style of SINGA's CIFAR-10 "cuda-convnet" model, on 8x8 digits.

    singa-launch -np 2 python examples/digits_cnn.py
    singa-launch -np 2 --strategy sandblaster --servers 1 python examples/digits_cnn.py
    SINGA_STRATEGY=sandblaster SINGA_SERVERS=1 torchrun --standalone --nproc-per-node 3 examples/digits_cnn.py

Two blocks of convolution, ReLU, max pooling and cross-channel local response normalization, then a dense
classifier, all native layers; SGD with momentum and weight decay as in SINGA's recipe, with a step
learning-rate schedule.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import digits  # noqa: E402
from training import step_schedule  # noqa: E402


def build_model(width: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(
        nl.Conv2d(1, width, kernel_size=3, padding=1), nl.ReLU(),
        nl.MaxPool2d(kernel_size=3, stride=2, padding=1),          # 8x8 -> 4x4
        nl.LRN(size=3, alpha=5e-5, beta=0.75, k=1.0),
        nl.Conv2d(width, width, kernel_size=3, padding=1), nl.ReLU(),
        nl.AvgPool2d(kernel_size=3, stride=2, padding=1),          # 4x4 -> 2x2
        nl.LRN(size=3, alpha=5e-5, beta=0.75, k=1.0),
        torch.nn.Flatten(),
        nl.Linear(width * 4, 10),
    )


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """SINGA's recipe lowers the rate tenfold twice; here after 60% and 85% of the epochs."""
    return step_schedule(optimizer, epochs, (0.6, 0.85))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    sd.init()
    torch.manual_seed(args.seed)
    device = sd.device()
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits(image=True))
    model = build_model().to(device)
    loss_fn = nl.SoftmaxCrossEntropy()
    optimizer = sd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=4e-3 / 10),
        named_parameters=model.named_parameters(), strategy=args.strategy)
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    scheduler = lr_schedule(optimizer, args.epochs)

    rank, size = sd.rank(), sd.size()
    per_rank = max(args.batch_size // size, 1)
    steps = len(x_train) // (per_rank * size)
    bar = tqdm(total=args.epochs * steps, disable=rank != 0 or args.quiet, desc="train", unit="step",
               mininterval=0.5, file=sys.stdout)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
        for step in range(steps):
            idx = order[(step * size + rank) * per_rank:][:per_rank]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            bar.update(1)
        scheduler.step()
    bar.close()

    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()
    return acc


if __name__ == "__main__":
    main()
