"""Live metrics: stats() against known answers (steps, bytes per step = the buckets), the CSV and rank 0's lines,
the parameter servers' staleness, counters kept when off, and singa-launch --metrics."""
import csv
import os
import sys
import textwrap
import time

import pytest
import torch

import singa_dist as sd
from launchers.config import UsageError, parse_args
from launchers.launch import main as launch_main
from singa_dist import metrics

ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
STEPS = 12
BATCH = 8
INTERVAL = 0.05


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def _train(opt, model, steps=STEPS, pause=0.0):
    g = torch.Generator().manual_seed(sd.rank())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(BATCH, 10, generator=g)),
                                     torch.randn(BATCH, 3, generator=g)).backward()
        opt.step()
        if pause:
            time.sleep(pause)


# --------------------------------------------------------------------------------------------------------------
# Off (one process): the counters that are free, no hooks, no flag

def test_off_keeps_steps_and_bytes_and_leaves_rates_none(single_process, monkeypatch):
    monkeypatch.delenv(metrics.VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match="not in a DistributedOptimizer yet"):
        sd.AllReduce().stats()
    hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    assert metrics.on is False and dict(torch.nn.modules.module._global_forward_pre_hooks) == hooks
    before = opt.strategy.stats()
    assert before["steps"] == 0 and before["bytes_sent"] == before["bytes_received"] == 0
    assert before["steps_per_s"] is None and before["bytes_sent_per_step"] is None
    _train(opt, model, steps=3)
    stats = opt.strategy.stats()
    assert stats["steps"] == 3 and stats["metrics_interval_s"] is None and stats["samples"] is None
    assert stats["bytes_sent_per_step"] == 0  # one process: nothing to send
    for key in ("steps_per_s", "samples_per_s", "comm_wait_fraction", "staleness_mean"):
        assert stats[key] is None, key


def test_bad_intervals_are_refused(single_process, monkeypatch):
    model = _model()
    for bad in (-1, float("nan"), "soon"):
        with pytest.raises(ValueError, match="metrics"):
            sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), metrics=bad)
    monkeypatch.setenv(metrics.VARIABLE, "inf")
    with pytest.raises(ValueError, match="SINGA_METRICS"):
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    assert not hasattr(model[0].weight, "_post_accumulate_grad_hooks") or \
        not model[0].weight._post_accumulate_grad_hooks, "nothing was set up"


def test_batch_size_given_instead_of_counted(single_process, capsys):
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), metrics=INTERVAL,
                                  backward_passes_per_step=1)
    opt.strategy.set_batch_size(5)
    with pytest.raises(ValueError, match="positive whole number"):
        opt.strategy.set_batch_size(0)
    _train(opt, model, steps=4, pause=INTERVAL / 2)
    stats = opt.strategy.stats()
    assert stats["samples"] == 4 * 5  # not the forward's 8 a pass
    assert stats["samples_per_s"] == pytest.approx(5 * stats["steps_per_s"])
    opt.strategy.meter.close()
    assert metrics.on is False
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(metrics.PREFIX)]
    assert lines and "steps/s" in lines[0] and "samples/s" in lines[0] and "comm wait" in lines[0]


# --------------------------------------------------------------------------------------------------------------
# AllReduce on 2 ranks: known answers, the CSV

def _allreduce_rank():
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy=sd.AllReduce(groups=2))
    first = opt.strategy.stats()
    _train(opt, model, pause=0.01)
    bucket_bytes = sum(sum(b.numels) * torch.tensor([], dtype=b.dtype).element_size() for b in opt.strategy.buckets)
    return first, opt.strategy.stats(), bucket_bytes, len(opt.strategy.buckets)


