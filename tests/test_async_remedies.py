"""The asynchronous frameworks' remedies for asynchrony: staleness-aware learning rate and momentum correction
(singa_dist.ps.server.asynchronous_step), on the servers (Downpour, Hybrid) and in Hogwild's replicas."""
import time

import pytest
import torch

import singa_dist as sd
from singa_dist.ps import server
from singa_dist.ps.slicing import slice_params
from singa_dist.strategies import make
from tests.test_sandblaster import ps_world


def _rule(options, staleness, groups, lr=True, momentum=True, sgd=True):
    return server.asynchronous_step(options, staleness, groups, staleness_lr=lr, momentum_correction=momentum,
                                    scales_gradient=sgd)


def test_rule_against_hand_computation():
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    # SGD computed on values 3 versions old: its gradient and weight decay count 1 / (3 + 1), the lr stays.
    out, scale = _rule(sgd, 3, 4)
    assert scale == pytest.approx(1 / 4) and out["weight_decay"] == pytest.approx(1e-4 / 4) and out["lr"] == 0.1
    assert out["momentum"] == pytest.approx(0.9 - (1 - 1 / 4))  # 4 groups: implicit momentum 3/4
    assert out["nesterov"] is False
    assert sgd == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}  # the user's are kept
    # An optimizer that normalises the gradient's scale away: the lr is scaled instead.
    out, scale = _rule(sgd, 3, 4, momentum=False, sgd=False)
    assert scale == 1.0 and out == {**sgd, "lr": pytest.approx(0.1 / 4)}
    # Fresh values and a lone group change nothing; each remedy alone touches only its option.
    assert _rule(sgd, 0, 1) == (sgd, 1.0)
    assert _rule(sgd, 2, 2, momentum=False) == ({**sgd, "weight_decay": pytest.approx(1e-4 / 3)},
                                               pytest.approx(1 / 3))
    assert _rule(sgd, 2, 2, lr=False) == ({**sgd, "momentum": pytest.approx(0.4)}, 1.0)
    # The corrected momentum never goes below 0; optimizers without momentum (Adam) keep theirs.
    assert _rule({"lr": 0.1, "momentum": 0.3}, 1, 8, lr=False)[0]["momentum"] == 0.0
    adam = {"lr": 1e-3, "betas": (0.9, 0.999)}
    assert _rule(adam, 1, 2, sgd=False) == ({"lr": pytest.approx(5e-4), "betas": (0.9, 0.999)}, 1.0)


def _table(momentum_correction: bool, groups: int = 2):
    """A server's table of one 6-element parameter, SGD with momentum and weight decay, pushed to by `groups`
    worker groups."""
    value = torch.linspace(-1, 1, 6, dtype=torch.float64)
    slices = slice_params([("w", 6)], 1, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(value.clone())], lr=0.1, momentum=0.9, weight_decay=0.01)
    options = [{k: v for k, v in opt.param_groups[0].items() if k != "params"}]
    spec = {"slices": slices, "values": [value.clone()], "param_group": [0], "optimizer_class": torch.optim.SGD,
            "defaults": dict(opt.defaults), "group_options": options, "replicas": 1, "staleness": None,
            "clients": groups, "staleness_lr": True, "momentum_correction": momentum_correction}
    return server._Table(spec), value, options


