"""singa-launch on one machine: output, failures, signals, restarts with checkpoints, servers, dry run, bad input."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from launchers import local
from launchers.launch import main as launch_main
from singa_dist.environment import free_port
from tests.dist_harness import kill_session, run_command, session_alive

LAUNCH = [sys.executable, "-m", "launchers.launch"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

# A rank that records its pid, prints, and then does what argv says.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["RANK"])
    open(os.path.join(sys.argv[1], f"pid{rank}"), "w").write(str(os.getpid()))
    print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']}"
          f"/{os.environ['LOCAL_WORLD_SIZE']} threads {os.environ.get('OMP_NUM_THREADS')}")
    if rank == 0:
        sys.stderr.write("train: 0%\\rtrain: 50%\\rtrain: 100%\\n")
    action = sys.argv[2]
    if action in ("exit3", "kill9") and rank == 1:
        # Fail once every rank is up, so that the launcher has them all to stop.
        deadline = time.time() + 30
        while time.time() < deadline and not all(
                os.path.exists(os.path.join(sys.argv[1], f"pid{r}")) for r in range(int(os.environ["WORLD_SIZE"]))):
            time.sleep(0.05)
        time.sleep(0.2)
        if action == "exit3":
            sys.exit(3)
        os.kill(os.getpid(), 9)
    if action in ("exit3", "kill9", "sleep"):
        time.sleep(120)
""")

