"""One training script, unchanged, under `python`, `singa-launch`, `torchrun` and `mpirun`, with each of AllReduce,
Sandblaster, Downpour and Hogwild: the same strategy gives the same model whatever starts the job.

The script uses torch's DistributedSampler and DataLoader as a newcomer would. The synchronous runs (AllReduce,
Sandblaster, and Downpour with one worker group of two) must equal one process on the whole batch. Hogwild's two
groups train apart and exchange their deltas at the end: its three multi-process runs must agree.
"""
import concurrent.futures
import json
import os
import shutil
import sys
import textwrap

import pytest
import torch

from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = textwrap.dedent("""
    import json
    import torch, torch.nn as nn, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler
    import singa_dist as sd

    sd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    sampler = DistributedSampler(data, num_replicas=sd.size(), rank=sd.rank(), shuffle=False)
    for epoch in range(3):
        for x, y in DataLoader(data, batch_size=16 // sd.size(), sampler=sampler):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    if hasattr(opt.strategy, "pull"):  # asynchronous groups: read the servers once everyone has pushed
        sd.barrier()
        opt.strategy.pull()
    if sd.strategy_name() == "hogwild":
        opt.strategy.close()  # the last exchange of deltas
    if sd.rank() == 0:
        print("RESULT", sd.strategy_name(), sd.size(),
              json.dumps([p.detach().flatten().tolist() for p in model.parameters()]), flush=True)
    sd.shutdown()
""")

# strategy -> (processes, its settings as SINGA_* variables, the same as singa-launch flags)
STRATEGIES = {
    "allreduce": (2, {}, []),
    "sandblaster": (3, {"SINGA_SERVERS": "1"}, ["--servers", "1"]),
    "downpour": (3, {"SINGA_SERVERS": "1", "SINGA_WORKER_GROUPS": "1"}, ["--servers", "1", "--worker-groups", "1"]),
    "hogwild": (2, {"SINGA_SYNC_FREQ": "1000"}, ["--sync-freq", "1000"]),
}
LAUNCHERS = ["python", "singa-launch", "torchrun", "mpirun"]


def _mpirun():
    for candidate in (os.path.join(os.path.dirname(sys.executable), "mpirun"), shutil.which("mpirun")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _command(launcher: str, strategy: str, script: str, table=STRATEGIES) -> tuple[list[str], dict]:
    nprocs, settings, flags = table[strategy]
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "SINGA_TIMEOUT": "60", "SINGA_STRATEGY": strategy, **settings}
    if launcher == "python":
        return [sys.executable, script], env
    if launcher == "singa-launch":
        workers = nprocs - int(settings.get("SINGA_SERVERS", 0))
        return [sys.executable, "-m", "launchers.launch", "-np", str(workers), "--strategy", strategy, *flags,
                script], {k: v for k, v in env.items() if not k.startswith("SINGA_") or k == "SINGA_TIMEOUT"}
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
                script], env
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun installed (pip install 'singa[mpi]')")
    exported = [w for name in env for w in ("-x", name)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--oversubscribe", "--bind-to", "none", *exported, "-np", str(nprocs), sys.executable,
            script], env


_results: dict = {}


def _result(launcher: str, strategy: str, tmp_path_factory) -> tuple[str, int, list]:
    if (launcher, strategy) not in _results:
        script = tmp_path_factory.mktemp("script") / "train.py"
        script.write_text(SCRIPT)
        command, env = _command(launcher, strategy, str(script))
        res = run_command(command, timeout=180, env=env, cwd=ROOT)
        assert res.returncode == 0, f"{launcher} / {strategy}:\n{res.stdout}\n{res.stderr}"
        lines = [line for line in res.stdout.splitlines() if "RESULT" in line]
        assert len(lines) == 1, f"{launcher} / {strategy}: one RESULT line expected:\n{res.stdout}"
        _, name, size, params = lines[0].split("RESULT", 1)[1].split(" ", 3)
        _results[launcher, strategy] = (name, int(size), [torch.tensor(p) for p in json.loads(params)])
    return _results[launcher, strategy]


