"""Negotiation as Horovod's coordinator does it: collectives match by name (not by their order on each rank),
the shared-memory channel survives every lifecycle (init, shutdown, init again, process sets added and removed),
join() refuses what Horovod refuses, handles are asynchronous, and a rank that waits in vain hears why."""
import concurrent.futures
import os
import sys
import textwrap
import time

import pytest
import torch

import singa_dist.horovod as hvd
from singa_dist import shared_headers
from tests.conftest import get_world
from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, "-m", "launchers.launch"]
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
CHANNELS = {"shared memory": {}, "all-gather": {"SINGA_SHM_NEGOTIATION": "0"}}


# --------------------------------------------------------------------------------------------------------------
# Matching by name

def submitted_around_a_barrier():
    """Horovod's duplicate-name tests: rank 0 submits before a barrier, the others after it; a second submission
    of a name in flight is refused on the rank that makes it."""
    r = hvd.rank()
    out = {}
    calls = {
        "allreduce": lambda: hvd.allreduce_async(torch.ones(4) * (r + 1), name="x.allreduce", op=hvd.Sum),
        "allgather": lambda: hvd.allgather_async(torch.full((r + 1, 2), float(r)), name="x.allgather"),
        "broadcast": lambda: hvd.broadcast_async(torch.full((3,), float(r)), root_rank=0, name="x.broadcast"),
    }
    handles = {}
    for when in ("before", "after"):
        if (when == "before") == (r == 0):
            for kind, call in calls.items():
                handles[kind] = call()
                try:
                    call()
                    out[kind + " duplicate"] = "accepted"
                except ValueError as exc:
                    out[kind + " duplicate"] = "refused" if "same name" in str(exc) else str(exc)
        hvd.barrier()
    out["allreduce"] = hvd.synchronize(handles["allreduce"]).tolist()
    out["allgather"] = hvd.synchronize(handles["allgather"]).tolist()
    out["broadcast"] = hvd.synchronize(handles["broadcast"]).tolist()
    return out


