"""The timeline: a Chrome trace with a track per rank and server, per-bucket spans inside their steps, free when off."""
import json
import os
import sys
import textwrap
import warnings

import pytest
import torch

import singa_dist as sd
import singa_dist.horovod as hvd
from launchers.launch import main as launch_main
from singa_dist import timeline
from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 8))


def _train(opt, model, steps=STEPS):
    g = torch.Generator().manual_seed(sd.rank())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(8, 32, generator=g)), torch.randn(8, 8, generator=g)).backward()
        opt.step()


def load_trace(path) -> list[dict]:
    """The trace's events, checked to be valid trace-event JSON."""
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        for key in ("name", "ph", "ts", "pid", "tid"):
            assert key in e, (key, e)
        assert e["ph"] in ("X", "M", "i"), e
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0, e
    pids = {e["pid"] for e in events}
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert pids == named, "every process has a name"
    lanes = {(e["pid"], e["tid"]) for e in events if e["ph"] != "M"}
    named_lanes = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert lanes <= named_lanes, "every lane has a name"
    return events


def process_names(events) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}


def spans(events, pid, cat=None) -> list[dict]:
    return sorted((e for e in events if e["ph"] == "X" and e["pid"] == pid and (cat is None or e["cat"] == cat)),
                  key=lambda e: e["ts"])


# --------------------------------------------------------------------------------------------------------------
# Off: nothing recorded; Horovod's errors and warnings

def test_off_records_nothing_and_stop_without_start_warns(single_process, tmp_path):
    assert timeline.on is False
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    _train(opt, model)
    sd.allreduce(torch.ones(2), name="off")
    assert timeline.buffered() == 0 and timeline.active_path() is None
    with pytest.warns(UserWarning, match="no timeline is being recorded"):
        sd.stop_timeline()
    with pytest.warns(UserWarning, match="no timeline is being recorded"):
        hvd.stop_timeline()
    with pytest.raises(OSError, match="does not exist"):
        sd.start_timeline(tmp_path / "absent" / "t.json")
    with pytest.raises(OSError, match="is a directory"):
        hvd.start_timeline(str(tmp_path))
    assert timeline.on is False and not list(tmp_path.iterdir())

    # One process: its own track, written at stop_timeline(); the model's hooks go with the recording.
    path = tmp_path / "one.json"
    hvd.start_timeline(str(path))
    _train(opt, model, steps=1)
    hvd.stop_timeline()
    events = load_trace(path)
    assert process_names(events) == {0: "rank 0"}
    assert {"forward", "backward", "step", "update"} <= {e["cat"] for e in events if e["ph"] == "X"}
    assert [p.name for p in tmp_path.iterdir()] == ["one.json"], "the parts are gone"
    _train(opt, model, steps=1)
    assert timeline.buffered() == 0 and not timeline._forward.hooks


def test_before_init_raises_value_error():
    assert not sd.is_initialized()
    with pytest.raises(ValueError, match="init"):
        sd.start_timeline("t.json")
    with pytest.raises(ValueError, match="hvd.init"):
        hvd.stop_timeline()


# --------------------------------------------------------------------------------------------------------------
# AllReduce: 2 ranks

def _allreduce_rank(path):
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(),
                                  strategy=sd.AllReduce(num_buckets=3), compression=sd.Compression.fp16)
    sd.start_timeline(path, mark_cycles=True)
    _train(opt, model)
    sd.allreduce(torch.ones(3), name="loss")
    sd.allgather(torch.ones(sd.rank() + 1), name="sizes")
    sd.broadcast(torch.ones(2), root_rank=0, name="weights")
    hvd.allreduce(torch.ones(1))
    sd.stop_timeline()
    return [b.description for b in opt.strategy.buckets]


def test_allreduce_trace_has_a_track_per_rank_and_bucket_spans_inside_their_steps(tmp_path):
    path = str(tmp_path / "allreduce.json")
    buckets = sd.run(_allreduce_rank, np=2, args=(path,), env=ENV, timeout=90)[0]
    assert len(buckets) > 1
    events = load_trace(path)
    assert process_names(events) == {0: "rank 0", 1: "rank 1"}
    assert os.listdir(tmp_path) == ["allreduce.json"], "rank 0 merged and removed the parts"
    for rank in (0, 1):
        steps, backwards = spans(events, rank, "step"), spans(events, rank, "backward")
        assert len(steps) == len(backwards) == STEPS
        assert len([e for e in events if e["ph"] == "i" and e["pid"] == rank]) == STEPS  # mark_cycles
        windows = [(b["ts"], s["ts"] + s["dur"]) for b, s in zip(backwards, steps)]
        assert all(b["ts"] + b["dur"] <= s["ts"] for b, s in zip(backwards, steps))
        assert len(spans(events, rank, "forward")) == STEPS
        for cat in ("gather", "compress", "decompress", "scatter"):
            assert len(spans(events, rank, cat)) == STEPS * len(buckets), cat
        comm = spans(events, rank, "comm")
        assert sorted({e["args"]["tensor"] for e in comm}) == sorted(buckets)
        assert len(comm) == STEPS * len(buckets)
        for e in comm:  # sent during backward or at the step, done before the step ended
            window = next(w for w in windows if e["ts"] < w[1])
            assert window[0] <= e["ts"] and e["ts"] + e["dur"] <= window[1] + 1e-3, (e, window)
        assert spans(events, rank, "negotiate") and spans(events, rank, "wait")
        names = {e["name"] for e in spans(events, rank)}
        assert {"allreduce.loss", "allgather.sizes", "broadcast.weights"} <= names
        assert any(n.startswith("allreduce.noname.") for n in names)
        # Each bucket's communication has a lane of its own, named by the bucket.
        lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["pid"] == rank
                 and e["name"] == "thread_name"}
        assert {lanes[e["tid"]] for e in comm} == set(buckets)
        assert lanes[spans(events, rank, "step")[0]["tid"]] == timeline.MAIN


