"""SINGA's deep auto-encoder: a stack of RBMs pre-trained one layer at a time with contrastive divergence,
unrolled into an encoder and a decoder, then fine-tuned by back-propagation (Hinton and Salakhutdinov 2006).

    singa-launch -np 2 python examples/digits_autoencoder.py --png autoencoder.png
    singa-launch -np 2 --strategy downpour --worker-groups 2 --servers 1 python examples/digits_autoencoder.py
    python examples/digits_autoencoder.py                                     # one process

SINGA's model is 784-1000-500-250-30 on MNIST. Here, on the 64-pixel digits, the same shape is scaled:
a first hidden layer a little wider than the input (1000/784), then halving twice, then a narrow code
(64-80-40-20-8; 30 units scaled to 64 pixels would be 2, too few for recognisable digits). Each RBM learns
from the hidden probabilities of the one below; the top one has gaussian hidden units, so the code is
linear. The auto-encoder's encoder takes each RBM's weight and hidden bias, its decoder the transposed
weights and visible biases, and the whole net is trained to reproduce its input (Euclidean loss). The
strategy is the launcher's; the training loops are plain PyTorch.

With the defaults on 2 workers the test digits' reconstruction error (mean squared, per pixel) is about
0.076 before fine-tuning and 0.029 after; the same net fine-tuned from random weights stays at 0.073, the
error of the mean image, which is what the pre-training is for.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import native_layers as nl
import singa_dist as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datasets import digits  # noqa: E402


def batches(n: int, per_rank: int, rank: int, size: int, seed: int, device):
    """This worker's share of each global batch of one epoch: every worker shuffles alike."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    for step in range(n // (per_rank * size)):
        yield order[(step * size + rank) * per_rank:][:per_rank]


def pretrain(x: torch.Tensor, sizes, args, rank: int, size: int) -> list:
    """SINGA's RBM stack: RBM i trained by CD-k on the hidden probabilities of RBM i - 1."""
    rbms = []
    per_rank = max(args.batch_size // size, 1)
    for i, (visible, hidden) in enumerate(zip(sizes, sizes[1:])):
        top = i == len(sizes) - 2
        # The code layer's units are gaussian (linear), as in SINGA's and Hinton's auto-encoder: a few
        # binary units would carry too little; their unbounded values call for a smaller step.
        rbm = nl.RBM(visible, hidden, hidden_unit="gaussian" if top else "bernoulli").to(x.device)
        lr = args.rbm_lr * (args.code_lr_scale if top else 1.0)
        opt = sd.DistributedOptimizer(torch.optim.SGD(rbm.parameters(), lr=lr, momentum=0.5),
                                      named_parameters=rbm.named_parameters())
        sd.broadcast_parameters(rbm.state_dict(), root_rank=0)
        for epoch in range(args.pretrain_epochs):
            for idx in batches(len(x), per_rank, rank, size, 100 * i + epoch, x.device):
                opt.zero_grad()
                nl.rbm.contrastive_divergence(rbm, x[idx], k=args.cd_k)
                opt.step()
        with torch.no_grad():
            if rank == 0:
                err = F.mse_loss(rbm.reconstruct(x), x).item()
                print(f"rbm {i + 1} ({visible}-{hidden}): reconstruction mse {err:.4f}")
            x = rbm.hidden_probs(x)
        rbms.append(rbm)
    return rbms


def unroll(rbms: list) -> torch.nn.Sequential:
    """The auto-encoder: sigmoid layers up through the RBMs' weights, then down through their transposes."""
    layers = []
    for rbm in rbms:
        act = "sigmoid" if rbm.hidden_unit == "bernoulli" else None
        layer = nl.Linear(rbm.visible, rbm.hidden, activation=act).to(rbm.weight.device)
        layer.weight.data.copy_(rbm.weight.data)
        layer.bias.data.copy_(rbm.hidden_bias.data)
        layers.append(layer)
    for rbm in reversed(rbms):
        layer = nl.Linear(rbm.hidden, rbm.visible, activation="sigmoid").to(rbm.weight.device)
        layer.weight.data.copy_(rbm.weight.data.t())
        layer.bias.data.copy_(rbm.visible_bias.data)
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def reconstruction_error(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.mse_loss(model(x), x).item()


def save_png(path: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One test image of each digit (top row) above its reconstruction (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = torch.stack([torch.nonzero(y == d)[0, 0] for d in range(10) if (y == d).any()])
    with torch.no_grad():
        rows = (x[picks].cpu(), model(x[picks]).cpu())
    fig, axes = plt.subplots(2, len(picks), figsize=(len(picks), 2.3))
    for r, (images, label) in enumerate(zip(rows, ("original", "reconstructed"))):
        for c, image in enumerate(images):
            axes[r, c].imshow(image.view(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,80,40,20,8", help="units per layer, the input's first")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="CD epochs per RBM")
    parser.add_argument("--finetune-epochs", type=int, default=40)
    parser.add_argument("--cd-k", type=int, default=1)
    # Downpour and Hogwild apply each worker group's update in turn; twice this step sometimes diverged there.
    parser.add_argument("--rbm-lr", type=float, default=0.25)
    parser.add_argument("--code-lr-scale", type=float, default=0.1, help="the code layer RBM's share of --rbm-lr")
    parser.add_argument("--lr", type=float, default=0.3, help="fine-tuning learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across the workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=None, help="write originals above their reconstructions to this PNG")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated unit counts, got {args.sizes!r}")
    if len(sizes) < 2 or sizes[0] != 64 or min(sizes) < 1:
        parser.error(f"--sizes: expected 64 input units and at least one positive hidden size, got {args.sizes!r}")

    sd.init()
    device = sd.device()  # this process's GPU when there is one: the layers then run their Triton kernels
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())
    rank, size = sd.rank(), sd.size()
    torch.manual_seed(args.seed * 1000 + rank)  # each worker's Gibbs chains draw their own random numbers

    model = unroll(pretrain(x_train, sizes, args, rank, size))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = reconstruction_error(model, x_test)
    loss_fn = nl.EuclideanLoss()
    per_rank = max(args.batch_size // size, 1)
    for epoch in range(args.finetune_epochs):
        for idx in batches(len(x_train), per_rank, rank, size, 10_000 + epoch, device):
            opt.zero_grad()
            loss_fn(model(x_train[idx]), x_train[idx]).backward()
            opt.step()
    after = reconstruction_error(model, x_test)
    if rank == 0:
        print(f"test reconstruction mse before fine-tuning: {before:.4f}")
        print(f"test reconstruction mse after fine-tuning: {after:.4f}")
        if args.png:
            save_png(args.png, model, x_test, y_test)
            print(f"wrote {args.png}")
    sd.shutdown()
    return before, after


if __name__ == "__main__":
    main()
