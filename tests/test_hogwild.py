"""Distributed Hogwild: co-located server groups exchanging deltas with each slice's master group."""
import math

import torch
import torch.distributed as dist

import singa_dist as sd
from tests.conftest import get_world
from tests.test_downpour import train_digits


def hogwild_world(ngroups=2, sync_freq=1):
    topology = sd.ClusterTopology.hogwild(ngroups, sync_freq=sync_freq)
    return get_world(topology.nprocs, SINGA_TOPOLOGY=topology.to_json())


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _master_holds_sum(compression=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    strategy = sd.Hogwild(sync_freq=1000)  # no automatic exchange: the test calls sync() itself
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                                  model.named_parameters(), strategy=strategy, compression=compression)
    start = _flat(model).clone()
    g = torch.Generator().manual_seed(sd.rank())
    for _ in range(3):  # each group its own data: different deltas
        x, y = torch.randn(16, 40, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    delta = _flat(model) - start
    deltas = [torch.empty_like(delta) for _ in range(sd.size())]
    dist.all_gather(deltas, delta, group=sd.workers_process_group())
    strategy.sync()
    dist.barrier(group=sd.workers_process_group())
    strategy.flush()  # fold the deltas other groups sent to the slices this group masters
    expected = start + torch.stack(deltas).sum(0)
    mastered = sum(s.numel for s in strategy.mine)
    mine = torch.zeros_like(delta, dtype=torch.bool)
    offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
    for s in strategy.mine:
        mine[offsets[s.param] + s.start:offsets[s.param] + s.end] = True
    strategy.close()
    value = _flat(model)
    # Masters hold start + every group's delta; after the exchange every replica holds the same.
    return ((value - expected).abs().max().item(), ((value - expected)[mine]).abs().max().item(), mastered,
            delta.abs().min().item(), value.abs().max().item(), torch.stack(deltas).abs().max().item())


def test_master_holds_sum_of_all_deltas():
    world = hogwild_world(2)
    results = world.run(_master_holds_sum, timeout=60)
    assert sum(r[2] for r in results) == 40 * 30 + 30 + 30 * 5 + 5  # every slice mastered by one group
    for everywhere, mastered_err, mastered, *_ in results:
        assert mastered > 0
        assert mastered_err < 1e-6
        assert everywhere < 1e-6


def test_fp16_deltas_and_values():
    """Deltas travel in fp16 (the master adds them rounded) and fresh values come back in fp16 (the other
    replica holds them rounded): errors of half a unit in the last place of 11 significant bits."""
    world = hogwild_world(2)
    for everywhere, mastered_err, _, _, value, delta in world.run(_master_holds_sum, sd.Compression.fp16,
                                                                   timeout=60):
        assert 0 < mastered_err <= delta * 2.0**-11
        assert 0 < everywhere <= value * 2.0**-11 + delta * 2.0**-11


def _hogwild_digits():
    return train_digits(sd.Hogwild(sync_freq=2))


def test_hogwild_trains_like_synchronous():
    world = hogwild_world(2)
    for acc, sync_acc in world.run(_hogwild_digits, timeout=120):
        assert acc >= sync_acc - 1.0, (acc, sync_acc)


def _hogwild_topk_digits():
    strategy, sent = sd.Hogwild(sync_freq=2), []
    accuracy = train_digits(strategy, compression=sd.Compression.topk(0.25), sent=sent)
    remote = [s.numel for slices in strategy.remote.values() for s in slices]
    return accuracy, sent[0], strategy.syncs - 2, remote  # the two last exchanges, in close(), are not counted


def test_hogwild_with_topk_trains_like_synchronous():
    """Top-k deltas: each exchange sends a quarter of the delta's elements; the rest waits in the residual."""
    world = hogwild_world(2)
    for (acc, sync_acc), sent, syncs, remote in world.run(_hogwild_topk_digits, timeout=120):
        assert acc >= sync_acc - 1.0, (acc, sync_acc)
        # One packet per exchange to the other group, the master of the slices listed in `remote`: a quarter
        # of their elements as float32 values and int32 indices, half the bytes of the dense deltas.
        assert syncs > 0 and sent == syncs * math.ceil(0.25 * sum(remote)) * 8, (sent, syncs, remote)


def _constant_gradient_steps():
    """Each group pushes the same gradient c_g every step (plain SGD, an exchange after every step while the other
    group steps too; group 1 takes more steps, more slowly)."""
    import time

    w = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    c = torch.arange(1.0, 8.0, dtype=torch.float64) * (1 if sd.worker_group() == 0 else -0.5)
    strategy = sd.Hogwild(sync_freq=1)
    opt = sd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), [("w", w)], strategy=strategy)
    steps = 20 + 7 * sd.worker_group()
    for _ in range(steps):
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        time.sleep(0.002 * sd.worker_group())
    strategy.close()
    return c, steps, strategy.syncs, w.detach().clone()


def test_every_step_counts_once_through_the_exchanges():
    """No delta is lost or applied twice however the groups' exchanges interleave: every replica ends at the start
    minus lr times every step of every group (in float64, exactly up to rounding)."""
    results = hogwild_world(2).run(_constant_gradient_steps, timeout=60)
    expected = -sum(0.1 * steps * c for c, steps, _, _ in results)
    for c, steps, syncs, final in results:
        assert syncs >= steps
        torch.testing.assert_close(final, expected, rtol=1e-12, atol=1e-12)
