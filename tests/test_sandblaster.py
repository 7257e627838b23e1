"""Sandblaster (synchronous parameter server) equals one process on the whole batch; its servers checkpoint."""
import threading
import time

import pytest
import torch

import singa_dist as sd
from tests.conftest import get_world

STEPS = 5
BATCH = 12  # divides among 2 and 3 workers


def ps_world(topology: "sd.ClusterTopology"):
    """A shared world whose server processes run the parameter-server loop; a dead peer is noticed in 20 s."""
    return get_world(topology.nprocs, SINGA_TOPOLOGY=topology.to_json(), SINGA_PROC_WORLD_SIZE=str(topology.nprocs),
                     SINGA_TIMEOUT="20")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99), weight_decay=1e-3)


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 3, generator=g)


def _train(model, opt, steps, rank=0, size=1, start=0, sched=None):
    for step in range(start, start + steps):
        x, y = _data(step)
        n = BATCH // size
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _equivalence(opt_name):
    reference = _model()
    ref_opt = _optimizer(opt_name, reference.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    _train(reference, ref_opt, STEPS, sched=ref_sched)

    model = _model()
    with torch.no_grad():  # different starting values on other ranks: the servers' initial values win
        for p in model.parameters():
            p.add_(sd.rank())
    opt = sd.DistributedOptimizer(_optimizer(opt_name, model.parameters()), model.named_parameters(),
                                  strategy="sandblaster")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, STEPS, sd.rank(), sd.size(), sched=sched)
    versions = opt.strategy.versions
    opt.strategy.close()
    return max(_rel(p, q) for p, q in zip(model.parameters(), reference.parameters())), versions


@pytest.mark.parametrize("nworkers,nservers", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_equals_one_process(nworkers, nservers):
    world = ps_world(sd.ClusterTopology.sandblaster(nworkers, nservers))
    for opt_name in ("sgd", "adam"):
        results = world.run(_equivalence, opt_name, timeout=120)
        for err, versions in results:
            assert err < 1e-5, (opt_name, err)
            assert versions == [STEPS] * nservers


class _TwoHeads(torch.nn.Module):
    """A trunk with two heads; the second one is used only on some steps and by some workers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(7, 13)
        self.head = torch.nn.Linear(13, 3)
        self.extra = torch.nn.Linear(13, 3)

    def forward(self, x, use_extra):
        h = torch.tanh(self.trunk(x))
        return self.head(h) + self.extra(h) if use_extra else self.head(h)


# The workers (of 2) that use the extra head at each step: both, none, only worker 1, none, none, both.
EXTRA_USED_BY = [{0, 1}, set(), {1}, set(), set(), {0, 1}]


def _two_heads_loss(model, step, rank, size):
    x, y = _data(step)
    n = BATCH // size
    return torch.nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n], rank in EXTRA_USED_BY[step]),
                                        y[rank * n:(rank + 1) * n])


def unused_parameter_run(strategy, synchronize):
    """Adam with a parameter that has no gradient on some steps, against one process on the whole batch
    (torch's Adam skips a parameter whose .grad is None: no move, no step counted)."""
    size = 2
    reference = _TwoHeads()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=1e-3)
    for step in range(len(EXTRA_USED_BY)):
        ref_opt.zero_grad()
        (sum(_two_heads_loss(reference, step, r, size) for r in range(size)) / size).backward()
        ref_opt.step()

    model = _TwoHeads()
    opt = sd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3),
                                  model.named_parameters(), strategy=strategy)
    for step in range(len(EXTRA_USED_BY)):
        before = model.extra.weight.detach().clone()
        opt.zero_grad()
        _two_heads_loss(model, step, sd.rank(), size).backward()
        if synchronize:
            opt.synchronize()  # e.g. to clip: the all-reduce must keep "no gradient anywhere" as None
        opt.step()
        if not EXTRA_USED_BY[step]:
            assert torch.equal(model.extra.weight, before), f"step {step}: the unused head moved"
    steps = opt.state_dict()["singa_strategy"]["state"]["extra.weight"]["step"]
    opt.strategy.close()
    return max(_rel(p, q) for p, q in zip(model.parameters(), reference.parameters())), float(steps)


