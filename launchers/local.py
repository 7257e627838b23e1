"""Run this node's processes with torch.distributed.elastic, watch them, and restart the job after a failure.

Each process starts through `torch.distributed.elastic.multiprocessing.start_processes` (its own session,
output redirected to files, its process group signalled on close). The launcher tails those files onto
its own stdout/stderr with a `[rank]` prefix, stops every process when one fails (SIGTERM, SIGKILL after
the grace period) and, with `--max-restarts`, starts the whole job again.

An asynchronous job (Downpour, Hybrid, Hogwild with several worker groups) goes on without a worker group that
fails; with restarts left (`--max-restarts`, each replacement counting as one) a new group takes its place: its
workers run the script from its start and take the current values from the servers (or Hogwild's masters).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs, SignalException, start_processes

from singa_dist.environment import DATA_ERROR_STATUS, free_port
from singa_dist.topology import strategy_kind

from .config import LaunchConfig, ProcessSpec
from .stopping import StopSignals, stopped_line
from .tag_output import LineSplitter
from .watchdog import NodeWatch

POLL_S = 0.05
# How long servers may take to finish on their own once every worker has succeeded.
SERVER_DRAIN_S = 10.0
# How long a process may take to be reaped after SIGKILL before the launcher says it could not stop it.
KILL_WAIT_S = 10.0
# How long the other workers may take to end on their own after one ended on a data error (DATA_ERROR_STATUS):
# they read the same data, and an error they share is then said once.
DATA_ERROR_WAIT_S = 10.0
# How long a process that a failed one names as its cause (it is exiting: its script ended or called sys.exit()
# while the others still trained) may take to end on its own, so that its own exit status is reported.
BLAMED_EXIT_WAIT_S = 5.0

# The elastic API logs every signal it sends; the launcher reports failures itself, once, by rank.
logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.ERROR)


class _RankFiles(LogsSpecs):
    """Output files named by rank (rank0.out, rank0.err, server0.out, ...) in one folder, or with `folders` in one
    folder per process, as horovodrun's --output-filename lays them out (rank.0/stdout, rank.0/stderr, ...)."""

    def __init__(self, folder: str, names: list[str], folders: bool = False):
        super().__init__(log_dir=folder)
        self._folder, self._names, self._folders = folder, names, folders

    @property
    def root_log_dir(self) -> str:
        return self._folder

    def reify(self, envs) -> LogsDest:
        if self._folders:
            for name in self._names:
                os.makedirs(os.path.join(self._folder, name), exist_ok=True)
            files = {"out": "stdout", "err": "stderr", "error.json": "error.json"}
            path = lambda i, ext: os.path.join(self._folder, self._names[i], files[ext])  # noqa: E731
        else:
            path = lambda i, ext: os.path.join(self._folder, f"{self._names[i]}.{ext}")  # noqa: E731
        n = range(len(self._names))
        for i in n:
            # torch's error file (its @record and ErrorHandler write it), from this attempt only
            envs[i]["TORCHELASTIC_ERROR_FILE"] = path(i, "error.json")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path(i, "error.json"))
        return LogsDest(stdouts={i: path(i, "out") for i in n}, stderrs={i: path(i, "err") for i in n},
                        tee_stdouts={}, tee_stderrs={}, error_files={i: path(i, "error.json") for i in n})


@dataclass
class _Source:
    """One output file being copied: where it goes, and the part of a line not yet ended."""

    label: str
    path: str
    stream: object
    file: object = None
    lines: LineSplitter = field(default_factory=LineSplitter)


