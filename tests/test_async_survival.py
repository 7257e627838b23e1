"""Asynchronous frameworks survive a lost worker group; parameter servers checkpoint and resume.

Under singa-launch, a Downpour or Hogwild worker group killed mid-run is dropped (the servers, or the other Hogwild
masters, stop waiting for it), the other groups finish, the job exits 0 and the loss is named on stderr. A Downpour
server writes its slices every N updates; killed and started again (--max-restarts), it resumes from its file.
The comparisons of accuracy with the unbroken runs train longer and are slow tests (`-m slow`).
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from singa_dist.checkpoint import CheckpointError
from singa_dist.ps import server
from tests.dist_harness import kill_session, run_command

LAUNCH = [sys.executable, "-m", "launchers.launch"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

# Every group goes over all the digits in its own order, so that a lost group takes away updates, not data; the
# step-down settles the final values. KILL_STEP: rank KILL_RANK SIGKILLs itself after that many steps (KILLS: its
# first that many generations do, when a replacement takes its place: tests/test_async_replacement.py). A
# replacement says where it started: how far its values are from its own initial ones, and the servers' versions.
TRAIN = textwrap.dedent("""
    import os, sys, time
    import torch
    import singa_dist as sd
    from examples.datasets import digits

    torch.set_num_threads(1)
    sd.init()
    x, y, x_test, y_test = digits()
    replacement = int(os.environ.get("SINGA_REPLACEMENT", "0"))
    hidden = 48 if replacement and os.environ.get("OTHER_MODEL") else 64
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    start = [p.detach().clone() for p in model.parameters()]
    epochs, batch = int(os.environ["EPOCHS"]), 32
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)  # a replacement's values are the servers'
    if replacement:
        moved = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), start))
        print(f"rank {sd.rank()} replacement {replacement} moved {moved:.4f} "
              f"versions {getattr(opt.strategy, 'versions', None)}", flush=True)
        try:
            sd.allreduce(torch.ones(1), name="across groups")
        except RuntimeError as exc:
            print(f"rank {sd.rank()} cross-group: {exc}", flush=True)
        # A script that resumes from its checkpoint: the servers keep their state, the group reads it.
        versions = getattr(opt.strategy, "versions", None)
        opt.load_state_dict(opt.state_dict())
        assert versions is None or opt.strategy.versions >= versions, (versions, opt.strategy.versions)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs * 3 // 4], gamma=0.1)
    kill_rank, kill_step = int(os.environ.get("KILL_RANK", "-1")), int(os.environ.get("KILL_STEP", "-1"))
    kills = int(os.environ.get("KILLS", "1"))  # how many generations of the rank kill themselves
    also = os.environ.get("ALSO_KILL")  # "rank:step": a second rank's first generation kills itself too
    also_rank, also_step = map(int, also.split(":")) if also else (-1, -1)
    gen = torch.Generator().manual_seed(100 + sd.rank())
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if (sd.rank() == kill_rank and step == kill_step and replacement < kills) or \
                    (sd.rank() == also_rank and step == also_step and not replacement):
                os.kill(os.getpid(), 9)
        sched.step()
    rank = sd.rank()
    if hasattr(opt.strategy, "pull"):
        opt.strategy.pull()  # Downpour: the servers' values now (the last group to pull has every update in them)
    pulled = time.time()
    sd.shutdown()  # Hogwild: the last exchange gives every replica the masters' values
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    print(f"rank {rank} steps {step} accuracy {acc:.2f} pulled at {pulled:.6f}", flush=True)
""")


DOWNPOUR = ["-np", "2", "--strategy", "downpour", "--worker-groups", "2", "--servers", "1"]
HOGWILD = ["-np", "3", "--strategy", "hogwild", "--sync-freq", "4"]
EPOCHS, KILL_STEP = 8, 176  # 44 steps an epoch: the group is killed half-way


class Job:
    """singa-launch started in its own session, its output to files (jobs run side by side, so no pipe may fill)."""

    def __init__(self, folder, args: list[str], script: str, env: dict):
        folder.mkdir()
        (folder / "script.py").write_text(script)
        self.out, self.err = open(folder / "out", "w+"), open(folder / "err", "w+")
        self.proc = subprocess.Popen(LAUNCH + args + [sys.executable, str(folder / "script.py")], stdout=self.out,
                                     stderr=self.err, env={**os.environ, **ENV, **env}, cwd=ROOT,
                                     start_new_session=True)

    def result(self, timeout: float = 240) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"singa-launch did not finish within {timeout} s\nstdout:\n{self._read(self.out)}\n"
                        f"stderr:\n{self._read(self.err)}")
        return self.proc.returncode, self._read(self.out), self._read(self.err)

    @staticmethod
    def _read(f) -> str:
        f.flush()
        f.seek(0)
        return f.read()

    def kill(self) -> None:
        kill_session(self.proc.pid)  # the processes it started die with it (launchers.lifeline)
        self.proc.wait()


def _start(root, jobs: dict) -> dict:
    (root / "server.py").write_text(SERVER)
    return {name: Job(root / name.replace(" ", "_"), args, script, env) for name, (args, script, env) in jobs.items()}


def _stop(started: dict) -> None:
    for job in started.values():
        job.kill()
        job.out.close()
        job.err.close()


def _killed(epochs: int, step: int) -> dict:
    return {"EPOCHS": str(epochs), "KILL_RANK": "1", "KILL_STEP": str(step)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The quick jobs, started at once: their start-up and ending overlap instead of adding up. A group is killed
    after 30 of its 88 steps."""
    root = tmp_path_factory.mktemp("async_survival")
    started = _start(root, {
        "downpour killed": (DOWNPOUR, TRAIN, _killed(2, 30)),
        "hogwild killed": (HOGWILD, TRAIN, _killed(2, 30)),
        "server killed": (DOWNPOUR + ["--max-restarts", "1", "--server-checkpoint-dir", str(root / "ckpt"),
                                      "--server-checkpoint-every", "10"], RESUME, {
            "SINGA_SERVER_COMMAND": f"{sys.executable} {root / 'server.py'}", "KILL_AT": "45",
            "KILLED": str(root / "killed")})})
    yield root, started
    _stop(started)


