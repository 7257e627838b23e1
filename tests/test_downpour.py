"""Downpour and Hybrid: asynchronous worker groups against parameter servers; versions, staleness, failures."""
import time

import torch

import singa_dist as sd
from examples.datasets import digits, shard
from tests.test_sandblaster import ps_world, unused_parameter_run

EPOCHS = 20  # enough for synchronous and asynchronous training to level off, so that 1 point means something
BATCH = 32  # per worker
LR = 0.05


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def _epochs(model, opt, x, y, batch, epochs, slow=0.0, after_step=None, schedule=False):
    # The step-down settles the final values, so that the test accuracy is not one noisy iterate's.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs * 3 // 4], gamma=0.1) if schedule else None
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if slow:
                time.sleep(slow)
            opt.step()
            if after_step is not None:
                after_step()
        if sched is not None:
            sched.step()  # on the workers: the new lr travels with the pushes


def synchronous_accuracy(nworkers):
    """The reference: synchronous training (one process on the whole batch, as AllReduce computes it)."""
    x, y, x_test, y_test = digits()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
    _epochs(model, opt, x, y, BATCH * nworkers, EPOCHS, schedule=True)
    return _accuracy(model, x_test, y_test)


def train_digits(strategy, compression=None, sent=None):
    """Each worker trains on its shard through `strategy`; returns (its test accuracy, synchronous accuracy).
    `sent`, a list, receives the bytes this worker sent towards the servers and the dense equivalent."""
    x, y, x_test, y_test = digits()
    x, y = shard(x, y, sd.rank(), sd.size())
    model = _mlp()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3),
                                  model.named_parameters(), strategy=strategy, compression=compression)
    # Asynchronous groups each make their own updates: the same number of epochs over the data in all.
    _epochs(model, opt, x, y, BATCH, EPOCHS, schedule=True)
    if hasattr(strategy, "pull"):
        strategy.pull()
    elif hasattr(strategy, "sync"):
        strategy.sync()
    acc = _accuracy(model, x_test, y_test)
    if sent is not None:
        steps = EPOCHS * (len(x) // BATCH)
        sent += [strategy.bytes_sent_total, steps * sum(p.numel() * p.element_size() for p in model.parameters())]
    strategy.close()
    return acc, synchronous_accuracy(sd.size())


def _downpour_digits():
    return train_digits(sd.Downpour())


def test_downpour_trains_like_synchronous():
    world = ps_world(sd.ClusterTopology.downpour(2, 1, nservers=2))
    for acc, sync_acc in world.run(_downpour_digits, timeout=120):
        assert acc >= sync_acc - 1.0, (acc, sync_acc)


def _downpour_topk_digits():
    sent = []
    return train_digits(sd.Downpour(), compression=sd.Compression.topk(0.1), sent=sent), sent


def test_downpour_with_topk_trains_like_synchronous():
    """Each group pushes a tenth of its gradient's elements (error feedback keeps the rest for later)."""
    world = ps_world(sd.ClusterTopology.downpour(2, 1, nservers=2))
    for (acc, sync_acc), (sent, dense) in world.run(_downpour_topk_digits, timeout=120):
        assert acc >= sync_acc - 1.0, (acc, sync_acc)
        # A tenth of the elements (rounded up per server), each with an int32 index: a fifth of the bytes.
        assert 0.2 * dense <= sent < 0.21 * dense, (sent, dense)


def _hybrid_digits():
    return train_digits(sd.Hybrid())


def test_hybrid_trains_like_synchronous():
    world = ps_world(sd.ClusterTopology.hybrid(2, 2, nservers=1))
    for acc, sync_acc in world.run(_hybrid_digits, timeout=120):
        assert acc >= sync_acc - 1.0, (acc, sync_acc)


def _versions_and_staleness(staleness, pull_freq):
    """Group 1 is slowed down; returns what this group saw: versions after each step and staleness per update."""
    x, y, _, _ = digits()
    x, y = shard(x[:320], y[:320], sd.rank(), sd.size())
    model = _mlp()
    strategy = sd.Downpour(pull_freq=pull_freq, staleness=staleness)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                                  strategy=strategy)
    versions = []
    _epochs(model, opt, x, y, 16, 1, slow=0.02 * sd.worker_group(),
            after_step=lambda: versions.append(strategy.versions))
    seen = strategy.staleness_seen
    strategy.close()
    return versions, seen


def test_versions_grow_and_staleness_is_bounded():
    world = ps_world(sd.ClusterTopology.downpour(2, 1, nservers=2))
    for staleness, pull_freq in ((2, 1), (3, 2)):
        results = world.run(_versions_and_staleness, staleness, pull_freq, timeout=120)
        for versions, seen in results:
            for before, after in zip(versions, versions[1:]):
                assert all(b < a for b, a in zip(before, after)), (before, after)  # every push is a new version
            assert max(seen) <= staleness, seen
        assert max(max(seen) for _, seen in results) == staleness  # the bound is reached, not just never tested
    # Without a bound the fast group runs ahead of the slow one by more than that.
    results = world.run(_versions_and_staleness, None, 1, timeout=120)
    assert max(max(seen) for _, seen in results) > 3


def _hybrid_unused_parameter():
    return unused_parameter_run(sd.Hybrid(), synchronize=False)


def test_hybrid_parameter_without_gradient_in_any_worker_is_not_stepped():
    """One group of two workers is synchronous: it equals one process; a parameter is stepped when any worker
    of the group had a gradient for it (zeros for the others), and not at all when none had."""
    world = ps_world(sd.ClusterTopology.hybrid(1, 2, nservers=1))
    for err, steps in world.run(_hybrid_unused_parameter, timeout=120):
        assert err < 1e-5, err
        assert steps == 3


def _worker_missing_in_its_group():
    """Worker 1 of the only group never reaches the step; worker 0 must stop and name it."""
    model = torch.nn.Linear(3, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy="hybrid")
    if sd.rank() == 1:
        time.sleep(3600)
    torch.nn.functional.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
    opt.step()


def test_missing_worker_inside_a_group_is_named():
    """The collectives inside a worker group go through the watched primitives too."""
    from tests.conftest import get_world

    topology = sd.ClusterTopology.hybrid(1, 2, nservers=1)
    world = get_world(topology.nprocs, SINGA_TOPOLOGY=topology.to_json(), SINGA_PROC_WORLD_SIZE=str(topology.nprocs),
                      SINGA_TIMEOUT="3")
    message, seconds = world.run_failing(_worker_missing_in_its_group)
    assert "rank 0: rank 1 did not reach gradients of worker group 0 of 2 parameters (weight, ...) within the 3 s " \
           "timeout" in message
    assert seconds < 30
