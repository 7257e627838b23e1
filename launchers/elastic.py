"""singa-launch's elastic mode: a job whose workers may fail, or be added, while it runs (Horovod elastic).

    singa-launch -np 3 --min-np 2 --max-np 4 python train.py
    singa-launch -np 2 --min-np 2 --max-np 8 --host-discovery-script ./hosts.sh python train.py
    singa-launch -np 4 -H h1:2,h2:2 --min-np 2 python train.py      # fault tolerance on fixed hosts

The launcher hosts the job's store and runs the rendezvous (singa_dist.rendezvous): it numbers the workers of
each round and publishes them; the workers' `singa_dist.elastic.run` does the rest. As horovodrun:

- The job starts once the hosts offer -np slots (waiting up to --elastic-timeout), with every slot they offer by
  then, up to --max-np. --min-np defaults to -np.
- A worker that fails (exits with an error or is killed) is dropped: its round is marked broken, so the others
  stop waiting for it at once, and the next round holds the others. Its host counts a failure; a host that
  failed --host-failures times (1 with discovery or --hosts) is left out (blacklisted): its other workers are
  stopped; with --blacklist-cooldown-range MIN MAX it may come back after a cooldown that doubles each time.
- The hosts: the discovery script's output (run through a shell every --discovery-interval seconds, one
  `host:slots` or `host` a line), the fixed --hosts, or this host with -np slots. Free slots on hosts not left
  out get new workers (up to --max-np); a host gone from the script's output has its workers released: they
  are in no new round, leave at the next `state.commit()` with everyone's consent, and are stopped. Rounds
  published for such changes say so (added/removed), which the workers read as Horovod's host notifications.
- Fewer than --min-np workers: no round is published; the launcher waits --elastic-timeout seconds for slots,
  then stops the job with an error. Each round after the first is a reset; past --reset-limit the job stops.
- The job ends well when every worker that took part in a round has finished well; workers still waiting
  to join then are stopped.

Workers on this host start directly; workers on other hosts start over ssh (--ssh-command), each in its own
connection, so a lost host takes only its own workers with it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch.distributed as dist

import singa_dist.rendezvous as rendezvous
from singa_dist.environment import SECRET_VARIABLE, store_listen_fd

from .config import LaunchConfig, UsageError, _check_port_free
from .lifeline import SECRET_FROM_STDIN
from .local import describe_exit, say
from .tag_output import copy_tagged
from .watchdog import is_this_host as _is_local

POLL_S = 0.05


@dataclass
class _Worker:
    id: int
    host: str
    proc: subprocess.Popen
    copiers: list = field(default_factory=list)
    code: int | None = None  # exit status once it ended
    slot: int = 0  # its place among its host's workers (horovodrun names a process host[slot])
    # Released: its host left the discovery script's output (or was left out after a failure of another worker
    # there). It is in no new round and leaves the job at its next commit; how it ends is no failure of the job.
    released: bool = False


def _start(wid: int, host: str, argv: list[str], env: dict, secret: str | None = None) -> _Worker:
    """A worker process of this host (or the ssh client that runs it elsewhere), its output copied to this console
    tagged with its id. `secret`: the job's secret, the one line of its input (an ssh client's: see
    launchers.lifeline.take_secret_from_stdin)."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL if secret is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    if secret is not None:
        try:
            proc.stdin.write(secret.encode() + b"\n")
            proc.stdin.close()
        except OSError:  # it ended already: its end is reported as any other's
            pass
    worker = _Worker(wid, host, proc)
    for pipe, out in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
        t = threading.Thread(target=copy_tagged, args=(pipe, out, str(wid)), daemon=True)
        t.start()
        worker.copiers.append(t)
    return worker


