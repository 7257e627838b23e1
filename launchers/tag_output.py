"""Rank prefixes on output lines: the line splitting the launcher's output pump uses, and the wrapper that
`singa-launch --mpi` runs every rank in.

    python -m launchers.tag_output --workers N [--timestamp] -- COMMAND ...

runs COMMAND and copies its stdout and stderr to its own, each line prefixed as the local launcher prefixes
it: `[3] ` for worker 3, `[s0] ` for the first server (the processes after the N workers); with --timestamp
the time comes first, as horovodrun's --prefix-output-with-timestamp writes it. The rank comes
from the MPI's environment (Open MPI's OMPI_COMM_WORLD_RANK, MPICH/Hydra's PMI_RANK), so the same command
line serves every rank whatever the MPI; mpirun's own tagging options differ between MPIs and between
Open MPI versions. Signals the wrapper gets are passed on to COMMAND, the wrapper dies with its parent and
COMMAND with the wrapper (Linux), and the wrapper exits as COMMAND did. It imports nothing heavy: it runs once per rank.
"""
from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import threading
import time

from launchers.lifeline import die_with_parent

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


class LineSplitter:
    """Bytes in, whole lines out, each with the character that ended it. A carriage return ends a line too and
    is kept, so that a progress bar (tqdm and rich redraw with '\\r') redraws in place on a terminal, behind
    its rank's prefix; the '\\n' of a '\\r\\n' ends the line as one newline."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""
        self.held: str | None = None  # a line ended by '\r': '\r' or '\r\n' depends on what comes next

    def feed(self, data: bytes) -> list[str]:
        lines, pending, held = [], self.pending, self.held
        for ch in self.decoder.decode(data):
            if held is not None:
                lines.append(held + ("\n" if ch == "\n" else "\r"))
                held = None
                if ch == "\n":
                    continue
            if ch == "\r":
                if pending:  # a '\r' right after a line's end adds no empty line
                    held = pending
                pending = ""
            elif ch == "\n":
                lines.append(pending + "\n")
                pending = ""
            else:
                pending += ch
        self.pending, self.held = pending, held
        return lines

    def finish(self) -> list[str]:
        """What is left, ended with a newline (the output ended without one)."""
        rest = self.pending + self.decoder.decode(b"", final=True)
        lines = [] if self.held is None else [self.held + "\n"]
        self.pending, self.held = "", None
        return lines + ([rest + "\n"] if rest else [])


def rank_label(nworkers: int, environ=os.environ) -> str:
    """This process's prefix under mpirun: its rank for a worker, s<index> for a server."""
    for name in _RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            rank = int(environ[name])
            return str(rank) if rank < nworkers else f"s{rank - nworkers}"
    return "?"


def copy_tagged(pipe, out, label: str, timestamp: bool = False) -> None:
    """Copy `pipe` to the binary stream `out` until it closes, each line prefixed with `[label] ` (and the time
    before it with `timestamp`)."""
    splitter = LineSplitter()
    prefix = f"[{label}] "

    def write(lines):
        if lines:
            stamp = time.asctime() if timestamp else ""
            try:
                out.write("".join(f"{stamp}{prefix}{line}" for line in lines).encode("utf-8", "replace"))
                out.flush()
            except (BrokenPipeError, ValueError):
                pass

    fd = pipe.fileno()
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        write(splitter.feed(data))
    write(splitter.finish())
    pipe.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    timestamp = argv[2:3] == ["--timestamp"]
    if timestamp:
        argv = argv[:2] + argv[3:]
    if len(argv) < 4 or argv[0] != "--workers" or not argv[1].isdigit() or argv[2] != "--":
        print("usage: python -m launchers.tag_output --workers N [--timestamp] -- COMMAND ...", file=sys.stderr)
        return 2
    label, command = rank_label(int(argv[1])), argv[3:]
    # The wrapper dies with whatever mpirun runs it under (mpirun itself may be killed outright), and the command
    # with the wrapper.
    die_with_parent()
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    except OSError as exc:
        print(f"[{label}] cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
    for name in _FORWARDED:
        signal.signal(getattr(signal, name), lambda signum, _frame: proc.send_signal(signum))
    copiers = [threading.Thread(target=copy_tagged, args=(pipe, out, label, timestamp), daemon=True)
               for pipe, out in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))]
    for t in copiers:
        t.start()
    code = proc.wait()
    for t in copiers:
        t.join(timeout=10)  # a child the command left behind may hold the pipes open
    if code < 0:  # killed by a signal: end the same way, so that mpirun reports what happened
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL's action cannot be changed, and is the default already
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
