"""SINGA's slicing: every element owned by exactly one server, balanced loads, small tensors whole, masters."""
import math
import random

import pytest

from singa_dist.ps.slicing import server_loads, slice_params


def _owners(sizes, slices):
    owned = [[0] * n for n in sizes]
    for s in slices:
        for i in range(s.start, s.end):
            owned[s.param][i] += 1
    return owned


@pytest.mark.parametrize("nservers,ngroups", [(1, 1), (2, 1), (3, 1), (4, 2), (3, 2), (1, 4)])
def test_every_element_owned_once(nservers, ngroups):
    rng = random.Random(nservers * 10 + ngroups)
    for _ in range(20):
        sizes = [rng.choice([1, 3, 10, 64, 500, 4096, 30000]) for _ in range(rng.randint(1, 12))]
        slices = slice_params([(f"p{i}", n) for i, n in enumerate(sizes)], nservers, ngroups)
        assert all(c == 1 for row in _owners(sizes, slices) for c in row)
        assert all(0 <= s.server < nservers and 0 <= s.master_group < ngroups for s in slices)
        assert sorted(s.id for s in slices) == list(range(len(slices)))


@pytest.mark.parametrize("nservers,ngroups", [(2, 1), (3, 1), (4, 1), (3, 2), (4, 4)])
def test_loads_within_ten_percent(nservers, ngroups):
    # A model shaped like an MLP/CNN mix: a few large tensors and many small ones.
    sizes = [64 * 3 * 3 * 3, 64, 64, 128 * 64 * 9, 128, 128, 256 * 128 * 9, 256, 4096 * 10, 10] * 2
    slices = slice_params([(f"p{i}", n) for i, n in enumerate(sizes)], nservers, ngroups)
    loads = server_loads(slices, nservers)
    assert sum(loads) == sum(sizes)
    assert max(loads) <= 1.1 * min(loads), loads
    # Every server masters about the same share too, among the server groups.
    masters = [0] * ngroups
    for s in slices:
        masters[s.master_group] += s.numel
    assert max(masters) <= 1.1 * min(masters), masters
    assert len({s.box for s in slices}) == math.lcm(nservers, ngroups)


def test_small_tensors_stay_whole():
    sizes = [100_000, 7, 100_000, 3, 5]
    slices = slice_params([(f"p{i}", n) for i, n in enumerate(sizes)], 3)
    for index in (1, 3, 4):
        parts = [s for s in slices if s.param == index]
        assert len(parts) == 1 and parts[0].numel == sizes[index]
    assert max(server_loads(slices, 3)) <= 1.1 * min(server_loads(slices, 3))


def test_more_servers_than_elements():
    slices = slice_params([("w", 3)], 5)
    assert sorted(server_loads(slices, 5)) == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="at least one server"):
        slice_params([("w", 3)], 0)