def _signal(worker: _Worker, sig: int) -> None:
    try:
        os.killpg(worker.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(worker: _Worker, grace: float) -> None:
    """SIGTERM, SIGKILL after `grace` seconds, then whatever it left in its process group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if worker.proc.poll() is not None:
            break
        try:
            os.killpg(worker.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            worker.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    _signal(worker, signal.SIGKILL)  # children it left in its group


def parse_discovered(text: str, default_slots: int) -> dict[str, int]:
    """`host:slots` or `host` lines (blank lines and # comments ignored) -> slots per host, in order."""
    slots: dict[str, int] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, count = line.partition(":")
        try:
            n = int(count) if count else default_slots
        except ValueError:
            raise ValueError(f"the host discovery script printed {line!r}: want host or host:slots") from None
        if n < 0:
            raise ValueError(f"the host discovery script printed {line!r}: slots must be 0 or more")
        slots[host.strip()] = slots.get(host.strip(), 0) + n
    return slots


def run_discovery(script: str, default_slots: int, timeout: float) -> dict[str, int]:
    """Run the host discovery script through a shell, as horovodrun runs it (a script without #!, or a command
    line, works too), and read its hosts: slots per host. Raises RuntimeError saying why when it fails."""
    try:
        out = subprocess.run(script, shell=True, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(str(exc)) from None
    if out.returncode != 0:
        raise RuntimeError(f"exited with status {out.returncode}"
                           + (f": {out.stderr.strip().splitlines()[-1]}" if out.stderr.strip() else ""))
    try:
        return parse_discovered(out.stdout, default_slots)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None


# Why singa-launch publishes a round for a change of hosts (Horovod's HostUpdateResult; singa_dist.elastic reads it)
REMOVED, ADDED = 1, 2
# horovodrun's words when the job ends for processes that failed, and past --reset-limit (scripts match them)
FAILED_MESSAGE = ("Horovod detected that one or more processes exited with non-zero status, thus causing the job to "
                  "be terminated. The first process to do so was: Process name: {name} Exit code: {code}")
RESET_LIMIT_EXCEEDED_MESSAGE = "Horovod was shutdown because number of resets during elastic job exceeded limit: {}"


@dataclass
class HostState:
    """What the driver knows of one host: its failed workers, and whether it is left out (blacklisted) and till
    when. horovodrun's cooldown: the n-th time a host is left out, MIN * 2^n + U(0, MIN) seconds, within
    [MIN, MAX]; it comes back when discovery lists it after that (without a cooldown range it never does)."""
    failures: int = 0
    blacklisted: bool = False
    times_left_out: int = 0
    cooldown_end: float = 0.0  # time.monotonic() when it may come back; 0: no cooldown running

    def blacklist(self, cooldown_range: tuple[int, int] | None, now: float) -> None:
        self.blacklisted = True
        if cooldown_range is None or self.cooldown_end > now:
            return
        low, high = cooldown_range
        self.times_left_out += 1
        delay = low * (1 << self.times_left_out) + random.uniform(0, 1) * low
        self.cooldown_end = now + max(low, min(high, delay))

    def resurrected(self, now: float) -> bool:
        """Left out, and its cooldown is over: it may take workers again."""
        return self.blacklisted and 0 < self.cooldown_end <= now

    def whitelist(self) -> None:
        self.blacklisted, self.failures, self.cooldown_end = False, 0, 0.0


class ElasticDriver:
    """Starts, watches and numbers the workers of one elastic job."""

    def __init__(self, cfg: LaunchConfig):
        self.cfg = cfg
        self.spec = cfg.elastic
        self.workers: dict[int, _Worker] = {}
        self.next_id = 0
        self.round = -1
        self.members: list[int] = []
        self.rounds: dict[int, tuple] = {}  # members of every round published
        self.joined: set[int] = set()  # workers seen in a round
        self.hosts: dict[str, HostState] = {}
        self.first_failure: str | None = None
        self.first_failed: _Worker | None = None
        self.short_since: float | None = None  # when the job fell below --min-np
        self.changed = False  # the workers changed since the last round published
        self.update = 0  # and the hosts did so (HostUpdateResult bits, announced with the next round)
        self.resets = 0  # rounds published after the first (horovodrun's reset count)
        self.store = dist.TCPStore(cfg.master_addr, cfg.master_port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=30),
                                   master_listen_fd=store_listen_fd(cfg.master_addr, cfg.master_port))
        self._next_discovery = 0.0
        self._slots: dict[str, int] = {}
        self.label = f"{socket.gethostname()}/0" if self.spec.agents else "localhost"
        self.agents = AgentBoard(self.store) if self.spec.agents else None

    # ---------------------------------------------------------------------------------------------- hosts
    def _host(self, name: str) -> HostState:
        return self.hosts.setdefault(name, HostState())

    def discover(self, first: bool = False) -> dict[str, int]:
        if self.spec.agents:  # this node, and every node whose launcher has joined and still beats
            return {self.label: self.spec.slots, **{a.label: self.spec.slots for a in self.agents.live()}}
        if self.spec.fixed_hosts is not None:
            return dict(self.spec.fixed_hosts)
        if not self.spec.discovery_script:
            return {"localhost": self.spec.initial_np}
        try:
            return run_discovery(self.spec.discovery_script, self.spec.slots,
                                 timeout=max(self.spec.discovery_interval * 10, 10))
        except RuntimeError as exc:
            if first:  # a script that fails at once is a mistake: the job does not start (as horovodrun)
                raise UsageError(f"the host discovery script {self.spec.discovery_script!r} failed: {exc}") from None
            say(f"the host discovery script failed ({exc}); keeping the hosts it gave before")
            return self._slots

    def _running(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.code is None]

    def _training(self) -> list[_Worker]:
        """The running workers that are, or will be, in the job's rounds (not those released)."""
        return [w for w in self._running() if not w.released]

    def _free_slots(self) -> list[str]:
        """One host name per worker that may start now, within --max-np."""
        busy: dict[str, int] = {}
        for w in self._training():
            busy[w.host] = busy.get(w.host, 0) + 1
        room = self.spec.max_np - len(self._training())
        free = []
        for host, slots in self._slots.items():
            if self._host(host).blacklisted:
                continue
            if not self.spec.agents and not _is_local(host) and self.cfg.master_addr in ("127.0.0.1", "localhost",
                                                                                            "::1"):
                say(f"host {host} is not this one, and the workers there cannot reach the job's store at "
                    f"{self.cfg.master_addr}: give --master-addr (this host's address); leaving {host} out")
                self._host(host).blacklist(None, time.monotonic())
                continue
            free += [host] * max(0, slots - busy.get(host, 0))
        return free[:max(0, room)]

    def _update_hosts(self, discovered: dict[str, int]) -> None:
        """Take what discovery printed: hosts whose cooldown is over and that it lists come back; the workers of a
        host it no longer lists (or beyond the slots it now gives) are released."""
        now = time.monotonic()
        for host, state in self.hosts.items():
            if host in discovered and state.resurrected(now):
                state.whitelist()
                say(f"host {host}'s cooldown is over: it may take workers again")
        self._slots = discovered
        if not self.spec.discovery_script:
            return  # (fixed hosts and agents' nodes are not removed: a node whose launcher is gone failed)
        for host in {w.host for w in self._training()}:
            on_host = sorted((w for w in self._training() if w.host == host), key=lambda w: w.slot)
            extra = on_host[discovered.get(host, 0):]
            if extra:
                for worker in extra:
                    worker.released = True
                self.changed, self.update = True, self.update | REMOVED
                gone = "is gone from" if host not in discovered else f"has {discovered[host]} slot(s) in"
                say(f"host {host} {gone} the host discovery script's output: worker(s) "
                    f"{', '.join(str(w.id) for w in extra)} leave the job at the next commit")

    # -------------------------------------------------------------------------------------------- workers
    def spawn(self, host: str) -> _Worker:
        wid = self.next_id
        self.next_id += 1
        taken = {w.slot for w in self._training() if w.host == host}
        slot = next(i for i in range(len(taken) + 1) if i not in taken)
        env = {**self.cfg.common_env(), rendezvous.ELASTIC_VARIABLE: "1", rendezvous.WORKER_ID_VARIABLE: str(wid),
               rendezvous.ELASTIC_TIMEOUT_VARIABLE: f"{self.spec.elastic_timeout:g}",
               "SINGA_LAUNCHER_PID": str(os.getpid()), "HOROVOD_ELASTIC": "1", "HOROVOD_HOSTNAME": host}
        env.pop("SINGA_TOPOLOGY", None)  # each round's size is its own
        env.pop("SINGA_PROC_WORLD_SIZE", None)
        argv = [sys.executable, "-m", "launchers.lifeline", *self.cfg.command]
        if self.spec.agents and host != self.label:  # its node's launcher starts it and reports its end
            worker = _Worker(wid, host, self.agents.start(host, wid, env))
        elif self.spec.agents or _is_local(host):
            worker = _start(wid, host, argv, {**os.environ, **env})
        else:
            # The job's secret travels on the worker's input, read there by launchers.lifeline, never in the command
            # (which dies with its parent there: this launcher is none of its ancestors on that host).
            remote = ["cd", shlex.quote(os.getcwd()), "&&", "env",
                      *[f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k != "SINGA_LAUNCHER_PID"],
                      "SINGA_LAUNCHER_PID=", f"{SECRET_FROM_STDIN}=1", shlex.quote(sys.executable), "-m",
                      "launchers.lifeline", *map(shlex.quote, self.cfg.command)]
            ssh = list(self.cfg.ssh_command)
            if self.cfg.ssh_port:
                ssh += ["-p", str(self.cfg.ssh_port)]
            if self.cfg.ssh_identity:
                ssh += ["-i", self.cfg.ssh_identity]
            worker = _start(wid, host, [sys.executable, "-m", "launchers.lifeline", *ssh, host, " ".join(remote)],
                            {**os.environ, "SINGA_LAUNCHER_PID": str(os.getpid())},
                            secret=os.environ.get(SECRET_VARIABLE, ""))
        worker.slot = slot
        self.workers[wid] = worker
        return worker

    def stop(self, worker: _Worker, grace: float) -> None:
        if isinstance(worker.proc, AgentWorker):
            worker.proc.stop(grace)
        else:
            _stop(worker, grace)

    # ---------------------------------------------------------------------------------------------- rounds
    def publish(self, members: list[int], update: int = 0) -> None:
        self.round += 1
        self.members = list(members)
        found = rendezvous.Round(self.round, tuple(members), tuple(self.workers[m].host for m in members), update)
        self.rounds[self.round] = found.members
        self.store.set(rendezvous.round_key(self.round), found.to_json())
        self.store.set(rendezvous.LATEST, str(self.round))

    def _joined(self, worker: _Worker) -> bool:
        """Whether the worker has been in some round (else it is still waiting to join its first)."""
        if worker.id not in self.joined and any(self.store.check([rendezvous.joined_key(r, worker.id)])
                                                 for r in range(self.round + 1)):
            self.joined.add(worker.id)  # once in a round, always: the store is not asked again
        return worker.id in self.joined

    def _formed(self, number: int) -> bool:
        """Whether every member of round `number` has come to it."""
        return self.store.check([rendezvous.joined_key(number, m) for m in self.rounds[number]])

    def _abort_rounds_of(self, worker: _Worker, why: str) -> None:
        for number, members in self.rounds.items():  # the round it trains in, and a newer one still forming
            if worker.id in members:
                rendezvous.abort(self.store, number, why)

    # ---------------------------------------------------------------------------------------------- the job
    def run(self) -> int:
        try:
            self._slots = self.discover(first=True)
        except UsageError as exc:
            say(str(exc))
            return 1
        deadline = time.monotonic() + self.spec.elastic_timeout
        need = self.spec.min_np if self.spec.agents else self.spec.initial_np
        # The job starts once the hosts offer the workers it needs (-np; --nnodes MIN nodes), with every slot they
        # offer by then, up to --max-np (as horovodrun starts).
        while len(self._free_slots()) < need and time.monotonic() < deadline and (
                self.spec.agents or self.spec.discovery_script):
            time.sleep(max(POLL_S, self.spec.discovery_interval if self.spec.discovery_script else 0))
            self._update_hosts(self.discover())
        first = self._free_slots()
        if len(first) < need:
            say(f"the hosts offer {len(first)} worker slot(s), fewer than the {need} the job needs to start"
                + (f" (waited {self.spec.elastic_timeout:g} s)" if self.spec.discovery_script or self.spec.agents
                   else ""))
            return 1
        if self.spec.agents:
            self.spec = dataclasses.replace(self.spec, initial_np=len(first))
        self._next_discovery = time.monotonic() + self.spec.discovery_interval
        self.publish([self.spawn(host).id for host in first])
        say(f"elastic job: {len(first)} workers (min {self.spec.min_np}, max {self.spec.max_np})")
        code = 1
        try:
            code = self._watch()
            return code
        finally:
            for worker in self._running():
                self.stop(worker, self.cfg.grace_period)
            if self.agents is not None:
                self.agents.finish(code)
            for worker in self.workers.values():
                for t in worker.copiers:
                    t.join(timeout=2.0)

    def _watch(self) -> int:
        while True:
            for worker in self._running():
                code = worker.proc.poll()
                if code is None:
                    continue
                worker.code = code
                if worker.released:
                    if code != 0:  # (its host may be gone with it: members still waiting for it must not wait)
                        self._abort_rounds_of(worker, f"worker {worker.id} on {worker.host} left the job")
                elif code != 0:
                    self._failed(worker)
            training = self._training()
            finished = [w for w in self.workers.values() if w.code == 0 and not w.released]
            if finished and not any(self._joined(w) for w in training):
                # Every worker that trained has finished well: the ones still waiting to join have nothing to do.
                for worker in self._running():
                    self.stop(worker, 0)
                if self.first_failure:
                    say(f"job finished with {len(finished)} worker(s), after losing some ({self.first_failure})")
                return 0
            if not training:
                say(f"job failed: every worker stopped ({self.first_failure or 'no worker finished'})"
                    + (". " + FAILED_MESSAGE.format(name=f"{self.first_failed.host}[{self.first_failed.slot}]",
                                                    code=self.first_failed.code) if self.first_failed else ""))
                return 1
            if self.spec.discovery_script or self.spec.agents or self.spec.fixed_hosts is not None:
                if time.monotonic() >= self._next_discovery and not finished:
                    # (once a worker has finished well the job is ending: its slot is not filled again)
                    self._update_hosts(self.discover())
                    self._next_discovery = time.monotonic() + self.spec.discovery_interval
                    self._grow()
            code = self._next_round()
            if code is not None:
                return code
            self._stop_released()
            time.sleep(POLL_S)

    def _next_round(self) -> int | None:
        """Publish a round for the changes not yet published, when the job has --min-np workers for it; wait for
        them up to --elastic-timeout otherwise. Returns the job's exit status when it must end."""
        training = self._training()
        if len(training) < self.spec.min_np:
            if self.short_since is None:
                self.short_since = time.monotonic()
                say(f"{len(training)} worker(s) left, fewer than --min-np {self.spec.min_np}: waiting up to "
                    f"{self.spec.elastic_timeout:g} s for hosts to offer more")
                for worker in self._running():  # released workers cannot wait for a round that never comes
                    if worker.released:
                        self._abort_rounds_of(worker, f"worker {worker.id} on {worker.host} left the job")
                        self.stop(worker, self.cfg.grace_period)
            elif time.monotonic() - self.short_since > self.spec.elastic_timeout:
                say(f"job failed: {len(training)} worker(s) left, fewer than --min-np {self.spec.min_np}, for "
                    f"{self.spec.elastic_timeout:g} s ({self.first_failure or 'hosts left the job'})")
                return 1
            return None
        self.short_since = None
        if not self.changed:
            return None
        if self.spec.reset_limit is not None and self.resets >= self.spec.reset_limit:
            say(f"job failed: the workers changed {self.resets} time(s) and would again, past --reset-limit "
                f"{self.spec.reset_limit}. " + RESET_LIMIT_EXCEEDED_MESSAGE.format(self.spec.reset_limit))
            return 1
        alive = [m for m in self.members if m in {w.id for w in training}]
        self.publish(alive + [w.id for w in training if w.id not in alive], self.update)
        self.resets += 1
        self.changed, self.update = False, 0
        return None

    def _stop_released(self) -> None:
        """Released workers are stopped once the round without them has formed (they left at the same commit as
        the others)."""
        released = [w for w in self._running() if w.released]
        if released and self.round in self.rounds and self._formed(self.round):
            for worker in released:
                if worker.id not in self.rounds[self.round]:
                    self.stop(worker, self.cfg.grace_period)
                    worker.code = worker.proc.poll()

    def _failed(self, worker: _Worker) -> None:
        """A worker ended with an error: break its round, count its host's failure, leave the host out after
        --host-failures of them (its other workers are stopped)."""
        what = f"worker {worker.id} on {worker.host} {describe_exit(worker.code)}"
        if isinstance(worker.proc, AgentWorker) and worker.proc.lost:
            what = (f"worker {worker.id} on {worker.host} was lost with its node's launcher (no heartbeat for "
                    f"{AGENT_STALE_S:g} s)")
        if self.first_failure is None:
            self.first_failure, self.first_failed = what, worker
        self._abort_rounds_of(worker, what)
        host = self._host(worker.host)
        host.failures += 1
        note = ""
        if host.failures >= self.spec.host_failures and not host.blacklisted:
            host.blacklist(self.spec.cooldown_range, time.monotonic())
            note = f"; host {worker.host} failed {host.failures} time(s): leaving it out of the job"
            if self.spec.cooldown_range is not None:
                note += f" for {host.cooldown_end - time.monotonic():.1f} s"
            for other in self._training():
                if other.host == worker.host:
                    other.released = True
                    self._abort_rounds_of(other, what)
                    self.stop(other, self.cfg.grace_period)
                    other.code = other.proc.poll()
        say(f"{what}; going on without it{note}")
        self.changed = True  # a round without it (no change of hosts to announce: the collectives report it)

    def _grow(self) -> None:
        free = self._free_slots()
        if not free:
            return
        for host in free:
            self.spawn(host)
        self.changed, self.update = True, self.update | ADDED
        say(f"{len(free)} new worker(s) on {', '.join(sorted(set(free)))}: they join at the next commit")


def run_elastic(cfg: LaunchConfig) -> int:
    if cfg.elastic.agents and not _is_local(cfg.master_addr):
        return run_agent(cfg)  # the rendezvous endpoint is another node's: its launcher drives the job
    try:
        driver = ElasticDriver(cfg)
    except Exception as exc:
        if cfg.elastic.agents and not _port_free(cfg.master_port):
            # Another node's launcher (or this host's first) holds the rendezvous: this one serves it as an agent.
            return run_agent(cfg)
        say(f"cannot host the job's store at port {cfg.master_port}: {exc}")
        return 1
    try:
        return driver.run()
    except KeyboardInterrupt:
        say("stopped by signal SIGINT")
        return 128 + signal.SIGINT


# --------------------------------------------------------------------------------------------------------------
# Several nodes, each running singa-launch with --nnodes MIN:MAX --rdzv-backend c10d --rdzv-endpoint HOST[:PORT]
# (torchrun's command line): the launcher that opens the store at the endpoint drives the job as above; every other
# one is an agent for its node. An agent announces its node and beats in the store, starts the workers the driver
# asks for on its node, stops those it is told to stop, and reports each one's end. A node whose agent stops beating
# (killed, host gone) counts as failed with all its workers: the driver goes on without them.

AGENTS = "singa/agents/"
AGENT_BEAT_S = 0.5
AGENT_STALE_S = 3.0  # an agent whose heartbeat stood still this long is gone, with its workers


def _port_free(port: int) -> bool:
    try:
        _check_port_free(port)
        return True
    except UsageError:
        return False


@dataclass
class _Agent:
    number: int
    label: str
    beat: str = ""
    changed: float = 0.0


class AgentBoard:
    """The driver's view of the agents: who has joined, who still beats; starting and stopping workers there."""

    def __init__(self, store):
        self.store = store
        self.known: dict[int, _Agent] = {}
        self._refreshed = -POLL_S

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < POLL_S:  # once per turn of the driver's loop, not once per worker it polls
            return
        self._refreshed = now
        count = int(self.store.add(AGENTS + "count", 0))
        for n in range(1, count + 1):
            if n not in self.known and self.store.check([f"{AGENTS}{n}/host"]):
                self.known[n] = _Agent(n, f"{self.store.get(f'{AGENTS}{n}/host').decode()}/{n}", changed=now)
        for agent in self.known.values():
            key = f"{AGENTS}{agent.number}/alive"
            beat = self.store.get(key).decode() if self.store.check([key]) else ""
            if beat != agent.beat:
                agent.beat, agent.changed = beat, now

    def live(self) -> list[_Agent]:
        self._refresh()
        now = time.monotonic()
        return [a for a in self.known.values() if now - a.changed < AGENT_STALE_S]

    def agent(self, label: str) -> _Agent:
        return next(a for a in self.known.values() if a.label == label)

    def start(self, label: str, wid: int, env: dict) -> "AgentWorker":
        agent = self.agent(label)
        index = self.store.add(f"{AGENTS}{agent.number}/spawn/count", 1)
        self.store.set(f"{AGENTS}{agent.number}/spawn/{index}", json.dumps({"id": wid, "env": env}))
        return AgentWorker(self, agent, wid)

    def finish(self, code: int) -> None:
        """Tell every agent the job is over (they stop what runs there and end with this status)."""
        try:
            self.store.set(AGENTS + "done", str(code))
            deadline = time.monotonic() + 2 * AGENT_STALE_S
            while time.monotonic() < deadline and any(
                    not self.store.check([f"{AGENTS}{a.number}/gone"]) for a in self.live()):
                time.sleep(POLL_S)
        except Exception:
            pass


class AgentWorker:
    """A worker on another node, as far as the driver's loop needs a process: poll(), wait(), stop()."""

    def __init__(self, board: AgentBoard, agent: _Agent, wid: int):
        self.board, self.agent, self.wid = board, agent, wid
        self.returncode: int | None = None
        self.pid = None
        self.lost = False  # its node's launcher stopped beating: its end is presumed

    def poll(self) -> int | None:
        if self.returncode is None:
            key = f"{AGENTS}{self.agent.number}/exit/{self.wid}"
            if self.board.store.check([key]):
                self.returncode = int(self.board.store.get(key))
            elif self.agent not in self.board.live():
                self.returncode, self.lost = -signal.SIGKILL, True  # its node's launcher is gone, and the worker
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("worker", timeout)
            time.sleep(POLL_S)
        return self.returncode

    def stop(self, grace: float) -> None:
        if self.poll() is None:
            self.board.store.set(f"{AGENTS}{self.agent.number}/stop/{self.wid}", str(grace))
            try:
                self.wait(grace + 5.0 + AGENT_STALE_S)
            except subprocess.TimeoutExpired:
                pass


def run_agent(cfg: LaunchConfig) -> int:
    """This node's part in an elastic job of several launchers: start, watch and report the workers the driver (the
    launcher at the rendezvous endpoint) asks for here, until it says the job is over."""
    timeout = max(cfg.rendezvous_timeout, 1.0)
    try:
        store = dist.TCPStore(cfg.master_addr, cfg.master_port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        store.set_timeout(datetime.timedelta(seconds=30))
        number = int(store.add(AGENTS + "count", 1))
        store.set(f"{AGENTS}{number}/host", socket.gethostname())
    except Exception as exc:
        say(f"the elastic job's rendezvous at {cfg.master_addr}:{cfg.master_port} did not answer: {exc}")
        return 1
    prefix = f"{AGENTS}{number}/"
    say(f"this node joined the elastic job at {cfg.master_addr}:{cfg.master_port} (node {number}, "
        f"{cfg.elastic.slots} slot(s))")
    workers: dict[int, _Worker] = {}
    killing: dict[int, float] = {}  # workers told to stop: when SIGKILL follows their SIGTERM
    started, beat = 0, 0
    code = 1
    try:
        while True:
            store.set(prefix + "alive", str(beat))
            beat += 1
            if store.check([AGENTS + "done"]):
                code = int(store.get(AGENTS + "done"))
                break
            while store.check([f"{prefix}spawn/{started + 1}"]):
                started += 1
                request = json.loads(store.get(f"{prefix}spawn/{started}"))
                workers[request["id"]] = _start(request["id"], socket.gethostname(),
                                                [sys.executable, "-m", "launchers.lifeline", *cfg.command],
                                                {**os.environ, **request["env"], "SINGA_LAUNCHER_PID": str(os.getpid())})
            for wid, worker in workers.items():
                if worker.code is not None:
                    continue
                # Stopped without blocking this loop: its heartbeat must go on (3 s of silence is a lost node).
                if wid not in killing and store.check([f"{prefix}stop/{wid}"]):
                    killing[wid] = time.monotonic() + float(store.get(f"{prefix}stop/{wid}"))
                    _signal(worker, signal.SIGTERM)
                elif wid in killing and time.monotonic() > killing[wid]:
                    _signal(worker, signal.SIGKILL)
                worker.code = worker.proc.poll()
                if worker.code is not None:
                    store.set(f"{prefix}exit/{wid}", str(worker.code))
            time.sleep(AGENT_BEAT_S / 5)
    except Exception as exc:  # the driver's store is gone: the job ended badly, or the driver's node did
        say(f"the elastic job's driver at {cfg.master_addr}:{cfg.master_port} stopped answering ({exc}); stopping "
            "this node's workers")
        code = 1
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                _stop(worker, cfg.grace_period)
            for t in worker.copiers:
                t.join(timeout=2.0)
        try:
            store.set(prefix + "gone", "1")
        except Exception:
            pass
    return code
