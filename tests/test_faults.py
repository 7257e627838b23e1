"""Faults end fast, name their first cause, and leave nothing behind.

The quick cases of the fault-injection suite (`python -m benchmarks.faults --quick`; the whole suite runs on
request), then the launcher's own pieces: how an attempt's outcome is told, and the watch that the launchers
of a job on several nodes keep on each other.
"""
import json
import threading
import time

import pytest

from benchmarks import faults
from launchers import watchdog
from launchers.config import ProcessSpec
from launchers.local import LocalJob, Outcome
from tests.dist_harness import free_port

QUICK = [case for case in faults.all_cases() if case.quick]


def test_the_suite_is_whole():
    cases = faults.all_cases()
    groups = {case.group for case in cases}
    assert groups == {"launcher input", "runtime", "checkpoint", "API misuse"}
    assert len(cases) >= 60
    assert len({case.name for case in cases}) == len(cases), "case names must be unique"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", QUICK, ids=[f"{c.group}: {c.name}" for c in QUICK])
def test_fault(case, tmp_path):
    row = faults.run_case(case, 0)
    assert row["leftover"] == 0, f"{row['leftover']} process(es) left behind: {row['got']}"
    if row["verdict"] == "skipped":
        pytest.skip(row["got"])
    assert row["verdict"] == "held", f"expected {case.expected}; got {row['got']}"


def _spec(role, index, proc):
    return ProcessSpec(proc_rank=proc, local_rank=proc, role=role, index=index, argv=[], env={})


def test_outcome_names_the_cause_not_the_first_to_fail():
    rank0, rank1 = _spec("worker", 0, 0), _spec("worker", 1, 1)
    outcome = Outcome(False, [(rank0, 1)], causes=[(rank1, "process 1 never reached singa_dist.init()", False)])
    assert outcome.describe() == "process 1 never reached singa_dist.init() (rank 1), so rank 0 exited with status 1"
    assert outcome.exit_code == 1


def test_outcome_of_different_step_counts_blames_no_one():
    rank0, rank1 = _spec("worker", 0, 0), _spec("worker", 1, 1)
    what = "the ranks ran different numbers of steps (rank 0 is at step 3, rank 1 left after 2)"
    outcome = Outcome(False, [(rank0, 3)], causes=[(rank1, what, True)])
    assert outcome.describe() == f"rank 0 exited with status 3: {what}"


def test_outcome_of_a_stranded_rank_fails_the_job():
    rank0, rank1 = _spec("worker", 0, 0), _spec("worker", 1, 1)
    outcome = Outcome(False, [(rank0, 0)], causes=[(rank1, "process 1 did not reach singa_dist.shutdown()", False)])
    assert outcome.describe() == ("process 1 did not reach singa_dist.shutdown() (rank 1); "
                                  "rank 0 finished and waited for rank 1 in vain")
    assert outcome.exit_code == 1  # it ended well, but the job did not


def test_processes_failed_together_are_told_cause_first(tmp_path):
    job = object.__new__(LocalJob)  # only its folder of notes is needed
    job.folder = str(tmp_path)
    r0, r1, r2 = (_spec("worker", i, i) for i in range(3))
    # Killed by a signal before one that exited on its own (seeing its peer gone).
    assert job.first_causes_first([(r0, 1), (r1, -9)]) == [(r1, -9), (r0, 1)]
    # The one another blames comes first of all; a neutral note (step counts differ) blames no one.
    (tmp_path / "blame.0").write_text(json.dumps({"proc": 0, "blames": [2], "what": "w", "neutral": False}))
    assert job.first_causes_first([(r0, 1), (r1, -9), (r2, 1)]) == [(r2, 1), (r1, -9), (r0, 1)]
    (tmp_path / "blame.0").write_text(json.dumps({"proc": 0, "blames": [2], "what": "w", "neutral": True}))
    assert job.first_causes_first([(r0, 1), (r2, 1)]) == [(r0, 1), (r2, 1)]


def test_outcome_of_a_lost_node():
    outcome = Outcome(False, [], lost="node 0's launcher is gone")
    assert outcome.describe() == "node 0's launcher is gone"
    assert outcome.exit_code == 1


def _until(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def watches(monkeypatch):
    """watches(n): the launchers' watches of an n-node job on this host, started; all closed afterwards."""
    monkeypatch.setattr(watchdog, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(watchdog, "STALE_S", 1.0)
    monkeypatch.setattr(watchdog, "OP_TIMEOUT_S", 5.0)
    made = []

    def make(n):
        port = free_port("127.0.0.1")
        nodes = [watchdog.NodeWatch("127.0.0.1", port, node, n, 0) for node in range(n)]
        for node in nodes:
            node.start()
        made.extend(reversed(nodes))
        time.sleep(0.5)
        assert all(node.problem is None for node in nodes)
        return port, nodes

    yield make
    for node in made:
        node.finish(False)
        node.close()


@pytest.mark.timeout(60)
def test_a_node_learns_that_node_0s_launcher_is_gone(watches):
    port, (node0, node1) = watches(2)
    node0.finish(False)
    node0.close()  # the store goes with node 0's launcher
    assert _until(lambda: node1.problem is not None, 20), "node 1 never noticed"
    assert "node 0's launcher is gone" in node1.problem and str(port) in node1.problem


@pytest.mark.timeout(60)
def test_node_0_learns_that_a_node_stopped_beating(watches):
    _, (node0, node1, node2) = watches(3)
    node2._stop.set()  # as if its launcher were killed: no more heartbeats, no goodbye
    assert _until(lambda: node0.problem is not None, 20), "node 0 never noticed"
    assert node0.problem.startswith("node 2's launcher stopped answering")
    assert node1.problem is None


@pytest.mark.timeout(60)
def test_node_0_keeps_the_store_until_every_node_is_done(watches):
    _, (node0, node1) = watches(2)
    finished = []
    waiter = threading.Thread(target=lambda: (node0.finish(True), finished.append(time.monotonic())))
    waiter.start()
    time.sleep(2.0)  # node 1 still runs, beating: node 0 waits for it, longer than STALE_S
    assert not finished and node1.problem is None
    node1.finish(True)
    waiter.join(timeout=10)
    assert finished, "node 0 did not end once node 1 was done"
    assert node0.problem is None and node1.problem is None