# --------------------------------------------------------------------------------------------------------------
# A parameter server: its own track, from SINGA_TIMELINE in the environment

def _sandblaster_rank():
    model = _model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    _train(opt, model)
    return sd.rank()


def test_parameter_server_has_a_track_with_pushes_and_updates(tmp_path):
    path = str(tmp_path / "sandblaster.json")
    env = {**ENV, "SINGA_STRATEGY": "sandblaster", "SINGA_SERVERS": "1", "SINGA_TIMELINE": path, "SINGA_TIMEOUT": "30"}
    assert sd.run(_sandblaster_rank, np=3, env=env, timeout=90) == [0, 1, None]
    events = load_trace(path)
    assert process_names(events) == {0: "rank 0", 1: "rank 1", 2: "server 0"}
    assert os.listdir(tmp_path) == ["sandblaster.json"]
    for rank in (0, 1):
        pushes, steps = spans(events, rank, "push"), spans(events, rank, "step")
        assert len(pushes) == len(steps) == STEPS
        assert all(s["ts"] <= p["ts"] and p["ts"] + p["dur"] <= s["ts"] + s["dur"] + 1e-3
                   for p, s in zip(pushes, steps))
    assert len(spans(events, 2, "apply")) == STEPS  # one update per step, for the two workers' pushes
    assert len(spans(events, 2, "push")) == 2 * STEPS


# --------------------------------------------------------------------------------------------------------------
# singa-launch --timeline

CRASHING = textwrap.dedent("""
    import sys, torch
    import singa_dist as sd
    sd.init()
    model = torch.nn.Linear(4, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    if sd.rank() == 1:
        raise RuntimeError("rank 1 fails")
    sd.barrier()
""")


def test_launcher_sets_the_timeline_and_merges_after_a_failure(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING)
    path = tmp_path / "out" / "job.json"
    path.parent.mkdir()
    res = run_command([sys.executable, "-m", "launchers.launch", "-np", "2", "--timeline", str(path), str(script)],
                      timeout=90, env={**ENV, "SINGA_TIMEOUT": "20"}, cwd=ROOT)
    assert res.returncode != 0
    assert "timeline of the job" in res.stderr, res.stderr
    events = load_trace(path)
    assert process_names(events) == {0: "rank 0", 1: "rank 1"}
    assert all(spans(events, r, "step") for r in (0, 1)), "what each rank recorded before the failure"
    assert os.listdir(path.parent) == ["job.json"]


def test_launcher_checks_the_timeline_file_before_starting(tmp_path, capsys):
    script = tmp_path / "rank.py"
    script.write_text("print('started')\n")
    for target, reason in [(tmp_path / "absent" / "t.json", "does not exist"), (tmp_path, "is a directory")]:
        assert launch_main(["-np", "2", "--timeline", str(target), str(script)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("singa-launch: error: --timeline") and reason in err and err.count("\n") == 1, err
    from launchers.config import parse_args
    cfg = parse_args(["-np", "2", "--timeline", "t.json", str(script)])
    assert cfg.node_plan()[1].env["SINGA_TIMELINE"] == os.path.abspath("t.json")


def test_merge_skips_a_cut_line_and_other_jobs_parts(tmp_path):
    path = str(tmp_path / "t.json")
    for proc, token in ((0, "job"), (1, "job"), (2, "old")):
        timeline.start(path, proc, f"rank {proc}", token)
        t0 = timeline.now()
        timeline.span("gather", t0, tensor="bucket")
        timeline.stop()
    with open(timeline.part_path(path, 1), "a") as f:
        f.write('0 1712345678901234567 12')  # a process died while writing its last span
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert timeline.merge(path, token="job") == 2
    assert process_names(load_trace(path)) == {0: "rank 0", 1: "rank 1"}
    assert sorted(os.listdir(tmp_path)) == ["t.json", "t.json.part2"]
