"""What a newcomer hits first: each mistake gets a clear error, or just works."""
import importlib
import inspect
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import singa_dist as sd
import singa_dist.horovod as hvd
from launchers.launch import main as launch_main
from singa_dist.environment import DATA_ERROR_STATUS
from tests.dist_harness import kill_session, run_command


# 1. named_parameters=model.parameters() (no names) says what is expected, as Horovod does.
@pytest.mark.parametrize("make", [sd.DistributedOptimizer, hvd.DistributedOptimizer], ids=["sd", "horovod"])
@pytest.mark.parametrize("given", ["parameters", "list", "model"])
def test_named_parameters_without_names(single_process, make, given):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = {"parameters": model.parameters(), "list": list(model.parameters()), "model": model}[given]
    with pytest.raises(ValueError, match=r"named_parameters should be a sequence of tuples \(name, parameter\)"):
        make(opt, named_parameters=named)
    assert type(opt) is torch.optim.SGD  # left as it was
    make(opt, named_parameters=model.named_parameters()).remove_hooks()


LAUNCH = [sys.executable, "-m", "launchers.launch"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


# 2. `singa-launch python train.py` where `python` on PATH is not this environment's: the launcher's own Python runs.
def _path_with_python(tmp_path, body: str) -> str:
    """PATH with a `python` and a `python3` (shell scripts running `body`) in front."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_python_on_path_without_torch_runs_the_launchers_python(tmp_path):
    # A `python` that cannot import torch whatever the system has.
    path = _path_with_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1")
    script = tmp_path / "train.py"
    script.write_text("import os, sys, torch\nprint('rank', os.environ['RANK'], 'runs', sys.executable)\n")
    res = run_command(LAUNCH + ["-np", "2", "python", str(script)], timeout=60, env={**ENV, "PATH": path})
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "cannot import torch" in line]
    assert notes == [f"singa-launch: python on PATH ({tmp_path / 'bin' / 'python'}) cannot import torch; "
                     f"running {sys.executable} (this launcher's Python) instead"], res.stderr
    assert "ModuleNotFoundError" not in res.stderr
    for rank in (0, 1):
        assert f"rank {rank} runs {sys.executable}" in res.stdout, res.stdout


@pytest.mark.parametrize("has_torch", [False, True])
def test_bare_python3_is_checked_once(tmp_path, monkeypatch, capsys, has_torch):
    body = f'exec "{sys.executable}" "$@"' if has_torch else "exit 1"
    monkeypatch.setenv("PATH", _path_with_python(tmp_path, body))
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert launch_main(["--dry-run", "-np", "2", "python3", str(script)]) == 0
    out, err = capsys.readouterr()
    if has_torch:
        assert "cannot import torch" not in err and out.count(f" python3 {script}") == 2, out
    else:
        assert err.count("cannot import torch") == 1 and out.count(f" {sys.executable} {script}") == 2, (out, err)


# 3. The zoo's learning-rate schedules make sense at every epoch count: a quick `--epochs 1` run is not decayed.
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py") and f not in ("datasets.py", "training.py"))


def test_every_schedule_is_built_by_its_scripts_lr_schedule():
    """So that the test below sees every schedule the zoo runs."""
    with_schedule = []
    for name in SCRIPTS:
        module = importlib.import_module(f"examples.{name}")
        main = inspect.getsource(module.main)
        assert "lr_scheduler" not in main, f"examples/{name}.py builds a schedule outside lr_schedule()"
        if hasattr(module, "lr_schedule"):
            assert "lr_schedule(optimizer, args.epochs)" in main, name
            with_schedule.append(name)
    assert {"alexnet", "cifar10_convnet", "digits_cnn", "digits_hybrid", "digits_mlp", "resnet",
            "vgg"} <= set(with_schedule)


@pytest.mark.parametrize("name", [n for n in SCRIPTS if hasattr(importlib.import_module(f"examples.{n}"),
                                                                 "lr_schedule")])
@pytest.mark.parametrize("epochs", [1, 2, 3, 10])
def test_schedule_starts_at_the_base_rate(name, epochs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = importlib.import_module(f"examples.{name}").lr_schedule(opt, epochs)
    milestones = sorted(scheduler.milestones.elements()) if hasattr(scheduler, "milestones") else []
    assert milestones == sorted(set(milestones)) and all(1 <= m < epochs for m in milestones), milestones
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert rates[0] == 0.1, rates
    assert all(0 < b <= a for a, b in zip(rates, rates[1:])), rates


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 10, 90])
def test_step_schedule_drops_milestones_a_short_run_cannot_have(epochs):
    from examples.training import step_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    milestones = sorted(step_schedule(opt, epochs, (0.0, 0.01, 0.5, 0.5, 0.75, 1.0)).milestones.elements())
    assert milestones == sorted({int(epochs * f) for f in (0.5, 0.75) if 1 <= int(epochs * f) < epochs})
    assert opt.param_groups[0]["lr"] == 1.0


# 4. --servers with a strategy that has no servers is refused in one line, as other bad topologies are.
@pytest.mark.parametrize("flags", [["--servers", "2"], ["--strategy", "adasum", "--server-groups", "2"],
                                   ["--min-np", "1", "--servers", "1"]], ids=["allreduce", "adasum", "elastic"])
def test_servers_without_a_server_strategy_are_refused(tmp_path, capsys, flags):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert launch_main(["--dry-run", "-np", "2", *flags, str(script)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("singa-launch: error: bad topology: ") and "has no parameter servers" in err, err
    assert f"drop {flags[-2]} {flags[-1]}" in err, err


def test_servers_zero_with_allreduce_is_no_servers(tmp_path):
    from singa_dist.topology import ClusterTopology

    assert ClusterTopology.for_strategy("allreduce", 2, servers=0).nprocs == 2


# 5. Ctrl-C of singa-launch ends with one line, whenever it comes: before the ranks are up, while they run, and
# a second one while they stop (which SIGKILLs them at once).
STOPPING_RANK = """
import os, signal, sys, time
def stop(*_):
    time.sleep(float(os.environ["STOP_S"]))  # a rank that takes a while to stop
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)
open(os.path.join(sys.argv[1], "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
while True:
    time.sleep(0.01)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent has ended too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["starting", "running", "twice"])
def test_ctrl_c_ends_with_one_line(tmp_path, when):
    script = tmp_path / "rank.py"
    script.write_text(STOPPING_RANK)
    stop_s = {"starting": 0.2, "running": 0.5, "twice": 30}[when]
    grace = ["--grace-period", "60"] if when == "twice" else []
    proc = subprocess.Popen(LAUNCH + ["-np", "2", *grace, str(script), str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **ENV, "STOP_S": str(stop_s)})
    try:
        if when == "starting":
            time.sleep(0.3)  # the launcher is still loading torch, or just starting the ranks
        else:
            deadline = time.monotonic() + 30
            while not all((tmp_path / f"pid{r}").exists() for r in range(2)):
                assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
                time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        if when == "twice":
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)  # the ranks would take 30 s: the second Ctrl-C stops them now
        second = time.monotonic()
        _, err = proc.communicate(timeout=40)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert when != "twice" or time.monotonic() - second < 15
    assert err.splitlines() == ["singa-launch: stopped by signal SIGINT"], err
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2) if (tmp_path / f"pid{r}").exists()]
    assert all(_gone(pid) for pid in pids)


