"""Gradient compression: round-trip error bounds, what top-k/threshold send, error feedback, and training
on the digits with each compression against the uncompressed run."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from singa_dist.compression import Compression


@pytest.mark.parametrize("compressor,bound", [(Compression.fp16, 2.0**-11), (Compression.bf16, 2.0**-8)])
def test_cast_round_trip_error_bound(compressor, bound):
    g = torch.Generator().manual_seed(0)
    # magnitudes across fp16's normal range [2**-14, 65504], both signs
    magnitude = torch.exp(torch.empty(10_000).uniform_(math.log(2.0**-14), math.log(6e4), generator=g))
    x = magnitude * torch.where(torch.rand(10_000, generator=g) < 0.5, -1.0, 1.0)
    wire, ctx = compressor.compress(x)
    assert wire.dtype == compressor.wire_dtype and wire.element_size() == 2
    back = compressor.decompress(wire, ctx)
    assert back.dtype == torch.float32
    rel = ((back - x).abs() / x.abs()).max().item()
    assert 0 < rel <= bound  # round to nearest: half a unit in the last place of an 11- or 8-bit significand
    if compressor is Compression.fp16:  # below the normal range fp16 keeps an absolute error of 2**-25
        tiny = x * 2.0**-30  # all below 2**-14
        assert (compressor.decompress(*compressor.compress(tiny)) - tiny).abs().max() <= 2.0**-25
    assert compressor.compress(torch.arange(3))[0].dtype == torch.int64  # integers travel unchanged


def test_sparse_selection():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.5])
    assert sorted(Compression.topk(0.25).select(x).tolist()) == [1, 3]
    assert Compression.topk(0.01).count(8) == 1 and Compression.topk(0.3).count(10) == 3
    assert sorted(Compression.threshold(0.5).select(x).tolist()) == [1, 3, 6, 7]
    # large buffers take a sampled shortcut: it must pick exactly the elements a full top-k picks
    g = torch.Generator().manual_seed(3)
    for big in (torch.randn(200_003, generator=g), torch.rand(100_000, generator=g) ** 8,
                torch.cat([torch.zeros(90_000), torch.randn(10_000, generator=g)])):
        for ratio in (0.001, 0.01, 0.05):
            k = Compression.topk(ratio).count(big.numel())
            got = Compression.topk(ratio).select(big)
            assert got.numel() == k and got.unique().numel() == k
            assert big.abs()[got].min() >= big.abs().topk(k).values.min()
    with pytest.raises(ValueError):
        Compression.topk(0.0)
    with pytest.raises(ValueError):
        Compression.threshold(-1.0)


# ------------------------------------------------------------------------------------------------------------
# What the sparse compressions send, and error feedback

def sparse_feedback(kind, steps):
    """Every rank has a fixed gradient; returns the synchronised gradient of each step, the bytes sent and
    the residual kept back after each step."""
    r = sd.rank()
    w = nn.Parameter(torch.zeros(1000))
    compression = Compression.topk(0.05) if kind == "topk" else Compression.threshold(8.0)
    opt = sd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)],
                                  compression=compression)
    target = torch.randn(1000, generator=torch.Generator().manual_seed(r)) * (1 + torch.arange(1000) / 500)
    applied, sent, residuals = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        (w * target).sum().backward()  # the gradient is `target`
        opt.synchronize()
        applied.append(w.grad.clone())
        sent.append(opt.strategy.bytes_sent_last_step)
        residuals.append(opt.strategy.buckets[0].residual.clone())
        with opt.skip_synchronize():
            opt.step()
    return applied, sent, residuals, target


def _check_feedback(results, steps):
    n = len(results)
    dense = sum(res[3] for res in results) / n  # what uncompressed averaging applies each step
    applied = results[0][0]
    assert all(torch.equal(a, b) for a, b in zip(applied, results[1][0]))  # identical on every rank
    errors = []
    for t in (steps // 4, steps // 2, steps):
        total = torch.stack(applied[:t]).sum(0)
        # nothing is lost: what was applied plus what the ranks still hold back is exactly the dense sum
        held_back = sum(res[2][t - 1] for res in results) / n
        assert torch.allclose(total + held_back, t * dense, rtol=1e-4, atol=1e-3)
        errors.append(((total - t * dense).norm() / (t * dense).norm()).item())
    # the residual stays bounded, so the relative error of the sum falls like 1/t
    norms = [sum(res[2][t - 1] for res in results).norm().item() for t in (steps // 2, steps)]
    assert norms[1] < 1.5 * norms[0]
    assert errors[2] < errors[1] < errors[0] and errors[2] < errors[0] / 2.5
    return applied


def test_topk_sends_the_stated_fraction_and_error_feedback_converges(world2):
    steps = 80
    results = world2.run(sparse_feedback, "topk", steps, timeout=60)
    applied = _check_feedback(results, steps)
    k = math.ceil(0.05 * 1000)
    assert all(s == k * (4 + 4) for s in results[0][1])  # k float32 values and k int32 indices
    assert all(0 < int((a != 0).sum()) <= 2 * k for a in applied)  # at most k elements from each of 2 ranks


def test_threshold_sends_large_elements_and_error_feedback_converges(world2):
    steps = 80
    results = world2.run(sparse_feedback, "threshold", steps, timeout=60)
    _check_feedback(results, steps)
    sent = results[0][1]
    # elements travel once their accumulated magnitude reaches 8 (in waves, as gradients here are constant),
    # so on average far fewer bytes than the dense 4000
    assert 0 < min(sent) and sum(sent) / len(sent) < 0.5 * 1000 * 4


# ------------------------------------------------------------------------------------------------------------
# Training on the digits with every compression

CONFIGS = {
    "none": dict(),
    "fp16": dict(compression=Compression.fp16),
    "bf16": dict(compression=Compression.bf16),
    "topk": dict(compression=Compression.topk(0.1)),
    "threshold": dict(compression=Compression.threshold(5e-3)),
    "partial": dict(strategy=sd.AllReduce(partial_update_chunks=3)),
}


def train_digits(configs, epochs=12, batch=32):
    from examples.datasets import digits, shard

    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    x, y = shard(x_train, y_train, sd.rank(), sd.size())
    results = {}
    for name in configs:
        options = dict(CONFIGS[name])
        if "strategy" in options:  # a strategy object serves one optimizer: make a fresh one
            options["strategy"] = sd.AllReduce(partial_update_chunks=options["strategy"].partial_update_chunks)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      named_parameters=model.named_parameters(), **options)
        sd.broadcast_parameters(model.state_dict(), root_rank=0)
        sent = 0
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch * 10 + sd.rank()))
            for i in range(0, len(x) - batch + 1, batch):
                idx = order[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sent += opt.strategy.bytes_sent_last_step
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        results[name] = (accuracy, sent)
    return results


def test_training_with_each_compression_reaches_the_uncompressed_accuracy(world2):
    results = world2.run(train_digits, list(CONFIGS), timeout=240)
    accuracy = {name: acc for name, (acc, _) in results[0].items()}
    sent = {name: s for name, (_, s) in results[0].items()}
    assert accuracy["none"] >= 0.95, accuracy
    for name, acc in accuracy.items():
        assert acc >= accuracy["none"] - 0.01, f"{name}: {acc:.3f} against {accuracy['none']:.3f} uncompressed"
    assert sent["fp16"] * 2 == sent["none"] and sent["bf16"] * 2 == sent["none"]
    assert sent["topk"] < 0.25 * sent["none"] and sent["threshold"] < 0.75 * sent["none"]
    assert sent["partial"] < 0.5 * sent["none"]


# ------------------------------------------------------------------------------------------------------------
# The residual in checkpoints

def _topk_steps(model, opt, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * step + sd.rank())
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _topk_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  named_parameters=model.named_parameters(), compression=Compression.topk(0.1))
    return model, opt


def residual_round_trip(folder):
    """Train, checkpoint (each rank its own file), train on; a restarted job (new model, optimizer and strategy)
    that loads the checkpoint must continue exactly as the uninterrupted run."""
    import warnings

    model, opt = _topk_model()
    _topk_steps(model, opt, 4, 0)
    path = f"{folder}/rank{sd.rank()}.pt"
    sd.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    _topk_steps(model, opt, 3, 4)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    opt.strategy.close()

    def restart(path):
        model, opt = _topk_model()
        state = sd.load_checkpoint(path)
        model.load_state_dict(state["model"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.load_state_dict(state["optimizer"])
        _topk_steps(model, opt, 3, 4)
        opt.strategy.close()
        err = max((p - q).abs().max().item() for p, q in zip(model.parameters(), uninterrupted))
        return err, [str(w.message) for w in caught]

    state = sd.load_checkpoint(path)["optimizer"]["singa_strategy"]["residual"]
    residual = (state["rank"], sorted(state["params"]), sum(r.abs().sum().item() for r in state["params"].values()))
    restored = restart(path)
    # Every rank loading rank 0's file (the usual `if sd.rank() == 0: save` pattern): another rank cannot take
    # rank 0's residual (that would count it twice) and starts from zero, with a warning.
    shared = restart(f"{folder}/rank0.pt")
    return residual, restored, shared


def test_topk_residual_survives_a_checkpoint(world2, tmp_path):
    for rank, (residual, restored, shared) in enumerate(world2.run(residual_round_trip, str(tmp_path), timeout=60)):
        saved_rank, names, held_back = residual
        assert saved_rank == rank and names == ["0.bias", "0.weight", "2.bias", "2.weight"] and held_back > 0
        err, warned = restored
        assert err == 0 and not warned, (err, warned)
        _, warned = shared
        if rank == 0:
            assert not warned
        else:
            assert any("rank 0's topk(0.1) residual" in w for w in warned), warned
