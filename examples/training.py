"""What the model-zoo scripts share around their training loops: the data loaders of a worker, evaluation
on every worker's share of the test set, and the per-epoch accuracy log (CSV, and a PNG of the curve)."""
from __future__ import annotations

import csv
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import singa_dist as sd
from singa_dist.environment import DATA_ERROR_STATUS

from datasets import DatasetError, EvalShard


def run(main) -> None:
    """The zoo scripts' entry point: main(), where a DatasetError (a missing, damaged or empty --data) ends the
    process with one line and status DATA_ERROR_STATUS (65) instead of a traceback. Under a launcher that collects
    the processes' errors (TORCHELASTIC_ERROR_FILE: singa-launch, torchrun) the line goes to it, and singa-launch
    says it once for all the ranks that failed so; elsewhere it is printed. The scripts read their data before
    sd.init(), so that every rank fails alike, none left waiting for another at init."""
    try:
        main()
    except DatasetError as exc:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            ErrorHandler().record_exception(exc)
        else:
            print(f"{os.path.basename(sys.argv[0])}: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(DATA_ERROR_STATUS)  # at once, as singa_dist ends a script dying of an error after init


def train_loader(train_set: Dataset, per_rank: int, seed: int, workers: int = 0) -> DataLoader:
    """This worker's shuffled share of the training set; every worker gets the same number of full batches
    (the model-parallel layers of a partitioned model need every worker in every step)."""
    sampler = DistributedSampler(train_set, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < per_rank:
        raise ValueError(f"{len(train_set)} training images give each of the {sd.size()} workers {len(sampler)}, "
                         f"fewer than one batch of {per_rank}: lower --batch-size")
    return DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def step_schedule(optimizer: torch.optim.Optimizer, epochs: int, fractions, gamma: float = 0.1):
    """The learning rate multiplied by `gamma` after each of `fractions` of the epochs (a MultiStepLR stepped once
    an epoch). A milestone that a short run puts at epoch 0, at or past the end, or onto an earlier one is dropped:
    the first epoch always runs at the base rate (`--epochs 1` or `2` would otherwise start decayed)."""
    milestones = []
    for fraction in fractions:
        epoch = int(epochs * fraction)
        if 1 <= epoch < epochs and (not milestones or epoch > milestones[-1]):
            milestones.append(epoch)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def evaluate(model: torch.nn.Module, test_set: Dataset, per_rank: int, prepare, workers: int = 0) -> float:
    """Accuracy on the whole test set: each worker classifies its share, the counts are summed over the
    workers. `prepare(uint8 batch)` turns images into the model's input."""
    loader = DataLoader(EvalShard(test_set, sd.rank(), sd.size()), batch_size=per_rank, num_workers=workers)
    device = sd.device()
    counts = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for x, y, valid in loader:
            hit = model(prepare(x.to(device))).argmax(1).cpu() == y
            counts += torch.stack([(hit & valid).sum(), valid.sum()]).double()
    model.train()
    counts = sd.allreduce(counts, op=sd.Sum, name="evaluate")
    return (counts[0] / counts[1]).item()


class EpochLog:
    """One CSV row per epoch (on rank 0): epoch, train loss and accuracy (rank 0's share), test accuracy (the
    whole test set), learning rate, seconds of training and of evaluation; `plot(png)` draws the accuracy curves."""

    FIELDS = ["epoch", "train_loss", "train_accuracy", "test_accuracy", "lr", "train_seconds", "eval_seconds"]

    def __init__(self, path: str | None):
        self.path = path if sd.rank() == 0 else None
        self.rows: list[dict] = []
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def add(self, **row) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow(row)

    def plot(self, png: str, title: str) -> None:
        if sd.rank() != 0:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r["train_accuracy"] for r in self.rows], label="train")
        ax.plot(epochs, [r["test_accuracy"] for r in self.rows], label="test")
        ax.set(xlabel="epoch", ylabel="accuracy", title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def load_torchvision_weights(model: torch.nn.Module, path: str) -> None:
    """Load a torchvision state_dict (torch.save'd) into a model of the same architecture. A final classifier
    of another number of classes is left as initialised, and said so; any other difference is an error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    last = list(own)[-2:]  # the final layer's weight and bias
    if missing or unexpected or any(k not in last for k in skipped):
        raise ValueError(f"{path}: not this architecture's state_dict (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, other shapes {[k for k in skipped if k not in last][:4]})")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=not skipped)
    if sd.rank() == 0:
        print(f"loaded {path}" + (f"; kept the new {', '.join(skipped)} (another number of classes)" if skipped
                                  else ""), flush=True)
