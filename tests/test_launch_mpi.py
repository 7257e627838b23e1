"""singa-launch --mpi: the exact mpirun command for Open MPI and for MPICH, and a real 3-rank run."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launchers import mpi
from launchers.config import UsageError, parse_args
from tests.dist_harness import kill_session, run_command
from tests.test_launch import _alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def TAG(nworkers):  # the wrapper every rank runs in: it prefixes output lines with the rank
    return [sys.executable, "-m", "launchers.tag_output", "--workers", str(nworkers), "--"]

SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    import singa_dist as sd
    torch.set_num_threads(1)
    sd.init()
    t = torch.tensor([float(sd.rank() + 1)])
    dist.all_reduce(t, group=sd.workers_process_group())
    print(f"worker {sd.rank()} of {sd.size()} local {sd.local_rank()}/{sd.local_size()}: sum {t.item():.0f}")
    sd.shutdown()
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return str(path)


def test_flavor_from_version_text():
    assert mpi.mpi_flavor("mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org") == mpi.OPENMPI
    assert mpi.mpi_flavor("HYDRA build details:\n    Version: 4.2.0\n") == mpi.MPICH
    assert mpi.mpi_flavor("Intel(R) MPI Library for Linux* OS, Version 2021.10") == mpi.MPICH
    with pytest.raises(UsageError, match="cannot tell which MPI"):
        mpi.mpi_flavor("some other launcher 1.0")


def test_openmpi_command(script):
    cfg = parse_args(["--mpi", "-np", "4", "--hosts", "h1:2,h2:2", "--mpi-args", "--mca btl tcp,self",
                      script, "--epochs", "3"])
    names = sorted(mpi.mpi_env(cfg))
    assert "MASTER_ADDR" not in names  # several hosts: rank 0 announces its address through mpi4py
    assert {"SINGA_TOPOLOGY", "SINGA_STRATEGY", "PYTHONUNBUFFERED"} <= set(names)
    assert not {"RANK", "SINGA_PROC_RANK", "LOCAL_RANK"} & set(names)
    cmd = mpi.mpirun_command(cfg, mpi.OPENMPI, "/opt/mpi/bin/mpirun", ["A", "B"], as_root=True)
    assert cmd == ["/opt/mpi/bin/mpirun", "--allow-run-as-root", "--bind-to", "none", "-H", "h1:2,h2:2",
                   "-x", "A", "-x", "B", "--mca", "btl", "tcp,self",
                   "-np", "4", *TAG(4), sys.executable, script, "--epochs", "3"]


def test_openmpi_command_with_servers_one_host(script, monkeypatch):
    monkeypatch.delenv("SINGA_SERVER_COMMAND", raising=False)
    monkeypatch.setattr(mpi, "_cores", lambda: 2)
    cfg = parse_args(["--mpi", "-np", "2", "--strategy", "sandblaster", "--servers", "1", script])
    cmd = mpi.mpirun_command(cfg, mpi.OPENMPI, "mpirun", ["SINGA_TOPOLOGY"], as_root=False)
    assert cmd == ["mpirun", "--oversubscribe", "--bind-to", "none", "-x", "SINGA_TOPOLOGY",
                   "-np", "2", *TAG(2), sys.executable, script,
                   ":", "-np", "1", *TAG(2), sys.executable, "-m", "singa_dist.ps"]
    env = mpi.mpi_env(cfg)
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


def test_mpich_command(script, tmp_path, monkeypatch):
    monkeypatch.delenv("SINGA_SERVER_COMMAND", raising=False)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2:2\n")
    cfg = parse_args(["--mpi", "-np", "3", "--strategy", "downpour", "--hostfile", str(hostfile), script])
    cmd = mpi.mpirun_command(cfg, mpi.MPICH, "mpiexec", ["MASTER_PORT", "SINGA_TOPOLOGY"], as_root=True)
    assert cmd == ["mpiexec", "-genvlist", "MASTER_PORT,SINGA_TOPOLOGY", "-hosts", "h1:2,h2:2",
                   "-n", "3", *TAG(3), sys.executable, script, ":", "-n", "1", *TAG(3), sys.executable, "-m",
                   "singa_dist.ps"]
    cfg = parse_args(["--mpi", "-np", "2", "--hosts", "a:1,b:1", script])
    assert mpi.mpirun_command(cfg, mpi.MPICH, "mpirun", ["X"]) == [
        "mpirun", "-genvlist", "X", "-hosts", "a:1,b:1", "-n", "2", *TAG(2), sys.executable, script]


def test_mpi_rejects_restarts(script):
    with pytest.raises(UsageError, match="--mpi: mpirun starts and stops the job itself"):
        parse_args(["--mpi", "-np", "2", "--max-restarts", "1", script])


def _mpirun():
    try:
        return mpi.find_mpirun()
    except UsageError:
        return None


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun installed (pip install 'singa[mpi]')")
@pytest.mark.parametrize("where", [["-np", "3"], ["--hosts", "localhost:3"]], ids=["one-host", "hosts"])
def test_real_mpirun_three_ranks(script, where):
    """With --hosts the launcher sets no MASTER_ADDR: rank 0 announces its address through mpi4py."""
    res = run_command([sys.executable, "-m", "launchers.launch", "--mpi", *where, script], timeout=180,
                      env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = sorted(line for line in res.stdout.splitlines() if "worker" in line)
    # Every line carries its rank, as under the local launcher.
    assert lines == [f"[{r}] worker {r} of 3 local {r}/3: sum 6" for r in range(3)], res.stdout


HOROVOD_SCRIPT = textwrap.dedent("""
    import os
    import singa_dist.horovod as hvd
    hvd.init()
    print(f"rank {hvd.rank()} mpi_enabled {hvd.mpi_enabled()} HOROVOD_RANK {os.environ['HOROVOD_RANK']} "
          f"HOROVOD_SIZE {os.environ['HOROVOD_SIZE']} sum {hvd.allreduce(hvd.rank() + 1.0, op=hvd.Sum)}")
    hvd.shutdown()
