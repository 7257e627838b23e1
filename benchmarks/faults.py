"""Fault injection: bad launcher input, faults while a job runs (under every strategy), damaged checkpoints and
API misuse. Every fault must end quickly, with a message that names the cause, and leave no process behind.

    python -m benchmarks.faults [--quick] [--only TEXT] [--group NAME]

Each case runs in a folder of its own under an outer timeout, with SINGA_FAULT_CASE=<case> in the environment of
everything it starts: after the case, the processes still carrying that mark are counted (and then killed).
Prints `case | expected | got | seconds | leftover | verdict` and `faults: P of N held`, and appends the rows
to benchmarks/results/faults.csv. `--quick` runs the cases marked quick (what tests/test_faults.py runs).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LAUNCH = [PY, "-m", "launchers.launch"]


@dataclass
class Case:
    group: str
    name: str
    expected: str
    check: Callable[["Bench"], tuple[bool, str]]  # -> (held, what was seen); held None: cannot run here
    quick: bool = False
    timeout: float = 120.0


@dataclass
class Result:
    code: int | None  # None: killed at the outer timeout
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def last(self, n: int = 1) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()] or [""]
        return " | ".join(lines[-n:])


class Bench:
    """One case's folder, mark and helpers."""

    def __init__(self, folder: Path, mark: str, timeout: float):
        self.folder, self.mark, self.timeout = folder, mark, timeout
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SINGA_FAULT_CASE": mark,
                    "SINGA_TIMEOUT": "5"}

    def file(self, name: str, text: str) -> str:
        path = self.folder / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    def run(self, argv: list[str], env: dict | None = None, timeout: float | None = None) -> Result:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=str(ROOT), env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout or self.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            code = None
        return Result(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                      time.monotonic() - start)

    def launch(self, args: list[str], body: str, env: dict | None = None, timeout: float | None = None) -> Result:
        return self.run(LAUNCH + args + [self.file("train.py", PRELUDE + textwrap.dedent(body))], env, timeout)

    def started(self) -> int:
        return len(list(self.folder.glob("started.*")))


# Every job script starts by leaving a mark, so that a case can tell whether anything started.
PRELUDE = """\
import os, sys, time
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"started.{os.getpid()}"), "w").close()
"""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def marked(mark: str) -> list[int]:
    """Live processes (zombies excluded) whose environment carries SINGA_FAULT_CASE=mark."""
    needle = f"SINGA_FAULT_CASE={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


# --------------------------------------------------------------------------------------------------------------
# Launcher input: exit status 2, one line naming the problem, nothing started

def bad_input(args: list[str], needle: str, script: bool = True) -> Callable[[Bench], tuple[bool, str]]:
    def check(b: Bench):
        argv = LAUNCH + args + ([b.file("train.py", PRELUDE)] if script else [])
        r = b.run(argv, timeout=60)
        lines = [line for line in r.err.splitlines() if line.strip()]
        held = r.code == 2 and len(lines) == 1 and needle in lines[0] and b.started() == 0
        return held, f"exit {r.code}: {r.last()}"
    return check


def _busy_port_case(b: Bench):
    import socket
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        return bad_input(["-np", "2", "--master-port", str(port)], "is in use on this host")(b)


def _shebang_case(b: Bench):
    tool = b.file("tool", "#!/no/such/interpreter\nprint(1)\n")
    os.chmod(tool, 0o755)
    return bad_input(["-np", "2", tool], "which does not exist", script=False)(b)


def _log_dir_file_case(b: Bench):
    target = b.file("a_file", "")
    return bad_input(["-np", "2", "--log-dir", target], "is a file, not a directory")(b)


