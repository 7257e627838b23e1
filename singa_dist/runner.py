"""`run(fn, np)`: a function on np local processes joined in one job, its results back in rank order
(Horovod's `horovod.run` for one host).

    import singa_dist as sd

    def train(lr):
        ...                      # sd.init() has been called; use sd.rank(), sd.DistributedOptimizer, ...
        return final_loss

    losses = sd.run(train, np=2, args=(0.1,))

Each process starts fresh (`python -m singa_dist.run_task`), with one intra-op thread as `singa-launch` gives
processes that share a host, calls `sd.init()`, runs `fn(*args, **kwargs)` and `sd.shutdown()`. `fn` and its
arguments travel by cloudpickle, as horovod.run sends them: a function of the calling script or of a notebook goes
by value, and the calling script is not run again in the processes (it needs no `if __name__ == "__main__"`
guard). The results travel by pickle.
"""
from __future__ import annotations

import importlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import cloudpickle

from .environment import SECRET_VARIABLE, free_port, loopback_only, make_secret

# After a rank fails, the others get this long to report (those waiting for it in a collective fail too).
FAILURE_GRACE_S = 5.0
# Processes still running when run() returns get this long to end after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0


# run(output_dir=...): each rank's stdout and stderr go to DIR/rank.<r>/stdout and stderr (horovod.run's
# output_filename layout).
OUTPUT_VARIABLE = "SINGA_RUN_OUTPUT_DIR"


def _output_to_files(folder: str) -> None:
    """This process's file descriptors 1 and 2 (Python's and native code's output alike) go to folder/stdout and
    folder/stderr."""
    os.makedirs(folder, exist_ok=True)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


class RunError(RuntimeError):
    """Raised by `run()`: `failures` maps each rank that raised to its traceback; `missing` lists the ranks that
    had not finished when the run was stopped."""

    def __init__(self, message: str, failures: dict[int, str], missing: list[int]):
        super().__init__(message)
        self.failures = failures
        self.missing = missing


