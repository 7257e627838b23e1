"""SINGA's cluster topology: worker groups and server groups, and the role of every process in a job.

One topology expresses every framework (SINGA.md sections 1-2):

| framework   | worker groups | workers/group | server groups | servers/group | separate |
|-------------|---------------|---------------|---------------|---------------|----------|
| sandblaster | 1             | n             | 1             | s             | yes      |
| allreduce   | 1             | n             | 1             | n             | no       |
| downpour    | g > 1         | n             | 1             | s             | yes      |
| hogwild     | g             | 1             | g             | 1             | no       |
| hybrid      | g > 1         | n > 1         | 1             | s             | yes      |

`STRATEGIES` below is the table every part of the project reads (the launcher, the presets and checks here,
`DistributedOptimizer`); `adasum` and `partial_update` run on AllReduce's shape.

Process numbering (the contract between `singa-launch`, `singa_dist.init()` and the servers): the job's
processes are numbered 0..nprocs-1; workers come first, worker group by worker group
(worker `i` of group `g` is process `g * nworkers_per_group + i`), then, when servers are separate, the
servers, server group by server group. Co-located servers live inside the worker processes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

class TopologyError(ValueError):
    """A topology whose numbers do not fit together."""


@dataclass(frozen=True)
class StrategyKind:
    """One training framework: its name, its class, and the topology shapes it runs on.

    This table is the one place a framework is described: `singa-launch` reads it for `--strategy` and the
    processes to start, `ClusterTopology` for its presets and checks, `DistributedOptimizer` (through
    `singa_dist.strategies.make`) for the class to build, and each strategy's set-up for the job it needs.
    """

    name: str
    cls: str  # "module:Class" inside singa_dist.strategies, imported when first used
    summary: str
    parameter_servers: bool = False  # parameters live on servers (separate or co-located), not on every worker
    separate_servers: bool = False  # the servers run as processes of their own (server_worker_separate)
    worker_groups: str = "one"  # "one", "one per worker" (each worker its own group) or "several"
    default_worker_groups: int | None = None  # for "several": None is one group per worker
    min_workers_per_group: int = 1
    server_groups: str = "one"  # "one", or "one per worker group" (each group has its own server group)
    # Worker groups never wait for each other: under singa-launch a lost group is dropped and the others go on.
    asynchronous: bool = False

    @property
    def class_name(self) -> str:
        return self.cls.partition(":")[2]

    def unfit(self, topology: "ClusterTopology") -> str | None:
        """Why this framework cannot run on `topology` (a job started for another one, say), or None."""
        t = topology
        if not self.parameter_servers and t.server_worker_separate:
            return (f"{self.name} has no server processes (every worker reduces a share of the gradients): "
                    "drop --separate-servers")
        if self.parameter_servers and self.separate_servers and \
                (not t.server_worker_separate or t.nservers_per_group < 1):
            return (f"{self.name} needs separate parameter-server processes but this job's topology has none; "
                    f"start it with `singa-launch --strategy {self.name} --servers S ...` (or SINGA_TOPOLOGY with "
                    "server_worker_separate=true)")
        if self.parameter_servers and not self.separate_servers and t.server_worker_separate:
            return (f"{self.name} runs a server group inside every worker process: the topology must have "
                    "co-located servers (server_worker_separate=false)")
        if self.worker_groups == "one" and t.nworker_groups != 1:
            return (f"{self.name} is synchronous: it has exactly one worker group, got {t.nworker_groups} "
                    "(use the downpour or hybrid strategy for several)")
        if self.worker_groups == "one per worker" and t.nworkers_per_group != 1:
            return f"{self.name} runs one worker per group, got {t.nworkers_per_group} workers per group"
        if t.nworkers_per_group < self.min_workers_per_group:
            return (f"{self.name} all-reduces inside worker groups of several workers; this topology has "
                    f"{t.nworkers_per_group} worker per group (use the downpour strategy, or --workers-per-group "
                    f"{self.min_workers_per_group} or more)")
        if self.parameter_servers and self.server_groups == "one" and t.nserver_groups != 1:
            return (f"{self.name} runs one server group (got {t.nserver_groups}); several replicated server "
                    "groups that exchange deltas are the hogwild strategy")
        if self.server_groups == "one per worker group" and t.nserver_groups != t.nworker_groups:
            return (f"{self.name} runs one server group per worker group; got {t.nserver_groups} server groups "
                    f"for {t.nworker_groups} worker groups")
        return None


_KINDS = (
    StrategyKind("allreduce", "allreduce:AllReduce",
                 "synchronous: gradients averaged by all-reduce, every worker reduces a share"),
    StrategyKind("adasum", "adasum:AdasumUpdate",
                 "synchronous: each worker's optimizer update combined with Adasum (Horovod's Adasum optimizer)"),
    StrategyKind("partial_update", "partial_update:PartialUpdate",
                 "synchronous steps on local gradients; one chunk of the parameters averaged per step, cycling"),
    StrategyKind("sandblaster", "sandblaster:Sandblaster",
                 "synchronous: separate parameter servers run the optimizer on the averaged gradients",
                 parameter_servers=True, separate_servers=True),
    StrategyKind("downpour", "downpour:Downpour",
                 "asynchronous: worker groups push to separate parameter servers at their own pace",
                 parameter_servers=True, separate_servers=True, worker_groups="several", asynchronous=True),
    StrategyKind("hogwild", "hogwild:Hogwild",
                 "asynchronous: every worker is its own server group; groups exchange deltas every sync_freq",
                 parameter_servers=True, worker_groups="one per worker", server_groups="one per worker group",
                 asynchronous=True),
    StrategyKind("hybrid", "hybrid:Hybrid",
                 "all-reduce inside each worker group, Downpour between groups",
                 parameter_servers=True, separate_servers=True, worker_groups="several", default_worker_groups=2,
                 min_workers_per_group=2, asynchronous=True),
)
STRATEGIES: dict[str, StrategyKind] = {kind.name: kind for kind in _KINDS}
# Frameworks whose parameters live on server processes (or co-located servers) rather than on every worker.
PARAMETER_SERVER_STRATEGIES = tuple(name for name, kind in STRATEGIES.items() if kind.parameter_servers)


def strategy_kind(name: str) -> StrategyKind:
    """The table's row for `name` (case-insensitive)."""
    try:
        return STRATEGIES[name.lower()]
    except (KeyError, AttributeError):
        raise TopologyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


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

        `servers` is the number of servers per server group. Unset fields take the framework's preset (the
        strategy table); the result is one the framework runs on, or a TopologyError says why not.
        """
        kind = strategy_kind(strategy)
        if nworkers < 1:
            raise TopologyError(f"the number of worker processes must be at least 1, got {nworkers}")
        if workers_per_group is not None and worker_groups is None:
            if nworkers % workers_per_group:
                raise TopologyError(
                    f"{nworkers} workers do not divide into groups of {workers_per_group}")
            worker_groups = nworkers // workers_per_group
        if kind.worker_groups == "one":
            groups = worker_groups or 1
            if groups != 1:
                raise TopologyError(f"{kind.name} has a single worker group; use --strategy downpour or hybrid "
                                    "for several")
        elif kind.worker_groups == "one per worker":
            groups = worker_groups or nworkers
            if groups != nworkers:
                raise TopologyError(f"{kind.name} runs one worker per group: {groups} groups for {nworkers} workers")
        else:
            groups = worker_groups or kind.default_worker_groups or nworkers
        if nworkers % groups:
            raise TopologyError(f"{nworkers} workers do not divide into {groups} worker groups")
        per_group = nworkers // groups
        separate = kind.separate_servers if separate is None else separate
        if kind.parameter_servers:
            server_groups = server_groups or (groups if kind.server_groups == "one per worker group" else 1)
            servers = 1 if servers is None else servers
        else:  # every worker reduces a share: one server beside each worker
            given = [f"{flag} {value}" for flag, value in (("--servers", servers), ("--server-groups", server_groups))
                     if value is not None and value > (0 if flag == "--servers" else 1)]
            if given:
                raise TopologyError(
                    f"{kind.name} has no parameter servers (every worker reduces a share of the gradients): drop "
                    f"{' and '.join(given)}, or choose a strategy with servers "
                    f"({', '.join(PARAMETER_SERVER_STRATEGIES)})")
            server_groups, servers = 1, per_group
        topology = cls(groups, per_group, server_groups, servers, separate, sync_freq, kind.name)
        unfit = kind.unfit(topology)
        if unfit:
            raise TopologyError(unfit)
        return topology

    # ---- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """SINGA's rules for a topology (any framework may further restrict the shapes it runs on: see
        StrategyKind.unfit)."""
        for field in ("nworker_groups", "nworkers_per_group", "nserver_groups", "sync_freq"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise TopologyError(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(self.nservers_per_group, int) or self.nservers_per_group < 0:
            raise TopologyError(f"nservers_per_group must be a non-negative integer, got {self.nservers_per_group!r}")
        kind = strategy_kind(self.strategy)
        if self.nworker_groups % self.nserver_groups:
            raise TopologyError(
                f"{self.nworker_groups} worker groups cannot share {self.nserver_groups} server groups evenly "
                "(nworker_groups must be a multiple of nserver_groups)")
        if kind.parameter_servers and self.nservers_per_group < 1:
            raise TopologyError(f"{self.strategy} keeps parameters on servers: it needs at least one server per group")
        if kind.worker_groups == "one" and self.nworker_groups != 1:
            raise TopologyError(f"{self.strategy} is synchronous: it has exactly one worker group")
        if kind.worker_groups == "one per worker" and self.nworkers_per_group != 1:
            raise TopologyError(f"{self.strategy} runs one worker per group")
        if not self.server_worker_separate and self.nservers_per_group > self.nworkers_per_group:
            raise TopologyError(
                f"co-located servers live inside worker processes: {self.nservers_per_group} servers per group "
                f"need at least as many workers per group, got {self.nworkers_per_group}")
        if not self.server_worker_separate and self.nserver_groups > self.nworker_groups:
            raise TopologyError("co-located server groups cannot outnumber worker groups")

    @property
    def kind(self) -> StrategyKind:
        """The strategy table's row for this topology's framework."""
        return STRATEGIES[self.strategy]

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