@pytest.fixture(scope="module")
def accuracy_jobs(tmp_path_factory):
    """Unbroken and broken runs long enough for the accuracy to level off, side by side."""
    root = tmp_path_factory.mktemp("async_accuracy")
    started = _start(root, {"downpour": (DOWNPOUR, TRAIN, {"EPOCHS": str(EPOCHS)}),
                            "downpour killed": (DOWNPOUR, TRAIN, _killed(EPOCHS, KILL_STEP)),
                            "hogwild": (HOGWILD, TRAIN, {"EPOCHS": str(EPOCHS)}),
                            "hogwild killed": (HOGWILD, TRAIN, _killed(EPOCHS, KILL_STEP))})
    yield started
    _stop(started)


def _accuracies(out: str) -> dict[int, float]:
    return {int(r): float(a) for r, a in re.findall(r"rank (\d+) steps \d+ accuracy ([\d.]+)", out)}


DOWNPOUR_LOST = ("worker group 1 (rank 1) lost: rank 1 was killed by signal SIGKILL (9); the other 1 worker group(s) "
                 "and the servers go on")
HOGWILD_LOST = "worker group 1 (rank 1) lost: rank 1 was killed by signal SIGKILL (9); the other 2 worker group(s) go on"


def _survived(result, lost_line: str, survivors: set, epochs: int) -> dict[int, float]:
    """The job ended well without rank 1, named the lost group, and every other rank ran all its steps."""
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert lost_line in err, err
    steps = {int(r): int(n) for r, n in re.findall(r"rank (\d+) steps (\d+) accuracy", out)}
    assert steps == {r: 44 * epochs for r in survivors}, out  # the killed rank never reached the end
    return _accuracies(out)


@pytest.mark.timeout(300)
def test_downpour_drops_a_killed_group(jobs):
    code, out, err = jobs[1]["downpour killed"].result()
    _survived((code, out, err), DOWNPOUR_LOST, {0}, 2)
    assert "parameter server 0.0 (process 2): dropped worker group 1 (process 1), lost; the other groups go on" in err


@pytest.mark.timeout(300)
def test_hogwild_drops_a_killed_group(jobs):
    got = _survived(jobs[1]["hogwild killed"].result(), HOGWILD_LOST, {0, 2}, 2)
    assert got[0] == got[2]  # the survivors took group 1's slices over and end with the masters' values


# Downpour: 8 epochs of 44 steps per group, group 1 killed half-way; the servers' final values are compared (each
# survivor pulls them). An unbroken run applies 704 updates, the broken one 528: both level off by then.
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_downpour_killed_group_costs_under_a_point(accuracy_jobs):
    code, out, err = accuracy_jobs["downpour"].result()
    assert code == 0, err
    reference = _accuracies(out)
    assert set(reference) == {0, 1}
    got = _survived(accuracy_jobs["downpour killed"].result(), DOWNPOUR_LOST, {0}, EPOCHS)
    assert abs(got[0] - reference[0]) <= 1.0, (got, reference)


# Hogwild: 3 groups, group 1 (master of a third of the slices) killed half-way; the survivors take its slices over
# and end with the same values.
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hogwild_killed_group_costs_under_a_point(accuracy_jobs):
    code, out, err = accuracy_jobs["hogwild"].result()
    assert code == 0, err
    reference = _accuracies(out)
    assert set(reference) == {0, 1, 2}
    got = _survived(accuracy_jobs["hogwild killed"].result(), HOGWILD_LOST, {0, 2}, EPOCHS)
    assert got[0] == got[2]
    assert abs(got[0] - reference[0]) <= 1.0, (got, reference)


