"""Run functions on N-rank Gloo worlds, with timeouts, and commands in their own process sessions.

A `World` starts N processes once (each joins a Gloo group through `singa_dist.init()`) and then runs one
test function after another on every rank: process start and Gloo set-up cost about 2 s, so tests share
worlds (see the `world` fixture in conftest.py). A rank that raises or does not answer in time fails the
test with each rank's traceback or a list of the missing ranks, and the world is rebuilt for the next test.

Functions sent to a world must be importable by name (module-level functions of a test module).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

from singa_dist.environment import free_port


class RankFailure(AssertionError):
    """One or more ranks raised, or did not answer in time."""


@dataclass
class _Task:
    fn: object
    args: tuple
    kwargs: dict


def _rank_main(proc_rank: int, nprocs: int, env: dict, tasks, results) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(proc_rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(proc_rank),
                       "LOCAL_WORLD_SIZE": str(nprocs)})
    if "SINGA_PROC_WORLD_SIZE" in env:
        os.environ["SINGA_PROC_RANK"] = str(proc_rank)
    import torch

    torch.set_num_threads(1)
    try:
        import singa_dist as sd
        from singa_dist.environment import job_topology

        if job_topology(nprocs).role_of(proc_rank).is_server:
            results.put((proc_rank, "server", None))  # init() serves until the workers are done
        try:
            sd.init()
        except sd.runtime.ServerDone:
            results.put((proc_rank, "exit", None))
            return
        results.put((proc_rank, "ready", None))
    except BaseException:
        results.put((proc_rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            value = task.fn(*task.args, **task.kwargs)
            results.put((proc_rank, "ok", value))
        except BaseException:
            results.put((proc_rank, "error", traceback.format_exc()))
    try:
        sd.shutdown()
    except Exception:
        pass


class World:
    """N processes joined in one job; `run(fn, ...)` calls `fn` on every rank and returns the results.

    `env` is added to every rank's environment (SINGA_TOPOLOGY, SINGA_TIMEOUT, ...). When it names a
    topology with separate servers, pass SINGA_PROC_WORLD_SIZE too: the server processes serve (sd.init()
    does, on them) and `run` talks to the workers only.
    """

    def __init__(self, nprocs: int, env: dict | None = None, start_timeout: float = 60.0):
        self.nprocs = nprocs
        self.env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.env.update(env or {})
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.tasks = [self.ctx.Queue() for _ in range(nprocs)]
        self.procs = [self.ctx.Process(target=_rank_main, args=(r, nprocs, self.env, self.tasks[r], self.results),
                                       daemon=True, name=f"rank{r}") for r in range(nprocs)]
        for p in self.procs:
            p.start()
        self.workers = list(range(nprocs))
        self.alive = True
        ready = self._collect(set(range(nprocs)), start_timeout, "start", accept=("ready", "exit", "server"))
        self.workers = [r for r, (kind, _) in sorted(ready.items()) if kind == "ready"]

    def _collect(self, ranks: set, timeout: float, what: str, accept=("ok",)) -> dict:
        got, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(got) + len(errors) < len(ranks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                r, kind, value = self.results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if errors and time.monotonic() > self._grace_deadline:
                    break
                continue
            if kind == "error":
                errors[r] = value
                # Ranks still waiting for the failed one would block until the collective timeout.
                self._grace_deadline = time.monotonic() + 5.0
            elif kind in accept:
                got[r] = (kind, value)
        missing = sorted(ranks - set(got) - set(errors))
        if errors or missing:
            self.close()
            lines = [f"{what}: " + (f"ranks {missing} did not finish within {timeout:.0f}s" if missing and not errors
                                    else f"{len(errors)} rank(s) failed")]
            for r in sorted(errors):
                lines.append(f"--- rank {r} ---\n{errors[r]}")
            if missing and errors:
                lines.append(f"ranks {missing} were still waiting (likely on the failed ranks)")
            raise RankFailure("\n".join(lines))
        return got

    _grace_deadline = float("inf")

    def run(self, fn, *args, timeout: float = 60.0, **kwargs) -> list:
        """Call fn(*args, **kwargs) on every worker rank; return the results in rank order."""
        if not self.alive:
            raise RuntimeError("this world was closed after a failure")
        self._grace_deadline = float("inf")
        for r in self.workers:
            self.tasks[r].put(_Task(fn, args, kwargs))
        got = self._collect(set(self.workers), timeout, getattr(fn, "__name__", str(fn)))
        return [got[r][1] for r in self.workers]

    def run_failing(self, fn, *args, timeout: float = 60.0, **kwargs) -> tuple[str, float]:
        """Call fn on every worker rank expecting some rank to fail; return the failure's message (every rank's
        traceback) and the seconds until it came. The world is closed afterwards (ranks left asleep die)."""
        start = time.monotonic()
        try:
            self.run(fn, *args, timeout=timeout, **kwargs)
        except RankFailure as failure:
            return str(failure), time.monotonic() - start
        finally:
            self.close()
        raise AssertionError(f"{getattr(fn, '__name__', fn)}: every rank finished, but a failure was expected")

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for r in self.workers:
            try:
                self.tasks[r].put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.05))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_command(args: list[str], timeout: float = 120.0, env: dict | None = None, cwd: str | None = None,
                input: str | None = None) -> CommandResult:
    """Run a command in its own process session; on timeout kill the whole session and fail the test. The output
    is decoded as it came, carriage returns included (no newline translation)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                            cwd=cwd, start_new_session=True, stdin=subprocess.PIPE if input else subprocess.DEVNULL)

    def text(data: bytes) -> str:
        return data.decode("utf-8", "replace")
    try:
        out, err = proc.communicate(input=input.encode() if input else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        raise RankFailure(f"{' '.join(args)} did not finish within {timeout:.0f}s\nstdout:\n{text(out)}\n"
                          f"stderr:\n{text(err)}")
    finally:
        kill_session(proc.pid)
    return CommandResult(proc.returncode, text(out), text(err), time.monotonic() - start)


def kill_session(pid: int) -> None:
    """Kill every process left in the session led by `pid` (a command's stray children included)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def session_alive(pid: int) -> bool:
    """True while any process of the session led by `pid` is still running."""
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
