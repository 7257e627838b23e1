"""Datasets that ship inside installed packages, so that no example downloads anything at run time.

`digits()`: the 1,797 8x8 handwritten digits bundled with scikit-learn, split once with a fixed seed into
1,437 training and 360 held-out test images, scaled to [0, 1].
"""
from __future__ import annotations

import torch


def digits(test_fraction: float = 0.2, seed: int = 0, image: bool = False):
    """(x_train, y_train, x_test, y_test): float32 features (N, 64), or (N, 1, 8, 8) with image=True."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    if image:
        x = x.view(-1, 1, 8, 8)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, size: int):
    """This rank's share of a dataset: every size-th sample starting at rank (equal shares, remainder dropped)."""
    n = (len(x) // size) * size
    return x[rank:n:size], y[rank:n:size]


def text_corpus() -> str:
    """About 43 kB of English prose: the dataset descriptions that ship with scikit-learn."""
    from importlib import resources

    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "\n".join((folder / name).read_text(encoding="utf-8") for name in names)
