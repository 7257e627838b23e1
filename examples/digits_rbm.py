"""A restricted Boltzmann machine trained with contrastive divergence (CD-k), SINGA's TrainOneBatch for
energy models, then fine-tuned with back-propagation as the first layer of a classifier.

    singa-launch -np 2 python examples/digits_rbm.py

CD-k: the positive phase takes the hidden probabilities given the data; k steps of Gibbs sampling give the
negative phase; the update is the difference of the two phases' statistics. Written as the gradient of
free energy F(v_data) - F(v_model) with the model sample held fixed, so autograd (and with it any
DistributedOptimizer strategy) sees an ordinary backward pass.
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


class RBM(torch.nn.Module):
    """Bernoulli-Bernoulli RBM (SINGA's RBMVis/RBMHid pair) with weight W, visible bias b, hidden bias c."""

    def __init__(self, visible: int, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden, visible) * 0.01)
        self.visible_bias = torch.nn.Parameter(torch.zeros(visible))
        self.hidden_bias = torch.nn.Parameter(torch.zeros(hidden))

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(v, self.weight, self.hidden_bias))

    def visible_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(h, self.weight.t(), self.visible_bias))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        return -(v @ self.visible_bias) - F.softplus(F.linear(v, self.weight, self.hidden_bias)).sum(1)

    def gibbs(self, v: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        for _ in range(k):
            h = torch.bernoulli(self.hidden_probs(v), generator=generator)
            v = torch.bernoulli(self.visible_probs(h), generator=generator)
        return v

    def cd_loss(self, v: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            v_model = self.gibbs(v, k, generator)
        return (self.free_energy(v) - self.free_energy(v_model)).mean()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--cd-k", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sd.init()
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits()
    rank, size = sd.rank(), sd.size()
    per_rank = max(args.batch_size // size, 1)
    steps = len(x_train) // (per_rank * size)
    sampler = torch.Generator().manual_seed(args.seed * 1000 + rank)

    rbm = RBM(64, args.hidden)
    opt = sd.DistributedOptimizer(torch.optim.SGD(rbm.parameters(), lr=0.1, momentum=0.5),
                                  named_parameters=rbm.named_parameters())
    sd.broadcast_parameters(rbm.state_dict(), root_rank=0)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        for step in range(steps):
            v = x_train[order[(step * size + rank) * per_rank:][:per_rank]]
            opt.zero_grad()
            rbm.cd_loss(v, args.cd_k, sampler).backward()
            opt.step()
    with torch.no_grad():
        err = F.mse_loss(rbm.visible_probs(rbm.hidden_probs(x_test)), x_test).item()

    # Fine-tune (SINGA's second phase): the RBM's weights initialise the first layer of a classifier,
    # and the whole net is trained by back-propagation, again data-parallel.
    net = torch.nn.Sequential(nl.Linear(64, args.hidden), nl.Sigmoid(), nl.Linear(args.hidden, 10))
    with torch.no_grad():
        net[0].weight.copy_(rbm.weight)
        net[0].bias.copy_(rbm.hidden_bias)
    net_opt = sd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                      named_parameters=net.named_parameters(), strategy="allreduce")
    sd.broadcast_parameters(net.state_dict(), root_rank=0)
    loss_fn = nl.SoftmaxCrossEntropy()
    for epoch in range(args.finetune_epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(10_000 + epoch))
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