class OutputPump:
    """Copies the processes' output files to the console, each line prefixed with its rank (lines split
    as LineSplitter says: a carriage return ends one too and is passed on, so progress bars redraw in place)."""

    def __init__(self, timestamp: bool = False):
        self.timestamp = timestamp  # horovodrun's --prefix-output-with-timestamp: the time before the rank
        self._sources: list[_Source] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="singa-launch-output", daemon=True)
        self._lock = threading.Lock()

    def add(self, label: str, path: str, stream) -> None:
        with self._lock:
            self._sources.append(_Source(label, path, stream))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Copy what is left (a last line without a newline included) and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            for src in self._sources:
                self._pump(src)
                self._emit(src, src.lines.finish())
                if src.file is not None:
                    src.file.close()
            self._sources = []

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                for src in self._sources:
                    self._pump(src)

    def _pump(self, src: _Source) -> None:
        if src.file is None:
            try:
                src.file = open(src.path, "rb")
            except FileNotFoundError:
                return
        data = src.file.read()
        if data:
            self._emit(src, src.lines.feed(data))

    def _emit(self, src: _Source, lines: list[str]) -> None:
        if not lines:
            return
        stamp = time.asctime() if self.timestamp else ""  # (horovodrun's form: "Mon Jan  6 10:00:00 2025[0]")
        try:
            src.stream.write("".join(f"{stamp}[{src.label}] {line}" for line in lines))
            src.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