def run(fn, np: int | None = None, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None,
        env: dict | None = None, hosts: str | None = None, use_gloo: bool | None = None,
        use_mpi: bool | None = None, output_dir: str | None = None) -> list:
    """Run `fn(*args, **kwargs)` on `np` local processes joined in one job; return their results in rank order.

    np: the number of processes (default: the slots `hosts` gives, else 2).
    timeout: seconds the whole run may take (None: no limit; a collective waiting for a missing rank still
             stops after the job's timeout, SINGA_TIMEOUT); past it, RunError names the ranks not finished.
    env: variables added to every process's environment (SINGA_TIMEOUT, SINGA_STRATEGY, SINGA_SERVERS, ...).
         With a parameter-server strategy the last processes are the servers (np counts them): they serve, and
         their results are None.
    hosts, use_gloo, use_mpi: horovod.run's. The processes run on this host and meet over Gloo: `hosts` may
         name this host ("localhost:4"); use_mpi=True is refused (singa-launch --mpi runs a script with mpirun).
    output_dir: each rank's output goes to output_dir/rank.<r>/stdout and .../stderr instead of this console
         (horovod.run's output_filename).

    A rank that raises makes RunError name it, with its traceback, after the others had a moment to report
    too; every process is stopped before run() returns or raises.
    """
    if use_mpi:
        raise ValueError("sd.run starts its processes itself and joins them over Gloo; to run through mpirun, use "
                         "`singa-launch --mpi -np N python script.py`")
    slots = local_slots(hosts)
    if np is None:
        np = slots if slots is not None else 2
    if slots is not None and np > slots:
        raise ValueError(f"{np} processes requested but hosts={hosts!r} gives {slots} slots")
    if np < 1:
        raise ValueError(f"np must be at least 1, got {np}")
    child_env = _child_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")),
                            "WORLD_SIZE": str(np), "LOCAL_WORLD_SIZE": str(np), "GROUP_RANK": "0",
                            "GROUP_WORLD_SIZE": "1", **loopback_only(), **(env or {})})
    if output_dir is not None:
        child_env[OUTPUT_VARIABLE] = os.path.abspath(output_dir)
    folder = tempfile.mkdtemp(prefix="singa-run-")
    processes = []
    try:
        _write_task(folder, fn, args, kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        for index in range(np):
            rank_env = {**child_env, "RANK": str(index), "LOCAL_RANK": str(index)}
            if "SINGA_PROC_WORLD_SIZE" in rank_env:  # a topology with separate servers: every process of it runs fn
                rank_env["SINGA_PROC_RANK"] = str(index)
            # Through singa-launch's lifeline (a program, not an import): the process dies with this one.
            processes.append(subprocess.Popen([sys.executable, "-m", "launchers.lifeline", sys.executable, "-m",
                                               "singa_dist.run_task", folder, str(index)],
                                              env=rank_env, stdin=subprocess.DEVNULL, start_new_session=True))
        values, failures, missing = _collect(processes, folder, timeout)
    finally:
        _stop(processes)
        shutil.rmtree(folder, ignore_errors=True)
    if failures or missing:
        raise RunError(_describe(failures, missing, timeout), failures, missing)
    return [values[r] for r in range(np)]


def _child_env(more: dict) -> dict:
    """The environment of a process this module starts: this one's, one intra-op thread, this process's import
    path (the function may live in a module only it can find), its pid for the lifeline and the job's secret (this
    environment's, else a new one for this run; docs/security.md); then `more`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "SINGA_LAUNCHER_PID": str(os.getpid()), SECRET_VARIABLE: os.environ.get(SECRET_VARIABLE) or make_secret(),
            **more}


def _write_task(folder: str, fn, args, kwargs) -> None:
    with open(os.path.join(folder, "task"), "wb") as f:
        # By value where it must be (a function of the caller's script or notebook), as horovod.run sends it.
        cloudpickle.dump((_by_name(fn), tuple(args), dict(kwargs or {})), f)


def _by_name(fn):
    """A function of a caller started as `python -m package.module` by its importable name rather than by value:
    its module's other functions are then the same objects in every process, so that what the function hands on
    by name (torch RPC to a parameter server, say) is found there too. A script run by its path cannot be imported
    without running it again: its functions go by value."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if getattr(fn, "__module__", None) != "__main__" or not name or name.endswith("__main__"):
        return fn
    try:
        found = getattr(importlib.import_module(name), fn.__qualname__, None)
    except Exception:
        return fn
    return found if callable(found) else fn


def run_elastic(fn, np: int | None = None, min_np: int | None = None, max_np: int | None = None, args: tuple = (),
                kwargs: dict | None = None, host_discovery_script: str | None = None, slots: int | None = None,
                reset_limit: int | None = None, elastic_timeout: float | None = None, env: dict | None = None,
                cooldown_range: tuple[int, int] | None = None) -> list:
    """Run `fn(*args, **kwargs)` as an elastic job (horovod.run with min_np/max_np/host_discovery_script): the
    workers are started, watched and replaced as `singa-launch --min-np/--max-np` does (launchers/elastic.py), `fn`
    typically wraps its loop in `singa_dist.elastic.run`. Returns the results of the workers of the job's last
    round, in their rank order; raises RunError when the job fails (the launcher has said why on stderr).

    `fn` and its arguments travel by cloudpickle (a function of the calling script goes by value, as horovod.run
    sends it), the results by pickle."""
    # singa-launch, as a program (this layer imports none of it), through its lifeline: it dies with this process.
    argv = [sys.executable, "-m", "launchers.lifeline", sys.executable, "-m", "launchers.launch"]
    for flag, value in (("-np", np), ("--min-np", min_np), ("--max-np", max_np),
                        ("--host-discovery-script", host_discovery_script), ("--slots", slots),
                        ("--reset-limit", reset_limit), ("--elastic-timeout", elastic_timeout)):
        if value is not None:
            argv += [flag, str(value)]
    if cooldown_range is not None:
        argv += ["--blacklist-cooldown-range", *map(str, cooldown_range)]
    child_env = _child_env(env or {})
    with tempfile.TemporaryDirectory(prefix="singa-run-") as folder:
        _write_task(folder, fn, args, kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.call(argv + [sys.executable, "-m", "singa_dist.run_task", folder], env=child_env,
                               stdin=subprocess.DEVNULL)
        finished = []
        for name in os.listdir(folder):
            if name.startswith("result."):
                with open(os.path.join(folder, name), "rb") as f:
                    finished.append(pickle.load(f))
    if code == 2:
        raise ValueError(f"singa_dist.run_elastic: singa-launch refused {' '.join(argv[6:])} (its message is above)")
    if code != 0:
        raise RunError(f"singa_dist.run_elastic: the elastic job failed (exit status {code}; the launcher's lines "
                       "above say why)", {}, [])
    if not finished:
        raise RunError("singa_dist.run_elastic: the job ended well but no worker left a result", {}, [])
    last = max(number for number, _, _ in finished)
    return [value for _, _, value in sorted((r for r in finished if r[0] == last), key=lambda r: r[1])]


def local_slots(hosts: str | None) -> int | None:
    """The slots `hosts` ("localhost:2,127.0.0.1:2") gives on this host; None without hosts; an error naming a
    host that is not this one."""
    if hosts is None:
        return None
    here = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    total = 0
    for item in str(hosts).split(","):
        host, _, count = item.strip().partition(":")
        if host not in here:
            raise ValueError(f"run() starts processes on this host only, got host {host!r}; for several hosts use "
                             "singa-launch --hosts")
        try:
            total += int(count or 1)
        except ValueError:
            raise ValueError(f"the slots of host {host!r} must be a whole number, got {count!r}") from None
    return total


def _report(folder: str, kind: str, index: int):
    """What rank `index` left in the run's folder (run_task writes each file whole): the pickled value for
    "returned", the traceback for "error", True for "left"; None while it has not."""
    path = os.path.join(folder, f"{kind}.{index}")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    return data if kind == "returned" else data.decode("utf-8", "replace") if kind == "error" else True


def _collect(processes, folder: str, timeout: float | None):
    """Read the ranks' reports until all have returned and left the job, one failed (plus a grace period for
    the others to report), or time is up. Returns (values, failures, missing)."""
    np = len(processes)
    deadline = None if timeout is None else time.monotonic() + timeout
    values: dict[int, object] = {}
    left: set[int] = set()
    failures: dict[int, str] = {}  # in the order they were found: the first is most likely the cause
    stop_at = None
    while len(left) + len(failures) < np:
        now = time.monotonic()
        if (deadline is not None and now >= deadline) or (stop_at is not None and now >= stop_at):
            break
        for index, process in enumerate(processes):
            if index in left or index in failures:
                continue
            ended = process.poll() is not None  # read before the files: a report written before the end is seen
            if index not in values:
                value = _report(folder, "returned", index)
                if value is not None:
                    values[index] = pickle.loads(value)
            error = _report(folder, "error", index)
            if error is not None:
                failures[index] = error
            elif _report(folder, "left", index):
                left.add(index)
            elif ended:  # killed, or crashed in native code, without a last report
                failures[index] = f"the process ended without a report, {_exit_status(process.returncode)}"
            else:
                continue
            if index in failures:
                stop_at = stop_at or now + FAILURE_GRACE_S
        time.sleep(0.02)
    # A rank that returned and waits in shutdown() for the others is not the one missing.
    missing = [r for r in range(np) if r not in values and r not in failures]
    if not missing and not failures and len(left) < np:
        missing = [r for r in range(np) if r not in left]
    return values, failures, missing


def _exit_status(code: int) -> str:
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _describe(failures: dict[int, str], missing: list[int], timeout: float | None) -> str:
    if failures:
        ranks = list(failures)
        lines = [f"singa_dist.run: rank {ranks[0]} failed" + (f" (then ranks {ranks[1:]})" if ranks[1:] else "")]
        for r in ranks:
            lines.append(f"--- rank {r} ---\n{failures[r].rstrip()}")
        if missing:
            lines.append(f"ranks {missing} had not finished (likely waiting for the failed ones) and were stopped")
        return "\n".join(lines)
    return (f"singa_dist.run: rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not finish "
            f"within {timeout:g} s; every process was stopped")


def _stop(processes) -> None:
    """SIGTERM the processes still running, SIGKILL those that outlive STOP_GRACE_S, and whatever they left in
    their sessions."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
