"""Negotiation headers through shared memory (every worker on one host) and through the all-gather (across hosts,
or SINGA_SHM_NEGOTIATION=0): the same answers, the same errors, a ring that wraps, a member that ends."""
import os
import threading
import time

import pytest
import torch

import singa_dist.horovod as hvd
from singa_dist import coordinator, shared_headers
from tests import test_horovod_parity as parity
from tests.conftest import get_world
from tests.dist_harness import World


def channel():
    engine = coordinator.engine_of(coordinator.global_process_set)
    hvd.allreduce(torch.ones(1), name="channel")
    if engine.shared is None:
        return None
    # Once every member has the others' files open (the second collective reads what the first one proved), each
    # name is removed: a killed process leaves nothing behind.
    hvd.allreduce(torch.ones(1), name="channel.2")
    return os.path.basename(engine.shared.path), os.path.exists(engine.shared.path)


def test_one_host_negotiates_through_memory_unless_turned_off():
    on = get_world(2).run(channel)
    assert len({name for name, _ in on}) == 2 and not any(left for _, left in on)
    assert get_world(3, SINGA_SHM_NEGOTIATION="0").run(channel) == [None, None, None]


@pytest.mark.parametrize("fn", [parity.mismatches, parity.process_sets], ids=["mismatches", "process sets"])
def test_the_all_gather_channel_gives_the_same_answers(fn):
    """The parity tests run through shared memory (one host); their error cases and process sets over Gloo too."""
    world = get_world(3, SINGA_SHM_NEGOTIATION="0")
    results = world.run(fn, timeout=120)
    if fn is parity.mismatches:
        for case, (kind, text) in parity.EXPECTED_ERRORS.items():
            for r, out in enumerate(results):
                assert out[case][0] == kind and text in out[case][1], (case, r, out[case])
                assert out[case][2] < 10, (case, r, out[case])
        assert [out["after"] for out in results] == [3.0] * 3


def burst():
    """Many more collectives in flight at once than a round carries, over more rounds than the ring has slots."""
    r = hvd.rank()
    count = coordinator.MAX_REQUESTS * shared_headers.SLOTS * 4 + 7
    handles = [hvd.allreduce_async(torch.tensor([float(i * (r + 1))]), op=hvd.Sum, name=f"burst.{i}")
               for i in range(count)]
    got = [hvd.synchronize(h).item() for h in handles]
    n = hvd.size()
    return got == [float(i * n * (n + 1) // 2) for i in range(count)]


def test_more_collectives_in_flight_than_a_round_and_the_ring_carry():
    assert get_world(2).run(burst, timeout=120) == [True, True]


def member_ends():
    if hvd.rank() == 1:
        hvd.barrier()
        threading.Timer(0.3, os._exit, (0,)).start()  # after this rank's answer has reached the test
        return None
    hvd.barrier()
    start = time.monotonic()
    try:
        hvd.allreduce(torch.ones(3), name="after.the.end")
    except Exception as exc:
        return str(exc), time.monotonic() - start
    return "no error", 0.0


def test_a_member_that_ends_is_named_at_once():
    """Found through its process id, at once, rather than by a roll call that waits for it or by the timeout."""
    world = World(2, env={"SINGA_TIMEOUT": "60"})
    try:
        (message, seconds), _ = world.run(member_ends, timeout=60)
    finally:
        world.alive = False
        for p in world.procs:
            p.kill()
            p.join(timeout=5)
    assert seconds < 5, message
    assert message.startswith("rank 0: rank 1 ended") and "after.the.end" in message, message