@pytest.mark.parametrize("momentum_correction", [False, True])
def test_server_steps_with_the_staleness_of_each_update(momentum_correction):
    """Two groups read version 0; group 0's update applies fresh, group 1's one version stale, then group 0's
    second update (it read version 1) one version stale: the parameter follows SGD by hand in float64."""
    table, w, options = _table(momentum_correction)
    table.register(0)
    table.register(1)
    g = [torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    momentum = 0.9 - 0.5 if momentum_correction else 0.9
    stale = []
    for group, grad in ((0, g[0]), (1, g[1]), (0, g[2])):
        future, done = table.push(group, [grad.clone()], options, want=True, average=True)
        server._complete(done)
        version, values, s = future.wait()  # the group computes on these fresh values next
        stale.append(s)
    assert stale == [0, 1, 1]
    buf = g[0] + 0.01 * w  # staleness 0: the user's step
    w = w - 0.1 * buf
    for grad in g[1:]:  # staleness 1: the gradient and the weight decay count half
        buf = momentum * buf + (grad + 0.01 * w) / 2
        w = w - 0.1 * buf
    torch.testing.assert_close(values[0], w, rtol=1e-12, atol=1e-12)
    assert options[0] == {**options[0], "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}  # what workers sent


def test_hogwild_replica_steps_as_one_of_its_groups():
    """A Hogwild group of 3 steps as staleness 2 (gradient and weight decay count a third) with momentum 0.9 - 2/3,
    and gives the user's options and gradients back afterwards (LR schedulers and the user see their own)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.3, momentum=0.9, weight_decay=0.1)
    strategy = sd.Hogwild(staleness_lr=True, momentum_correction=True)
    strategy.optimizer, strategy.params, strategy.groups = opt, [w], 3
    grads = [torch.tensor([0.5, 1.0, -1.5], dtype=torch.float64), torch.tensor([2.0, -1.0, 0.25],
                                                                                dtype=torch.float64)]
    ref = w.detach().clone()
    buf = None
    for grad in grads:
        w.grad = grad.clone()
        strategy._local_update(None, lambda closure: opt.step(closure))
        d = (grad + 0.1 * ref) / 3
        buf = d if buf is None else (0.9 - 2 / 3) * buf + d
        ref = ref - 0.3 * buf
        assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.9
        assert opt.param_groups[0]["weight_decay"] == 0.1 and torch.equal(w.grad, grad)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)


def test_options_are_checked_and_the_launcher_default_has_them():
    for cls in (sd.Downpour, sd.Hybrid, sd.Hogwild):
        with pytest.raises(ValueError, match="staleness_lr must be True or False, got 1"):
            cls(staleness_lr=1)
        with pytest.raises(ValueError, match="momentum_correction must be True or False, got 'yes'"):
            cls(momentum_correction="yes")
    # What `singa-launch --strategy downpour` builds (a script that names no strategy) is the class's defaults.
    for name in ("downpour", "hybrid", "hogwild"):
        built, default = make(name), sd.strategies.strategy_class(name)()
        assert (built.staleness_lr, built.momentum_correction) == (default.staleness_lr, default.momentum_correction)
    # On by default where benchmarks/async_accuracy.py shows it helps (docs/parameter_server.md).
    assert (sd.Downpour().staleness_lr, sd.Downpour().momentum_correction) == (True, False)
    assert (sd.Hybrid().staleness_lr, sd.Hybrid().momentum_correction) == (True, False)
    assert (sd.Hogwild().staleness_lr, sd.Hogwild().momentum_correction) == (False, False)


def _constant_gradient_run(staleness_lr: bool):
    """Each group pushes the same gradient c_g every step (loss = (w * c_g).sum()), group 1 starting late so that
    its first updates are stale; plain SGD, so the servers' final value is w0 - sum over updates of lr_u * c_g."""
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    c = torch.arange(1.0, 6.0, dtype=torch.float64) * (1 if sd.worker_group() == 0 else -0.5)
    strategy = sd.Downpour(staleness_lr=staleness_lr, momentum_correction=False)
    opt = sd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), [("w", w)], strategy=strategy)
    if sd.worker_group() == 1:
        time.sleep(0.3)  # group 0 runs ahead: group 1's first push is several versions stale
    for _ in range(6):
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        time.sleep(0.01)
    sd.barrier()
    strategy.pull()
    seen = strategy.staleness_seen
    strategy.close()
    return c, seen, w.detach().clone()


def test_servers_scale_each_update_by_its_staleness():
    world = ps_world(sd.ClusterTopology.downpour(2, 1, nservers=1))  # shared with test_follow_the_model
    results = world.run(_constant_gradient_run, True, timeout=60)
    assert max(max(seen) for _, seen, _ in results) >= 2, results  # some updates were stale
    expected = -sum(0.1 * c * sum(1 / (s + 1) for s in seen) for c, seen, _ in results)
    unscaled = -sum(0.1 * c * len(seen) for c, seen, _ in results)  # what staleness_lr=False applies
    for _, _, final in results:
        torch.testing.assert_close(final, expected, rtol=1e-12, atol=1e-12)
        assert (final - unscaled).abs().max() > 0.01
