"""A restricted Boltzmann machine trained with contrastive divergence (CD-k), SINGA's TrainOneBatch for
energy models, then fine-tuned with back-propagation as the first layer of a classifier.

    singa-launch -np 2 python examples/digits_rbm.py

    singa-launch -np 2 --strategy sandblaster --servers 1 python examples/digits_rbm.py

CD-k (native_layers.rbm.contrastive_divergence): the positive phase takes the hidden probabilities given
the data; k steps of Gibbs sampling give the negative phase; the difference of the two phases' statistics
goes into the parameters' .grad as a backward pass would put it, so the optimizer (and any strategy of
DistributedOptimizer, chosen by the launcher) applies the update.
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


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--cd-k", type=int, default=1)
    # Downpour and Hogwild apply each worker group's update in turn; twice this step sometimes diverged there.
    parser.add_argument("--rbm-lr", type=float, default=0.25, help="learning rate of the CD updates")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sd.init()
    torch.manual_seed(args.seed)
    device = sd.device()  # this process's GPU when there is one: the RBM then runs its Triton kernels
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())
    rank, size = sd.rank(), sd.size()
    per_rank = max(args.batch_size // size, 1)
    steps = len(x_train) // (per_rank * size)

    rbm = nl.RBM(64, args.hidden).to(device)
    opt = sd.DistributedOptimizer(torch.optim.SGD(rbm.parameters(), lr=args.rbm_lr, momentum=0.5),
                                  named_parameters=rbm.named_parameters())
    sd.broadcast_parameters(rbm.state_dict(), root_rank=0)
    torch.manual_seed(args.seed * 1000 + rank)  # each worker's Gibbs chains draw their own random numbers
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch)).to(device)
        for step in range(steps):
            v = x_train[order[(step * size + rank) * per_rank:][:per_rank]]
            opt.zero_grad()
            nl.rbm.contrastive_divergence(rbm, v, k=args.cd_k)
            opt.step()
    with torch.no_grad():
        err = F.mse_loss(rbm.reconstruct(x_test), x_test).item()

    # Fine-tune (SINGA's second phase): the RBM's weights initialise the first layer of a classifier,
    # and the whole net is trained by back-propagation, again data-parallel.
    net = torch.nn.Sequential(nl.Linear(64, args.hidden), nl.Sigmoid(), nl.Linear(args.hidden, 10)).to(device)
    with torch.no_grad():
        net[0].weight.copy_(rbm.weight)
        net[0].bias.copy_(rbm.hidden_bias)
    net_opt = sd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                      named_parameters=net.named_parameters())
    sd.broadcast_parameters(net.state_dict(), root_rank=0)
    loss_fn = nl.SoftmaxCrossEntropy()
    for epoch in range(args.finetune_epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(10_000 + epoch)).to(device)
        for step in range(steps):
            idx = order[(step * size + rank) * per_rank:][:per_rank]
            net_opt.zero_grad()
            loss_fn(net(x_train[idx]), y_train[idx]).backward()
            net_opt.step()
    with torch.no_grad():
        acc = (net(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"reconstruction mse: {err:.4f}")
        print(f"test accuracy: {acc:.4f}")
    sd.shutdown()
    return acc


if __name__ == "__main__":
    main()
