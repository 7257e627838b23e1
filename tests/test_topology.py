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
