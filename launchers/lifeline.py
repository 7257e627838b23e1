"""A process that dies with its parent, even when the parent is killed with SIGKILL (which runs no cleanup).

    python -m launchers.lifeline PROGRAM [ARGS...]

asks Linux to SIGKILL this process when the process that started it ends (prctl PR_SET_PDEATHSIG), then
replaces itself with PROGRAM: the request survives the exec, so PROGRAM dies with the launcher. singa-launch
starts every worker and server this way, and the ssh clients and mpirun wrappers it runs ask the same. An
elastic worker started over ssh takes the job's secret from its standard input here first. It imports nothing
heavy: it runs once per process.
"""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
SECRET_FROM_STDIN = "SINGA_SECRET_FROM_STDIN"  # 1: the job's secret is the first line of standard input


def take_secret_from_stdin() -> None:
    """A process started over ssh with SINGA_SECRET_FROM_STDIN=1 (a node's singa-launch, an elastic worker) takes the
    job's secret (SINGA_SECRET) from the first line of its standard input, so that it appears on no command line
    (docs/security.md). It reads that line alone, byte by byte: the rest of the input is the process's."""
    if os.environ.pop(SECRET_FROM_STDIN, None) != "1":
        return
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < 4096:
        try:
            byte = os.read(0, 1)
        except OSError:
            break
        if not byte:
            break
        line += byte
    secret = line.decode(errors="replace").strip()
    if secret:
        os.environ["SINGA_SECRET"] = secret


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent ends. `parent`: the pid the parent had; if it is gone already (it
    died between starting this process and this call), end now. Linux only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)


def main(argv: list[str]) -> None:
    if not argv:
        print("usage: python -m launchers.lifeline PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(2)
    parent = os.environ.get("SINGA_LAUNCHER_PID")
    die_with_parent(int(parent) if parent and parent.isdigit() else None)
    take_secret_from_stdin()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