LAUNCHER_CASES = [
    ("-np 0", ["-np", "0"], "-np must be at least 1"),
    ("-np -3", ["-np", "-3"], "-np must be at least 1"),
    ("unknown strategy", ["-np", "2", "--strategy", "ring"], "unknown strategy 'ring'"),
    ("hybrid with one worker per group", ["-np", "2", "--strategy", "hybrid"], "hybrid all-reduces inside"),
    ("sandblaster with co-located servers", ["-np", "2", "--strategy", "sandblaster", "--colocate-servers"],
     "needs separate parameter-server processes"),
    ("allreduce with separate servers", ["-np", "2", "--separate-servers"], "allreduce has no server processes"),
    ("workers not dividing into groups", ["-np", "5", "--strategy", "downpour", "--worker-groups", "2"],
     "do not divide into 2 worker groups"),
    ("--nnodes 0", ["-np", "2", "--nnodes", "0"], "--nnodes must be at least 1"),
    ("--nnodes 2 without --master-addr", ["-np", "2", "--nnodes", "2"], "--nnodes > 1 needs --master-addr"),
    ("--master-port out of range", ["-np", "2", "--master-port", "70000"], "between 1 and 65535"),
    ("--network-interface that does not exist", ["-np", "2", "--network-interface", "nope9"],
     "is not an interface of this host"),
    ("empty host name", ["-H", "h1:2,:2"], "names no host"),
    ("zero slots", ["--hosts", "h1:0"], "must be a positive integer"),
    ("missing hostfile", ["--hostfile", "/no/such/hostfile"], "cannot read the hostfile"),
    ("--grace-period nan", ["-np", "2", "--grace-period", "nan"], "--grace-period must be a number"),
    ("--grace-period -1", ["-np", "2", "--grace-period", "-1"], "--grace-period must be a number"),
    ("--max-restarts -1", ["-np", "2", "--max-restarts", "-1"], "--max-restarts must be at least 0"),
    ("--omp-num-threads 0", ["-np", "2", "--omp-num-threads", "0"], "--omp-num-threads must be at least 1"),
    ("--sync-freq 0", ["-np", "2", "--strategy", "hogwild", "--sync-freq", "0"], "--sync-freq must be at least 1"),
    ("--node-rank outside the nodes", ["-np", "2", "--nnodes", "2", "--master-addr", "h", "--node-rank", "5"],
     "--node-rank 5 is outside"),
    ("--tee without --log-dir", ["-np", "2", "--tee", "3"], "--tee copies the --log-dir files"),
    ("--mpi with --gloo", ["-np", "2", "--mpi", "--gloo"], "give one of them"),
    ("--mpi with --max-restarts", ["-np", "2", "--mpi", "--max-restarts", "1"], "--mpi: mpirun starts and stops"),
    ("--standalone with --nnodes", ["-np", "2", "--standalone", "--nnodes", "2", "--master-addr", "h"],
     "--standalone runs one node"),
    ("-x of an unset variable", ["-np", "2", "-x", "NO_SUCH_VARIABLE_XYZ"], "is not set in this environment"),
    ("unknown flag", ["-np", "2", "--no-such-flag"], "unrecognized arguments"),
]


def launcher_cases() -> list[Case]:
    # Flags alone (the test suite checks each of these in tests/test_launch.py), then what needs files or ports.
    cases = [Case("launcher input", name, f"exit 2: {needle}", bad_input(args, needle), timeout=60)
             for name, args, needle in LAUNCHER_CASES]
    cases += [
        Case("launcher input", "missing script", "exit 2: does not exist",
             bad_input(["-np", "2", "/no/such/train.py"], "does not exist", script=False), quick=True),
        Case("launcher input", "python with a missing script", "exit 2: the script ... does not exist",
             bad_input(["-np", "2", PY, "/no/such/train.py"], "does not exist", script=False), quick=True),
        Case("launcher input", "missing program", "exit 2: not on PATH",
             bad_input(["-np", "2", "no-such-program-xyz"], "is not on PATH", script=False), quick=True),
        Case("launcher input", "-m with a missing module", "exit 2: no module named",
             bad_input(["-np", "2", "-m", "no_such_module_xyz"], "no module named", script=False), quick=True),
        Case("launcher input", "no program", "exit 2: no program given",
             bad_input(["-np", "2"], "no program given", script=False), quick=True),
        Case("launcher input", "--master-port in use", "exit 2: is in use on this host", _busy_port_case, quick=True),
        Case("launcher input", "#! interpreter missing", "exit 2: its #! interpreter does not exist", _shebang_case,
             quick=True),
        Case("launcher input", "--log-dir is a file", "exit 2: is a file", _log_dir_file_case, quick=True),
    ]
    return cases


# --------------------------------------------------------------------------------------------------------------
# Faults while a job runs

INIT = """
import torch, torch.nn as nn
import singa_dist as sd
torch.set_num_threads(1)
sd.init()
model = nn.Linear(4, 2)
opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
def step():
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
"""


