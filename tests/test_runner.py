"""sd.run: results in rank order, a failing rank named with its traceback, a hang stopped at the timeout, and no
process left behind."""
import multiprocessing
import os
import sys
import textwrap
import time

import pytest
import torch

import singa_dist as sd
from tests.dist_harness import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _identity(offset):
    t = torch.tensor([float(sd.rank())])
    sd.allreduce_(t, op=sd.Sum)
    return {"rank": sd.rank(), "size": sd.size(), "sum": t.item(), "offset": offset, "pid": os.getpid(),
            "threads": torch.get_num_threads(), "timeout": sd.runtime.timeout_s()}


def _fail_on_rank_1(message):
    if sd.rank() == 1:
        raise ValueError(message)
    sd.barrier()  # ranks 0 and 2 wait for rank 1, which never comes
    return os.getpid()


def _hang_on_rank_1():
    if sd.rank() == 1:
        time.sleep(300)
    return os.getpid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by someone else) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_run_returns_results_in_rank_order():
    before = set(multiprocessing.active_children())
    results = sd.run(_identity, np=3, args=(7,), env={"SINGA_TIMEOUT": "42"}, timeout=120)
    assert [(r["rank"], r["size"], r["sum"], r["offset"]) for r in results] == [(0, 3, 3.0, 7), (1, 3, 3.0, 7),
                                                                                 (2, 3, 3.0, 7)]
    assert all(r["threads"] == 1 and r["timeout"] == 42.0 for r in results)  # one intra-op thread; env applied
    assert len({r["pid"] for r in results}) == 3
    assert not any(_pid_alive(r["pid"]) for r in results)
    assert set(multiprocessing.active_children()) == before


def test_run_names_the_failing_rank_with_its_traceback():
    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(sd.RunError) as info:
        sd.run(_fail_on_rank_1, np=3, args=("rank one gives up",), env={"SINGA_TIMEOUT": "60"}, timeout=120)
    error = info.value
    assert list(error.failures)[0] == 1
    assert str(error).startswith("singa_dist.run: rank 1 failed")
    assert "ValueError: rank one gives up" in error.failures[1] and "_fail_on_rank_1" in error.failures[1]
    assert set(error.missing) | set(error.failures) == {0, 1, 2}
    assert time.monotonic() - start < 50  # stopped after the grace period, not after the collective timeout
    assert set(multiprocessing.active_children()) == before


def test_run_timeout_names_the_missing_rank_and_stops_every_process():
    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(sd.RunError) as info:
        sd.run(_hang_on_rank_1, np=2, env={"SINGA_TIMEOUT": "120"}, timeout=15)
    assert info.value.missing == [1] and not info.value.failures  # rank 0 returned; it waited for rank 1
    assert "rank 1 did not finish within 15 s" in str(info.value)
    assert time.monotonic() - start < 40
    assert set(multiprocessing.active_children()) == before


def _rank_and_size():
    return sd.rank(), sd.size()


def test_horovod_run_keywords():
    import singa_dist.horovod as hvd

    assert sd.run(_rank_and_size, hosts="localhost:2", use_gloo=True, timeout=120) == [(0, 2), (1, 2)]
    assert hvd.run(_rank_and_size, np=2, hosts="localhost:2") == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="singa-launch --mpi"):
        sd.run(_rank_and_size, np=2, use_mpi=True)
    with pytest.raises(ValueError, match="this host only, got host 'elsewhere.invalid'"):
        sd.run(_rank_and_size, hosts="elsewhere.invalid:2")
    with pytest.raises(ValueError, match="3 processes requested but"):
        sd.run(_rank_and_size, np=3, hosts="localhost:2")
    with pytest.raises(ValueError, match="use_gloo and use_mpi"):
        hvd.run(_rank_and_size, np=2, use_gloo=True, use_mpi=True)


def test_horovod_run_from_a_script_without_a_main_guard(tmp_path):
    # As Horovod users write it: the function lives in the script, which calls horovod.run at its top level. The
    # function goes by value; the script is not run again in the processes (spawn would, and start a run there).
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import singa_dist.horovod as hvd
        SCALE = 10
        def train(offset):
            hvd.init()
            return hvd.rank() * SCALE + offset
        print("results", hvd.run(train, args=(1,), np=2), flush=True)
    """))
    res = run_command([sys.executable, str(script)], timeout=120, env={"PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("results") == 1 and "results [1, 11]" in res.stdout, res.stdout


def _say_rank():
    print(f"out of rank {sd.rank()}", flush=True)
    os.write(2, f"native err of rank {sd.rank()}\n".encode())  # what native code writes goes there too
    return sd.rank()


def test_horovod_run_output_filename(tmp_path):
    import singa_dist.horovod as hvd

    assert hvd.run(_say_rank, np=2, output_filename=str(tmp_path / "out")) == [0, 1]
    for r in (0, 1):
        assert (tmp_path / "out" / f"rank.{r}" / "stdout").read_text() == f"out of rank {r}\n"
        assert f"native err of rank {r}\n" in (tmp_path / "out" / f"rank.{r}" / "stderr").read_text()
    with pytest.raises(ValueError, match="output_filename is for runs of fixed processes"):
        hvd.run(_say_rank, min_np=1, max_np=2, output_filename=str(tmp_path / "out"))


def _train_with_the_job_strategy():
    model = torch.nn.Linear(3, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    return sd.rank(), sd.size(), sd.strategy_name(), sd.role().role


def test_parameter_servers_from_the_environment_without_singa_launch():
    """SINGA_STRATEGY and SINGA_SERVERS (or sd.init's arguments) make the last processes servers, whatever starts
    the job: here sd.run, as torchrun would start three processes of one script."""
    results = sd.run(_train_with_the_job_strategy, np=3, env={"SINGA_STRATEGY": "sandblaster", "SINGA_SERVERS": "1"},
                     timeout=120)
    assert results == [(0, 2, "sandblaster", "worker"), (1, 2, "sandblaster", "worker"), None]