def test_allreduce_stats_known_answers_and_csv(tmp_path, capfd):
    path = tmp_path / "metrics.csv"
    env = {**ENV, metrics.VARIABLE: str(INTERVAL), metrics.FILE_VARIABLE: str(path)}
    results = sd.run(_allreduce_rank, np=2, env=env, timeout=60)
    for first, stats, bucket_bytes, nbuckets in results:
        assert nbuckets == 2 and bucket_bytes == 4 * (10 * 6 + 6 + 6 * 3 + 3)
        assert first["steps"] == 0 and first["bytes_sent"] == 0 and first["steps_per_s"] is None
        assert stats["steps"] == STEPS and stats["metrics_interval_s"] == INTERVAL
        assert stats["bytes_sent"] == stats["bytes_received"] == STEPS * bucket_bytes
        assert stats["bytes_sent_per_step"] == stats["bytes_received_per_step"] == bucket_bytes
        assert 0.0 <= stats["comm_wait_fraction"] <= 1.0
        assert stats["steps_per_s"] > 0 and stats["samples"] == STEPS * BATCH
        assert stats["samples_per_s"] == pytest.approx(BATCH * stats["steps_per_s"])
        assert stats["staleness_mean"] is None  # no parameter servers
    with open(path) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == metrics.COLUMNS
    rows = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(rows) >= 2, "rank 0 alone writes a row every 0.05 s"
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == STEPS  # the last window is written at shutdown
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith(metrics.PREFIX)]
    assert len(printed) == len(rows), "rank 0 alone prints, a line for each row"
    for r in rows:
        assert r["strategy"] == "allreduce" and float(r["bytes_sent_per_step"]) == results[0][2]
        assert 0.0 <= float(r["comm_wait_fraction"]) <= 1.0 and float(r["steps_per_s"]) > 0


# --------------------------------------------------------------------------------------------------------------
# Downpour: a worker group and a server

def _downpour_rank():
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  metrics=INTERVAL)
    _train(opt, model, steps=6, pause=0.01)
    return opt.strategy.stats(), len(opt.strategy.staleness_seen)


def test_downpour_reports_staleness():
    env = {**ENV, "SINGA_STRATEGY": "downpour", "SINGA_SERVERS": "1", "SINGA_TIMEOUT": "30"}
    results = sd.run(_downpour_rank, np=2, env=env, timeout=60)
    assert results[1] is None  # the server
    numel = 10 * 6 + 6 + 6 * 3 + 3
    for stats, pushes in results[:1]:
        assert stats["strategy"] == "downpour" and stats["steps"] == 6 and pushes == 6
        assert stats["staleness_mean"] >= 0 and stats["staleness_max"] >= 0
        assert stats["bytes_sent_per_step"] == stats["bytes_received_per_step"] == 4 * numel
        assert 0.0 <= stats["comm_wait_fraction"] <= 1.0


# --------------------------------------------------------------------------------------------------------------
# singa-launch --metrics

SCRIPT = textwrap.dedent("""
    import time, torch
    import singa_dist as sd
    sd.init()
    model = torch.nn.Linear(4, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        time.sleep(0.03)
    sd.shutdown()
""")


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf", "fast", ""])
def test_launcher_refuses_bad_metrics_before_starting(value, tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    assert launch_main(["-np", "2", "--metrics", value, str(script)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("singa-launch: error: --metrics") and err.count("\n") == 1, err


def test_launcher_sets_the_environment(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = parse_args(["-np", "2", "--metrics", "0.5", str(script)]).common_env()
    assert env[metrics.VARIABLE] == "0.5" and metrics.FILE_VARIABLE not in env
    env = parse_args(["-np", "2", "--metrics", "2", "--log-dir", str(tmp_path / "logs"), str(script)]).common_env()
    assert env[metrics.VARIABLE] == "2"
    assert env[metrics.FILE_VARIABLE] == os.path.join(str(tmp_path / "logs"), "metrics.csv")
    assert metrics.VARIABLE not in parse_args(["-np", "2", str(script)]).common_env()
    with pytest.raises(UsageError):
        parse_args(["-np", "2", "--metrics", "-1", str(script)])
