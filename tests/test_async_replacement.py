"""A lost worker group of an asynchronous job is replaced (singa-launch --max-restarts under Downpour, Hybrid, Hogwild).

The replacement's workers run the script from its start with the lost ranks, take the current values from the servers
(Hogwild: from the slices' masters, which the lost group no longer is), train with the others and leave with them.
Each replacement counts as one restart; with none left, a lost group is dropped as before. Its model is checked
against the servers' tables, and collectives across worker groups (which it is not in) fail with a clear error.
"""
import re
import sys

import pytest

from tests.dist_harness import run_command
from tests.test_async_survival import DOWNPOUR, ENV, HOGWILD, LAUNCH, TRAIN, Job, _accuracies, _stop
from tests.test_launch_multinode import ADDR, _ssh_stand_in, namespaces  # noqa: F401 (a fixture)


HYBRID = ["-np", "4", "--strategy", "hybrid", "--worker-groups", "2", "--servers", "1"]
EPOCHS, KILL_STEP = 8, 176  # as the survival tests: 44 steps an epoch, the group killed half-way


def _killed(epochs: int, step: int, rank: int = 1, **more) -> dict:
    return {"EPOCHS": str(epochs), "KILL_RANK": str(rank), "KILL_STEP": str(step), **more}


def _start(root, jobs: dict) -> dict:
    return {name: Job(root / name.replace(" ", "_"), args, TRAIN, env) for name, (args, env) in jobs.items()}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The quick jobs, side by side: group 1 killed after 30 of its 88 steps, one restart allowed."""
    root = tmp_path_factory.mktemp("async_replacement")
    started = _start(root, {
        "downpour replaced": (DOWNPOUR + ["--max-restarts", "1"], _killed(2, 30)),
        "hogwild replaced": (HOGWILD + ["--max-restarts", "1"], _killed(2, 30))})
    yield started
    _stop(started)


def _replaced(result, group_ranks: str, everyone: set, epochs: int) -> tuple[str, str]:
    """The job ended well, said it replaced the group, and every rank (the replacements too) ran all its steps."""
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert f"worker group 1 ({group_ranks}) lost: " in err and "replacing it (1/1): its new workers take the " \
        "current values from the others" in err, err
    steps = {int(r): int(n) for r, n in re.findall(r"rank (\d+) steps (\d+) accuracy", out)}
    assert steps == {r: 44 * epochs for r in everyone}, out + err
    return out, err


def _started_from_current_values(out: str, ranks: set) -> list:
    """What each replacement said of its start: its values are not its own initial ones but the job's."""
    started = {int(r): (float(moved), versions) for r, moved, versions in
               re.findall(r"rank (\d+) replacement 1 moved ([\d.]+) versions (.*)", out)}
    assert set(started) == ranks, out
    for moved, _ in started.values():
        assert moved > 0.05, out  # the initial values differ from the job's by far more after 30 updates
    for rank in ranks:  # no collective across worker groups for a group outside the job's process groups
        assert re.search(rf"rank {rank} cross-group: allreduce\(\): rank {rank} belongs to worker group 1, which "
                         r"replaced a lost group of this asynchronous job", out), out
    return [versions for _, versions in started.values()]


@pytest.mark.timeout(300)
def test_downpour_replaces_a_killed_group(jobs):
    out, err = _replaced(jobs["downpour replaced"].result(), "rank 1", {0, 1}, 2)
    (versions,) = _started_from_current_values(out, {1})
    assert int(versions.strip("[]")) >= 30, out  # the servers had taken both groups' updates by then
    assert "parameter server 0.0 (process 2): dropped worker group 1 (process 1), lost; the other groups go on (a " \
           "replacement is on its way)" in err
    assert "parameter server 0.0 (process 2): worker group 1 is back (replacement 1)" in err


@pytest.mark.timeout(300)
def test_hogwild_replaces_a_killed_group(jobs):
    out, _ = _replaced(jobs["hogwild replaced"].result(), "rank 1", {0, 1, 2}, 2)
    _started_from_current_values(out, {1})
    got = _accuracies(out)
    assert got[0] == got[1] == got[2], out  # the replacement ends with the masters' values too