def _unused_parameter(synchronize):
    return unused_parameter_run("sandblaster", synchronize)


@pytest.mark.parametrize("synchronize", [False, True], ids=["push", "synchronize-then-push"])
def test_parameter_without_gradient_is_not_stepped(synchronize):
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    for err, steps in world.run(_unused_parameter, synchronize, timeout=120):
        assert err < 1e-5, err
        assert steps == 3  # Adam's step count on the servers: only the steps where some worker used it


def _sampler_shards():
    sampler = torch.utils.data.distributed.DistributedSampler(range(12), shuffle=False)
    given = torch.utils.data.distributed.DistributedSampler(range(12), num_replicas=4, rank=1, shuffle=False)
    return list(sampler), sampler.num_replicas, sampler.rank, given.num_replicas, given.rank


def test_distributed_sampler_shares_the_data_among_the_workers():
    """torch's default group holds the servers too; DistributedSampler(dataset) must not leave their shares unread."""
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    out = world.run(_sampler_shards, timeout=60)
    assert [o[1:] for o in out] == [(2, 0, 4, 1), (2, 1, 4, 1)]  # values given explicitly are kept
    assert sorted(out[0][0] + out[1][0]) == list(range(12))


def _checkpoint():
    model = _model()
    opt = sd.DistributedOptimizer(_optimizer("adam", model.parameters()), model.named_parameters(),
                                  strategy="sandblaster")
    _train(model, opt, 3, sd.rank(), sd.size())
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    _train(model, opt, 2, sd.rank(), sd.size(), start=3)
    after = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 4, sd.rank(), sd.size(), start=10)  # wander off, then come back
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    _train(model, opt, 2, sd.rank(), sd.size(), start=3)
    again = [p.detach() for p in model.parameters()]
    state = saved["singa_strategy"]
    opt.strategy.close()
    keys = sorted(state["state"]["0.weight"])
    return max(_rel(a, b) for a, b in zip(again, after)), keys, state["versions"]["0.weight"]


def test_checkpoint_restores_server_state():
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    for err, keys, version in world.run(_checkpoint, timeout=120):
        assert err < 1e-6
        assert keys == ["exp_avg", "exp_avg_sq", "step"]  # Adam's state, kept on the servers
        assert version == 3


def _train_until_failure(started):
    model = _model()
    opt = sd.DistributedOptimizer(_optimizer("sgd", model.parameters()), model.named_parameters(),
                                  strategy="sandblaster")
    try:
        _train(model, opt, 2, sd.rank(), sd.size())
        open(f"{started}.{sd.rank()}", "w").close()
        while True:
            _train(model, opt, 10, sd.rank(), sd.size())
    except RuntimeError as exc:
        return str(exc), time.time()


def test_killed_server_stops_workers_with_its_name(tmp_path):
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))  # the last test of this world: it loses a server
    killed = {}

    started = tmp_path / "training"

    def kill():  # once both workers train
        while not all((tmp_path / f"training.{r}").exists() for r in range(2)):
            time.sleep(0.1)
        time.sleep(0.5)
        killed["at"] = time.time()
        world.procs[3].kill()  # server 0.1

    try:
        threading.Thread(target=kill, daemon=True).start()
        results = world.run(_train_until_failure, str(started), timeout=90)
    finally:
        world.close()
    for message, at in results:
        assert "parameter server 0.1 (process 3)" in message, message
        assert at - killed["at"] < 30
        if at - killed["at"] < 15:  # well inside the 20 s timeout: a death, said as such
            assert "failed or died" in message and "did not answer" not in message, message

