"""Ranks that disagree fail fast with a message that names the rank and the tensor; a missing rank is named
by the others instead of hanging them."""
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from tests.conftest import get_world


def mismatched_model(kind):
    width = 9 if sd.rank() == 1 and kind == "shape" else 8
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    if sd.rank() == 1 and kind == "dtype":
        model[2].double()
    if sd.rank() == 1 and kind == "extra":
        model.append(nn.Linear(2, 2))
    start = time.monotonic()
    try:
        if kind == "broadcast":
            state = model.state_dict()
            if sd.rank() == 1:
                state = {("renamed." + k if k.startswith("2.") else k): v for k, v in state.items()}
            sd.broadcast_parameters(state, root_rank=0)
        else:
            sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    named_parameters=model.named_parameters())
    except RuntimeError as error:
        return str(error), time.monotonic() - start
    return None, time.monotonic() - start


@pytest.mark.parametrize("kind,expect", [
    ("shape", "rank 1's parameter '0.weight' is (9, 4) float32 but rank 0's is (8, 4) float32"),
    ("dtype", "rank 1's parameter '2.weight' is (2, 8) float64 but rank 0's is (2, 8) float32"),
    ("extra", "rank 1 has parameter '3.weight' (2, 2) float32 that rank 0 does not have"),
    ("broadcast", "rank 1 lacks tensor '2.weight' (2, 8) float32 that rank 0 has"),
])
def test_mismatched_model_fails_fast_on_every_rank(world2, kind, expect):
    for rank, (message, seconds) in enumerate(world2.run(mismatched_model, kind, timeout=60)):
        assert message is not None, f"rank {rank} did not notice the mismatch"
        assert message.startswith(f"rank {rank}: the workers' models differ")
        assert expect in message
        assert seconds < 30


def sleeping_rank():
    """Rank 1 never reaches the first gradient all-reduce; rank 0 must stop and name it."""
    model = nn.Linear(3, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    if sd.rank() == 1:
        time.sleep(3600)
    F.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
    opt.step()


def test_missing_rank_is_named_instead_of_hanging():
    world = get_world(2, SINGA_TIMEOUT="3")
    message, seconds = world.run_failing(sleeping_rank)
    assert "rank 0: rank 1 did not reach gradient bucket 0 (bias, weight) within the 3 s timeout" in message
    assert "ranks [1] were still waiting" in message or "ranks [1] did not finish" in message
    assert seconds < 30
    assert not any(p.is_alive() for p in world.procs)


def missing_in_collective():
    if sd.rank() == 2:
        time.sleep(3600)
    sd.allreduce(torch.ones(2), name="loss")


def test_missing_rank_in_a_tensor_collective():
    world = get_world(3, SINGA_TIMEOUT="3")
    message, seconds = world.run_failing(missing_in_collective)
    for r in (0, 1):
        assert f"rank {r}: rank 2 did not reach allreduce of loss (2,)" in message
    assert seconds < 30
