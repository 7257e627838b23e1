"""Weights set after DistributedOptimizer() wraps the optimizer are the ones that train, under every strategy.

A model whose ranks start from different random weights is wrapped, then gets the same weights W, either loaded
on every rank or loaded on rank 0 and broadcast. One step on each rank's own batch must then equal one process
starting from W: the averaged gradient (synchronous strategies) or the sum of the groups' updates (the
asynchronous ones, whose groups each apply their own; with plain SGD and one step each, their order does not
matter).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from tests.conftest import get_world
from tests.test_sandblaster import ps_world

LR = 0.1


def _weights():
    torch.manual_seed(7)
    return nn.Linear(4, 3).state_dict()


def _batch(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)


def load_after_wrapping(how):
    rank = sd.rank()
    torch.manual_seed(100 + rank)  # every rank starts elsewhere
    model = nn.Linear(4, 3)
    strategy = sd.strategy_name()
    if strategy == "downpour":  # each group's whole update, in whichever order they arrive (no staleness_lr)
        strategy = sd.Downpour(staleness_lr=False)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                                  strategy=strategy)
    if how == "load" or rank == 0:
        model.load_state_dict(_weights())
    if how == "broadcast":
        sd.broadcast_parameters(model.state_dict(), root_rank=0)
    x, y = _batch(rank)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    strategy = opt.strategy
    if hasattr(strategy, "pull"):  # asynchronous groups: read the servers once every group has pushed
        sd.barrier()
        strategy.pull()
    elif strategy.name == "hogwild":
        strategy.close()  # the last exchange of deltas, every group's folded in
    return [p.detach().clone() for p in model.parameters()]


def _reference(nranks: int, combine: str):
    model = nn.Linear(4, 3)
    model.load_state_dict(_weights())
    grads = []
    for rank in range(nranks):
        model.zero_grad()
        x, y = _batch(rank)
        F.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            total = sum(g[i] for g in grads)
            p -= LR * (total / nranks if combine == "average" else total)
    return [p.detach() for p in model.parameters()]


WORLDS = {
    "allreduce": (lambda: get_world(2), "average"),
    "sandblaster": (lambda: ps_world(sd.ClusterTopology.sandblaster(2, 1)), "average"),
    "hybrid": (lambda: ps_world(sd.ClusterTopology.hybrid(1, 2, nservers=1)), "average"),
    "downpour": (lambda: ps_world(sd.ClusterTopology.downpour(2, 1, nservers=1)), "sum"),
    "hogwild": (lambda: get_world(2, SINGA_TOPOLOGY=sd.ClusterTopology.hogwild(2, sync_freq=1).to_json(),
                                  SINGA_TIMEOUT="20"), "sum"),
}


@pytest.mark.parametrize("how", ["load", "broadcast"])
@pytest.mark.parametrize("strategy", list(WORLDS))
def test_weights_set_after_wrapping_are_the_ones_that_train(strategy, how):
    make_world, combine = WORLDS[strategy]
    want = _reference(2, combine)
    for rank, params in enumerate(make_world().run(load_after_wrapping, how, timeout=120)):
        for got, w in zip(params, want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6, msg=f"{strategy}, {how}, rank {rank}")
