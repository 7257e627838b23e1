"""A horovod.torch training script, unchanged but for its import line: uneven data with join, SyncBatchNorm,
grouped allreduce and process sets.

    singa-launch -np 3 python examples/horovod_digits.py
    python examples/horovod_digits.py                       # one process
    (with Horovod itself: `import horovod.torch as hvd`, then `horovodrun -np 3 python horovod_digits.py`)

Every rank holds an uneven share of the 8x8 digits (rank r's share grows with r), so ranks run different
numbers of batches per epoch: each epoch ends with hvd.join(), the ranks that ran out of data take part in the others'
steps with zero gradients, and then everyone takes the model of the rank that joined last. The MLP normalizes with SyncBatchNorm (statistics over every rank's
batch). Metrics travel in one grouped_allreduce. The even ranks form a process set that agrees on a best
epoch of their own, to show that collectives can run on part of the job.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist.horovod as hvd  # with Horovod: import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import digits  # noqa: E402


def uneven_share(x, y, rank: int, size: int):
    """Rank r gets a contiguous block proportional to r + 2 (so no two ranks hold as many samples)."""
    weights = [r + 2 for r in range(size)]
    bounds = [len(x) * sum(weights[:r]) // sum(weights) for r in range(size + 1)]
    return x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)

    hvd.init(process_sets="dynamic")
    evens = hvd.add_process_set([r for r in range(hvd.size()) if r % 2 == 0])
    torch.manual_seed(42)

    x_train, y_train, x_test, y_test = digits()
    x, y = uneven_share(x_train, y_train, hvd.rank(), hvd.size())

    model = nn.Sequential(nn.Linear(64, 64), hvd.SyncBatchNorm(64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         op=hvd.Average)

    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        total_loss, batches = torch.zeros(1), torch.zeros(1)
        for i in range(0, len(x), args.batch_size):
            idx = order[i:i + args.batch_size]
            if len(idx) < 2:
                break  # batch normalization needs two samples
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            batches += 1
        last = hvd.join()  # the ranks with fewer batches waited here, adding zero gradients
        # They missed the last steps' updates: every rank takes the model of the rank that joined last.
        hvd.broadcast_parameters(model.state_dict(), root_rank=last)
        hvd.broadcast_optimizer_state(optimizer, root_rank=last)

        model.eval()
        with torch.no_grad():
            correct = torch.tensor([float((model(x_test).argmax(1) == y_test).sum())])
        loss_sum, batch_count, correct_sum = hvd.grouped_allreduce([total_loss, batches, correct], op=hvd.Sum,
                                                                   name="epoch_metrics")
        accuracy = correct_sum.item() / (len(y_test) * hvd.size())
        history.append(accuracy)
        if hvd.rank() == 0:
            print(f"epoch {epoch}: loss {loss_sum.item() / batch_count.item():.4f}, test accuracy: {accuracy:.4f}, "
                  f"last to join: rank {last}", flush=True)

    best = None
    if evens.included():
        best = hvd.allreduce(torch.tensor([max(history)]), op=hvd.Max, process_set=evens).item()
    if hvd.rank() == 0:
        print(f"even ranks' best test accuracy: {best:.4f}", flush=True)
    params = hvd.allgather_object(sum(float(p.detach().sum()) for p in model.parameters()))
    if hvd.rank() == 0:
        print(f"replicas identical: {len(set(params)) == 1}", flush=True)
    hvd.shutdown()
    return {"accuracy": history[-1], "best": best}


if __name__ == "__main__":
    main()