def job_case(args: list[str], body: str, codes: tuple, needles: list[str], env: dict | None = None,
             within: float = 60.0) -> Callable[[Bench], tuple[bool, str]]:
    """Launch `body`; it held when the exit status is one of `codes`, every needle is in the output, and it
    ended within `within` seconds."""
    def check(b: Bench):
        r = b.launch(args, body, env=env, timeout=within + 30)
        missing = [n for n in needles if n not in r.text]
        held = r.code in codes and not missing and r.seconds <= within
        got = f"exit {r.code} in {r.seconds:.0f}s: " + (f"missing {missing!r}; " if missing else "") + r.last()
        return held, got
    return check


SSH_STAND_IN = """#!/bin/sh
# ssh [-o option]... [-p port] [-i identity] host command: runs the command on this machine as sshd would, in a
# session of its own that outlives this client; the command learns that the client is gone when its stdin closes.
while [ $# -gt 0 ]; do
    case "$1" in -o|-p|-i|-l) shift 2 ;; -*) shift ;; *) break ;; esac
done
shift
exec setsid -w sh -c "$*"
"""


def _sigkill_launcher(b: Bench, args: list[str], workers: int = 2, others: list[list[str]] = (), env: dict = None,
                      settle: float = 10.0) -> tuple[bool, str]:
    """Start the job (and `others`, more launchers of it), SIGKILL the first launcher once every worker has
    started and taken a step, and count what is left `settle` seconds later."""
    body = INIT + "step()\nopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), f'stepped.{os.getpid()}'), " \
                  "'w').close()\ntime.sleep(300)\n"
    script = b.file("train.py", PRELUDE + body)
    env = {**b.env, **(env or {})}
    proc = subprocess.Popen(LAUNCH + args + [script], cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rest = [subprocess.Popen(LAUNCH + a + [script], cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True) for a in others]
    deadline = time.monotonic() + 60
    while len(list(b.folder.glob("stepped.*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    stepped = len(list(b.folder.glob("stepped.*")))
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while marked(b.mark) and time.monotonic() < killed + settle:
        time.sleep(0.2)
    gone_after = time.monotonic() - killed
    left = marked(b.mark)
    said = ""
    for other in rest:
        try:
            _, err = other.communicate(timeout=5)
            lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.startswith("singa-launch")]
            said += f"; the other launcher exited {other.returncode}" + (f": {lines[-1][:80]}" if lines else "")
        except subprocess.TimeoutExpired:
            _kill_group(other.pid)
            said += "; the other launcher was still running"
    held = not left and stepped == workers
    after = f"{len(left)} process(es) left {settle:g} s after SIGKILL" if left else \
        f"every process gone {gone_after:.1f} s after SIGKILL"
    return held, f"{stepped} of {workers} workers stepped; {after}{said}"


def _sigkill_nodes(killed: int) -> Callable[[Bench], tuple[bool, str]]:
    """--nnodes 2 on this host: SIGKILL node `killed`'s launcher; the other node's launcher learns it (the
    store node 0's launcher hosts goes away, or node 1's heartbeat stops) and stops its processes."""
    def check(b: Bench):
        from singa_dist.environment import free_port
        port = str(free_port("127.0.0.1"))
        common = ["-np", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
        return _sigkill_launcher(b, common + ["--node-rank", str(killed)],
                                 others=[common + ["--node-rank", str(1 - killed)]], settle=40)
    return check


def _sigkill_ssh(b: Bench) -> tuple[bool, str]:
    """--hosts with a second host reached over ssh (a stand-in that runs it here, as sshd would)."""
    import shutil
    folder = b.folder / "bin"
    folder.mkdir()
    (folder / "ssh").write_text(SSH_STAND_IN)
    (folder / "ssh").chmod(0o755)
    if shutil.which("setsid") is None:
        return None, "needs setsid"
    return _sigkill_launcher(b, ["-np", "2", "--hosts", "localhost:1,otherhost:1"], settle=40,
                             env={"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"})


def _needs_mpirun(check: Callable[[Bench], tuple[bool, str]]) -> Callable[[Bench], tuple[bool, str]]:
    """`check`, skipped where no mpirun is installed (the mpi extra puts one beside Python)."""
    def run(b: Bench):
        from launchers.config import UsageError
        from launchers.mpi import find_mpirun
        try:
            find_mpirun()
        except UsageError:
            return None, "no mpirun on this machine"
        return check(b)
    return run


_sigkill_mpi = _needs_mpirun(lambda b: _sigkill_launcher(b, ["-np", "2", "--mpi"]))


def _mpi_job(body: str, codes: tuple, needles: list[str]) -> Callable[[Bench], tuple[bool, str]]:
    return _needs_mpirun(job_case(["-np", "2", "--mpi"], body, codes, needles))


def _sigterm_launcher(b: Bench) -> tuple[bool, str]:
    body = INIT + "step()\ntime.sleep(300)\n"
    proc = subprocess.Popen(LAUNCH + ["-np", "2", b.file("train.py", PRELUDE + body)], cwd=str(ROOT), env=b.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while b.started() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False, "the launcher did not stop within 30 s of SIGTERM"
    held = proc.returncode == 128 + signal.SIGTERM and "stopped by signal SIGTERM" in err.decode()
    return held, f"exit {proc.returncode}: {err.decode().strip().splitlines()[-1] if err.strip() else ''}"


def _run_module(b: Bench, body: str, needles: list[str], within: float = 60.0) -> tuple[bool, str]:
    """Run a Python module whose main() uses sd.run; held when it exits 0 and prints every needle."""
    path = b.file("job.py", body)
    r = b.run([PY, path], timeout=within + 30)
    missing = [n for n in needles if n not in r.text]
    return r.code == 0 and not missing and r.seconds <= within, \
        f"exit {r.code} in {r.seconds:.0f}s: " + (f"missing {missing!r}; " if missing else "") + r.last(2)


def runtime_cases() -> list[Case]:
    ps = ["-np", "2", "--strategy", "sandblaster", "--servers", "1"]
    down = ["-np", "2", "--strategy", "downpour", "--worker-groups", "2", "--servers", "1"]
    hog = ["-np", "2", "--strategy", "hogwild", "--sync-freq", "1"]
    exit3 = INIT + "step()\nif sd.rank() == 1:\n    sys.exit(3)\nfor _ in range(100):\n    step()\n"
    kill9 = INIT + "step()\nif sd.rank() == 1:\n    os.kill(os.getpid(), 9)\nfor _ in range(100):\n    step()\n"
    hang = INIT + "step()\nif sd.rank() == 1:\n    time.sleep(300)\nfor _ in range(100):\n    step()\n"
    cases = []
    lost = "worker group 1 (rank 1) lost: rank 1 "
    for label, args in (("allreduce", ["-np", "2"]), ("sandblaster", ps), ("downpour", down), ("hogwild", hog)):
        # Downpour and Hogwild drop the lost group; the other group finishes and the job ends well.
        asynchronous = label in ("downpour", "hogwild")
        cases += [
            # Under Sandblaster the other worker's push cannot complete without rank 1's: the server says why.
            Case("runtime", f"{label}: a rank exits 3",
                 "rank 0 fails: process 1 left after 1 step" if label == "sandblaster" else
                 "exit 0, group 1 named lost" if asynchronous else "exit 3, rank 1 named",
                 job_case(args, exit3, (1, 3), ["worker process 1 of worker group 0 left the parameter server after "
                                                "1 optimizer step(s)", "rank 0 exited with status 1"])
                 if label == "sandblaster" else job_case(args, exit3, (0,), [lost + "exited with status 3"])
                 if asynchronous else job_case(args, exit3, (3,), ["rank 1 exited with status 3"]),
                 quick=label == "allreduce"),
            Case("runtime", f"{label}: a rank is killed",
                 "exit 0, group 1 named lost" if asynchronous else "exit 137, rank 1 named",
                 job_case(args, kill9, (0,), [lost + "was killed by signal SIGKILL"]) if asynchronous else
                 job_case(args, kill9, (137,), ["rank 1 was killed by signal SIGKILL"])),
            Case("runtime", f"{label}: a rank hangs", "stops within the timeout, rank 1 named",
                 job_case(args, hang, (1,), ["rank 1"], within=45)),
        ]
    cases += [
        Case("runtime", "a rank never reaches init()", "rank 1 named as never reaching init()",
             job_case(["-np", "2"], "import singa_dist as sd\nif os.environ['RANK'] == '1':\n    time.sleep(300)\n"
                      "sd.init()\n", (1,), ["process 1 never reached singa_dist.init()", "(rank 1)"], within=45),
             quick=True),
        Case("runtime", "ranks run different numbers of steps", "the runtime says the steps differ",
             job_case(["-np", "2"], INIT + "for _ in range(3 if sd.rank() == 0 else 1):\n    step()\nsd.shutdown()\n",
                      (1,), ["the ranks ran different numbers of steps"], within=45), quick=True),
        Case("runtime", "a parameter server is killed", "the workers name the dead server",
             job_case(ps, INIT + "step()\nif sd.rank() == 0:\n    import signal, subprocess\n"
                      "    subprocess.run(['pkill', '-9', '-f', 'singa_dist.ps'])\nfor _ in range(200):\n"
                      "    step()\n", (1, 137, -9), ["parameter server 0.0"], within=45)),
        Case("runtime", "mismatched allreduce shapes", "HorovodInternalError on every rank, job exit 1",
             job_case(["-np", "2"], "import torch, singa_dist as sd\nsd.init()\n"
                      "sd.allreduce(torch.ones(10 if sd.rank() else 20), name='x')\n", (1,),
                      ["[0]", "[1]", "Mismatched tensor shapes"], within=45), quick=True),
        Case("runtime", "workers with different models", "an error naming the parameter on every rank",
             job_case(["-np", "2"], "import torch, singa_dist as sd\nsd.init()\n"
                      "m = torch.nn.Linear(4, 2 + sd.rank())\n"
                      "sd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters())\n",
                      (1,), ["the workers' models differ", "'weight'"], within=45)),
        Case("runtime", "script raises on one rank", "exit 1, rank 1 named, the others stopped",
             job_case(["-np", "2"], INIT + "step()\nif sd.rank() == 1:\n    raise ValueError('boom')\n"
                      "for _ in range(100):\n    step()\n", (1,), ["rank 1 exited with status 1", "boom"])),
        Case("runtime", "a restart resumes the job", "--max-restarts 1 ends well after one crash",
             job_case(["-np", "2", "--max-restarts", "1"], INIT + "step()\n"
                      "if sd.rank() == 1 and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n    sys.exit(5)\n"
                      "step()\nsd.shutdown()\n", (0,), ["restarting the job (1/1)"])),
        Case("runtime", "forgotten sd.init()", "NotInitializedError naming sd.init()",
             job_case(["-np", "2"], "import torch, singa_dist as sd\nm = torch.nn.Linear(2, 2)\n"
                      "sd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))\n", (1,),
                      ["NotInitializedError", "call singa_dist.init() before DistributedOptimizer()"]), quick=True),
        Case("runtime", "the launcher is killed (workers)", "no process left", lambda b: _sigkill_launcher(b, ["-np", "2"]),
             quick=True),
        Case("runtime", "the launcher is killed (servers)", "no process left", lambda b: _sigkill_launcher(b, ps)),
        Case("runtime", "the launcher is killed (--mpi)", "no process left", _sigkill_mpi),
        Case("runtime", "--mpi: a rank exits 3", "exit 3, the step difference said", _mpi_job(
            exit3, (3,), ["the ranks ran different numbers of steps", "Exit code:    3"])),
        Case("runtime", "--mpi: a rank is killed", "non-zero exit, no process left", _mpi_job(
            kill9, (137, 9, 1), ["signal 9"])),
        Case("runtime", "node 0's launcher is killed (--nnodes 2)", "no process left on either node",
             _sigkill_nodes(0)),
        Case("runtime", "node 1's launcher is killed (--nnodes 2)", "no process left on either node",
             _sigkill_nodes(1)),
        Case("runtime", "the launcher is killed (--hosts, ssh)", "no process left on either host", _sigkill_ssh),
        Case("runtime", "the launcher is stopped (SIGTERM)", "exit 143, every process stopped", _sigterm_launcher),
        Case("runtime", "sd.run: a rank raises", "RunError naming rank 1 and its traceback",
             lambda b: _run_module(b, """
                import singa_dist as sd
                def fn():
                    if sd.rank() == 1:
                        raise KeyError("lost")
                    sd.barrier()
                if __name__ == "__main__":
                    try:
                        sd.run(fn, np=2, timeout=60)
                    except sd.RunError as exc:
                        print("RunError", exc.failures.keys(), "lost" in str(exc))
                """, ["RunError dict_keys([1", "True"])),
        Case("runtime", "sd.run: a rank hangs", "RunError naming the missing rank at the timeout",
             lambda b: _run_module(b, """
                import time, singa_dist as sd
                def fn():
                    if sd.rank() == 1:
                        time.sleep(300)
                if __name__ == "__main__":
                    try:
                        sd.run(fn, np=2, timeout=8)
                    except sd.RunError as exc:
                        print("RunError missing", exc.missing)
                """, ["RunError missing [1]"], within=40)),
    ]
    return cases


# --------------------------------------------------------------------------------------------------------------
# Checkpoints

def _checkpoint_case(make: Callable[[Path, Path], None], error: str = "CheckpointError", needle: str = ""):
    def check(b: Bench):
        import torch
        import singa_dist as sd
        good = b.folder / "good.pt"
        sd.save_checkpoint(good, {"w": torch.arange(6.0), "step": 3})
        target = b.folder / "ckpt.pt"
        make(good, target)
        try:
            sd.load_checkpoint(target)
        except Exception as exc:
            held = type(exc).__name__ == error and needle in str(exc) and "ckpt.pt" in str(exc)
            return held, f"{type(exc).__name__}: {str(exc)[:100]}"
        return False, "loaded"
    return check


def _write(data: bytes):
    return lambda good, target: target.write_bytes(data)


def _flip(good: Path, target: Path) -> None:
    data = bytearray(good.read_bytes())
    start = data.index(b"data/0") + 80  # inside the first tensor's record
    data[start] ^= 0x40
    target.write_bytes(bytes(data))


def _legacy_truncated(good: Path, target: Path) -> None:
    import io
    import torch
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf, _use_new_zipfile_serialization=False)
    target.write_bytes(buf.getvalue()[:60])


def _killed_save(b: Bench) -> tuple[bool, str]:
    import singa_dist as sd
    path = b.folder / "ckpt.pt"
    code = ("import os, torch, singa_dist.checkpoint as c\n"
            "orig = torch.save\n"
            "def slow(obj, f):\n    f.write(b'partial'); f.flush(); os._exit(9)\n"
            f"torch.save = slow\nc.save_checkpoint({str(path)!r}, {{'step': 2}})\n")
    sd.save_checkpoint(path, {"step": 1})
    b.run([PY, "-c", code], timeout=60)
    stale = [p.name for p in b.folder.iterdir() if p.name.endswith(".tmp")]
    step = sd.load_checkpoint(path)["step"]
    left = [p.name for p in b.folder.iterdir() if p.name.endswith(".tmp")]
    held = bool(stale) and not left and step == 1
    return held, f"temporary files after the kill {stale}, after the next load {left}; step {step}"


def checkpoint_cases() -> list[Case]:
    return [
        Case("checkpoint", "empty file", "CheckpointError: empty", _checkpoint_case(_write(b""), needle="empty"),
             quick=True),
        Case("checkpoint", "random bytes", "CheckpointError", _checkpoint_case(_write(os.urandom(4000))), quick=True),
        Case("checkpoint", "truncated zip", "CheckpointError",
             _checkpoint_case(lambda g, t: t.write_bytes(g.read_bytes()[:len(g.read_bytes()) // 2])), quick=True),
        Case("checkpoint", "truncated legacy file", "CheckpointError", _checkpoint_case(_legacy_truncated),
             quick=True),
        Case("checkpoint", "a flipped bit in a tensor", "CheckpointError: checksum",
             _checkpoint_case(_flip, needle="checksum"), quick=True),
        Case("checkpoint", "a directory", "CheckpointError: is a directory",
             _checkpoint_case(lambda g, t: t.mkdir(), needle="directory"), quick=True),
        Case("checkpoint", "text, not a checkpoint", "CheckpointError",
             _checkpoint_case(_write(b"hello, I am not a checkpoint\n" * 20)), quick=True),
        Case("checkpoint", "unsafe objects", "CheckpointError: weights_only",
             _checkpoint_case(lambda g, t: __import__("torch").save({"f": Bench}, t), needle="weights_only"),
             quick=True),
        Case("checkpoint", "a zip that is not torch's", "CheckpointError",
             _checkpoint_case(_zip_of_text), quick=True),
        Case("checkpoint", "missing file", "FileNotFoundError",
             _checkpoint_case(lambda g, t: None, error="FileNotFoundError"), quick=True),
        Case("checkpoint", "a save killed part-way", "its temporary file removed, the old checkpoint intact",
             _killed_save, quick=True),
    ]


def _zip_of_text(good: Path, target: Path) -> None:
    import zipfile
    with zipfile.ZipFile(target, "w") as z:
        z.writestr("notes.txt", "not a model")


# --------------------------------------------------------------------------------------------------------------
# API misuse, on two ranks (sd.run) or in one process

MISUSE = """
import torch, torch.nn as nn, warnings
import singa_dist as sd, singa_dist.horovod as hvd

def attempt(fn):
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)
    return "no error"

def misuse():
    m = nn.Linear(3, 2)
    out = {}
    opt = sd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters())
    out["wrapped twice"] = attempt(lambda: sd.DistributedOptimizer(opt))
    m(torch.ones(1, 3)).sum().backward()
    out["two backward passes"] = attempt(lambda: m(torch.ones(1, 3)).sum().backward())
    opt.step()
    # backward() finishes a step's reduction (as DDP's); between the passes a step accumulates, zero_grad() would
    # race with nothing but would drop the passes done: Horovod's error.
    acc = sd.DistributedOptimizer(torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1), backward_passes_per_step=2)
    sum(p.sum() for g in acc.param_groups for p in g["params"]).backward()
    out["zero_grad before step"] = attempt(acc.zero_grad)
    out["fractional passes"] = attempt(lambda: sd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), backward_passes_per_step=1.5))
    out["duplicate name in flight"] = attempt(lambda: [sd.allreduce_async(torch.ones(1), name="d") for _ in range(2)])
    sd.synchronize(sd.allreduce_async(torch.ones(1), name="after"))
    out["root outside the job"] = attempt(lambda: sd.broadcast(torch.ones(1), root_rank=7))
    out["bad alltoall splits"] = attempt(lambda: sd.alltoall(torch.ones(3), splits=[2, 2]))
    out["averaging bools"] = attempt(lambda: sd.allreduce(torch.ones(2, dtype=torch.bool)))
    out["reducescatter with Max"] = attempt(lambda: sd.reducescatter(torch.ones(4), op=sd.Max))
    ps = hvd.add_process_set([0])
    out["outside a process set"] = attempt(lambda: sd.allreduce(torch.ones(1), process_set=ps)) \\
        if sd.rank() == 1 else "ValueError: skipped on the member"
    hvd.remove_process_set(ps)
    out["duplicate parameter names"] = attempt(lambda: sd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), [("w", p) for p in nn.Linear(2, 2).parameters()]))
    out["optimizer with an unknown strategy"] = attempt(lambda: sd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), strategy="ring"))
    out["bad compression"] = attempt(lambda: sd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), compression=object()))
    out["mismatched broadcast roots"] = attempt(lambda: sd.broadcast(torch.ones(1), root_rank=sd.rank(), name="r"))
    out["after the errors"] = attempt(lambda: sd.barrier())
    return out

if __name__ == "__main__":
    results = sd.run(misuse, np=2, timeout=90)
    for key in results[0]:
        print("CASE", key, "|", results[0][key][:160].replace("\\n", " "), "|", results[1][key][:160].replace("\\n", " "))
"""

MISUSE_EXPECTED = {
    "wrapped twice": "ValueError", "two backward passes": "AssertionError", "zero_grad before step": "AssertionError",
    "fractional passes": "ValueError", "duplicate name in flight": "ValueError", "root outside the job": "ValueError",
    "bad alltoall splits": "ValueError", "averaging bools": "ValueError", "reducescatter with Max": "CollectiveError",
    "outside a process set": "ValueError", "duplicate parameter names": "ValueError",
    "optimizer with an unknown strategy": "ValueError",
    "bad compression": "TypeError", "mismatched broadcast roots": "CollectiveMismatchError",
    "after the errors": "no error",
}
_misuse_results: dict = {}


def _misuse(name: str) -> Callable[[Bench], tuple[bool, str]]:
    def check(b: Bench):
        if not _misuse_results:
            r = b.run([PY, b.file("misuse.py", MISUSE)], timeout=120)
            for line in r.out.splitlines():
                if line.startswith("CASE "):
                    key, first, second = line[5:].split(" | ")
                    _misuse_results[key] = (first, second)
            if not _misuse_results:
                _misuse_results["?"] = (f"exit {r.code}: {r.last(3)}", "")
        first, second = _misuse_results.get(name, (_misuse_results.get("?", ("not run", ""))[0], ""))
        want = MISUSE_EXPECTED[name]
        held = first.startswith(want) and second.startswith(want)
        return held, f"rank 0: {first[:90]} / rank 1: {second[:60]}"
    return check


def _single(code: str, needle: str) -> Callable[[Bench], tuple[bool, str]]:
    def check(b: Bench):
        r = b.run([PY, "-c", code], timeout=60)
        return r.code == 0 and needle in r.text, f"exit {r.code}: {r.out.strip()[:120]}"
    return check


def misuse_cases() -> list[Case]:
    cases = [Case("API misuse", name, f"{want} on both ranks", _misuse(name), quick=True)
             for name, want in MISUSE_EXPECTED.items()]
    cases += [
        Case("API misuse", "init with a timeout of 0", "ValueError",
             _single("import singa_dist as sd\ntry:\n    sd.init(timeout=0)\nexcept ValueError as e:\n    print('VE', e)",
                     "VE the timeout must be a positive number"), quick=True),
        Case("API misuse", "init with an unknown strategy", "TopologyError",
             _single("import singa_dist as sd\ntry:\n    sd.init(strategy='ring')\nexcept sd.TopologyError as e:\n"
                     "    print('TE', e)", "TE unknown strategy 'ring'"), quick=True),
        Case("API misuse", "Adasum on 3 ranks", "NotImplementedError (as Horovod)",
             lambda b: _run_module(b, """
                import torch, singa_dist as sd
                def fn():
                    try:
                        sd.allreduce(torch.ones(2), op=sd.Adasum)
                    except NotImplementedError as exc:
                        return str(exc)
                if __name__ == "__main__":
                    print(sd.run(fn, np=3, timeout=60))
                """, ["non-power of 2 ranks"] * 1)),
    ]
    return cases


def all_cases() -> list[Case]:
    return launcher_cases() + runtime_cases() + checkpoint_cases() + misuse_cases()


# --------------------------------------------------------------------------------------------------------------

def run_case(case: Case, index: int) -> dict:
    mark = f"fault{os.getpid()}x{index}"
    with tempfile.TemporaryDirectory(prefix="singa-fault-") as folder:
        bench = Bench(Path(folder), mark, case.timeout)
        start = time.monotonic()
        try:
            held, got = case.check(bench)
        except Exception as exc:
            held, got = False, f"the case itself failed: {type(exc).__name__}: {exc}"
        seconds = time.monotonic() - start
        if seconds > case.timeout:
            held, got = False, f"over the {case.timeout:g} s outer timeout: {got}"
        time.sleep(0.3)
        left = marked(mark)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    verdict = "skipped" if held is None and not left else "held" if held and not left else "FAILED"
    return {"group": case.group, "case": case.name, "expected": case.expected, "got": got.replace("\n", " ")[:200],
            "seconds": round(seconds, 1), "leftover": len(left), "verdict": verdict}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the quick cases (as the test suite runs them)")
    parser.add_argument("--only", help="only the cases whose name contains this text")
    parser.add_argument("--group", help="only this group of cases")
    parser.add_argument("--no-csv", action="store_true", help="do not append the rows to benchmarks/results")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if (not args.quick or c.quick) and (not args.only or args.only in c.name)
             and (not args.group or args.group == c.group)]
    rows = []
    for i, case in enumerate(cases):
        row = run_case(case, i)
        rows.append(row)
        print(f"{row['verdict']:6s} {row['seconds']:6.1f}s  [{case.group}] {case.name}: {row['got'][:110]}", flush=True)
    from benchmarks.common import print_table, write_csv
    print()
    print_table(rows, ["case", "expected", "got", "seconds", "leftover", "verdict"])
    held = sum(r["verdict"] == "held" for r in rows)
    skipped = [r["case"] for r in rows if r["verdict"] == "skipped"]
    rows_run = len(rows) - len(skipped)
    print(f"\nfaults: {held} of {rows_run} held" + (f" ({len(skipped)} skipped here: {'; '.join(skipped)})"
                                                     if skipped else ""))
    if not args.no_csv and rows:
        write_csv("faults", rows)
    return 0 if held == rows_run else 1


if __name__ == "__main__":
    sys.exit(main())