def _recorded_error(path: str) -> str | None:
    """The first line of the message a process left in its error file (torch's format, TORCHELASTIC_ERROR_FILE)."""
    try:
        with open(path) as f:
            message = json.load(f)["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(message, dict):
        message = message.get("message")
    return message.strip().splitlines()[0] if isinstance(message, str) and message.strip() else None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group has ended already


@dataclass
class Outcome:
    """How one attempt of the job ended."""

    ok: bool
    failed: list  # (ProcessSpec, exit code) of the processes that failed first
    signal: int | None = None  # the launcher itself was told to stop
    # (ProcessSpec, what they say, neutral) of the processes the failed ones blame; neutral: the note says what
    # went wrong (different numbers of steps) without making those processes the cause
    causes: list = field(default_factory=list)
    lost: str | None = None  # another node's launcher is gone (see launchers.watchdog)
    errors: dict = field(default_factory=dict)  # process rank -> the error a failed process recorded

    def describe(self) -> str:
        if self.lost:
            return self.lost
        said = self._said()
        if self.failed and all(code == 0 for _, code in self.failed) and self.causes:
            # A process that ended well but could not leave the job with the others (singa_dist.shutdown()).
            blamed = ", ".join(spec.title for spec, _, _ in self.causes)
            waited = ", ".join(spec.title for spec, _ in self.failed)
            return f"{self.causes[0][1]} ({blamed}); {waited} finished and waited for {blamed} in vain"
        if not self.causes:
            return said
        if self.causes[0][2]:  # the note says what went wrong, not who caused it
            return f"{said}: {self.causes[0][1]}"
        blamed = ", ".join(spec.title for spec, _, _ in self.causes)
        return f"{self.causes[0][1]} ({blamed}), so {said}"

    def _said(self) -> str:
        """How the failed processes ended, with the errors they recorded; once for all when they failed alike."""
        errors = {self.errors.get(spec.proc_rank) for spec, _ in self.failed}
        codes = {code for _, code in self.failed}
        if len(self.failed) > 1 and len(codes) == 1 and len(errors) == 1 and None not in errors:
            titles = [spec.title for spec, _ in self.failed]
            return f"{', '.join(titles[:-1])} and {titles[-1]} {describe_exit(codes.pop())}: {errors.pop()}"
        return "; ".join(f"{spec.title} {describe_exit(code)}" + (f": {self.errors[spec.proc_rank]}"
                                                                  if spec.proc_rank in self.errors else "")
                         for spec, code in self.failed)

    @property
    def exit_code(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        if self.lost:
            return 1
        code = self.failed[0][1] if self.failed else 1
        if code == 0:  # ended well, stranded by the others: the job did not
            return 1
        return code if code > 0 else 128 + -code


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {name} ({-code})"
    return f"exited with status {code}"


class LocalJob:
    """One attempt: this node's processes, started and watched."""

    def __init__(self, cfg: LaunchConfig, attempt: int, restarts_used: int = 0, signals: StopSignals | None = None):
        self.cfg = cfg
        self.signals = signals if signals is not None else StopSignals()
        self.attempt = attempt
        self.restarts_used = restarts_used  # restarts of the job and replacements of groups before this attempt
        self.replaced = 0  # worker groups replaced so far in this attempt
        self.generations: dict[int, int] = {}  # worker group -> how many times it was replaced
        self.ever_lost: set[int] = set()  # worker groups lost at least once (replaced or not)
        self.specs = cfg.node_plan(restart_count=attempt)
        self.contexts: list[tuple[object, list[ProcessSpec]]] = []
        self.pump = None if cfg.log_dir and not cfg.tee else OutputPump(timestamp=cfg.timestamp_output)
        if cfg.log_dir:
            self.folder = cfg.log_dir if attempt == 0 else os.path.join(cfg.log_dir, f"restart{attempt}")
            self._temp = None
        else:
            self.folder = self._temp = tempfile.mkdtemp(prefix="singa-launch-")
        os.makedirs(self.folder, exist_ok=True)
        self.watch = None
        # Downpour, Hybrid, Hogwild: a lost worker group is dropped and the others go on (see wait()).
        self.asynchronous = cfg.topology.nworker_groups > 1 and strategy_kind(cfg.topology.strategy).asynchronous
        self.lost: set[int] = set()  # processes of the worker groups lost (and not replaced) so far
        self.retired: set[int] = set()  # id() of the handlers of processes lost with their group (not watched)

    def start(self) -> None:
        if self.cfg.nnodes > 1 or self.asynchronous:
            # Node 0's launcher hosts the job's store; the launchers watch each other through it. An asynchronous
            # job's store must outlive rank 0's group too, and carries the marks of lost groups.
            self.watch = NodeWatch(self.cfg.master_addr, self.cfg.master_port, self.cfg.node_rank, self.cfg.nnodes,
                                   self.attempt)
            self.watch.start()
        # One context per program (workers run the user's command, servers the parameter server).
        by_role: dict[str, list[ProcessSpec]] = {}
        for spec in self.specs:
            by_role.setdefault(spec.role, []).append(spec)
        if self.pump is not None:
            self.pump.start()
        for role, specs in by_role.items():
            if self.signals.received:
                break  # told to stop: wait() says so at once
            self._start(role, specs, self._file_names(specs))

    def _file_names(self, specs: list[ProcessSpec], generation: int = 0) -> list[str]:
        """The name of each process's output files: rank0 (rank0.out, rank0.err), server0, ...; with horovodrun's
        --output-filename its folder, rank.<rank> zero-padded as horovodrun pads it (rank.00 ... rank.11 of 12);
        a replacement's (generation g) end in .r<g>."""
        topo, names = self.cfg.topology, []
        for s in specs:
            kind, count = ("rank", topo.nworkers) if s.role == "worker" else ("server", topo.nprocs - topo.nworkers)
            index = str(s.index).zfill(len(str(max(count - 1, 0))))
            name = f"{kind}.{index}" if self.cfg.output_filename else f"{kind}{s.index}"
            names.append(name + (f".r{generation}" if generation else ""))
        return names

    def _start(self, role: str, specs: list[ProcessSpec], names: list[str], env: dict | None = None) -> None:
        """Start `specs` (one context; output files named `names`), their output copied to the console."""
        # Each process starts through launchers.lifeline, so that it dies with this launcher even when the
        # launcher is killed outright (SIGKILL runs none of the cleanup below).
        # From the main thread, though torch puts its raising signal handlers in meanwhile: a process started from a
        # helper thread would get its death signal (launchers.lifeline) when that thread ended.
        try:
            ctx = start_processes(
                name=role, entrypoint=sys.executable,
                args={i: ("-m", "launchers.lifeline", *s.argv) for i, s in enumerate(specs)},
                envs={i: {**s.env, "SINGA_LAUNCHER_PID": str(os.getpid()), "SINGA_FAILURE_DIR": self.folder,
                          **({"TORCHELASTIC_USE_AGENT_STORE": "True", "SINGA_LAUNCHER_STORE": "1"}
                             if self.watch is not None else {}), **(env or {})}
                      for i, s in enumerate(specs)},
                logs_specs=_RankFiles(self.folder, names, folders=bool(self.cfg.output_filename)))
        except SignalException as exc:
            # torch's handler, in place while it starts the processes. Those it started die with the launcher,
            # which stops now (launchers.lifeline).
            self.signals.received.append(int(exc.sigval))
            return
        finally:
            self.signals.install()  # torch's handlers out again
        self.contexts.append((ctx, specs))
        if self.pump is not None:
            tee = self.cfg.tee if self.cfg.log_dir else 3
            for i, s in enumerate(specs):
                if self.cfg.console_ranks is not None and s.local_rank not in self.cfg.console_ranks:
                    continue  # --local-ranks-filter: its output goes to its files only
                if tee & 1:
                    self.pump.add(s.label, ctx.stdouts[i], sys.stdout)
                if tee & 2:
                    self.pump.add(s.label, ctx.stderrs[i], sys.stderr)

    def _notes(self, failed: list) -> dict[int, dict]:
        """The notes the failed processes left (runtime.blame), by process rank."""
        notes = {}
        for spec, _ in failed:
            try:
                with open(os.path.join(self.folder, f"blame.{spec.proc_rank}")) as f:
                    notes[spec.proc_rank] = json.load(f)
            except (OSError, ValueError):
                continue
        return notes

    def first_causes_first(self, failed: list, notes: dict[int, dict] | None = None) -> list:
        """Processes found failed at the same moment, in the order of cause: one that another blames (its note
        is not neutral), then one killed by a signal (nothing in the job sends one before the launcher does),
        then the rest as they are. `notes`: the failed processes' notes, when already read."""
        notes = self._notes(failed) if notes is None else notes
        accusers = {proc: note for proc, note in notes.items() if not note.get("neutral")}
        blamed = set()
        for proc, note in accusers.items():
            # A process leaving at its exit (its script ended or called sys.exit() without shutdown()) that blames
            # those it left waiting, who blame it in turn: theirs is the word that counts.
            if note.get("at_exit") and any(proc in other.get("blames", []) for other in accusers.values()):
                continue
            blamed.update(note.get("blames", []))
        return sorted(failed, key=lambda item: (item[0].proc_rank not in blamed, item[1] >= 0))

    def causes(self, failed: list, notes: dict[int, dict] | None = None) -> list:
        """The processes the failed ones name as the cause (a peer that never came to init(), to a collective,
        to shutdown()), from the notes singa_dist leaves in the job's folder (see runtime.blame)."""
        by_proc = {spec.proc_rank: spec for spec in self.specs}
        excluded = {spec.proc_rank for spec, _ in failed}  # failed themselves, or already named
        found = []
        notes = self._notes(failed) if notes is None else notes
        for spec, _ in failed:  # the first cause's note first
            note = notes.get(spec.proc_rank, {})
            for proc in note.get("blames", []):
                if proc in by_proc and proc not in excluded:
                    excluded.add(proc)
                    found.append((by_proc[proc], note.get("what", "it stopped answering"), bool(note.get("neutral"))))
        return found

    def _codes(self) -> list[tuple[ProcessSpec, int | None]]:
        """The exit status of every process watched (None: running); a lost group's processes are not."""
        return [(spec, ctx.subprocess_handlers[i].proc.poll())
                for ctx, specs in self.contexts for i, spec in enumerate(specs)
                if id(ctx.subprocess_handlers[i]) not in self.retired]

    def _errors(self, failed: list) -> dict[int, str]:
        """The errors the failed processes recorded (see _recorded_error), by process rank."""
        files = {spec.proc_rank: ctx.error_files[i] for ctx, specs in self.contexts for i, spec in enumerate(specs)}
        errors = {spec.proc_rank: _recorded_error(files[spec.proc_rank]) for spec, _ in failed
                  if spec.proc_rank in files}
        return {proc: error for proc, error in errors.items() if error}

    def wait(self) -> Outcome:
        servers_done_by = None
        data_error_wait = None  # until when the others may end on their own after a data error
        blamed_wait = None  # until when the processes a failed one blames may end on their own
        checked: set = set()  # processes that ended well and were checked for a note
        while True:
            if self.signals.received:
                return Outcome(False, [], signal=self.signals.first)
            if self.watch is not None and self.watch.problem:
                return Outcome(False, [], lost=self.watch.problem)
            codes = self._codes()
            failed = [(spec, code) for spec, code in codes if code not in (None, 0)]
            if any(code == DATA_ERROR_STATUS for _, code in failed) and \
                    any(code is None and spec.role == "worker" for spec, code in codes):
                data_error_wait = data_error_wait or time.monotonic() + DATA_ERROR_WAIT_S
                if time.monotonic() < data_error_wait:
                    time.sleep(POLL_S)
                    continue
            if failed and blamed_wait is None:
                time.sleep(POLL_S)  # a note a failed process wrote as it ended is on disk by now
                running = {spec.proc_rank for spec, code in self._codes() if code is None}
                blamed = {proc for note in self._notes(failed).values() if not note.get("neutral")
                          for proc in note.get("blames", [])}
                blamed_wait = time.monotonic() + (BLAMED_EXIT_WAIT_S if blamed & running else 0.0)
            if failed and time.monotonic() < blamed_wait and \
                    any(code is None for spec, code in codes if spec.proc_rank in blamed):
                time.sleep(POLL_S)
                continue
            if failed and self.asynchronous and not self._blames_others(failed) and self._lose_groups(failed):
                continue
            if failed:
                time.sleep(POLL_S)  # a note a failed process wrote as it ended is on disk by now
                notes = self._notes(failed)
                failed = self.first_causes_first(failed, notes)
                return Outcome(False, failed, causes=self.causes(failed, notes), errors=self._errors(failed))
            # A process that ended well but left a note could not meet the others at singa_dist.shutdown()
            # (they hang, or ran more steps): waiting for them would be waiting forever.
            stranded = [(spec, 0) for spec, code in codes if code == 0 and spec.proc_rank not in checked
                        and os.path.exists(os.path.join(self.folder, f"blame.{spec.proc_rank}"))]
            checked.update(spec.proc_rank for spec, code in codes if code == 0)
            causes = self.causes(stranded) if stranded else []
            if causes:
                return Outcome(False, stranded, causes=causes)
            workers_running = [s for s, code in codes if code is None and s.role == "worker"]
            if not workers_running:
                if all(code is not None for _, code in codes):
                    return Outcome(True, [])
                # A node of servers alone (--hosts h1:2,h2:1) sees no worker of its own end: its servers end when
                # every worker of the job has said goodbye (or the job's end stops them), not 10 s after they start.
                if not any(spec.role == "worker" for spec in self.specs):
                    time.sleep(POLL_S)
                    continue
                # Every worker finished well: servers get a moment to finish, then they are stopped.
                if servers_done_by is None:
                    servers_done_by = time.monotonic() + SERVER_DRAIN_S
                elif time.monotonic() > servers_done_by:
                    return Outcome(True, [])
            time.sleep(POLL_S)

    def _blames_others(self, failed: list) -> bool:
        """Whether the failed processes failed because of processes of other worker groups that still run (a group
        that hangs, waited for in shutdown() until the timeout): then dropping the failed ones' groups would leave
        the job to the hung ones, for ever. The job stops instead, naming them."""
        time.sleep(POLL_S)  # a note a failed process wrote as it ended is on disk by now
        topo = self.cfg.topology
        groups = {topo.role_of(spec.proc_rank).group for spec, _ in failed}
        running = {spec.proc_rank for spec, code in self._codes() if code is None}
        for note in self._notes(failed).values():
            if note.get("neutral"):
                continue
            for proc in note.get("blames", []):
                if proc in running and proc not in self.lost and topo.role_of(proc).group not in groups:
                    return True
        return False

    def _lose_groups(self, failed: list) -> bool:
        """An asynchronous job goes on without the worker groups of the failed workers: the rest of each group is
        killed and the job's processes are told (the servers drop the group). False when that cannot be: a server
        failed, or no worker group would be left."""
        topo = self.cfg.topology
        if any(spec.role != "worker" for spec, _ in failed):
            return False
        groups = sorted({topo.role_of(spec.proc_rank).group for spec, _ in failed})
        lost_groups = {topo.role_of(p).group for p in self.lost} | set(groups)
        if len(lost_groups) >= topo.nworker_groups:
            return False
        if topo.strategy == "hogwild" and len(self.ever_lost | set(groups)) >= topo.nworker_groups:
            # Hogwild's slices are mastered by groups never lost: with none left, their values are gone.
            say("every hogwild worker group has now been lost at least once: no group holds the masters' values, "
                "so the job stops")
            return False
        self.ever_lost.update(groups)
        # A group lost before every process joined the job would keep the others waiting at their rendezvous.
        if not self.watch.joined(list(range(topo.nprocs))):
            return False
        handlers = {spec.proc_rank: ctx.subprocess_handlers[i]
                    for ctx, specs in self.contexts for i, spec in enumerate(specs)
                    if id(ctx.subprocess_handlers[i]) not in self.retired}
        for group in groups:
            ranks = topo.worker_ranks(group)
            for proc in ranks:
                if proc in handlers:
                    self.retired.add(id(handlers[proc]))
                    if handlers[proc].proc.poll() is None:
                        try:
                            os.killpg(handlers[proc].proc.pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
            self.lost.update(ranks)
            local = [spec for spec in self.specs if spec.proc_rank in ranks]
            replacing = self.restarts_used + self.replaced < self.cfg.max_restarts and len(local) == len(ranks)
            if replacing:
                self.watch.mark_coming(ranks, self.generations.get(group, 0) + 1)
            self.watch.mark_lost(ranks)
            said = "; ".join(f"{spec.title} {describe_exit(code)}" for spec, code in failed
                             if topo.role_of(spec.proc_rank).group == group)
            servers = " and the servers" if topo.server_worker_separate else ""
            if replacing:
                self._replace(group, local, said)
                continue
            say(f"worker group {group} (rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}) lost: {said}; "
                f"the other {topo.nworker_groups - len(lost_groups)} worker group(s){servers} go on")
        return True

    def _replace(self, group: int, specs: list[ProcessSpec], said: str) -> None:
        """Start a worker group in the place of lost group `group` (all of whose processes ran on this node): the
        same ranks, the script from its start; they join the running job as replacements (SINGA_REPLACEMENT)."""
        self.replaced += 1
        generation = self.generations[group] = self.generations.get(group, 0) + 1
        ranks = [spec.proc_rank for spec in specs]
        for proc in ranks:  # what the lost processes said of their end is not the replacements' to answer for
            try:
                os.unlink(os.path.join(self.folder, f"blame.{proc}"))
            except OSError:
                pass
        say(f"worker group {group} (rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}) lost: {said}; "
            f"replacing it ({self.restarts_used + self.replaced}/{self.cfg.max_restarts}): its new workers take the "
            "current values from the others")
        self._start(f"worker-group{group}-r{generation}", specs, self._file_names(specs, generation),
                    env={"SINGA_REPLACEMENT": str(generation)})
        self.lost.difference_update(ranks)

    def stop(self, grace: float) -> None:
        """SIGTERM every process group still running, SIGKILL after `grace` seconds (at once when another stop
        signal comes meanwhile), then tidy up."""
        told = len(self.signals.received)
        handlers = [(spec, ctx.subprocess_handlers[i]) for ctx, specs in self.contexts for i, spec in enumerate(specs)]
        running = [(spec, h) for spec, h in handlers if h.proc.poll() is None]
        for _, h in running:
            _signal_group(h.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline and len(self.signals.received) == told:
            time.sleep(POLL_S)
            running = [(spec, h) for spec, h in running if h.proc.poll() is None]
        # Every group, ended processes' too: one that exited may have left children in its group, whose id cannot be
        # reused while they live.
        for _, h in handlers:
            _signal_group(h.proc.pid, signal.SIGKILL)
        for spec, h in running:
            try:
                h.proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                say(f"{spec.title} (pid {h.proc.pid}) did not end {KILL_WAIT_S:g} s after SIGKILL")
        for ctx, _ in self.contexts:
            if all(h.proc.poll() is not None for h in ctx.subprocess_handlers.values()):
                ctx.close(death_sig=signal.SIGKILL, timeout=0)  # torch's own tidying; it has no process to signal
        if self.pump is not None:
            self.pump.stop()
        if self.watch is not None:
            self.watch.close()
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)


def _watch_stdin() -> None:
    """On a remote node: when the controlling ssh connection goes away, stop the job."""
    def watch():
        try:  # the raw descriptor: a daemon thread must not hold sys.stdin's lock at interpreter exit
            while os.read(0, 4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="singa-launch-stdin", daemon=True).start()


def say(message: str) -> None:
    print(f"singa-launch: {message}", file=sys.stderr, flush=True)


def run_node(cfg: LaunchConfig, signals: StopSignals | None = None) -> int:
    """Run this node's share of the job to the end; return the launcher's exit status. `signals`: the stop
    signals recorded since the launcher started (by default, from now)."""
    signals = signals if signals is not None else StopSignals()
    signals.install()
    try:
        return _run_attempts(cfg, signals)
    finally:
        signals.restore()


def _run_attempts(cfg: LaunchConfig, signals: StopSignals) -> int:
    if cfg.exit_on_stdin_close:
        _watch_stdin()
    attempt = 0
    replaced = 0  # lost worker groups replaced in earlier attempts (each counts as a restart)
    while True:
        job = LocalJob(cfg, attempt, restarts_used=attempt + replaced, signals=signals)
        try:
            job.start()
            outcome = job.wait()
        except OSError as exc:  # a program that cannot be executed after all
            job.stop(0)
            say(f"could not start the job: {exc}")
            return 1
        if job.watch is not None:
            job.watch.finish(outcome.ok, stopped=lambda: bool(signals.received))
        others = sum(1 for _, code in job._codes() if code is None)
        if not outcome.ok and outcome.signal is None and others:
            which = "this node's" if outcome.lost else "the other"
            say(f"{outcome.describe()}; stopping {which} {others} process(es)")
        job.stop(cfg.grace_period)
        if not outcome.ok and signals.received:  # told to stop while the job was failing
            outcome = Outcome(False, [], signal=signals.first)
        replaced += job.replaced
        if outcome.ok:
            return 0
        if outcome.signal is not None:
            print(stopped_line(outcome.signal), file=sys.stderr, flush=True)
            return outcome.exit_code
        if attempt + replaced >= cfg.max_restarts:
            restarts = f" after {attempt + replaced} restart(s)" if attempt + replaced else ""
            say(f"job failed{restarts}: {outcome.describe()}")
            return outcome.exit_code
        attempt += 1
        say(f"{outcome.describe()}; restarting the job ({attempt + replaced}/{cfg.max_restarts})")
        if cfg.nnodes == 1:
            cfg.master_port = free_port()  # the old rendezvous port may linger in TIME_WAIT
        else:
            # Every node restarts once per failure of the job: attempt k meets at base port + k on all nodes,
            # never at a store left over from the attempt before.
            cfg.master_port += 1
