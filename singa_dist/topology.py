"""SINGA's cluster topology: worker groups and server groups, and the role of every process in a job.

One topology expresses every framework (SINGA.md sections 1-2):

| framework   | worker groups | workers/group | server groups | servers/group | separate |
|-------------|---------------|---------------|---------------|---------------|----------|
| sandblaster | 1             | n             | 1             | s             | yes      |
| allreduce   | 1             | n             | 1             | n             | no       |
| downpour    | g > 1         | n             | 1             | s             | yes      |
| hogwild     | g             | 1             | g             | 1             | no       |
| hybrid      | g > 1         | n > 1         | 1             | s             | yes      |

Process numbering (the contract between `singa-launch`, `singa_dist.init()` and the servers): the job's
processes are numbered 0..nprocs-1; workers come first, worker group by worker group
(worker `i` of group `g` is process `g * nworkers_per_group + i`), then, when servers are separate, the
servers, server group by server group. Co-located servers live inside the worker processes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

STRATEGIES = ("allreduce", "sandblaster", "downpour", "hogwild", "hybrid")
# Frameworks whose parameters live on server processes (or co-located servers) rather than on every worker.
PARAMETER_SERVER_STRATEGIES = ("sandblaster", "downpour", "hogwild", "hybrid")


class TopologyError(ValueError):
    """A topology whose numbers do not fit together."""


@dataclass(frozen=True)
class ProcessRole:
    """What one process of the job is: a worker or a server, its group and its index inside the group."""

    role: str  # "worker" or "server"
    group: int
    index: int
    proc_rank: int

    @property
    def is_worker(self) -> bool:
        return self.role == "worker"

    @property
    def is_server(self) -> bool:
        return self.role == "server"


@dataclass(frozen=True)
class ClusterTopology:
    """SINGA's topology fields, plus the framework (strategy) that uses them."""

    nworker_groups: int = 1
    nworkers_per_group: int = 1
    nserver_groups: int = 1
    nservers_per_group: int = 0
    server_worker_separate: bool = False
    sync_freq: int = 1
    strategy: str = "allreduce"

    def __post_init__(self):
        self.validate()

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def allreduce(cls, nworkers: int) -> "ClusterTopology":
        return cls(1, nworkers, 1, nworkers, False, 1, "allreduce")

    @classmethod
    def sandblaster(cls, nworkers: int, nservers: int = 1) -> "ClusterTopology":
        return cls(1, nworkers, 1, nservers, True, 1, "sandblaster")

    @classmethod
    def downpour(cls, nworker_groups: int, nworkers_per_group: int = 1, nservers: int = 1) -> "ClusterTopology":
        return cls(nworker_groups, nworkers_per_group, 1, nservers, True, 1, "downpour")

    @classmethod
    def hogwild(cls, ngroups: int, sync_freq: int = 1) -> "ClusterTopology":
        return cls(ngroups, 1, ngroups, 1, False, sync_freq, "hogwild")

    @classmethod
    def hybrid(cls, nworker_groups: int, nworkers_per_group: int, nservers: int = 1) -> "ClusterTopology":
        return cls(nworker_groups, nworkers_per_group, 1, nservers, True, 1, "hybrid")

    @classmethod
    def for_strategy(
        cls,
        strategy: str,
        nworkers: int,
        *,
        worker_groups: int | None = None,
        workers_per_group: int | None = None,
        servers: int | None = None,
        server_groups: int | None = None,
        sync_freq: int = 1,
        separate: bool | None = None,
    ) -> "ClusterTopology":
        """The topology for `strategy` with `nworkers` worker processes in all, as `singa-launch` flags give it.

        `servers` is the number of servers per server group. Unset fields take the framework's preset.
        """
        strategy = strategy.lower()
        if strategy not in STRATEGIES:
            raise TopologyError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if nworkers < 1:
            raise TopologyError(f"the number of worker processes must be at least 1, got {nworkers}")
        if workers_per_group is not None and worker_groups is None:
            if nworkers % workers_per_group:
                raise TopologyError(
                    f"{nworkers} workers do not divide into groups of {workers_per_group}")
            worker_groups = nworkers // workers_per_group
        if strategy == "allreduce":
            groups = worker_groups or 1
            if groups != 1:
                raise TopologyError("allreduce has a single worker group; use --strategy hybrid or downpour")
            return cls(1, nworkers, 1, nworkers, False if separate is None else separate, sync_freq, strategy)
        if strategy == "hogwild":
            groups = worker_groups or nworkers
            if groups != nworkers:
                raise TopologyError(f"hogwild runs one worker per group: {groups} groups for {nworkers} workers")
            return cls(groups, 1, server_groups or groups, servers or 1,
                       False if separate is None else separate, sync_freq, strategy)
        if strategy == "sandblaster":
            if (worker_groups or 1) != 1:
                raise TopologyError("sandblaster has a single worker group; use --strategy downpour for several")
            groups = 1
        else:  # downpour, hybrid
            groups = worker_groups or (nworkers if strategy == "downpour" else 2)
        if nworkers % groups:
            raise TopologyError(f"{nworkers} workers do not divide into {groups} worker groups")
        return cls(groups, nworkers // groups, server_groups or 1, 1 if servers is None else servers,
                   True if separate is None else separate, sync_freq, strategy)

    # ---- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        for field in ("nworker_groups", "nworkers_per_group", "nserver_groups", "sync_freq"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise TopologyError(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(self.nservers_per_group, int) or self.nservers_per_group < 0:
            raise TopologyError(f"nservers_per_group must be a non-negative integer, got {self.nservers_per_group!r}")
        if self.strategy not in STRATEGIES:
            raise TopologyError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.nworker_groups % self.nserver_groups:
            raise TopologyError(
                f"{self.nworker_groups} worker groups cannot share {self.nserver_groups} server groups evenly "
                "(nworker_groups must be a multiple of nserver_groups)")
        if self.strategy in PARAMETER_SERVER_STRATEGIES and self.nservers_per_group < 1:
            raise TopologyError(f"{self.strategy} keeps parameters on servers: it needs at least one server per group")
        if self.strategy in ("sandblaster",) and self.nworker_groups != 1:
            raise TopologyError("sandblaster is synchronous: it has exactly one worker group")
        if self.strategy == "allreduce" and self.nworker_groups != 1:
            raise TopologyError("allreduce has exactly one worker group")
        if self.strategy == "hogwild" and self.nworkers_per_group != 1:
            raise TopologyError("hogwild runs one worker per group")
        if not self.server_worker_separate and self.nservers_per_group > self.nworkers_per_group:
            raise TopologyError(
                f"co-located servers live inside worker processes: {self.nservers_per_group} servers per group "
                f"need at least as many workers per group, got {self.nworkers_per_group}")
        if not self.server_worker_separate and self.nserver_groups > self.nworker_groups:
            raise TopologyError("co-located server groups cannot outnumber worker groups")

    # ---- counts and roles ----------------------------------------------------------------------------
    @property
    def nworkers(self) -> int:
        return self.nworker_groups * self.nworkers_per_group

    @property
    def nservers(self) -> int:
        return self.nserver_groups * self.nservers_per_group

    @property
    def nprocs(self) -> int:
        """Processes the launcher starts: workers, plus servers when they run on their own processes."""
        return self.nworkers + (self.nservers if self.server_worker_separate else 0)

    def role_of(self, proc_rank: int) -> ProcessRole:
        if not 0 <= proc_rank < self.nprocs:
            raise TopologyError(f"process {proc_rank} is outside a job of {self.nprocs} processes")
        if proc_rank < self.nworkers:
            group, index = divmod(proc_rank, self.nworkers_per_group)
            return ProcessRole("worker", group, index, proc_rank)
        group, index = divmod(proc_rank - self.nworkers, self.nservers_per_group)
        return ProcessRole("server", group, index, proc_rank)

    def worker_ranks(self, group: int | None = None) -> list[int]:
        """Process ranks of all workers, or of worker group `group`."""
        if group is None:
            return list(range(self.nworkers))
        start = group * self.nworkers_per_group
        return list(range(start, start + self.nworkers_per_group))

    def server_ranks(self, group: int | None = None) -> list[int]:
        """Process ranks of the separate servers (all, or of server group `group`); empty when co-located."""
        if not self.server_worker_separate:
            return []
        groups = range(self.nserver_groups) if group is None else [group]
        return [self.nworkers + g * self.nservers_per_group + i
                for g in groups for i in range(self.nservers_per_group)]

    def server_group_of(self, worker_group: int) -> int:
        """SINGA's mapping: worker group g talks to server group g / (nworker_groups / nserver_groups)."""
        return worker_group // (self.nworker_groups // self.nserver_groups)

    # ---- (de)serialisation through the environment ---------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ClusterTopology":
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TopologyError(f"SINGA_TOPOLOGY is not valid JSON: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise TopologyError(f"unknown topology fields: {', '.join(sorted(unknown))}")
        return cls(**fields)
