"""The checkpoint recipe of docs/launcher.md, verbatim, under every strategy and launcher: rank 0 alone calls
`opt.state_dict()` and saves; a second job loads the file on every rank and goes on as the first one did.

Strategies with one state for the whole job (AllReduce's replicas, the parameter servers' values and optimizer state
under Sandblaster and under Downpour/Hybrid with one worker group) must resume exactly: the second job's steps equal
the uninterrupted job's. Adasum (each worker's own momentum), PartialUpdate and Hogwild (each worker's own replica)
resume every worker from rank 0's state, as Horovod's recipe does: the reference job takes rank 0's state on every
worker at the same step (sd.broadcast_parameters, sd.broadcast_optimizer_state). Every job has a timeout and a
collective timeout far below it, so that a call that waits for a worker that never comes fails the test fast; the
whole process session of each job is killed when it ends.
"""
import json
import os
import sys
import textwrap

import pytest
import torch

from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVE_AT, STEPS = 3, 6

# The recipe itself is the few lines marked "recipe"; ADOPT makes the reference job take rank 0's state at the save.
SCRIPT = textwrap.dedent("""
    import json, os
    import torch, torch.nn as nn, torch.nn.functional as F
    import singa_dist as sd

    torch.set_num_threads(1)
    sd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = sd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    sd.broadcast_optimizer_state(opt, root_rank=0)
    path, save_at, steps = os.environ["CKPT"], int(os.environ["SAVE_AT"]), int(os.environ["STEPS"])
    resume, mode = os.environ.get("RESUME") == "1", os.environ.get("MODE", "")
    start = 0
    if resume and (mode != "load_on_rank_0" or sd.rank() == 0):
        state = sd.load_checkpoint(path)                                       # recipe
        model.load_state_dict(state["model"])                                  # recipe
        if mode != "load_elsewhere" or sd.rank() != 0:
            opt.load_state_dict(state["optimizer"])                            # recipe
        start = state["epoch"]
    if mode == "load_on_rank_0":  # Horovod's form: rank 0 loads, the others take its values
        start = sd.broadcast_object(start)
        sd.broadcast_parameters(model.state_dict(), root_rank=0)
        sd.broadcast_optimizer_state(opt, root_rank=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    after = []
    for epoch in range(start, steps):
        batch = (torch.arange(16) + 16 * epoch) % 64
        mine = batch[sd.rank()::sd.size()]  # this worker's share of the step's batch
        opt.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        opt.step()
        if epoch + 1 == save_at and not resume:
            if os.environ.get("ADOPT") == "1":
                sd.broadcast_parameters(model.state_dict(), root_rank=0)
                sd.broadcast_optimizer_state(opt, root_rank=0)
            if sd.rank() == 0:                                                 # recipe
                sd.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "epoch": epoch + 1})                 # recipe
            elif mode == "every_rank_reads":  # any worker may read the job's state alone, a non-leader too
                torch.save(opt.state_dict(), f"{path}.rank{sd.rank()}")
        if epoch + 1 > save_at:
            after.append([p.detach().flatten().tolist() for p in model.parameters()])
    with open(f"{path}.after{sd.rank()}.json", "w") as f:  # a file: torchrun's ranks share one stdout
        json.dump({"strategy": sd.strategy_name(), "after": after}, f)
    sd.shutdown()
""")

# name -> (strategy, workers, singa-launch flags (SINGA_* variables for torchrun), exact resume or ADOPT reference)
SETUPS = {
    "allreduce": ("allreduce", 2, {}, "exact"),
    "sandblaster": ("sandblaster", 2, {"servers": "1"}, "exact"),
    "downpour": ("downpour", 2, {"worker-groups": "1", "servers": "1"}, "exact"),
    "hybrid": ("hybrid", 2, {"worker-groups": "1", "servers": "1"}, "exact"),
    "adasum": ("adasum", 2, {}, "adopt"),
    "partial_update": ("partial_update", 2, {}, "adopt"),
    "hogwild": ("hogwild", 2, {"sync-freq": "1000"}, "adopt"),  # no exchange before the end: deterministic
}
FAST = {"hybrid", "sandblaster"}  # the parameter-server cases that once hung or waited on the others


