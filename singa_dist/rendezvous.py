"""The elastic rendezvous: which workers make up each round of an elastic job, and how a round ends.

An elastic job (`singa-launch --min-np N --max-np M`, launchers/elastic.py) changes its set of workers while
it runs. The launcher hosts the job's key-value store and writes there, for each round r, the workers of
that round in rank order (`round/<r>`) and the newest round's number (`latest`). A worker joins the newest
round that lists it (its rank is its place in the list) and forms the round's process group under keys of
that round alone. A round ends in one of two ways:
- broken: a worker of it failed. The launcher, or the first survivor to see a collective fail, sets
  `abort/<r>`; every member waiting in a collective of round r stops at once (see `raise_if_aborted`)
  instead of waiting for the job's timeout, and rejoins in round r+1 without the failed worker.
- superseded: the launcher added workers in round r+1. The members of round r go on until their next
  `state.commit()`, where they agree to move (singa_dist.elastic), and rejoin in round r+1.

Every process of the job reads the same keys; this module holds the names and the worker's side of it.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass

import torch.distributed as dist

ELASTIC_VARIABLE = "SINGA_ELASTIC"  # "1" in every worker of an elastic job
WORKER_ID_VARIABLE = "SINGA_WORKER_ID"  # a worker's name for the whole job (its rank changes from round to round)
# How long singa-launch waits for enough workers (--elastic-timeout): a worker waits for its next round as long.
ELASTIC_TIMEOUT_VARIABLE = "SINGA_ELASTIC_TIMEOUT"
PREFIX = "singa/elastic/"
LATEST = PREFIX + "latest"
# How often a waiting worker looks at the store for a newer round, or for the end of its own.
POLL_S = 0.05


def enabled() -> bool:
    return os.environ.get(ELASTIC_VARIABLE) == "1"


def round_key(number: int) -> str:
    return f"{PREFIX}round/{number}"


def abort_key(number: int) -> str:
    return f"{PREFIX}abort/{number}"


def joined_key(number: int, worker: int) -> str:
    return f"{PREFIX}joined/{number}/{worker}"


def group_prefix(number: int) -> str:
    """Where round `number`'s process group keeps its keys (no key of an earlier round is ever read again)."""
    return f"{PREFIX}group/{number}/"


@dataclass(frozen=True)
class Round:
    number: int
    members: tuple  # worker ids, in rank order
    hosts: tuple  # each member's host, in the same order
    # Why singa-launch published it, when for a change of hosts (Horovod's HostUpdateResult: 1 hosts removed,
    # 2 added, 3 both); 0 for the first round and after a failure (the collectives report those themselves).
    update: int = 0

    def to_json(self) -> str:
        return json.dumps({"members": list(self.members), "hosts": list(self.hosts), "update": self.update})

    @classmethod
    def from_json(cls, number: int, text: str | bytes) -> "Round":
        data = json.loads(text)
        return cls(number, tuple(data["members"]), tuple(data["hosts"]), int(data.get("update", 0)))

    def layout(self, worker: int) -> tuple[int, int, int, int, int, int]:
        """(rank, size, local_rank, local_size, cross_rank, cross_size) of `worker` in this round, as Horovod
        numbers them: local among the members on its host, cross among the members with its local rank."""
        rank = self.members.index(worker)
        host = self.hosts[rank]
        local = [i for i, h in enumerate(self.hosts) if h == host]
        local_rank = local.index(rank)
        order = list(dict.fromkeys(self.hosts))  # hosts in the order of their first member
        local_ranks = {h: [i for i, x in enumerate(self.hosts) if x == h] for h in order}
        peers = [h for h in order if len(local_ranks[h]) > local_rank]
        return rank, len(self.members), local_rank, len(local), peers.index(host), len(peers)


def worker_id() -> int:
    try:
        return int(os.environ[WORKER_ID_VARIABLE])
    except (KeyError, ValueError):
        raise RuntimeError(f"an elastic worker needs {WORKER_ID_VARIABLE} (singa-launch --min-np/--max-np sets it)") \
            from None


def join_timeout(timeout_s: float) -> float:
    """How long a worker waits for a round that lists it: the job's timeout, or longer while singa-launch may wait
    for workers to come (below --min-np it publishes no round for up to --elastic-timeout seconds)."""
    try:
        return max(timeout_s, float(os.environ.get(ELASTIC_TIMEOUT_VARIABLE, 0)) + 30.0)
    except ValueError:
        return timeout_s