# A server that kills itself (SIGKILL, holding its table's lock, so that no update comes after the version it
# records) in the first attempt; singa-launch --max-restarts 1 starts the job again and the server resumes.
SERVER = textwrap.dedent("""
    import os, threading, time
    from singa_dist import runtime
    from singa_dist.ps import server

    def kill_at(version, record):
        while True:
            tables = list(server._server.tables.values()) if server._server is not None else []
            if tables and tables[0].version >= version:
                with tables[0].lock:
                    with open(record, "w") as f:
                        f.write(str(tables[0].version))
                    os.kill(os.getpid(), 9)
            time.sleep(0.002)

    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        threading.Thread(target=kill_at, args=(int(os.environ["KILL_AT"]), os.environ["KILLED"]), daemon=True).start()
    server.serve()
    runtime.shutdown()
""")

RESUME = textwrap.dedent("""
    import os
    import torch
    import singa_dist as sd

    torch.set_num_threads(1)
    sd.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    # The strategy and its checkpoints are the launcher's (--server-checkpoint-dir/--server-checkpoint-every).
    opt = sd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters())
    print(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} rank {sd.rank()} opened at {opt.strategy.versions[0]}",
          flush=True)
    x = torch.randn(16, 8)
    for _ in range(60):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    print(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} rank {sd.rank()} ended at {opt.strategy.versions[0]}",
          flush=True)
    sd.shutdown()
""")


@pytest.mark.timeout(300)
def test_killed_server_resumes_from_its_checkpoint(jobs):
    root, started = jobs
    code, out, err = started["server killed"].result()
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "restarting the job (1/1)" in err
    killed = int((root / "killed").read_text())
    opened = {int(r): int(v) for r, v in re.findall(r"attempt 1 rank (\d) opened at (\d+)", out)}
    assert set(opened) == {0, 1}
    resumed = opened[0]
    assert opened[1] == resumed
    # The last checkpoint before the kill: at most N = 10 updates lost, none made up.
    assert resumed % 10 == 0 and killed - 10 <= resumed <= killed, (resumed, killed)
    assert f"resumed table 0 from {root / 'ckpt'}" in err and f"at version {resumed}" in err
    ended = [int(v) for v in re.findall(r"attempt 1 rank \d ended at (\d+)", out)]
    assert max(ended) == resumed + 120  # both groups' 60 updates each, on top of the checkpoint's


def _table(values):
    spec = {"slices": [type("S", (), {"id": i, "name": f"p{i}", "start": 0, "end": v.numel()})()
                       for i, v in enumerate(values)], "values": values,
            "param_group": [0] * len(values), "optimizer_class": torch.optim.Adam, "defaults": {"lr": 0.1},
            "group_options": [{"lr": 0.1}], "replicas": 1, "staleness": None, "clients": 1}
    return server._Table(spec)


@pytest.mark.timeout(60)
def test_server_checkpoint_round_trip_and_corruption(tmp_path):
    path = str(tmp_path / "table.pt")
    table = _table([torch.randn(5), torch.randn(3)])
    assert not table.resume(path, 2)  # nothing to resume from: it starts afresh
    for _ in range(4):
        table._apply([torch.randn(5), torch.randn(3)], [{"lr": 0.1}])
    saved = [p.detach().clone() for p in table.params]
    state = {k: v.clone() for k, v in table.optimizer.state[table.params[0]].items()}
    table._apply([torch.randn(5), torch.randn(3)], [{"lr": 0.1}])  # version 5: not written (every 2)

    again = _table([torch.zeros(5), torch.zeros(3)])
    assert again.resume(path, 2)
    assert again.version == 4
    for p, v in zip(again.params, saved):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=0)
    for key, value in state.items():
        torch.testing.assert_close(again.optimizer.state[again.params[0]][key], value, rtol=0, atol=0)

    other = _table([torch.zeros(4)])
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*other slices"):
        other.resume(path, 2)

    data = open(path, "rb").read()[:-200]  # cut short
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        _table([torch.zeros(5), torch.zeros(3)]).resume(path, 2)
    assert open(path, "rb").read() == data  # the damaged file is left for the user, not overwritten


def test_lost_groups_need_an_asynchronous_framework():
    from singa_dist.topology import STRATEGIES
    assert {n for n, k in STRATEGIES.items() if k.asynchronous} == {"downpour", "hybrid", "hogwild"}


HANGS = textwrap.dedent("""
    import time, torch
    import singa_dist as sd
    sd.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    for step in range(20):
        if sd.rank() == 1 and step == 5:
            time.sleep(3600)  # hangs: neither dead nor working
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    sd.shutdown()
""")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_hung_group_stops_the_job_naming_it(tmp_path):
    # Group 0 finishes and waits at shutdown() for group 1, which hangs; after the timeout it fails, blaming rank 1.
    # Dropping group 0 as lost would leave the job to the hung group for ever: the job stops instead, naming it.
    script = tmp_path / "hangs.py"
    script.write_text(HANGS)
    res = run_command(LAUNCH + ["-np", "2", "--strategy", "downpour", "--worker-groups", "2", "--servers", "1",
                                str(script)], timeout=180, env={**ENV, "SINGA_TIMEOUT": "10"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "job failed: process 1 did not reach singa_dist.shutdown() (rank 1)" in res.stderr, res.stderr
    assert "worker group 0" not in res.stderr, res.stderr  # the group that waited is not taken for lost
