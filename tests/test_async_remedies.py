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
    # Under DANA a stale update counts 1 / sqrt(s + 1): 3 versions old, a half.
    dana = server.asynchronous_step(sgd, 3, 4, staleness_lr=True, momentum_correction=False, scales_gradient=True,
                                    dana=True)
    assert dana == ({**sgd, "weight_decay": pytest.approx(1e-4 / 2)}, pytest.approx(1 / 2))
    assert server.asynchronous_step(adam, 8, 2, staleness_lr=True, momentum_correction=False, scales_gradient=False,
                                    dana=True) == ({"lr": pytest.approx(1e-3 / 3), "betas": (0.9, 0.999)}, 1.0)


def _table(momentum_correction: bool, groups: int = 2, **more):
    """A server's table of one 6-element parameter, SGD with momentum and weight decay, pushed to by `groups`
    worker groups (`more`: other entries of the spec)."""
    value = torch.linspace(-1, 1, 6, dtype=torch.float64)
    slices = slice_params([("w", 6)], 1, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(value.clone())], lr=0.1, momentum=0.9, weight_decay=0.01)
    options = [{k: v for k, v in opt.param_groups[0].items() if k != "params"}]
    spec = {"slices": slices, "values": [value.clone()], "param_group": [0], "optimizer_class": torch.optim.SGD,
            "defaults": dict(opt.defaults), "group_options": options, "replicas": 1, "staleness": None,
            "clients": groups, "staleness_lr": True, "momentum_correction": momentum_correction, **more}
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
    strategy = sd.Hogwild(staleness_lr=True, momentum_correction=True, dana=False)
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
    strategy = sd.Downpour(staleness_lr=staleness_lr, momentum_correction=False, dana=False)  # Zhang et al.'s share
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


# ---- Downpour/Hybrid's warm start (warmup_steps) and DANA (dana) ---------------------------------------------------
def _sgd_table(groups=2, warmup_steps=0, dana=False, staleness_lr=True):
    """A server's table of one 6-element parameter, SGD lr 0.1 momentum 0.9 weight decay 0.01, `groups` groups."""
    table, value, options = _table(False, groups)
    table.warmup_steps, table.dana = warmup_steps, dana and groups > 1
    table.staleness_lr = staleness_lr
    for g in range(groups):
        table.register(g)
    return table, value, options