def connect(timeout_s: float) -> dist.TCPStore:
    """The job's store, hosted by singa-launch (MASTER_ADDR:MASTER_PORT)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as exc:
        raise RuntimeError(f"elastic worker {worker_id()}: the job's store at {host}:{port}, hosted by singa-launch, "
                           f"did not answer within {timeout_s:g} s: {exc}") from exc


def latest(store) -> int:
    return int(store.get(LATEST)) if store.check([LATEST]) else -1


def next_round(store, worker: int, after: int, timeout_s: float) -> Round:
    """The newest round after round `after` that lists `worker`; waits for the launcher to publish one."""
    deadline = time.monotonic() + timeout_s
    while True:
        newest = latest(store)
        if newest > after:
            found = Round.from_json(newest, store.get(round_key(newest)))
            if worker in found.members:
                return found
            raise RuntimeError(f"elastic worker {worker} has been removed from the elastic job (it is not in round "
                               f"{newest}): its host left the host discovery script's output, or was left out after "
                               "failures")
        if time.monotonic() > deadline:
            raise RuntimeError(f"elastic worker {worker}: no new round of the job after round {after} within "
                               f"{timeout_s:g} s (singa-launch published none: is it still running?)")
        time.sleep(POLL_S)


def abort(store, number: int, why: str) -> None:
    """Mark round `number` broken (first word wins: the cause, not the echoes)."""
    try:
        store.compare_set(abort_key(number), "", why)
    except Exception:
        pass


def aborted(store, number: int) -> str | None:
    """Why round `number` was broken, or None while it holds."""
    key = abort_key(number)
    if store.check([key]):
        return store.get(key).decode()
    return None


class RoundAborted(RuntimeError):
    """The elastic job's round broke (a worker failed) while this process waited for it."""


class RoundStore(dist.Store):
    """Round `number`'s keys for torch's group creation, whose waits stop as soon as the round breaks.

    torch's process-group creation cannot be interrupted and waits for every member's address for the job's
    whole timeout: a member that dies inside it (after the members met, see singa_dist.runtime._join_round)
    would leave the others there. Creation reads the store through `get` and `wait`, which here poll the round's
    abort mark between short looks at the keys, and raise RoundAborted once it is set."""

    # torch holds a Python store only through its C++ side, which does not keep the Python object alive: without
    # a reference here its methods would vanish under the group ("Not implemented"). One per round, and clones.
    _alive: list = []

    def __init__(self, store, number: int):
        super().__init__()
        self._store, self._number = store, number
        self._keys = dist.PrefixStore(group_prefix(number), store)
        RoundStore._alive.append(self)

    def _wait_for(self, keys: list) -> None:
        pause = 0.001
        while not self._keys.check(keys):
            why = aborted(self._store, self._number)
            if why is not None:
                raise RoundAborted(f"round {self._number} of the elastic job broke ({why}) while its process "
                                   f"group formed")
            time.sleep(pause)
            pause = min(pause * 2, POLL_S)

    def wait(self, keys, timeout=None) -> None:
        self._wait_for(list(keys))

    def get(self, key):
        self._wait_for([key])
        return self._keys.get(key)

    def set(self, key, value) -> None:
        self._keys.set(key, value)

    def add(self, key, amount):
        return self._keys.add(key, amount)

    def compare_set(self, key, expected, desired):
        return self._keys.compare_set(key, expected, desired)

    def check(self, keys) -> bool:
        return self._keys.check(keys)

    def delete_key(self, key) -> bool:
        return self._keys.delete_key(key)

    def num_keys(self) -> int:
        return self._keys.num_keys()

    def set_timeout(self, timeout) -> None:
        self._keys.set_timeout(timeout)

    @property
    def timeout(self):
        return self._keys.timeout

    def clone(self) -> "RoundStore":
        """A store of its own for a thread of the group (torch's Gloo asks for one per group)."""
        return RoundStore(self._store.clone(), self._number)

    def multi_get(self, keys: list) -> list:
        self._wait_for(list(keys))
        return self._keys.multi_get(keys)

    def multi_set(self, keys: list, values: list) -> None:
        self._keys.multi_set(keys, values)

    def append(self, key, value) -> None:
        self._keys.append(key, value)

    def has_extended_api(self) -> bool:
        return True