@pytest.mark.parametrize("channel", CHANNELS)
def test_collectives_match_by_name_not_by_order(channel):
    results = get_world(3, **CHANNELS[channel]).run(submitted_around_a_barrier, timeout=120)
    for out in results:
        assert out["allreduce duplicate"] == out["allgather duplicate"] == out["broadcast duplicate"] == "refused"
        assert out["allreduce"] == [6.0] * 4
        assert out["allgather"] == [[0.0, 0.0]] + [[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3
        assert out["broadcast"] == [0.0] * 3


def async_in_opposite_orders():
    """Named asynchronous collectives submitted in opposite orders on two ranks, then waited for in a third."""
    r = hvd.rank()
    names = [f"o.{i}" for i in range(40)]
    order = names if r == 0 else list(reversed(names))
    handles = {nm: hvd.allreduce_async(torch.tensor([float(i + r)]), name=nm, op=hvd.Sum)
               for nm, i in zip(order, [names.index(nm) for nm in order])}
    third = names[::3] + names[1::3] + names[2::3]
    return [hvd.synchronize(handles[nm]).item() for nm in third] == [float(2 * names.index(nm) + 1) for nm in third]


def test_named_collectives_in_opposite_orders_complete():
    assert get_world(2).run(async_in_opposite_orders, timeout=60) == [True, True]


# --------------------------------------------------------------------------------------------------------------
# Handles are asynchronous

def poll_before_the_peer_submits():
    r = hvd.rank()
    if r == 1:
        time.sleep(0.5)
    handle = hvd.allreduce_async(torch.ones(5), name="late.peer", op=hvd.Sum)
    early = hvd.poll(handle)
    got = hvd.synchronize(handle).tolist()
    return early, got, hvd.poll(handle)


def test_poll_is_false_until_every_rank_has_submitted():
    (early0, got0, late0), (_, got1, late1) = get_world(2).run(poll_before_the_peer_submits, timeout=60)
    assert early0 is False
    assert got0 == got1 == [2.0] * 5 and late0 and late1


# --------------------------------------------------------------------------------------------------------------
# join

def join_refuses_what_horovod_refuses():
    r, n = hvd.rank(), hvd.size()
    out = {}
    for kind, call in {"allgather": lambda: hvd.allgather(torch.ones(2, 3)),
                       "broadcast": lambda: hvd.broadcast(torch.ones(3), root_rank=n - 1, name="j.bcast"),
                       "allreduce": lambda: hvd.allreduce(torch.full((3,), float(r)), op=hvd.Sum, name="j.sum")}.items():
        if r == 0:
            out[kind] = ("joined", hvd.join())
        else:
            try:
                out[kind] = ("ok", call().tolist())
            except RuntimeError as exc:
                out[kind] = ("raised", str(exc))
            out[kind] += (hvd.join(),)
    # The refused allgather was unnamed: the rank that had joined counts it too, so the next ones still match.
    out["after"] = hvd.allgather(torch.tensor([r])).tolist()
    return out


def test_join_takes_part_in_allreduce_and_refuses_allgather_and_broadcast():
    results = get_world(3).run(join_refuses_what_horovod_refuses, timeout=120)
    assert [out["after"] for out in results] == [[0, 1, 2]] * 3
    for kind in ("allgather", "broadcast", "allreduce"):
        lasts = {out[kind][-1] for out in results}
        assert len(lasts) == 1 and lasts != {0}, (kind, results)  # the same on every rank; not the first to join
    for out in results[1:]:
        assert out["allgather"][0] == "raised" and "Allgather is not supported with Join" in out["allgather"][1]
        assert out["broadcast"][0] == "raised" and "Broadcast is not supported with Join" in out["broadcast"][1]
        assert out["allreduce"][:2] == ("ok", [3.0] * 3)  # rank 0 took part with zeros


# --------------------------------------------------------------------------------------------------------------
# Sparse gradients

def sparse_as_horovod():
    r = hvd.rank()
    dense = torch.zeros(6, 3)
    dense[r] = 1.0
    dense[5] = float(r + 1)
    handle = hvd.sparse_allreduce_async(dense.to_sparse(), name="sp", op=hvd.Average)
    reduced = handle()  # Horovod hands back a function to call
    kept = []
    for sparse_as_dense in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Embedding(10, 3, sparse=True)
        opt = hvd.DistributedOptimizer(torch.optim.SparseAdam(list(model.parameters()), lr=0.1),
                                       named_parameters=model.named_parameters(), sparse_as_dense=sparse_as_dense)
        model(torch.tensor([[1, 2], [r + 3, 9]])).sum().backward()
        opt.step()
        kept.append(model.weight.grad.is_sparse)
    return reduced.is_sparse, reduced.to_dense().tolist(), kept


def test_sparse_allreduce_handle_is_callable_and_sparse_adam_gets_sparse_gradients():
    results = get_world(2).run(sparse_as_horovod, timeout=60)
    want = [[0.5] * 3, [0.5] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [1.5] * 3]
    assert results == [(True, want, [True, True])] * 2


# --------------------------------------------------------------------------------------------------------------
# Lifecycles of the shared-memory channel, in real jobs

LIFECYCLE = textwrap.dedent("""
    import os, sys, time, glob
    import torch
    import singa_dist.horovod as hvd
    cycles = int(sys.argv[1])
    for cycle in range(cycles):
        hvd.init()
        r, n = hvd.rank(), hvd.size()
        if r == cycle % n:
            time.sleep(0.05)  # one rank late: the others may finish and leave before it reads their files
        evens = hvd.add_process_set([k for k in range(n) if k % 2 == 0])
        odds = hvd.add_process_set([k for k in range(n) if k % 2 == 1])
        mine = evens if r % 2 == 0 else odds
        got = hvd.allreduce(torch.ones(2), op=hvd.Sum, process_set=mine, name=f"c{cycle}")
        assert got.tolist() == [float(mine.size())] * 2, got
        total = hvd.allreduce(torch.ones(1), op=hvd.Sum)
        assert total.item() == n, total
        hvd.remove_process_set(odds)
        if cycle % 2:
            pair = hvd.add_process_set([0, 1])
            if r in (0, 1):
                assert hvd.broadcast_object(cycle, root_rank=1, process_set=pair) == cycle
            hvd.remove_process_set(pair)
        hvd.barrier()
        hvd.shutdown()
    print("cycles done", cycles, flush=True)
""")


@pytest.mark.parametrize("np_,jobs", [(2, 2), (3, 1)], ids=["two jobs of 2 at once", "one job of 3"])
def test_init_shutdown_and_process_sets_twenty_times_on_shared_memory(tmp_path, np_, jobs):
    script = tmp_path / "lifecycle.py"
    script.write_text(LIFECYCLE)
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(lambda _: run_command(LAUNCH + ["-np", str(np_), sys.executable, str(script), "20"],
                                                   timeout=300, env={**ENV, "SINGA_TIMEOUT": "60"}), range(jobs)))
    for res in done:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("cycles done 20") == np_
    if os.path.isdir("/dev/shm"):  # (files of processes still running belong to other jobs on this host)
        left = {f for f in set(os.listdir("/dev/shm")) - before if f.startswith(shared_headers.FILE_PREFIX)
                and not shared_headers.alive(int(f[len(shared_headers.FILE_PREFIX):].split("-")[0]))}
        assert not left, left


UNEVEN = textwrap.dedent("""
    import sys, time
    import torch
    import singa_dist.horovod as hvd
    hvd.init()
    steps = 3 if hvd.rank() == 0 else 5
    for step in range(steps):
        hvd.allreduce(torch.ones(1), name="loss")
    start = time.monotonic()
    try:
        hvd.shutdown()
    except Exception as exc:
        print("shutdown raised", type(exc).__name__, flush=True)
    print("left after", round(time.monotonic() - start, 1), flush=True)
""")


def test_a_rank_left_early_is_named_at_once_on_shared_memory(tmp_path):
    """Rank 0 reaches shutdown() after 3 steps while rank 1 waits in its 4th: rank 1 hears it at once (the file
    says so), not after the job's timeout."""
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    res = run_command(LAUNCH + ["-np", "2", sys.executable, str(script)], timeout=120,
                      env={**ENV, "SINGA_TIMEOUT": "100"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert res.seconds < 40, out[-3000:]
    assert "the ranks ran different numbers of steps: rank 0 finished after 0 steps, rank 1 is at step 1" in out, \
        out[-3000:]


STALL = textwrap.dedent("""
    import time
    import torch
    import singa_dist.horovod as hvd
    hvd.init()
    if hvd.rank() == 1:
        time.sleep(3)
    hvd.allreduce(torch.ones(1), name="slow.one")
    hvd.shutdown()
    print("finished", flush=True)
""")


@pytest.mark.parametrize("channel", CHANNELS)
def test_stall_check_warns_naming_the_missing_rank_and_the_job_goes_on(tmp_path, channel):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    res = run_command(LAUNCH + ["-np", "2", sys.executable, str(script)], timeout=120,
                      env={**ENV, "HOROVOD_STALL_CHECK_TIME_SECONDS": "1", **CHANNELS[channel]})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("finished") == 2
    # Through shared memory a rank sees who has not sent its block; an all-gather does not say.
    said = "missing rank 1" if channel == "shared memory" else "not yet heard from the other ranks"
    assert f"[0] rank 0: one or more collectives were submitted by a subset" in res.stderr, res.stderr[-3000:]
    assert f"allreduce.slow.one: {said}" in res.stderr, res.stderr[-3000:]