@pytest.fixture(scope="module")
def slow_jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_replacement_slow")
    started = _start(root, {
        "hybrid replaced": (HYBRID + ["--max-restarts", "1"], _killed(2, 30, rank=3)),
        "budget spent": (DOWNPOUR + ["--max-restarts", "1"], _killed(2, 30, KILLS="2")),
        "other model": (DOWNPOUR + ["--max-restarts", "1"], _killed(2, 30, OTHER_MODEL="1")),
        "hogwild all lost": (["-np", "2", "--strategy", "hogwild", "--sync-freq", "4", "--max-restarts", "1"],
                             _killed(3, 30, ALSO_KILL="0:80")),
        "downpour": (DOWNPOUR, {"EPOCHS": str(EPOCHS)}),
        "downpour replaced": (DOWNPOUR + ["--max-restarts", "1"], _killed(EPOCHS, KILL_STEP)),
        "hogwild": (HOGWILD, {"EPOCHS": str(EPOCHS)}),
        "hogwild replaced": (HOGWILD + ["--max-restarts", "1"], _killed(EPOCHS, KILL_STEP))})
    yield started
    _stop(started)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hybrid_replaces_a_killed_group_of_two_workers(slow_jobs):
    out, err = _replaced(slow_jobs["hybrid replaced"].result(), "ranks 2, 3", {0, 1, 2, 3}, 2)
    _started_from_current_values(out, {2, 3})
    got = _accuracies(out)
    assert got[2] == got[3], out  # the replacement group's two workers hold the same values (their own group)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_with_no_restart_left_a_lost_replacement_is_dropped(slow_jobs):
    code, out, err = slow_jobs["budget spent"].result()
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "replacing it (1/1)" in err
    assert "worker group 1 (rank 1) lost: rank 1 was killed by signal SIGKILL (9); the other 1 worker group(s) and " \
           "the servers go on" in err, err
    steps = {int(r): int(n) for r, n in re.findall(r"rank (\d+) steps (\d+) accuracy", out)}
    assert steps == {0: 88}, out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_replacement_with_another_model_is_refused(slow_jobs):
    code, out, err = slow_jobs["other model"].result()
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"  # refused, and dropped: the other group finishes
    assert "worker group 1 does not train the model of table 0 on parameter server 0.0 (process 2): its slice of " \
           "parameter '0.weight' has 3072 elements, the table's 4096" in err, err
    steps = {int(r): int(n) for r, n in re.findall(r"rank (\d+) steps (\d+) accuracy", out)}
    assert steps == {0: 88}, out


def _final_accuracy(out: str) -> float:
    """The accuracy of the job's final values: those of the last group to pull them (Downpour's servers have every
    update by then; Hogwild's replicas all end with the masters' values)."""
    pulls = re.findall(r"rank \d+ steps \d+ accuracy ([\d.]+) pulled at ([\d.]+)", out)
    return float(max(pulls, key=lambda p: float(p[1]))[0])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hogwild_stops_once_every_group_was_lost(slow_jobs):
    """Two Hogwild groups: group 1 is replaced, then group 0 dies too. The slices' masters were the groups never lost,
    and none is left: the job stops, saying why, rather than go on with masters whose replicas may not hold them."""
    code, out, err = slow_jobs["hogwild all lost"].result()
    assert code == 137, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "worker group 1 (rank 1) lost: rank 1 was killed by signal SIGKILL (9); replacing it (1/1)" in err, err
    assert "singa-launch: every hogwild worker group has now been lost at least once: no group holds the masters' " \
           "values, so the job stops" in err, err
    assert "job failed after 1 restart(s): rank 0 was killed by signal SIGKILL (9)" in err, err


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("framework", ["downpour", "hogwild"])
def test_a_replaced_group_costs_under_a_point(slow_jobs, framework):
    code, out, err = slow_jobs[framework].result()
    assert code == 0, err
    reference = _final_accuracy(out)
    everyone = set(_accuracies(out))
    out, _ = _replaced(slow_jobs[f"{framework} replaced"].result(), "rank 1", everyone, EPOCHS)
    assert abs(_final_accuracy(out) - reference) <= 1.0, (out, reference)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replacement_reaches_a_server_on_another_host(namespaces, tmp_path):
    """Two hosts in network namespaces: both worker groups on host a, the server on host b (through singa-launch's
    ssh stand-in). The replacement of group 1 reaches the server's door across the hosts."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    ssh = _ssh_stand_in(tmp_path, namespaces)
    hosts = f"{ADDR['a']}:2,{ADDR['b']}:1"
    res = run_command(["ip", "netns", "exec", namespaces["a"], *LAUNCH, "--hosts", hosts, "--ssh-command", str(ssh),
                       "--network-interface", "sg0", *DOWNPOUR, "--max-restarts", "1", sys.executable,
                       str(script)], timeout=240, env={**ENV, **_killed(2, 30)})
    out, err = _replaced((res.returncode, res.stdout, res.stderr), "rank 1", {0, 1}, 2)
    _started_from_current_values(out, {1})
    assert "[s0] parameter server 0.0 (process 2): worker group 1 is back (replacement 1)" in err, err
