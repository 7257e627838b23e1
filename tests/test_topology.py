import pytest

from singa_dist.topology import ClusterTopology, TopologyError


def test_presets_match_singa_table():
    t = ClusterTopology.sandblaster(4, 2)
    assert (t.nworker_groups, t.nworkers_per_group, t.nserver_groups, t.nservers_per_group) == (1, 4, 1, 2)
    assert t.server_worker_separate and t.nprocs == 6
    t = ClusterTopology.allreduce(4)
    assert (t.nservers_per_group, t.server_worker_separate, t.nprocs) == (4, False, 4)
    t = ClusterTopology.downpour(2, 2, 1)
    assert (t.nworkers, t.nservers, t.nprocs) == (4, 1, 5)
    t = ClusterTopology.hogwild(3, sync_freq=5)
    assert (t.nworker_groups, t.nserver_groups, t.nprocs, t.sync_freq) == (3, 3, 3, 5)


def test_roles_cover_every_process_once():
    t = ClusterTopology.downpour(3, 2, 2)
    roles = [t.role_of(r) for r in range(t.nprocs)]
    workers = [(r.group, r.index) for r in roles if r.is_worker]
    servers = [(r.group, r.index) for r in roles if r.is_server]
    assert workers == [(g, i) for g in range(3) for i in range(2)]
    assert servers == [(0, 0), (0, 1)]
    assert t.worker_ranks(1) == [2, 3] and t.server_ranks() == [6, 7]
    with pytest.raises(TopologyError):
        t.role_of(8)


def test_server_group_mapping():
    t = ClusterTopology(4, 1, 2, 1, False, 1, "hogwild")
    assert [t.server_group_of(g) for g in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(nworker_groups=3, nserver_groups=2, nservers_per_group=1, strategy="downpour",
          server_worker_separate=True), "multiple of nserver_groups"),
    (dict(nworker_groups=2, nservers_per_group=0, strategy="downpour", server_worker_separate=True),
     "at least one server"),
    (dict(nworkers_per_group=0), "positive integer"),
    (dict(strategy="ring"), "unknown strategy"),
    (dict(nworker_groups=2, strategy="sandblaster", nservers_per_group=1, server_worker_separate=True),
     "exactly one worker group"),
])
def test_invalid_topologies_raise(kwargs, message):
    with pytest.raises(TopologyError, match=message):
        ClusterTopology(**kwargs)


def test_for_strategy_and_json_round_trip():
    t = ClusterTopology.for_strategy("downpour", 4, worker_groups=2, servers=2)
    assert (t.nworker_groups, t.nworkers_per_group, t.nservers_per_group, t.nprocs) == (2, 2, 2, 6)
    assert ClusterTopology.from_json(t.to_json()) == t
    with pytest.raises(TopologyError, match="do not divide"):
        ClusterTopology.for_strategy("downpour", 5, worker_groups=2)
    with pytest.raises(TopologyError, match="unknown strategy"):
        ClusterTopology.for_strategy("ring", 2)


# ------------------------------------------------------------------------------------------------------------
# The strategy table: one row per framework, read by the launcher, the presets and the strategies' set-up

def test_strategy_table_describes_every_framework():
    from singa_dist.topology import PARAMETER_SERVER_STRATEGIES, STRATEGIES

    assert list(STRATEGIES) == ["allreduce", "adasum", "partial_update", "sandblaster", "downpour", "hogwild",
                                "hybrid"]
    assert PARAMETER_SERVER_STRATEGIES == ("sandblaster", "downpour", "hogwild", "hybrid")
    t = ClusterTopology.for_strategy("partial_update", 3)
    assert (t.nworker_groups, t.nworkers_per_group, t.nservers_per_group, t.nprocs) == (1, 3, 3, 3)
    assert t.kind is STRATEGIES["partial_update"]


@pytest.mark.parametrize("strategy, options, message", [
    ("hybrid", dict(), "hybrid all-reduces inside worker groups of several workers"),
    ("sandblaster", dict(separate=False), "sandblaster needs separate parameter-server processes"),
    ("hogwild", dict(separate=True), "hogwild runs a server group inside every worker process"),
    ("allreduce", dict(separate=True), "allreduce has no server processes"),
    ("downpour", dict(server_groups=2, worker_groups=2), r"downpour runs one server group \(got 2\)"),
    ("hogwild", dict(server_groups=1), "hogwild runs one server group per worker group"),
    ("sandblaster", dict(worker_groups=2), "sandblaster has a single worker group"),
])
def test_for_strategy_refuses_shapes_the_framework_cannot_run(strategy, options, message):
    with pytest.raises(TopologyError, match=message):
        ClusterTopology.for_strategy(strategy, 2, **options)


def test_unfit_says_why_a_job_does_not_suit_a_framework():
    from singa_dist.topology import strategy_kind

    plain = ClusterTopology.allreduce(2)
    assert strategy_kind("allreduce").unfit(plain) is None
    assert "needs separate parameter-server processes" in strategy_kind("downpour").unfit(plain)
    assert "one worker per group, got 2" in strategy_kind("hogwild").unfit(plain)
    assert strategy_kind("hybrid").unfit(ClusterTopology.hybrid(2, 2)) is None
    with pytest.raises(TopologyError, match="unknown strategy 'ring'"):
        strategy_kind("ring")
