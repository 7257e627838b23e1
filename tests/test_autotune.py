"""AllReduce(bucket_mb="auto") and singa-launch --autotune: the tuner's bookkeeping, every rank settling on the
same size at the same step, gradients exactly those of a fixed size, the choice reported once, and the
launcher's flag."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from launchers.config import UsageError, parse_args
from singa_dist.environment import AUTOTUNE_VARIABLE
from singa_dist.strategies.buckets import BucketTuner

SIZES_MB = (0.0001, 0.0004, 0.004, 0.05)  # 4, 2, 1 and 1 buckets of the model below (3.1 KB of gradients)
WARMUP, MEASURED = 1, 2
STEPS = 12  # 3 distinct layouts x (1 + 2) steps of tuning, then 3 with the chosen size


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def reference():
    """One process on the whole batch, in float64."""
    model = make_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------------
# The tuner alone

def test_tuner_times_from_step_end_to_step_end_after_warmup():
    tuner = BucketTuner([1.0, 4.0], warmup=2, steps=3)
    ends = iter([0.0, 1.0, 2.0, 2.5, 3.0, 3.5])  # trial 1: 2 warm-up steps, then 0.5 s steps
    assert [tuner.step_done(next(ends)) for _ in range(5)] == [False, False, False, False, True]
    assert tuner.times_ms[0] == [1000.0, 500.0, 500.0] and tuner.size_mb == 1.0
    assert tuner.advance() and tuner.size_mb == 4.0
    for t in (3.6, 3.7, 3.8, 3.9, 4.0):
        done = tuner.step_done(t)
    assert done and tuner.times_ms[1] == pytest.approx([100.0] * 3)
    assert not tuner.advance()
    assert tuner.medians_ms() == pytest.approx([500.0, 100.0]) and tuner.best(tuner.medians_ms()) == 1
    assert BucketTuner.best([2.0, 1.0, 1.0]) == 1  # a tie goes to the smaller size
    with pytest.raises(ValueError, match="warm-up"):
        BucketTuner([1.0], warmup=0, steps=1)


def test_arguments_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="'auto'"):
        sd.AllReduce(bucket_mb="fast")
    with pytest.raises(ValueError, match="num_buckets or groups"):
        sd.AllReduce(bucket_mb="auto", num_buckets=2)
    with pytest.raises(ValueError, match="partial update"):
        sd.AllReduce(bucket_mb="auto", partial_update_chunks=2)
    with pytest.raises(ValueError, match="autotune_sizes_mb"):
        sd.AllReduce(bucket_mb="auto", autotune_sizes_mb=(1, 0))
    with pytest.raises(ValueError, match="autotune_warmup"):
        sd.AllReduce(bucket_mb="auto", autotune_steps=0)
    monkeypatch.setenv(AUTOTUNE_VARIABLE, "1")
    assert sd.AllReduce().autotune and not sd.AllReduce(bucket_mb=8).autotune
    assert not sd.AllReduce(num_buckets=2).autotune
    monkeypatch.setenv(AUTOTUNE_VARIABLE, "maybe")
    with pytest.raises(ValueError, match=AUTOTUNE_VARIABLE):
        sd.AllReduce()
    monkeypatch.delenv(AUTOTUNE_VARIABLE)
    assert not sd.AllReduce().autotune and sd.AllReduce(bucket_mb="auto").autotune


def test_one_process_reports_the_default_size(single_process):
    model = make_model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy=sd.AllReduce(bucket_mb="auto"))
    for x, y in batches()[:3]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.strategy.bucket_mb == 4.0 and opt.strategy.autotune_log == []  # nothing to tune alone


# --------------------------------------------------------------------------------------------------------------
# Two ranks

def _train(bucket_mb, sizes=SIZES_MB):
    rank, size = sd.rank(), sd.size()
    model = make_model()
    strategy = sd.AllReduce(bucket_mb=bucket_mb, autotune_sizes_mb=sizes,
                            autotune_warmup=WARMUP, autotune_steps=MEASURED)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  named_parameters=model.named_parameters(), strategy=strategy)
    in_use = []  # (bucket_mb, number of buckets) of each step
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for x, y in batches():
            in_use.append((strategy.bucket_mb, len(strategy.buckets)))
            opt.zero_grad()
            F.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
            opt.step()
    return [p.detach() for p in model.parameters()], in_use, strategy.bucket_mb, strategy.autotune_log, out.getvalue()


def _train_both():
    return _train("auto"), _train(0.0004)


def test_auto_equals_a_fixed_size_and_ranks_agree(world2):
    results = world2.run(_train_both, timeout=60)
    want = reference()
    (auto0, fixed0), (auto1, _) = results
    params, in_use, chosen, log, printed = auto0
    # Gradients are exactly those of a fixed size (2 ranks: the sums are exact whatever the buckets).
    for a, f in zip(params, fixed0[0]):
        assert torch.equal(a, f)
    for got, w in zip(params, want):
        assert ((got.double() - w).norm() / w.norm()).item() < 1e-6
    # Three distinct layouts (0.05 MB gives one bucket, as 0.004 MB does), tried in order, then the choice.
    assert [e["bucket_mb"] for e in log] == [0.0001, 0.0004, 0.004]
    assert [e["buckets"] for e in log] == [4, 2, 1]
    assert all(e["step_ms"] > 0 and len(e["times_ms"]) == MEASURED for e in log)
    trial = WARMUP + MEASURED
    assert in_use[:3 * trial] == [(0.0001, 4)] * trial + [(0.0004, 2)] * trial + [(0.004, 1)] * trial
    assert chosen == min(log, key=lambda e: e["step_ms"])["bucket_mb"]
    assert [mb for mb, _ in in_use[3 * trial:]] == [chosen] * (STEPS - 3 * trial)
    # Every rank: the same times (the slowest rank's), the same choice at the same step.
    assert auto1[1] == in_use and auto1[2] == chosen
    assert [e["step_ms"] for e in auto1[3]] == [e["step_ms"] for e in log]
    lines = printed.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[singa autotune] bucket_mb={chosen:g}:"), printed
    assert auto1[4] == "", "rank 0 alone reports the choice"


def _train_one_layout():
    return _train("auto", sizes=(1, 4, 16, 64))


def test_sizes_giving_the_same_buckets_are_not_tried(world2):
    for _, in_use, chosen, log, _ in world2.run(_train_one_layout, timeout=60):
        assert chosen == 1.0 and log == [{"bucket_mb": 1.0, "buckets": 1, "step_ms": None}]
        assert set(in_use) == {(1.0, 1)}


# --------------------------------------------------------------------------------------------------------------
# singa-launch --autotune

def test_launcher_sets_the_environment_and_checks_the_strategy(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert parse_args(["-np", "2", "--autotune", str(script)]).common_env()[AUTOTUNE_VARIABLE] == "1"
    assert AUTOTUNE_VARIABLE not in parse_args(["-np", "2", str(script)]).common_env()
    # an elastic job's workers get it too
    assert parse_args(["-np", "2", "--min-np", "1", "--autotune", str(script)]).common_env()[AUTOTUNE_VARIABLE] == "1"
    with pytest.raises(UsageError, match="--autotune"):
        parse_args(["-np", "2", "--strategy", "hogwild", "--autotune", str(script)])
    for strategy in ("sandblaster", "downpour"):  # their messages per server
        assert parse_args(["-np", "2", "--strategy", strategy, "--autotune", str(script)]).common_env()[
            AUTOTUNE_VARIABLE] == "1"


def _replan_keeps_residuals():
    model = make_model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy=sd.AllReduce(bucket_mb=0.0001), compression=sd.Compression.topk(0.1))
    for x, y in batches()[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before = {name: r.clone() for name, r in opt.strategy._residuals().items()}
    opt.strategy._replan(0.004)
    after = opt.strategy._residuals()
    return len(opt.strategy.buckets), opt.strategy.bucket_mb, before, after


def test_replanning_keeps_the_sparse_residuals(world2):
    for buckets, mb, before, after in world2.run(_replan_keeps_residuals, timeout=60):
        assert buckets == 1 and mb == 0.004 and set(before) == set(after) and len(before) == 6
        assert any(r.abs().sum() > 0 for r in before.values())
        for name in before:
            assert torch.equal(before[name], after[name]), name
