"""Uneven data, the commonest real case: ranks with different numbers of batches.

Without anything, a rank that finishes early is noticed within seconds and the error says what happened; with
`with sd.join(model, optimizer):` the ranks that run out of batches take part with zeros and the result equals one
process training on the same batches."""
import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, "-m", "launchers.launch"]
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "SINGA_TIMEOUT": "300"}
CHANNELS = {"shared memory": {}, "all-gather": {"SINGA_SHM_NEGOTIATION": "0"}}

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn as nn, torch.nn.functional as F
    import singa_dist as sd

    sd.init()
    steps = [int(s) for s in sys.argv[2].split(",")][sd.rank()]
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(sd.rank())
    batches = [(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)) for _ in range(steps)]

    def loop():
        for x, y in batches:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    if sys.argv[1] == "join":
        with sd.join(model, opt) as joined:
            loop()
        print("LAST", joined.last, flush=True)
    else:
        loop()
    print("RESULT", sd.rank(), json.dumps([p.detach().flatten().tolist() for p in model.parameters()]), flush=True)
    sd.shutdown()
""")


def one_process(steps: list[int]) -> list[torch.Tensor]:
    """One process on the same batches: step i averages over the ranks that have a batch i (equal batch sizes)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = []
    for rank, count in enumerate(steps):
        g = torch.Generator().manual_seed(rank)
        batches.append([(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)) for _ in range(count)])
    for i in range(max(steps)):
        here = [b[i] for b in batches if i < len(b)]
        opt.zero_grad()
        F.mse_loss(model(torch.cat([x for x, _ in here])), torch.cat([y for _, y in here])).backward()
        opt.step()
    return [p.detach().flatten() for p in model.parameters()]


def _run(tmp_path, mode: str, steps: list[int], env: dict):
    script = tmp_path / "uneven.py"
    script.write_text(SCRIPT)
    return run_command(LAUNCH + ["-np", str(len(steps)), sys.executable, str(script), mode,
                                 ",".join(map(str, steps))], timeout=120, env={**ENV, **env})


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_rank_that_finishes_early_is_named_within_seconds(tmp_path, channel):
    res = _run(tmp_path, "plain", [5, 8], CHANNELS[channel])
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert res.seconds < 15, out[-3000:]  # not the 300 s timeout
    assert ("the ranks ran different numbers of steps: rank 0 finished after 5 steps, rank 1 is at step 6"
            in out), out[-3000:]
    assert "sd.join(model, optimizer)" in out


@pytest.mark.parametrize("channel", CHANNELS)
def test_join_equals_one_process_on_the_same_batches(tmp_path, channel):
    steps = [5, 8, 6]
    res = _run(tmp_path, "join", steps, CHANNELS[channel])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("LAST 1") == 3  # the rank with the most batches finishes last
    results = [json.loads(line.split(" ", 3)[3]) for line in res.stdout.splitlines() if "RESULT" in line]
    assert len(results) == 3
    want = one_process(steps)
    for params in results:  # every rank ends with the last rank's model
        for got, ref in zip(params, want):
            torch.testing.assert_close(torch.tensor(got), ref, rtol=1e-5, atol=1e-6)
