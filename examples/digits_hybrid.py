"""The digits CNN with hybrid partitioning: convolution layers data parallel, fully-connected layers model
parallel (SINGA's partition_dim 0 and 1, Krizhevsky's "one weird trick"), inside one worker group.

    singa-launch -np 2 python examples/digits_hybrid.py

Every worker sees its share of each batch in the convolution layers and holds half of each fully-connected
layer's output features; `sd.partition.partition` inserts the connection layers between the two halves of
the net and shards the dense layers' parameters out of the full model. Training equals one process on the
whole batch; the full model's state_dict is gathered for saving with `sd.partition.full_state_dict`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import torch
from tqdm import tqdm

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import digits  # noqa: E402
from training import step_schedule  # noqa: E402


def build_model(width: int = 32, hidden: int = 64) -> torch.nn.Sequential:
    features = torch.nn.Sequential(
        nl.Conv2d(1, width, kernel_size=3, padding=1), nl.ReLU(),
        nl.MaxPool2d(kernel_size=3, stride=2, padding=1),          # 8x8 -> 4x4
        nl.LRN(size=3, alpha=5e-5, beta=0.75, k=1.0),
        nl.Conv2d(width, width, kernel_size=3, padding=1), nl.ReLU(),
        nl.AvgPool2d(kernel_size=3, stride=2, padding=1),          # 4x4 -> 2x2
        nl.LRN(size=3, alpha=5e-5, beta=0.75, k=1.0),
        torch.nn.Flatten(),
    )
    classifier = torch.nn.Sequential(nl.Linear(width * 4, hidden), nl.ReLU(), nl.Linear(hidden, 10))
    return torch.nn.Sequential(OrderedDict(features=features, classifier=classifier))


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """SINGA's recipe lowers the rate tenfold twice; here after 60% and 85% of the epochs."""
    return step_schedule(optimizer, epochs, (0.6, 0.85))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write the whole model's state_dict here (rank 0)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    sd.init()
    torch.manual_seed(args.seed)
    device = sd.device()
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits(image=True))
    full = build_model().to(device)
    sd.broadcast_parameters(full.state_dict(), root_rank=0)  # every worker cuts its shards from rank 0's model
    # Convolution, pooling and LRN default to partition_dim 0; the dense layers split their features.
    model = sd.partition.partition(full, {"classifier.0": 1, "classifier.2": 1})
    loss_fn = nl.SoftmaxCrossEntropy()
    # AllReduce averages the replicated (convolution) gradients and leaves the feature-split ones local.
    optimizer = sd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=4e-3 / 10),
        named_parameters=model.named_parameters(), strategy="allreduce")
    scheduler = lr_schedule(optimizer, args.epochs)

    rank, size = sd.rank(), sd.size()
    if rank == 0:
        print(f"workers={size} feature-split parameters: "
              f"{', '.join(n for n, p in model.named_parameters() if sd.partition.is_feature_split(p))}")
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

    # Every worker evaluates its share of the test set; the model-parallel layers serve all of them at once.
    model.eval()
    with torch.no_grad():
        correct = (model(x_test[rank::size]).argmax(1) == y_test[rank::size]).sum().float()
    acc = (sd.allreduce(correct, op=sd.Sum) / len(x_test)).item()
    state = sd.partition.full_state_dict(model)  # a collective: every worker takes part
    if rank == 0:
        print(f"test accuracy: {acc:.4f}")
        if args.save:
            torch.save(state, args.save)
    sd.shutdown()
    return acc


if __name__ == "__main__":
    main()