# Data-parallel training on scikit-learn's bundled digits with torch.distributed directly (Gloo all_reduce of
# gradients), checkpointing every epoch; CRASH_EPOCH makes the last rank SIGKILL itself in the first attempt.
TRAIN_SCRIPT = textwrap.dedent("""
    import gzip, importlib.util, os, signal, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import singa_dist as sd

    torch.set_num_threads(1)
    sd.init()
    rank, size = sd.rank(), sd.size()
    root = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    data = np.loadtxt(gzip.open(os.path.join(root, "datasets", "data", "digits.csv.gz")), delimiter=",")
    x, y = torch.tensor(data[:, :-1] / 16, dtype=torch.float32), torch.tensor(data[:, -1], dtype=torch.long)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    epochs, batch = int(os.environ.get("EPOCHS", "4")), 100
    ckpt, crash = os.environ.get("CKPT"), int(os.environ.get("CRASH_EPOCH", "-1"))
    start = 0
    if ckpt and os.path.exists(ckpt):
        state = sd.load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
        print(f"resumed from epoch {start}")
    for epoch in range(start, epochs):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            mine = idx[rank::size]  # this rank's share of the batch
            loss = F.cross_entropy(model(xtr[mine]), ytr[mine], reduction="sum") / len(idx)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
        if epoch == crash and rank == size - 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        if ckpt:
            if rank == 0:
                sd.save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "epoch": epoch + 1})
            dist.barrier()
    acc = (model(xte).argmax(1) == yte).float().mean().item()
    if rank == 0:
        print(f"ACCURACY {acc:.4f}")
        if os.environ.get("PARAMS_OUT"):
            torch.save(model.state_dict(), os.environ["PARAMS_OUT"])
    sd.shutdown()
""")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _pids_gone(folder, timeout=5.0):
    """Every pid recorded in `folder` has exited."""
    pids = [int(open(os.path.join(folder, f)).read()) for f in os.listdir(folder) if f.startswith("pid")]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; it only waits for its parent
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_prefixed_output_and_env(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    res = run_command(LAUNCH + ["-np", "2", script, str(tmp_path), "ok"], timeout=60, env=ENV)
    assert res.returncode == 0, res.stderr
    assert "[0] hello from rank 0 of 2 local 0/2" in res.stdout
    assert "[1] hello from rank 1 of 2 local 1/2" in res.stdout
    # A '\r' is passed on, behind the rank's prefix: a progress bar redraws in place.
    assert re.search(r"\[0\] train: 0%\r\[0\] train: 50%\r\[0\] train: 100%\n", res.stderr), res.stderr
    assert "[1] train" not in res.stderr


def test_log_dir_and_threads_flag(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    logs = tmp_path / "logs"
    res = run_command(LAUNCH + ["-np", "2", "--log-dir", str(logs), "--omp-num-threads", "3", script, str(tmp_path),
                                "ok"], timeout=60, env=ENV)
    assert res.returncode == 0, res.stderr
    assert "hello" not in res.stdout
    assert (logs / "rank1.out").read_text().strip() == "hello from rank 1 of 2 local 1/2 threads 3"
    assert "train: 100%" in (logs / "rank0.err").read_text()


def test_failing_rank_stops_the_job(tmp_path):
    """Issue 2: rank 1 exits with status 3 -> non-zero within 10 s, naming rank 1, no process left."""
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    start = time.monotonic()
    res = run_command(LAUNCH + ["-np", "2", script, str(tmp_path), "exit3"], timeout=60, env=ENV)
    elapsed = time.monotonic() - start
    assert res.returncode == 3, res.stderr
    assert elapsed < 10, f"the launcher took {elapsed:.1f}s to stop the job"
    assert "rank 1 exited with status 3" in res.stderr
    assert _pids_gone(str(tmp_path)), "a rank outlived the launcher"


def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    env = {**os.environ, **ENV}
    proc = subprocess.Popen(LAUNCH + ["-np", "3", script, str(tmp_path), "sleep"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{r}").exists() for r in range(3)):
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the pid is written before its process's own start-up is over
        os.kill(int((tmp_path / "pid2").read_text()), signal.SIGKILL)
        start = time.monotonic()
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        kill_session(proc.pid)
    assert proc.returncode != 0
    assert elapsed < 10, f"the job took {elapsed:.1f}s to end"
    assert "rank 2 was killed by signal SIGKILL" in err, err
    assert _pids_gone(str(tmp_path))
    assert not session_alive(proc.pid)


def test_sigterm_to_launcher_stops_every_rank(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    proc = subprocess.Popen(LAUNCH + ["-np", "2", script, str(tmp_path), "sleep"], env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert _pids_gone(str(tmp_path))


@pytest.mark.parametrize("extra", [[], ["--strategy", "sandblaster", "--servers", "1"]], ids=["workers", "servers"])
def test_sigkill_to_launcher_takes_every_process_with_it(tmp_path, extra):
    """SIGKILL runs no cleanup in the launcher: its processes (servers too) must die with it all the same."""
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    server = _write(tmp_path, "server.py", "import os, sys, time\n"
                    "open(os.path.join(sys.argv[1], 'pid_s' + os.environ['ROLE_RANK']), 'w').write(str(os.getpid()))\n"
                    "time.sleep(300)\n")
    env = {**os.environ, **ENV, "SINGA_SERVER_COMMAND": f"{sys.executable} {server} {tmp_path}"}
    proc = subprocess.Popen(LAUNCH + ["-np", "2", *extra, script, str(tmp_path), "sleep"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=False)
    nprocs = 3 if extra else 2
    try:
        deadline = time.monotonic() + 60
        while sum(1 for f in tmp_path.glob("pid*") if f.read_text()) < nprocs:  # written, not only made
            assert time.monotonic() < deadline and proc.poll() is None, "processes did not start"
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _pids_gone(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pids_gone(str(tmp_path)), "a process outlived its launcher"
    finally:
        for pid_file in tmp_path.glob("pid*"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Accuracy and parameters of a 2-process training run that nothing interrupts."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    script = _write(folder, "train.py", TRAIN_SCRIPT)
    res = run_command(LAUNCH + ["-np", "2", script], timeout=120,
                      env={**ENV, "PARAMS_OUT": str(folder / "params.pt")})
    assert res.returncode == 0, res.stderr
    return float(re.search(r"\[0\] ACCURACY (\S+)", res.stdout).group(1)), torch.load(folder / "params.pt")


def test_restart_resumes_from_checkpoint(tmp_path, uninterrupted):
    script = _write(tmp_path, "train.py", TRAIN_SCRIPT)
    env = {**ENV, "CKPT": str(tmp_path / "ckpt.pt"), "CRASH_EPOCH": "1", "PARAMS_OUT": str(tmp_path / "p.pt")}
    res = run_command(LAUNCH + ["-np", "2", "--max-restarts", "1", script], timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 1 was killed by signal SIGKILL" in res.stderr and "restarting the job (1/1)" in res.stderr
    assert re.search(r"\[\d\] resumed from epoch [12]", res.stdout), res.stdout
    accuracy = float(re.search(r"\[0\] ACCURACY (\S+)", res.stdout).group(1))
    ref_accuracy, ref_params = uninterrupted
    assert ref_accuracy > 0.85
    assert abs(accuracy - ref_accuracy) <= 0.01
    # Resuming from the checkpoint replays the same steps: the parameters match the uninterrupted run.
    params = torch.load(tmp_path / "p.pt")
    for key in ref_params:
        torch.testing.assert_close(params[key], ref_params[key], rtol=1e-5, atol=1e-6)


def test_failure_after_the_last_restart(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    res = run_command(LAUNCH + ["-np", "2", "--max-restarts", "1", script, str(tmp_path), "kill9"], timeout=60,
                      env=ENV)
    assert res.returncode == 128 + signal.SIGKILL
    assert res.stdout.count("[1] hello from rank 1") == 2  # the job ran twice
    assert "rank 1 was killed by signal SIGKILL (9); restarting the job (1/1)" in res.stderr
    assert "job failed after 1 restart(s): rank 1 was killed by signal SIGKILL (9)" in res.stderr
    assert _pids_gone(str(tmp_path))


# A stand-in for `python -m singa_dist.ps` that says who it is, then serves as the real one does (a worker's
# sd.shutdown() joins the servers' RPC group to release them, so a server must serve): on a server process,
# sd.init() serves until the workers are done and then ends the process.
SERVER_SCRIPT = textwrap.dedent("""
    import os
    import singa_dist as sd
    from singa_dist.environment import job_topology
    proc, nprocs = int(os.environ["SINGA_PROC_RANK"]), int(os.environ["SINGA_PROC_WORLD_SIZE"])
    role = job_topology(nprocs).role_of(proc)
    print(f"server {role.index} of group {role.group}: process {proc} of {nprocs}", flush=True)
    sd.init()
    print("never here", flush=True)
""")

WORKER_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    import singa_dist as sd
    sd.init()
    t = torch.tensor([float(sd.rank())])
    dist.all_reduce(t, group=sd.workers_process_group())
    print(f"worker {sd.rank()} of {sd.size()} in group {sd.worker_group()}: sum {t.item():.0f}")
    sd.shutdown()
""")


def test_separate_servers_start_with_their_roles(tmp_path):
    worker = _write(tmp_path, "worker.py", WORKER_SCRIPT)
    server = _write(tmp_path, "server.py", SERVER_SCRIPT)
    env = {**ENV, "SINGA_SERVER_COMMAND": f"{sys.executable} {server}"}
    res = run_command(LAUNCH + ["-np", "2", "--strategy", "downpour", "--worker-groups", "2", worker],
                      timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[0] worker 0 of 2 in group 0: sum 1" in res.stdout
    assert "[1] worker 1 of 2 in group 1: sum 1" in res.stdout
    assert "[s0] server 0 of group 0: process 2 of 3" in res.stdout and "never here" not in res.stdout


def test_dry_run_prints_commands_and_environment(capsys, tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    assert launch_main(["-np", "4", "--strategy", "downpour", "--worker-groups", "2", "--servers", "2",
                        "--master-port", "29999", "--dry-run", script, "--lr", "0.1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "# node 0 of 1 (this host): 6 processes, master 127.0.0.1:29999"
    assert [line.split()[0] for line in lines[1:]] == ["[0]", "[1]", "[2]", "[3]", "[s0]", "[s1]"]
    assert lines[2].endswith(f"{sys.executable} {script} --lr 0.1")
    assert "RANK=1 " in lines[2] and "WORLD_SIZE=4 " in lines[2] and "SINGA_PROC_RANK=1 " in lines[2]
    assert "SINGA_STRATEGY=downpour" in lines[2] and '"nworker_groups": 2' in lines[2]
    # what horovodrun sets, on the workers
    assert "HOROVOD_RANK=1 " in lines[2] and "HOROVOD_SIZE=4 " in lines[2] and "HOROVOD_LOCAL_RANK=1 " in lines[2]
    assert "HOROVOD_LOCAL_SIZE=4 " in lines[2] and "HOROVOD_CROSS_SIZE=1 " in lines[2]
    assert " RANK=" not in lines[6] and "SINGA_PROC_RANK=5 " in lines[6] and "HOROVOD_RANK" not in lines[6]
    assert lines[6].endswith(f"{sys.executable} -m singa_dist.ps")
    assert not list(tmp_path.glob("pid*"))


SERVER_AFTER_A_WHILE = textwrap.dedent("""
    import sys, time
    import torch
    import singa_dist as sd
    sd.init()
    time.sleep(float(sys.argv[1]))  # longer than the servers' drain after their node's workers ended
    model = torch.nn.Linear(4, 2)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    print(f"rank {sd.rank()} stepped", flush=True)
    sd.shutdown()
""")


@pytest.mark.timeout(120)
def test_a_node_of_servers_alone_serves_until_the_workers_are_done(tmp_path):
    """The second host runs the server alone: it saw no worker of its own end, so it must not stop its server after
    the drain that follows its own workers' end (a replacement then found the server's door shut, and the job hung)."""
    script = _write(tmp_path, "late.py", SERVER_AFTER_A_WHILE)
    res = run_command(LAUNCH + ["--hosts", "localhost:2,127.0.0.1:1", "-np", "2", "--strategy", "sandblaster",
                                "--servers", "1", script, str(local.SERVER_DRAIN_S + 2)], timeout=100, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[0] rank 0 stepped" in res.stdout and "[1] rank 1 stepped" in res.stdout


def test_dry_run_over_ssh_prints_each_host(capsys, tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    assert launch_main(["--hosts", "localhost:1,node7:2", "--ssh-command", "ssh -F cfg", "--ssh-port", "2222",
                        "--dry-run", script]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# host localhost (node 0, 1 processes, local):"
    assert lines[1].startswith("  sh -c 'cd ")
    assert lines[3] == "# host node7 (node 1, 2 processes, ssh):"
    assert lines[4].startswith("  ssh -F cfg -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=10 "
                               "-p 2222 node7 'cd ")
    assert "--node-slots 1,2 --node-rank 1 --master-addr localhost --master-port 29500" in lines[4]
    assert lines[5].startswith("  [1] ") and "LOCAL_RANK=0 " in lines[5] and "RANK=1 " in lines[5]
    assert lines[6].startswith("  [2] ") and "GROUP_RANK=1 " in lines[6] and "WORLD_SIZE=3 " in lines[6]
    assert "GROUP_WORLD_SIZE=2 " in lines[5] and "GROUP_WORLD_SIZE=2 " in lines[6]


@pytest.mark.parametrize("args, reason", [
    (["-np", "0"], "-np must be at least 1"),
    (["-np", "5", "--hosts", "localhost:2,127.0.0.1:2"], "needs 5 processes but the hosts give only 4 slots"),
    (["-np", "5", "--strategy", "hybrid", "--worker-groups", "2"], "do not divide into 2 worker groups"),
    (["-np", "2", "--strategy", "hybrid"], "hybrid all-reduces inside worker groups of several workers"),
    (["-np", "2", "--strategy", "sandblaster", "--colocate-servers"], "needs separate parameter-server processes"),
    (["-np", "2", "--strategy", "parameter-soup"], "unknown strategy 'parameter-soup'"),
    (["-np", "2", "--hosts", "nohost.invalid:2"], "unreachable host(s): nohost.invalid"),
    (["-np", "2", "--no-such-flag"], "unrecognized arguments"),
    (["-np", "4", "--nnodes", "3", "--master-addr", "10.0.0.1"], "do not divide evenly over 3 nodes"),
    (["-np", "4", "--nnodes", "2"], "--nnodes > 1 needs --master-addr"),
    (["--hostfile", "/nonexistent/hosts"], "cannot read the hostfile /nonexistent/hosts"),
    (["-np", "2", "--hosts", "h1:0"], "slots of host 'h1' must be a positive integer, got 0"),
    (["-np", "2", "--hosts", "h1:2,:2"], "--hosts entry ':2' names no host"),
    (["-np", "2", "--nnodes", "0"], "--nnodes must be at least 1, got 0"),
    (["-np", "2", "--grace-period", "nan"], "--grace-period must be a number of seconds"),
    (["-np", "2", "--master-port", "70000"], "--master-port must be a port number between 1 and 65535"),
    (["-np", "2", "--network-interface", "no-such-if9"], "'no-such-if9' is not an interface of this host"),
    (["-np", "2", "--sync-freq", "0"], "--sync-freq must be at least 1"),
    (["-np", "2", "--node-rank", "-1"], "--node-rank must be 0 or more"),
    (["-np", "2", "--server-checkpoint-dir", "ck"], "--strategy allreduce has none"),
    (["-np", "2", "--strategy", "downpour", "--servers", "1", "--server-checkpoint-every", "5"],
     "--server-checkpoint-every needs --server-checkpoint-dir DIR"),
    (["-np", "2", "--strategy", "downpour", "--servers", "1", "--server-checkpoint-dir", "ck",
      "--server-checkpoint-every", "0"], "--server-checkpoint-every must be at least 1, got 0"),
])
def test_bad_input_exits_2_before_starting(args, reason, tmp_path, capsys):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    assert launch_main(args + [script, str(tmp_path), "ok"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("singa-launch: error: ") and reason in err, err
    assert err.count("\n") == 1
    assert not list(tmp_path.glob("pid*")), "a process started"


def test_bad_files_and_ports_exit_2_before_starting(tmp_path, capsys):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    (tmp_path / "a_file").write_text("")
    bad_shebang = tmp_path / "tool"
    bad_shebang.write_text("#!/no/such/interpreter\nprint(1)\n")
    bad_shebang.chmod(0o755)
    import socket
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, reason in [
            (["--log-dir", str(tmp_path / "a_file"), script], "is a file, not a directory"),
            ([str(bad_shebang)], "runs with /no/such/interpreter (its #! line), which does not exist"),
            ([sys.executable, str(tmp_path / "absent.py")], "the script"),
            (["--master-port", str(port), script], f"--master-port {port} is in use on this host"),
        ]:
            assert launch_main(["-np", "2", *args]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith("singa-launch: error: ") and reason in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("pid*"))


def test_missing_program_exits_2(tmp_path):
    res = run_command(LAUNCH + ["-np", "2", str(tmp_path / "absent.py")], timeout=60, env=ENV)
    assert res.returncode == 2
    assert res.stderr == f"singa-launch: error: the program {tmp_path / 'absent.py'} does not exist\n"
    res = run_command(LAUNCH + ["-np", "2", "no-such-program-xyz"], timeout=60, env=ENV)
    assert res.returncode == 2 and "'no-such-program-xyz' is not on PATH" in res.stderr


def test_output_pump_splits_lines_at_carriage_returns(tmp_path):
    import io

    from launchers.local import OutputPump
    path = tmp_path / "rank0.err"
    path.write_bytes("a\r\nbar 1%\rbar 99%\rdone\n\nlast é".encode())
    out = io.StringIO()
    pump = OutputPump()
    pump.add("0", str(path), out)
    pump.stop()
    assert out.getvalue() == "[0] a\n[0] bar 1%\r[0] bar 99%\r[0] done\n[0] \n[0] last é\n"


def test_threads_shared_out_among_processes(monkeypatch, tmp_path):
    from launchers import config
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(config, "_cores", lambda: 8)
    threads = lambda *a: config.parse_args([*a, script]).common_env().get("OMP_NUM_THREADS")  # noqa: E731
    assert threads("-np", "1") is None  # one process keeps torch's default
    assert threads("-np", "2") == "4"
    assert threads("-np", "8") == "1" and threads("-np", "12") == "1"  # as many processes as cores, or more
    assert threads("-np", "12", "--omp-num-threads", "2") == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads("-np", "12") is None  # the user's own setting is inherited as it is


def test_horovodrun_and_torchrun_spellings(tmp_path, capsys):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    assert launch_main(["-H", "localhost:2", "--gloo", "--dry-run", script]) == 0
    assert "# host localhost (node 0, 2 processes, local):" in capsys.readouterr().out
    assert launch_main(["--standalone", "--nproc-per-node", "2", "--dry-run", script]) == 0
    assert "2 processes" in capsys.readouterr().out
    assert launch_main(["-np", "2", "--dry-run", "-m", "launchers.tag_output", "--workers"]) == 0
    assert f"{sys.executable} -m launchers.tag_output --workers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        launch_main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("singa-launch ")


def test_torchrun_flags(tmp_path, capsys):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)

    def plan(*args):
        assert launch_main([*args, "--dry-run", script]) == 0
        return capsys.readouterr().out
    out = plan("--nnodes=1:1", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
               "--rdzv-id", "job9", "--max_restarts=0", "--monitor-interval", "1", "--start-method", "spawn",
               "--role", "trainer", "-r", "3", "--run-path")
    assert "2 processes" in out and "TORCHELASTIC_RUN_ID=job9" in out, out
    out = plan("--nproc-per-node", "cpu")
    assert f"{os.cpu_count()} processes" in out, out
    out = plan("--nnodes", "2", "--node_rank", "1", "--rdzv-endpoint", "10.0.0.1:29555", "--nproc-per-node", "1")
    assert "# node 1 of 2 (this host): 1 processes, master 10.0.0.1:29555" in out, out
    out = plan("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1", "--nproc-per-node", "1")
    assert "rank comes from the c10d rendezvous at 10.0.0.1:29400" in out, out
    assert launch_main(["--no-python", "-np", "1", "--dry-run", script]) == 2  # not executable: not run as a program
    assert "does not exist or is not executable" in capsys.readouterr().err
    os.chmod(script, 0o755)
    out = plan("--no-python", "--nproc-per-node", "1")
    assert f"{script}" in out and f"{sys.executable} {script}" not in out, out
    for args, reason in [
        (["--rdzv-backend", "etcd"], "etcd is not available"),
        (["--rdzv-endpoint", "h:1", "--master-addr", "g"], "name different places for node 0"),
        (["--rdzv-endpoint", "h:port"], "--rdzv-endpoint wants HOST[:PORT]"),
        (["--rdzv-conf", "bogus=1"], "unknown key(s) bogus"),
        (["--local-ranks-filter", "x"], "--local-ranks-filter wants local ranks"),
        (["--nproc-per-node", "many"], "want a number of processes, auto, cpu or gpu"),
    ]:
        assert launch_main(["-np", "1", *args, script]) == 2, args
        assert reason in capsys.readouterr().err, args


def test_c10d_rendezvous_numbers_the_nodes(tmp_path):
    # Two launchers as torchrun is started on two nodes (here both on this host): no --node-rank, the launcher that
    # hosts the rendezvous at the endpoint is node 0, the other gets rank 1; --local-ranks-filter 1 shows only
    # local rank 1's output on its console.
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "j1"]
    env = {**os.environ, **ENV}
    first = subprocess.Popen(LAUNCH + common + [script, str(tmp_path), "ok"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(0.5)
        second = run_command(LAUNCH + common + ["--local-ranks-filter", "1", script, str(tmp_path), "ok"],
                             timeout=60, env=ENV)
        out, err = first.communicate(timeout=60)
    finally:
        kill_session(first.pid)
    assert first.returncode == 0 and second.returncode == 0, out + err + second.stdout + second.stderr
    assert "node 0 of 2 (c10d rendezvous" in err and "node 1 of 2 (c10d rendezvous" in second.stderr
    assert "[0] hello from rank 0 of 4 local 0/2" in out and "[1] hello from rank 1 of 4 local 1/2" in out, out
    assert "[3] hello from rank 3 of 4 local 1/2" in second.stdout and "rank 2" not in second.stdout, second.stdout


@pytest.mark.parametrize("args, reason", [
    (["-np", "2", "--mpi", "--gloo"], "give one of them"),
    (["-np", "2", "--standalone", "--nnodes", "2", "--master-addr", "h"], "--standalone runs one node"),
    (["-np", "2", "--tee", "3"], "--tee copies the --log-dir files"),
    (["-np", "2", "-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
])
def test_spellings_refuse_what_they_cannot_mean(args, reason, tmp_path, capsys):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    assert launch_main(args + ([] if "-m" in args else [script])) == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1, err


def test_tee_shows_the_log_files_on_the_console(tmp_path):
    script = _write(tmp_path, "rank.py", RANK_SCRIPT)
    logs = tmp_path / "logs"
    res = run_command(LAUNCH + ["-np", "2", "--log-dir", str(logs), "--tee", "1", script, str(tmp_path), "ok"],
                      timeout=60, env=ENV)
    assert res.returncode == 0, res.stderr
    assert "[0] hello from rank 0 of 2" in res.stdout and "train" not in res.stderr  # stdout only
    assert "hello from rank 0" in (logs / "rank0.out").read_text()