def _same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_script_every_launcher(strategy, tmp_path_factory):
    # The launchers run side by side: most of each run is processes starting and meeting, not computing.
    with concurrent.futures.ThreadPoolExecutor(len(LAUNCHERS)) as pool:
        started = {launcher: pool.submit(_result, launcher, strategy, tmp_path_factory) for launcher in LAUNCHERS}
    results = {launcher: future.result() for launcher, future in started.items()}
    workers = STRATEGIES[strategy][0] - int(STRATEGIES[strategy][1].get("SINGA_SERVERS", 0))
    for launcher, (name, size, _) in results.items():
        assert name == strategy, (launcher, name)  # sd.strategy_name() tells the truth
        assert size == (1 if launcher == "python" else workers), (launcher, size)
    alone = results["python"][2]
    together = [results[launcher][2] for launcher in LAUNCHERS[1:]]
    assert all(_same(together[0], other) for other in together[1:]), f"{strategy}: the launchers disagree"
    if strategy == "hogwild":
        assert not _same(alone, together[0])  # two groups that trained apart are not one process
    else:
        assert _same(alone, together[0]), f"{strategy}: not one process on the whole batch"


# --------------------------------------------------------------------------------------------------------------
# What runs between backward() and step() sees the reduced gradients: gradient clipping

CLIP_SCRIPT = textwrap.dedent("""
    import torch, torch.nn as nn
    import singa_dist as sd

    sd.init()
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                  named_parameters=model.named_parameters())
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)) * 100  # the same batch on every rank
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    opt.step()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    if sd.rank() == 0:
        print("CLIPPED", sd.strategy_name(), sd.size(), f"{norm.item():.6g}", f"{moved:.9g}", flush=True)
    sd.shutdown()
""")
CLIP_STRATEGIES = {**STRATEGIES, "hybrid": (3, {"SINGA_SERVERS": "1", "SINGA_WORKER_GROUPS": "1"},
                                            ["--servers", "1", "--worker-groups", "1"])}
CLIP_RUNS = [("python", "allreduce")] + [(launcher, "allreduce") for launcher in LAUNCHERS[1:]] + \
    [("singa-launch", strategy) for strategy in CLIP_STRATEGIES if strategy != "allreduce"]


@pytest.mark.timeout(600)
def test_clipping_between_backward_and_step_counts_under_every_strategy_and_launcher(tmp_path):
    """Every rank has the same batch, so the reduced gradients are one process's: a clip to 1e-3 between backward()
    and step() moves the weights by 1e-3 (lr 1) everywhere. Under AllReduce the reduced gradients used to arrive in
    step() and overwrite the clipped ones (the weights moved by the unclipped norm)."""
    script = tmp_path / "clip.py"
    script.write_text(CLIP_SCRIPT)

    def run(launcher, strategy):
        command, env = _command(launcher, strategy, str(script), CLIP_STRATEGIES)
        res = run_command(command, timeout=180, env=env, cwd=ROOT)
        assert res.returncode == 0, f"{launcher} / {strategy}:\n{res.stdout}\n{res.stderr}"
        lines = [line.split("CLIPPED", 1)[1].split() for line in res.stdout.splitlines() if "CLIPPED" in line]
        assert len(lines) == 1, f"{launcher} / {strategy}:\n{res.stdout}"
        return lines[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = dict(zip(CLIP_RUNS, pool.map(lambda ls: run(*ls), CLIP_RUNS)))
    for (launcher, strategy), (name, size, norm, moved) in results.items():
        assert name == strategy and float(norm) > 1.0, (launcher, strategy, name, norm)  # the clip binds
        assert abs(float(moved) - 1e-3) < 1e-6, (launcher, strategy, moved)
