"""singa-launch's elastic mode: a job whose workers may fail, or be added, while it runs (Horovod elastic).

    singa-launch -np 3 --min-np 2 --max-np 4 python train.py
    singa-launch --min-np 2 --max-np 8 --host-discovery-script ./hosts.sh python train.py

The launcher hosts the job's store and runs the rendezvous (singa_dist.rendezvous): it numbers the workers of
each round and publishes them; the workers' `singa_dist.elastic.run` does the rest.

- A worker that fails (exits with an error or is killed) is dropped: its round is marked broken, so the others
  stop waiting for it at once, and the next round holds the others. Its host counts a failure; a host that
  failed --host-failures times is left out of the job (its workers stopped, none started there again).
- With --host-discovery-script, the script runs every --discovery-interval seconds and prints the hosts
  that may run workers now, one `host:slots` (or `host`, with --slots slots) a line. Free slots on hosts
  not left out get new workers (up to --max-np); they join the next round, which the others enter at their
  next `state.commit()`. Without a script the hosts are this one with -np slots: the job shrinks on
  failures and never grows.
- Fewer than --min-np workers: the launcher waits --elastic-timeout seconds for discovery to offer more,
  then stops the job with an error.
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

from .config import LaunchConfig, UsageError, _check_port_free
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


def _start(wid: int, host: str, argv: list[str], env: dict) -> _Worker:
    """A worker process of this host (or the ssh client that runs it elsewhere), its output copied to this console
    tagged with its id."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
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
        self.failures: dict[str, int] = {}
        self.left_out: set[str] = set()
        self.first_failure: str | None = None
        self.short_since: float | None = None  # when the job fell below --min-np
        self.store = dist.TCPStore(cfg.master_addr, cfg.master_port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=30))
        self._next_discovery = 0.0
        self._slots: dict[str, int] = {}
        self.label = f"{socket.gethostname()}/0" if self.spec.agents else "localhost"
        self.agents = AgentBoard(self.store) if self.spec.agents else None

    # ---------------------------------------------------------------------------------------------- hosts
    def discover(self) -> dict[str, int]:
        if self.spec.agents:  # this node, and every node whose launcher has joined and still beats
            return {self.label: self.spec.slots, **{a.label: self.spec.slots for a in self.agents.live()}}
        if not self.spec.discovery_script:
            return {"localhost": self.spec.initial_np}
        try:
            out = subprocess.run(shlex.split(self.spec.discovery_script), capture_output=True, text=True,
                                 timeout=max(self.spec.discovery_interval * 10, 10))
        except (OSError, subprocess.TimeoutExpired) as exc:
            say(f"the host discovery script failed ({exc}); keeping the hosts it gave before")
            return self._slots
        if out.returncode != 0:
            say(f"the host discovery script exited with status {out.returncode}; keeping the hosts it gave before"
                + (f": {out.stderr.strip().splitlines()[-1]}" if out.stderr.strip() else ""))
            return self._slots
        try:
            return parse_discovered(out.stdout, self.spec.slots)
        except ValueError as exc:
            say(f"{exc}; keeping the hosts it gave before")
            return self._slots

    def _running(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.code is None]

    def _free_slots(self) -> list[str]:
        """One host name per worker that may start now, within --max-np."""
        busy: dict[str, int] = {}
        for w in self._running():
            busy[w.host] = busy.get(w.host, 0) + 1
        room = self.spec.max_np - len(self._running())
        free = []
        for host, slots in self._slots.items():
            if host in self.left_out:
                continue
            if not self.spec.agents and not _is_local(host) and self.cfg.master_addr in ("127.0.0.1", "localhost",
                                                                                            "::1"):
                say(f"host {host} is not this one, and the workers there cannot reach the job's store at "
                    f"{self.cfg.master_addr}: give --master-addr (this host's address); leaving {host} out")
                self.left_out.add(host)
                continue
            free += [host] * max(0, slots - busy.get(host, 0))
        return free[:max(0, room)]

    # -------------------------------------------------------------------------------------------- workers
    def spawn(self, host: str) -> _Worker:
        wid = self.next_id
        self.next_id += 1
        env = {**self.cfg.common_env(), rendezvous.ELASTIC_VARIABLE: "1", rendezvous.WORKER_ID_VARIABLE: str(wid),
               "SINGA_LAUNCHER_PID": str(os.getpid()), "HOROVOD_ELASTIC": "1", "HOROVOD_HOSTNAME": host}
        env.pop("SINGA_TOPOLOGY", None)  # each round's size is its own
        env.pop("SINGA_PROC_WORLD_SIZE", None)
        if self.spec.reset_limit is not None:
            env["SINGA_ELASTIC_RESET_LIMIT"] = str(self.spec.reset_limit)
        argv = [sys.executable, "-m", "launchers.lifeline", *self.cfg.command]
        if self.spec.agents and host != self.label:  # its node's launcher starts it and reports its end
            worker = _Worker(wid, host, self.agents.start(host, wid, env))
            self.workers[wid] = worker
            return worker
        if self.spec.agents or _is_local(host):
            worker = _start(wid, host, argv, {**os.environ, **env})
        else:
            remote = ["cd", shlex.quote(os.getcwd()), "&&", "env",
                      *[f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k != "SINGA_LAUNCHER_PID"],
                      *map(shlex.quote, self.cfg.command)]
            ssh = list(self.cfg.ssh_command)
            if self.cfg.ssh_port:
                ssh += ["-p", str(self.cfg.ssh_port)]
            if self.cfg.ssh_identity:
                ssh += ["-i", self.cfg.ssh_identity]
            worker = _start(wid, host, [sys.executable, "-m", "launchers.lifeline", *ssh, host, " ".join(remote)],
                            {**os.environ, "SINGA_LAUNCHER_PID": str(os.getpid())})
        self.workers[wid] = worker
        return worker

    def stop(self, worker: _Worker, grace: float) -> None:
        if isinstance(worker.proc, AgentWorker):
            worker.proc.stop(grace)
        else:
            _stop(worker, grace)

    # ---------------------------------------------------------------------------------------------- rounds
    def publish(self, members: list[int]) -> None:
        self.round += 1
        self.members = list(members)
        found = rendezvous.Round(self.round, tuple(members), tuple(self.workers[m].host for m in members))
        self.rounds[self.round] = found.members
        self.store.set(rendezvous.round_key(self.round), found.to_json())
        self.store.set(rendezvous.LATEST, str(self.round))

    def _joined(self, worker: _Worker) -> bool:
        """Whether the worker has been in some round (else it is still waiting to join its first)."""
        if worker.id not in self.joined and any(self.store.check([rendezvous.joined_key(r, worker.id)])
                                                 for r in range(self.round + 1)):
            self.joined.add(worker.id)  # once in a round, always: the store is not asked again
        return worker.id in self.joined

    # ---------------------------------------------------------------------------------------------- the job
    def run(self) -> int:
        self._slots = self.discover()
        if self.spec.agents:  # the job starts once --nnodes MIN nodes have come, with all that have by then
            deadline = time.monotonic() + self.spec.elastic_timeout
            while len(self._free_slots()) < self.spec.min_np and time.monotonic() < deadline:
                time.sleep(POLL_S)
                self._slots = self.discover()
            if len(self._free_slots()) >= self.spec.min_np:
                self.spec = dataclasses.replace(self.spec, initial_np=len(self._free_slots()))
        self._next_discovery = time.monotonic() + self.spec.discovery_interval
        first = self._free_slots()[:self.spec.initial_np]
        if len(first) < self.spec.min_np:
            say(f"the hosts offer {len(first)} worker slot(s), fewer than --min-np {self.spec.min_np}")
            return 1
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
            changed = False
            for worker in self._running():
                code = worker.proc.poll()
                if code is None:
                    continue
                worker.code = code
                if code != 0:
                    changed |= self._failed(worker)
            running = self._running()
            finished = [w for w in self.workers.values() if w.code == 0]
            if finished and not any(self._joined(w) for w in running):
                # Every worker that trained has finished well: the ones still waiting to join have nothing to do.
                for worker in running:
                    self.stop(worker, 0)
                if any(w.code not in (0, None) for w in self.workers.values()):
                    say(f"job finished with {len(finished)} worker(s), after losing some ({self.first_failure})")
                return 0
            if not running:
                say(f"job failed: every worker stopped ({self.first_failure or 'no worker finished'})")
                return 1
            if time.monotonic() >= self._next_discovery and (self.spec.discovery_script or self.spec.agents) \
                    and not finished:
                # (once a worker has finished well the job is ending: its slot is not filled again)
                self._slots = self.discover()
                self._next_discovery = time.monotonic() + self.spec.discovery_interval
                changed |= self._grow()
            if changed:
                alive = [m for m in self.members if self.workers[m].code is None]
                self.publish(alive + [w.id for w in self._running() if w.id not in self.members])
            if len(running) < self.spec.min_np:
                self.short_since = self.short_since or time.monotonic()
                if time.monotonic() - self.short_since > self.spec.elastic_timeout:
                    say(f"job failed: {len(running)} worker(s) left, fewer than --min-np {self.spec.min_np}, for "
                        f"{self.spec.elastic_timeout:g} s ({self.first_failure})")
                    return 1
            else:
                self.short_since = None
            time.sleep(POLL_S)

    def _failed(self, worker: _Worker) -> bool:
        """A worker ended with an error: break its round, count its host's failure. True: the members changed."""
        what = f"worker {worker.id} on {worker.host} {describe_exit(worker.code)}"
        if isinstance(worker.proc, AgentWorker) and worker.proc.lost:
            what = (f"worker {worker.id} on {worker.host} was lost with its node's launcher (no heartbeat for "
                    f"{AGENT_STALE_S:g} s)")
        self.first_failure = self.first_failure or what
        for number, members in self.rounds.items():  # the round it trains in, and a newer one still forming
            if worker.id in members:
                rendezvous.abort(self.store, number, what)
        self.failures[worker.host] = self.failures.get(worker.host, 0) + 1
        note = ""
        if self.failures[worker.host] >= self.spec.host_failures and worker.host not in self.left_out:
            self.left_out.add(worker.host)
            note = f"; host {worker.host} failed {self.failures[worker.host]} time(s): leaving it out of the job"
            for other in self._running():
                if other.host == worker.host:
                    self.stop(other, self.cfg.grace_period)
                    other.code = other.proc.returncode
        say(f"{what}; going on without it{note}")
        return worker.id in self.members

    def _grow(self) -> bool:
        free = self._free_slots()
        if not free:
            return False
        for host in free:
            self.spawn(host)
        say(f"{len(free)} new worker(s) on {', '.join(sorted(set(free)))}: they join at the next commit")
        return True


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