def _grads(n):
    return [torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def test_warm_start_runs_the_first_updates_synchronously():
    """warmup_steps=2 with 2 groups: each group's push waits for the other's; the two gradients are averaged into
    one fresh update (AllReduce's, momentum and weight decay at the user's values) and both groups get the same
    values; the third push is applied alone, asynchronously."""
    table, w, options = _sgd_table(warmup_steps=2)
    g = _grads(5)
    buf = None
    for step in range(2):
        first, done = table.push(0, [g[2 * step].clone()], options, want=False, average=True)
        assert done == [] and not first.done()  # waits for group 1
        second, done = table.push(1, [g[2 * step + 1].clone()], options, want=False, average=True)
        server._complete(done)
        d = (g[2 * step] + g[2 * step + 1]) / 2 + 0.01 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
        for future in (first, second):
            version, values, stale = future.wait()
            assert (version, stale) == (step + 1, 0)
            torch.testing.assert_close(values[0], w, rtol=1e-12, atol=1e-12)
    future, done = table.push(0, [g[4].clone()], options, want=True, average=True)
    server._complete(done)
    version, values, stale = future.wait()
    assert (version, stale) == (3, 0)  # group 0 read version 2: fresh, applied at once
    w = w - 0.1 * (0.9 * buf + g[4] + 0.01 * w)
    torch.testing.assert_close(values[0], w, rtol=1e-12, atol=1e-12)


def test_warm_start_goes_on_without_a_group_that_left():
    """A group that leaves during the warm start (finished, or lost) is not waited for."""
    table, w, options = _sgd_table(warmup_steps=5)
    g = _grads(1)[0]
    future, done = table.push(0, [g.clone()], options, want=False, average=True)
    assert done == [] and not future.done()
    table.left[1] = (None, None)  # what close_table records
    server._complete(table.drain())
    version, values, stale = future.wait()
    torch.testing.assert_close(values[0], w - 0.1 * (g + 0.01 * w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("staleness_lr", [False, True])
def test_dana_steps_each_group_with_its_own_momentum_and_answers_looked_ahead(staleness_lr):
    """Group 0, group 1, group 0 again (each read the values after its own last update): each gradient enters its
    own group's momentum buffer, a stale one counting 1 / sqrt(s + 1); the values answered are
    w - lr * momentum * (sum of the groups' buffers)."""
    table, w, options = _sgd_table(dana=True, staleness_lr=staleness_lr)
    g = _grads(3)
    bufs = {}
    for group, grad, stale in ((0, g[0], 0), (1, g[1], 1), (0, g[2], 1)):
        future, done = table.push(group, [grad.clone()], options, want=True, average=True)
        server._complete(done)
        version, values, seen = future.wait()
        assert seen == stale
        share = (stale + 1) ** -0.5 if staleness_lr else 1.0
        d = (grad + 0.01 * w) * share
        bufs[group] = d if group not in bufs else 0.9 * bufs[group] + d
        w = w - 0.1 * bufs[group]
        torch.testing.assert_close(values[0], w - 0.1 * 0.9 * sum(bufs.values()), rtol=1e-12, atol=1e-12)
    # The servers' own values (a pull, the final model) are not looked ahead.
    torch.testing.assert_close(table.values()[0], w, rtol=1e-12, atol=1e-12)
    # Checkpoints carry each group's state, and a load restores it.
    state = table.state()
    (entry,) = state.values()
    assert set(entry["state"]) == {"group0.momentum_buffer", "group1.momentum_buffer"}
    torch.testing.assert_close(entry["state"]["group0.momentum_buffer"], bufs[0], rtol=1e-12, atol=1e-12)
    other, _, _ = _sgd_table(dana=True)
    other.load(state)
    torch.testing.assert_close(other.values(look_ahead=True)[0], values[0], rtol=1e-12, atol=1e-12)


def test_dana_looks_ahead_at_each_groups_own_learning_rate():
    """Group 1 runs ahead into the LR schedule's lower rate (0.01): the look-ahead takes its momentum at 0.01 and
    group 0's at 0.1, whichever group pushed last."""
    table, w, options = _sgd_table(dana=True, staleness_lr=False)
    slow = [{**options[0], "lr": 0.01}]
    g = _grads(2)
    b0 = g[0] + 0.01 * w
    w = w - 0.1 * b0
    b1 = g[1] + 0.01 * w
    w = w - 0.01 * b1
    for group, grad, opts in ((0, g[0], options), (1, g[1], slow)):
        future, done = table.push(group, [grad.clone()], opts, want=True, average=True)
        server._complete(done)
    torch.testing.assert_close(future.wait()[1][0], w - 0.09 * b0 - 0.009 * b1, rtol=1e-12, atol=1e-12)


def test_dana_after_the_warm_start_splits_the_momentum_among_the_groups():
    """After a synchronous update each group's buffer starts as a 1/G share of the shared one (their sum is the
    synchronous momentum); a lone group has no DANA (nothing is asynchronous)."""
    table, w, options = _sgd_table(warmup_steps=1, dana=True)
    g = _grads(3)
    for group in (0, 1):
        future, done = table.push(group, [g[group].clone()], options, want=False, average=True)
    server._complete(done)
    buf = (g[0] + g[1]) / 2 + 0.01 * w
    w = w - 0.1 * buf
    future, done = table.push(0, [g[2].clone()], options, want=True, average=True)
    server._complete(done)
    b0 = 0.9 * buf / 2 + g[2] + 0.01 * w  # fresh (group 0 read the synchronous update's values)
    w = w - 0.1 * b0
    torch.testing.assert_close(future.wait()[1][0], w - 0.09 * (b0 + buf / 2), rtol=1e-12, atol=1e-12)
    lone, _, _ = _sgd_table(groups=1, dana=True)
    assert not lone.dana


def test_warm_start_and_dana_options_are_checked():
    for cls in (sd.Downpour, sd.Hybrid):
        for bad in (-1, 1.5, "10", True):
            with pytest.raises(ValueError, match=f"warmup_steps must be a number of updates .* got {bad!r}"):
                cls(warmup_steps=bad)
        with pytest.raises(ValueError, match="dana must be True or False, got 1"):
            cls(dana=1)
    for name in ("downpour", "hybrid"):  # what --strategy builds
        built = make(name)
        assert (built.dana, built.warmup_steps) == (True, 0)


def _warm_start_run():
    """Each group pushes a constant gradient c_g (plain SGD, staleness_lr and DANA by default): the first 3 updates are
    synchronous (the groups' mean, fresh), the others asynchronous (c_g counting 1/sqrt(s + 1))."""
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    c = torch.arange(1.0, 6.0, dtype=torch.float64) * (1 if sd.worker_group() == 0 else -0.5)
    strategy = sd.Downpour(warmup_steps=3)
    opt = sd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), [("w", w)], strategy=strategy)
    versions = []
    for step in range(6):
        if sd.worker_group() == 1 and step == 3:
            time.sleep(0.3)  # after the warm start group 0 runs ahead
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        versions.append(strategy.versions[0])
    sd.barrier()
    strategy.pull()
    seen = strategy.staleness_seen
    strategy.close()
    return c, list(seen), versions, w.detach().clone()


def test_warm_start_in_a_downpour_job():
    world = ps_world(sd.ClusterTopology.downpour(2, 1, nservers=1))  # shared with the test above
    results = world.run(_warm_start_run, timeout=60)
    for _, seen, versions, _ in results:
        assert versions[:3] == [1, 2, 3] and seen[:3] == [0, 0, 0], (versions, seen)  # in step, every update fresh
    expected = -sum(0.1 * c * (3 / 2 + sum((s + 1) ** -0.5 for s in seen[3:])) for c, seen, _, _ in results)
    for _, _, _, final in results:
        torch.testing.assert_close(final, expected, rtol=1e-12, atol=1e-12)


# ---- Downpour/Hybrid's relative clip (relative_clip) ---------------------------------------------------------------
def test_relative_clip_scales_a_gradient_far_above_the_groups_running_norm():
    """Each group's first gradient starts its running mean of norms; a later gradient of more than 2 times that mean
    is scaled down to 2 times it (before the staleness share), and the mean takes the clipped norm with weight 0.1.
    Group 1's norms are its own. DANA and the staleness-aware step on, as by default: SGD by hand in float64."""
    table, w, options = _sgd_table(dana=True)
    table.relative_clip = 2.0
    g = _grads(4)
    pushes = ((0, g[0], 0), (1, 10 * g[1], 1), (0, 5 * g[2], 1), (0, 3 * g[3], 0))
    bufs, means = {}, {}
    for group, grad, stale in pushes:
        future, done = table.push(group, [grad.clone()], options, want=True, average=True)
        server._complete(done)
        version, values, seen = future.wait()
        assert seen == stale
        norm = grad.norm().item()
        if group in means and norm > 2 * means[group]:
            grad, norm = grad * (2 * means[group] / norm), 2 * means[group]
        means[group] = norm if group not in means else 0.9 * means[group] + 0.1 * norm
        d = (grad + 0.01 * w) * (stale + 1) ** -0.5
        bufs[group] = d if group not in bufs else 0.9 * bufs[group] + d
        w = w - 0.1 * bufs[group]
        torch.testing.assert_close(values[0], w - 0.09 * sum(bufs.values()), rtol=1e-12, atol=1e-12)
    assert table.grad_norms == pytest.approx(means, rel=1e-12)
    # The third push (5 times a gradient of about the first's norm) was clipped; group 1's large first one was not.
    assert means[0] < 5 * g[0].norm().item() and means[1] == pytest.approx(10 * g[1].norm().item())


def test_relative_clip_default_and_checks():
    for cls in (sd.Downpour, sd.Hybrid):
        assert cls().relative_clip == 2.0 and cls(relative_clip=None).relative_clip is None
        for bad in (1, 0.5, True, "2"):
            with pytest.raises(ValueError, match=f"relative_clip must be None or a number above 1.*got {bad!r}"):
                cls(relative_clip=bad)
    for name in ("downpour", "hybrid"):  # what --strategy builds
        assert make(name).relative_clip == 2.0
    assert _table(False, groups=2, relative_clip=2.0)[0].relative_clip == 2.0
    assert _table(False, groups=1, relative_clip=2.0)[0].relative_clip is None  # a lone group is synchronous


def test_hogwild_replica_clips_relative_to_its_running_norm():
    """Hogwild's default (here without DANA's look-ahead): a replica's gradient of more than 2 times the running mean of its norms is scaled down to
    it before the user's SGD step (weight decay untouched); the user's gradient is given back."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.3, momentum=0.9, weight_decay=0.1)
    strategy = sd.Hogwild(dana=False)
    strategy.optimizer, strategy.params, strategy.groups = opt, [w], 2
    grads = [torch.tensor([0.5, 1.0, -1.5], dtype=torch.float64), torch.tensor([2.0, -1.0, 0.25], dtype=torch.float64),
             torch.tensor([-6.0, 8.0, 3.0], dtype=torch.float64)]
    ref, buf, mean = w.detach().clone(), None, None
    for grad in grads:
        w.grad = grad.clone()
        strategy._local_update(None, lambda closure: opt.step(closure))
        norm, used = grad.norm().item(), grad
        if mean is not None and norm > 2 * mean:
            used, norm = grad * (2 * mean / norm), 2 * mean
        mean = norm if mean is None else 0.9 * mean + 0.1 * norm
        d = used + 0.1 * ref
        buf = d if buf is None else 0.9 * buf + d
        ref = ref - 0.3 * buf
        assert torch.equal(w.grad, grad) and opt.param_groups[0]["weight_decay"] == 0.1
    assert grads[2].norm() > 2 * grads[0].norm()  # the last one was clipped
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)
    assert strategy.grad_norm == pytest.approx(mean, rel=1e-12)
    with pytest.raises(ValueError, match="relative_clip must be None or a number above 1.*got 0"):
        sd.Hogwild(relative_clip=0)
    assert sd.Hogwild().relative_clip == 2.0 and make("hogwild").relative_clip == 2.0


def test_hogwild_replica_looks_ahead_by_its_own_momentum():
    """Hogwild's DANA (default): the replica steps in SGD's Nesterov form (its values at the point its momentum takes
    them to); the user's nesterov=False is given back. With momentum 0 (or dampening) nothing changes."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.3, momentum=0.9, weight_decay=0.1)
    strategy = sd.Hogwild(relative_clip=None)
    strategy.optimizer, strategy.params, strategy.groups = opt, [w], 2
    grads = [torch.tensor([0.5, 1.0, -1.5], dtype=torch.float64), torch.tensor([2.0, -1.0, 0.25], dtype=torch.float64)]
    ref, buf = w.detach().clone(), None
    for grad in grads:
        w.grad = grad.clone()
        strategy._local_update(None, lambda closure: opt.step(closure))
        d = grad + 0.1 * ref
        buf = d if buf is None else 0.9 * buf + d
        ref = ref - 0.3 * (d + 0.9 * buf)
        assert opt.param_groups[0]["nesterov"] is False and torch.equal(w.grad, grad)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)
    plain = torch.optim.SGD([w], lr=0.3, momentum=0.0)
    strategy.optimizer = plain
    w.grad, before = grads[0].clone(), w.detach().clone()
    strategy._local_update(None, lambda closure: plain.step(closure))
    torch.testing.assert_close(w.detach(), before - 0.3 * grads[0], rtol=1e-12, atol=1e-12)
    assert sd.Hogwild().dana is True and make("hogwild").dana is True
    with pytest.raises(ValueError, match="dana must be True or False, got 1"):
        sd.Hogwild(dana=1)
