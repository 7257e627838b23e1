"""Compression for the parameter-server strategies: 16-bit pushes and pulls stay close to one process,
top-k/threshold lose nothing (error feedback), bytes shrink, and the residuals survive a checkpoint."""
import math

import pytest
import torch

import singa_dist as sd
from singa_dist.compression import Compression
from tests.test_sandblaster import STEPS, _model, _optimizer, _rel, _train, ps_world

COMPRESSIONS = {"none": Compression.none, "fp16": Compression.fp16, "bf16": Compression.bf16}


def _cast_runs():
    """Sandblaster with each dense compression against one process on the whole batch (Adam, LR schedule)."""
    reference = _model()
    ref_opt = _optimizer("adam", reference.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    _train(reference, ref_opt, STEPS, sched=ref_sched)
    results = {}
    for name, compression in COMPRESSIONS.items():
        model = _model()
        opt = sd.DistributedOptimizer(_optimizer("adam", model.parameters()), model.named_parameters(),
                                      strategy="sandblaster", compression=compression)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        _train(model, opt, STEPS, sd.rank(), sd.size(), sched=sched)
        err = max(_rel(p, q) for p, q in zip(model.parameters(), reference.parameters()))
        results[name] = (err, opt.strategy.bytes_sent_total, opt.strategy.bytes_received_total)
        opt.strategy.close()
    return results


def test_16_bit_pushes_and_pulls_stay_close_and_halve_the_bytes():
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    for results in world.run(_cast_runs, timeout=120):
        err = {name: r[0] for name, r in results.items()}
        sent = {name: r[1] for name, r in results.items()}
        received = {name: r[2] for name, r in results.items()}
        assert err["none"] < 1e-5, err
        # Workers hold the servers' values rounded to 11 (fp16) or 8 (bf16) significant bits (half a unit in
        # the last place: 2**-11 and 2**-8 relative); the rounded gradients add less than that again.
        assert 0 < err["fp16"] < 2 * 2.0**-11 and 0 < err["bf16"] < 2 * 2.0**-8, err
        numel = sum(p.numel() for p in _model().parameters())
        assert sent["none"] == STEPS * numel * 4, sent
        assert sent["fp16"] * 2 == sent["none"] and sent["bf16"] * 2 == sent["none"], sent
        # The initial values and every step's answer: 16 bits instead of 32.
        assert received["none"] == (STEPS + 1) * numel * 4, received
        assert received["fp16"] * 2 == received["none"] and received["bf16"] * 2 == received["none"], received


def _sparse_feedback(kind, steps):
    """A fixed gradient per worker and plain SGD with lr 1: the servers' values are minus the sum of the applied
    averaged gradients. Returns, per checked step, that sum, this worker's residual and its bytes."""
    w = torch.nn.Parameter(torch.zeros(1000))
    unused = torch.nn.Parameter(torch.ones(10))  # never gets a gradient: never pushed, never stepped
    compression = Compression.topk(0.05) if kind == "topk" else Compression.threshold(8.0)
    opt = sd.DistributedOptimizer(torch.optim.SGD([w, unused], lr=1.0), [("w", w), ("unused", unused)],
                                  strategy="sandblaster", compression=compression)
    target = torch.randn(1000, generator=torch.Generator().manual_seed(sd.rank())) * (1 + torch.arange(1000) / 500)
    checked, sent = [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        (w * target).sum().backward()
        opt.step()
        sent.append(opt.strategy.bytes_sent_last_step)
        if step in (steps // 4, steps // 2, steps):
            residual = opt.state_dict()["singa_strategy"]["residual"]
            assert set(residual["params"]) == {"w", "unused"} and residual["rank"] == sd.rank()
            assert not residual["params"]["unused"].any()
            checked.append((step, -w.detach().clone(), residual["params"]["w"]))
    assert torch.equal(unused.detach(), torch.ones(10))
    slices = [(s.server, s.numel) for s in opt.strategy.client.slices if s.name == "w"]
    opt.strategy.close()
    return checked, sent, target, slices


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_sparse_pushes_lose_nothing(kind):
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    steps = 40
    results = world.run(_sparse_feedback, kind, steps, timeout=120)
    n = len(results)
    dense = sum(r[2] for r in results) / n  # what uncompressed averaging applies each step
    errors = []
    for i, (step, applied, _) in enumerate(results[0][0]):
        assert torch.equal(applied, results[1][0][i][1])  # every worker holds the servers' values
        held_back = sum(r[0][i][2] for r in results) / n
        # applied plus what the workers still hold back is exactly the dense sum: nothing is lost
        torch.testing.assert_close(applied + held_back, step * dense, rtol=1e-4, atol=1e-3)
        errors.append(((applied - step * dense).norm() / (step * dense).norm()).item())
    assert errors[2] < errors[1] < errors[0], errors
    sent = results[0][1]
    if kind == "topk":  # k float32 values and k int32 indices per server, over the slices of w it holds
        per_server = {}
        for server, numel in results[0][3]:
            per_server[server] = per_server.get(server, 0) + numel
        expected = sum(math.ceil(0.05 * numel) * 8 for numel in per_server.values())
        assert all(s == expected for s in sent), (sent, expected)
    else:
        assert 0 < sum(sent) / len(sent) < 0.5 * 1000 * 4, sent


def _residual_checkpoint():
    """Sandblaster with top-k: restoring opt.state_dict() (server state and this worker's residual) continues
    exactly as the run that was never interrupted."""
    model = _model()
    opt = sd.DistributedOptimizer(_optimizer("adam", model.parameters()), model.named_parameters(),
                                  strategy="sandblaster", compression=Compression.topk(0.2))
    _train(model, opt, 3, sd.rank(), sd.size())
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    _train(model, opt, 3, sd.rank(), sd.size(), start=3)
    after = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 4, sd.rank(), sd.size(), start=10)  # wander off (the residual changes too), come back
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    _train(model, opt, 3, sd.rank(), sd.size(), start=3)
    again = [p.detach().clone() for p in model.parameters()]
    opt.strategy.close()
    return max(_rel(a, b) for a, b in zip(again, after)), sum(r.abs().sum().item() for r in
                                                             saved["singa_strategy"]["residual"]["params"].values())


def test_checkpoint_restores_the_residual():
    world = ps_world(sd.ClusterTopology.sandblaster(2, 2))
    for err, held_back in world.run(_residual_checkpoint, timeout=120):
        assert held_back > 0
        assert err < 1e-6, err

