"""SINGA's parameter slicing: every parameter element is owned by exactly one server of a server group.

All parameters, laid end to end in the optimizer's order, are cut into about `lcm(nserver_groups,
nservers_per_group)` equal boxes. A tensor that crosses a box boundary is cut there, unless it is small
(at most a twentieth of a box): small tensors stay whole, which keeps every box within 5% of its share.
Box `b` goes to server `b % nservers_per_group` of every server group, and its slices are mastered by
server group `b % nserver_groups` (the group that receives the other groups' deltas in Hogwild).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """Elements [start, end) of the flattened parameter `param` (index in the optimizer's order)."""

    id: int
    param: int
    name: str
    start: int
    end: int
    box: int
    server: int  # index of the owning server inside its server group
    master_group: int  # server group that masters this slice

    @property
    def numel(self) -> int:
        return self.end - self.start


def slice_params(named_sizes: list[tuple[str, int]], nservers_per_group: int = 1, nserver_groups: int = 1,
                 nboxes: int | None = None) -> list[Slice]:
    """Slices of the parameters given as (name, numel) pairs, in order; see the module's docstring."""
    if nservers_per_group < 1 or nserver_groups < 1:
        raise ValueError(f"need at least one server and one server group, got {nservers_per_group} "
                         f"and {nserver_groups}")
    if nboxes is None:
        nboxes = math.lcm(nserver_groups, nservers_per_group)
    total = sum(n for _, n in named_sizes)
    slices: list[Slice] = []
    if total == 0:
        return slices
    box_size = total / nboxes
    small = box_size / 20
    box, filled = 0, 0  # filled: elements placed in boxes 0..box so far

    def add(param, name, start, end):
        slices.append(Slice(len(slices), param, name, start, end, box,
                            box % nservers_per_group, box % nserver_groups))

    for index, (name, numel) in enumerate(named_sizes):
        start = 0
        while start < numel:
            boundary = round((box + 1) * box_size)  # where the current box ends, in elements
            room = boundary - filled
            if room <= 0 and box < nboxes - 1:
                box += 1
                continue
            rest = numel - start
            if rest <= room or box == nboxes - 1 or numel <= small:
                add(index, name, start, numel)
                filled += rest
                start = numel
            else:
                add(index, name, start, start + room)
                filled += room
                start += room
                box += 1
    return slices


def message_runs(slices: list[Slice], messages: int) -> list[tuple[int, int]]:
    """A server's slices cut into up to `messages` runs [start, end) of consecutive slices of about equal
    elements: the messages one push to that server is sent as (a slice is never cut)."""
    total = sum(s.numel for s in slices)
    runs, start, filled = [], 0, 0
    for i, s in enumerate(slices):
        filled += s.numel
        if len(runs) < messages - 1 and i + 1 < len(slices) and filled >= total * (len(runs) + 1) / messages:
            runs.append((start, i + 1))
            start = i + 1
    if start < len(slices) or not runs:
        runs.append((start, len(slices)))
    return runs


def server_loads(slices: list[Slice], nservers_per_group: int) -> list[int]:
    """Elements each server of a group owns."""
    loads = [0] * nservers_per_group
    for s in slices:
        loads[s.server] += s.numel
    return loads