""").replace("hvd.rank() + 1.0", "__import__('torch').tensor(hvd.rank() + 1.0)")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun installed (pip install 'singa[mpi]')")
def test_horovod_script_under_mpirun_knows_mpi_is_enabled(tmp_path):
    path = tmp_path / "hvd_train.py"
    path.write_text(HOROVOD_SCRIPT)
    res = run_command([sys.executable, "-m", "launchers.launch", "--mpi", "-np", "2", str(path)], timeout=180,
                      env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = sorted(line for line in res.stdout.splitlines() if "mpi_enabled" in line)
    assert lines == [f"[{r}] rank {r} mpi_enabled True HOROVOD_RANK {r} HOROVOD_SIZE 2 sum 3.0" for r in range(2)], \
        res.stdout


HELLO = textwrap.dedent("""
    import os, sys
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK"))
    print(f"hello from process {rank}")
    print(f"warning from process {rank}", file=sys.stderr)
""")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun installed (pip install 'singa[mpi]')")
def test_real_mpirun_prefixes_workers_and_servers(tmp_path):
    """Servers are a second application context: their lines carry s<index>, on stdout and stderr alike."""
    hello = tmp_path / "hello.py"
    hello.write_text(HELLO)
    res = run_command([sys.executable, "-m", "launchers.launch", "--mpi", "-np", "2", "--strategy", "sandblaster",
                       "--servers", "1", str(hello)], timeout=120,
                      env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
                           "SINGA_SERVER_COMMAND": f"{sys.executable} {hello}"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(line for line in res.stdout.splitlines() if "hello" in line) == [
        "[0] hello from process 0", "[1] hello from process 1", "[s0] hello from process 2"], res.stdout
    assert sorted(line for line in res.stderr.splitlines() if "warning" in line) == [
        "[0] warning from process 0", "[1] warning from process 1", "[s0] warning from process 2"], res.stderr


# ------------------------------------------------------------------------------------------------------------
# The wrapper on its own, as mpirun starts it

def _tag(env, code, timeout=30):
    clean = {k: "" for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")}
    return run_command([sys.executable, "-m", "launchers.tag_output", "--workers", "2", "--",
                        sys.executable, "-c", code], timeout=timeout, env={"PYTHONPATH": ROOT, **clean, **env})


def test_wrapper_prefixes_lines_and_keeps_the_exit_status():
    code = ("import sys; sys.stdout.write('a\\r\\nbar 1%\\rbar 99%\\rdone\\n\\nlast'); "
            "print('oops', file=sys.stderr); sys.exit(3)")
    res = _tag({"OMPI_COMM_WORLD_RANK": "1"}, code)  # Open MPI
    assert res.returncode == 3
    assert res.stdout == "[1] a\n[1] bar 1%\r[1] bar 99%\r[1] done\n[1] \n[1] last\n"
    assert res.stderr == "[1] oops\n"
    res = _tag({"PMI_RANK": "3"}, "print('server up')")  # MPICH's Hydra; ranks after the 2 workers are servers
    assert (res.returncode, res.stdout) == (0, "[s1] server up\n")


def test_wrapper_passes_signals_on_and_ends_as_the_command_did():
    code = ("import signal, sys, time\n"
            "def bye(*_):\n    print('got SIGTERM', flush=True); sys.exit(7)\n"
            "signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(60)")
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMPI_COMM_WORLD_RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "launchers.tag_output", "--workers", "1", "--",
                             sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "[0] ready\n"
        proc.send_signal(signal.SIGTERM)  # to the wrapper only, as mpirun signals the process it started
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_session(proc.pid)
    assert out == "[0] got SIGTERM\n" and proc.returncode == 7
    res = _tag({"OMPI_COMM_WORLD_RANK": "0"}, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert res.returncode == -signal.SIGKILL


_LAUNCHER_VARS = ("SINGA_PROC_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                  "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, ("mpirun", 2, 3, 0, 1)),
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, ("mpirun", 1, 4, 1, 2)),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
      "SLURM_TASKS_PER_NODE": "2(x3),1"}, ("srun", 6, 7, 0, 1)),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
      "SLURM_TASKS_PER_NODE": "2(x3),1"}, ("srun", 3, 7, 1, 2)),
])
def test_runtime_reads_mpi_and_slurm_ranks(env, expected, monkeypatch):
    from singa_dist import environment
    for name in _LAUNCHER_VARS + ("SLURM_NTASKS_PER_NODE",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert environment.detect_launcher() == expected


SLEEPER = textwrap.dedent("""
    import os, sys, time
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK"))
    open(os.path.join(sys.argv[1], f"pid{rank}"), "w").write(str(os.getpid()))
    time.sleep(300)
""")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun installed (pip install 'singa[mpi]')")
def test_sigkill_to_mpi_launcher_takes_every_rank_with_it(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, "-m", "launchers.launch", "--mpi", "-np", "2", str(script), str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.monotonic() + 60
        while sum(1 for f in tmp_path.glob("pid*") if f.read_text()) < 2:  # written, not only made
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.1)
        time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
        proc.kill()  # singa-launch --mpi is mpirun by now
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a rank outlived mpirun"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