# 6. A dataset error in a zoo script is one line, said once, with its own exit status.
def test_missing_data_under_singa_launch_is_one_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    res = run_command(LAUNCH + ["-np", "2", os.path.join(EXAMPLES, "cifar10_convnet.py"), "--data", str(missing),
                                "--epochs", "1"], timeout=120, env=ENV)
    assert res.returncode == DATA_ERROR_STATUS, res.stderr
    assert res.stderr.splitlines() == [f"singa-launch: job failed: rank 0 and rank 1 exited with status 65: "
                                       f"DatasetError: --data {missing}: no such folder"], res.stderr
    assert "Traceback" not in res.stdout


@pytest.mark.parametrize("launched", [False, True], ids=["alone", "error-file"])
def test_zoo_entry_point_turns_a_dataset_error_into_one_line(tmp_path, monkeypatch, capsys, launched):
    from examples.training import DatasetError, run  # (the class training.py catches: `datasets` on its path)

    error_file = tmp_path / "error.json"
    if launched:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    else:
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr(sys, "argv", ["vgg.py"])
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))

    def main():
        raise DatasetError("--data /x: no such folder")
    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == DATA_ERROR_STATUS
    err = capsys.readouterr().err
    if launched:
        assert err == "" and "DatasetError: --data /x: no such folder" in error_file.read_text()
    else:
        assert err == "vgg.py: --data /x: no such folder\n" and not error_file.exists()


def test_failures_alike_are_said_once():
    from launchers.config import ProcessSpec
    from launchers.local import Outcome

    ranks = [ProcessSpec(proc_rank=r, local_rank=r, role="worker", index=r, argv=[], env={}) for r in range(3)]
    same = Outcome(False, [(s, 65) for s in ranks], errors={r: "DatasetError: bad" for r in range(3)})
    assert same.describe() == "rank 0, rank 1 and rank 2 exited with status 65: DatasetError: bad"
    assert same.exit_code == 65
    mixed = Outcome(False, [(ranks[0], 65), (ranks[1], 1)], errors={0: "DatasetError: bad"})
    assert mixed.describe() == "rank 0 exited with status 65: DatasetError: bad; rank 1 exited with status 1"
    plain = Outcome(False, [(ranks[0], 1), (ranks[1], 1)])
    assert plain.describe() == "rank 0 exited with status 1; rank 1 exited with status 1"


# 7. Every example's --help describes it in whole sentences: its docstring's first paragraph, not its first line.
@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_script_in_whole_sentences(name, capsys):
    module = importlib.import_module(f"examples.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())  # usage, then the description
    assert description.endswith("."), description
    assert description == " ".join(module.__doc__.split("\n\n")[0].split())