def _command(setup: str, launcher: str, script: str) -> tuple[list[str], dict]:
    strategy, workers, flags, _ = SETUPS[setup]
    if launcher == "singa-launch":
        args = [arg for flag, value in flags.items() for arg in (f"--{flag}", value)]
        return [sys.executable, "-m", "launchers.launch", "-np", str(workers), "--strategy", strategy, *args,
                script], {}
    settings = {f"SINGA_{flag.replace('-', '_').upper()}": value for flag, value in flags.items()}
    procs = workers + int(flags.get("servers", 0))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            script], {"SINGA_STRATEGY": strategy, **settings}


def _job(setup: str, launcher: str, tmp_path, **env) -> dict:
    """Run one job; {rank: the parameters after each step past the save}."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    command, launcher_env = _command(setup, launcher, str(script))
    full_env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "SINGA_TIMEOUT": "30", "CKPT": str(tmp_path / "ckpt.pt"),
                "SAVE_AT": str(SAVE_AT), "STEPS": str(STEPS), **launcher_env, **env}
    res = run_command(command, timeout=120, env=full_env, cwd=ROOT)
    assert res.returncode == 0, f"{setup} under {launcher} ({env}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    results = {}
    for rank in range(SETUPS[setup][1]):
        out = tmp_path / f"ckpt.pt.after{rank}.json"
        assert out.exists(), f"{setup} under {launcher}: rank {rank} wrote no results\n{res.stdout[-4000:]}"
        result = json.loads(out.read_text())
        out.unlink()
        assert result["strategy"] == SETUPS[setup][0], result["strategy"]
        results[rank] = [[torch.tensor(p) for p in step] for step in result["after"]]
    return results


def _assert_same(resumed: dict, reference: dict, what: str) -> None:
    for rank, steps in reference.items():
        assert len(resumed[rank]) == len(steps) == STEPS - SAVE_AT, what
        for step, (mine, theirs) in enumerate(zip(resumed[rank], steps)):
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                           msg=f"{what}: rank {rank}, step {SAVE_AT + step + 1} differs")


def _recipe(setup: str, launcher: str, tmp_path, **env) -> None:
    adopt = SETUPS[setup][3] == "adopt"
    reference = _job(setup, launcher, tmp_path, ADOPT="1" if adopt else "0", **env)
    assert (tmp_path / "ckpt.pt").exists()
    resumed = _job(setup, launcher, tmp_path, RESUME="1", **env)
    _assert_same(resumed, reference, f"{setup} under {launcher}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", [pytest.param(name, marks=() if name in FAST else pytest.mark.slow)
                                   for name in SETUPS])
def test_recipe_under_singa_launch(setup, tmp_path):
    _recipe(setup, "singa-launch", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", ["sandblaster", "downpour", "hybrid", "hogwild"])
def test_recipe_under_torchrun(setup, tmp_path):
    _recipe(setup, "torchrun", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hybrid_any_worker_reads_the_state_and_rank_0_alone_loads(tmp_path):
    """A worker that is not its group's first reads the servers' state alone (the same as rank 0's), and Horovod's
    form of the resume (rank 0 loads, then broadcasts) restores the servers without the others loading."""
    reference = _job("hybrid", "singa-launch", tmp_path, MODE="every_rank_reads")
    mine = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["singa_strategy"]
    other = torch.load(tmp_path / "ckpt.pt.rank1", weights_only=True)["singa_strategy"]
    assert mine["versions"] == other["versions"] and mine["steps"] == other["steps"]
    for name, value in mine["params"].items():
        assert torch.equal(value, other["params"][name]), name
        for key, tensor in mine["state"][name].items():
            assert torch.equal(tensor, other["state"][name][key]), (name, key)
    resumed = _job("hybrid", "singa-launch", tmp_path, RESUME="1", MODE="load_on_rank_0")
    _assert_same(resumed, reference, "hybrid, loaded on rank 0 alone")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_load_without_rank_0_says_what_to_do(tmp_path):
    """Workers that load a checkpoint rank 0 never loads are told so when the timeout runs out."""
    _job("sandblaster", "singa-launch", tmp_path)
    script = tmp_path / "train.py"
    command, _ = _command("sandblaster", "singa-launch", str(script))
    res = run_command(command, timeout=120, cwd=ROOT,
                      env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "SINGA_TIMEOUT": "5",
                           "CKPT": str(tmp_path / "ckpt.pt"), "SAVE_AT": str(SAVE_AT), "STEPS": str(STEPS),
                           "RESUME": "1", "MODE": "load_elsewhere"})
    assert res.returncode != 0
    assert "waited 5 s for rank 0 to restore the parameter servers" in res.stdout + res.stderr
    assert "call opt.load_state_dict() on rank 0 too" in res.stdout + res.stderr
