"""The parameter servers' autotune (messages_per_server="auto", singa-launch --autotune): pushes cut into several
messages, every worker settling on the same count at the same step, values and server optimizer state exactly
those of a fixed count, the choice reported once (per worker group for Downpour/Hybrid)."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from singa_dist.environment import AUTOTUNE_VARIABLE
from singa_dist.ps.slicing import message_runs, slice_params
from tests.test_sandblaster import ps_world

COUNTS = (1, 2, 4, 16)  # 16 cuts the model's 8 slices as 8 would: tried as a distinct count (8 runs)
WARMUP, MEASURED = 1, 2
STEPS = 15  # 4 distinct counts x (1 + 2) steps of tuning, then 3 with the chosen count


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def batches(n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


# --------------------------------------------------------------------------------------------------------------
# One process

def test_message_runs_cover_every_slice_once_in_order():
    slices = slice_params([(f"p{i}", n) for i, n in enumerate([96, 16, 256, 16, 256, 16, 48, 3])])
    for messages in (1, 2, 3, 4, 8, 20):
        runs = message_runs(slices, messages)
        assert 1 <= len(runs) <= min(messages, len(slices))
        assert runs[0][0] == 0 and runs[-1][1] == len(slices)
        assert all(a < b for a, b in runs) and all(b == c for (_, b), (c, _) in zip(runs, runs[1:]))
    assert message_runs(slices, 1) == [(0, len(slices))]
    assert message_runs([], 4) == [(0, 0)]  # a server without slices still answers one (empty) push


def test_arguments_are_checked_and_the_launcher_turns_auto_on(monkeypatch):
    for bad in (0, -1, 1.5, "fast", True):
        with pytest.raises(ValueError, match="messages_per_server"):
            sd.Sandblaster(messages_per_server=bad)
    with pytest.raises(ValueError, match="autotune_messages"):
        sd.Downpour(messages_per_server="auto", autotune_messages=(0, 2))
    with pytest.raises(ValueError, match="autotune_warmup"):
        sd.Sandblaster(messages_per_server="auto", autotune_steps=0)
    assert sd.Sandblaster(messages_per_server="auto").autotune and sd.Hybrid(messages_per_server="auto").autotune
    assert not sd.Sandblaster().autotune and sd.Sandblaster().messages_per_server == 1
    monkeypatch.setenv(AUTOTUNE_VARIABLE, "1")
    assert sd.Sandblaster().autotune and sd.Downpour(pull_freq=2).autotune
    assert not sd.Sandblaster(messages_per_server=2).autotune


# --------------------------------------------------------------------------------------------------------------
# Sandblaster: 2 workers, 1 server

def _train(strategy):
    rank, size = sd.rank(), sd.size()
    model = make_model()
    opt = sd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3),
                                  named_parameters=model.named_parameters(), strategy=strategy)
    in_use = []  # messages per server at each step
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for x, y in batches():
            in_use.append(strategy.messages_per_server)
            opt.zero_grad()
            F.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
            opt.step()
    server_state = opt.state_dict()["singa_strategy"]
    strategy.close()
    return ([p.detach() for p in model.parameters()], server_state, in_use, strategy.messages_per_server,
            strategy.autotune_log, out.getvalue())


def _sandblaster_runs():
    tuned = sd.Sandblaster(messages_per_server="auto", autotune_messages=COUNTS, autotune_warmup=WARMUP,
                           autotune_steps=MEASURED)
    return _train(tuned), _train(sd.Sandblaster()), _train(sd.Sandblaster(messages_per_server=4))


def _same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_state(a[key], b[key])
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_sandblaster_auto_equals_a_fixed_count_and_workers_agree():
    world = ps_world(sd.ClusterTopology.sandblaster(2, 1))
    (auto0, fixed0, four0), (auto1, fixed1, _) = world.run(_sandblaster_runs, timeout=60)
    params, state, in_use, chosen, log, printed = auto0
    # The server puts a push's messages together: values and Adam's state are those of one message per push.
    for a, f, f4 in zip(params, fixed0[0], four0[0]):
        assert torch.equal(a, f) and torch.equal(f4, f)
    _same_state(state, fixed0[1])
    _same_state(four0[1], fixed0[1])
    assert set(state["versions"].values()) == {STEPS}
    # Four distinct counts tried in order (16 cuts the 8 slices into 8 messages), then the choice, kept.
    assert [e["messages_per_server"] for e in log] == list(COUNTS)
    assert all(e["step_ms"] > 0 and len(e["times_ms"]) == MEASURED for e in log)
    trial = WARMUP + MEASURED
    assert in_use[:4 * trial] == [c for c in COUNTS for _ in range(trial)]
    assert chosen == min(log, key=lambda e: (e["step_ms"], e["messages_per_server"]))["messages_per_server"]
    assert in_use[4 * trial:] == [chosen] * (STEPS - 4 * trial)
    # Both workers: the same (slowest) times, the same choice at the same step; worker 0 alone reports it.
    assert auto1[2] == in_use and auto1[3] == chosen
    assert [e["step_ms"] for e in auto1[4]] == [e["step_ms"] for e in log]
    lines = printed.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[singa autotune] sandblaster messages_per_server={chosen}:")
    assert "slowest of 2 workers" in lines[0], lines[0]
    assert auto1[5] == "" and fixed0[5] == "" and fixed1[5] == ""
    assert fixed0[4] == [] and fixed0[3] == 1


def _sandblaster_topk():
    """Top-k's selection spans a whole push: "auto" keeps one message per server and measures nothing."""
    strategy = sd.Sandblaster(messages_per_server="auto", autotune_messages=COUNTS)
    model = make_model()
    sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                            strategy=strategy, compression=sd.Compression.topk(0.5))
    result = strategy.messages_per_server, strategy.autotune_log, strategy.tuner
    strategy.close()
    return result


def test_sparse_compression_pushes_one_message():
    world = ps_world(sd.ClusterTopology.sandblaster(2, 1))
    for messages, log, tuner in world.run(_sandblaster_topk, timeout=30):
        assert messages == 1 and log == [{"messages_per_server": 1, "step_ms": None}] and tuner is None


# --------------------------------------------------------------------------------------------------------------
# Hybrid: one worker group of 2 (Downpour's code path, synchronous inside the group), 1 server

def _hybrid_runs():
    tuned = sd.Hybrid(messages_per_server="auto", autotune_messages=COUNTS, autotune_warmup=WARMUP,
                      autotune_steps=MEASURED)
    return _train(tuned), _train(sd.Hybrid())


def test_hybrid_group_tunes_and_agrees():
    world = ps_world(sd.ClusterTopology.hybrid(1, 2, nservers=1))
    (auto0, fixed0), (auto1, _) = world.run(_hybrid_runs, timeout=60)
    params, state, in_use, chosen, log, printed = auto0
    for a, f in zip(params, fixed0[0]):  # one group: nothing asynchronous, the same updates
        assert torch.equal(a, f)
    _same_state(state, fixed0[1])
    assert [e["messages_per_server"] for e in log] == list(COUNTS)
    assert auto1[2] == in_use and auto1[3] == chosen  # the group's second worker (it does not push) agrees
    lines = printed.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[singa autotune] hybrid messages_per_server={chosen}:")
    assert "worker group 0, slowest of 2 workers" in lines[0], lines[0]
    assert auto1[5] == ""
