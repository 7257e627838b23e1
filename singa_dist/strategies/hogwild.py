"""Distributed Hogwild: every process is one worker group with its own co-located server group.

Each process updates its full replica of the parameters with the user's optimizer (its server group's
update rule, state included) at its own pace. The parameters are sliced as SINGA does, and every slice
has one master group. Every `sync_freq` updates a process sends, for each slice it does not master,
`delta = current - value_at_last_sync` to the slice's master; the master adds the delta and answers with
its fresh value, which the sender adopts plus its own updates since. A master folds the deltas it received
into its replica at its next step, so after everyone's sync it holds the sum of every group's delta.

`staleness_lr`, `momentum_correction` (both off: benchmarks/async_accuracy.py measured no gain): the remedies for
asynchrony of Downpour's servers (ps.server.asynchronous_step) applied to each replica's own step, which the
masters sum with the G - 1 other groups' steps: it counts as staleness G - 1. `dana` (on): DANA's look-ahead (as
Downpour's servers do it) with the one momentum a replica knows, its own: the replica steps with SGD's Nesterov form
(momentum without dampening), which keeps its values at the point its momentum takes them to, so its gradients are
computed there (the replicas exchange and end with those values). `relative_clip` (2.0): a gradient of more
than that many times the running mean of the replica's gradient norms is scaled down to it before the step
(ps.server.relative_clip_factor, as Downpour's servers do): the digits CNN's low seeds were catapults whose large
gradients then fed the replica's momentum. None: no clip.

Under singa-launch a lost group's slices go to the live groups' masters for good; a group that replaces it (singa-launch
--max-restarts) masters none: it takes the current values of every slice from its master, then exchanges as the others.
"""
from __future__ import annotations

import threading
import time

import torch

from .. import primitives, runtime
from ..functions import broadcast_flat_
from ..ps import client as ps_client
from ..ps import sockets, transport, wire
from ..ps.server import asynchronous_step, relative_clip_factor
from ..ps.slicing import slice_params
from .base import ParameterServerStrategy, check_relative_clip, check_remedies

_live: dict[int, "Hogwild"] = {}  # session -> strategy, for the masters' RPC handler
LOST_WAIT_S = 10.0  # how long a failed exchange waits for singa-launch to mark the master's group lost


def _table(session: int) -> "Hogwild":
    """The strategy whose slices a master's handler serves (runs on the master)."""
    me = _live.get(session)
    if me is None:
        raise RuntimeError(f"process {runtime.proc_rank()} has no hogwild table {session} (closed already?)")
    return me


@sockets.handler
def merge_deltas(session: int, slice_ids: list[int], packet: tuple) -> list[torch.Tensor]:
    """On a slice's master: add another group's deltas; answer with the fresh values (runs on the master)."""
    me = _table(session)
    deltas = wire.unpack(me.packer.compressor, packet, [me.slices[sid].numel for sid in slice_ids])
    fresh = []
    with me.lock:
        me._check_masters(slice_ids)
        for sid, delta in zip(slice_ids, deltas):
            me.pending[sid] += delta.to(me.pending[sid].dtype)
            s = me.slices[sid]
            value = ps_client.read_slice(me.params[s.param], me.params[s.param], s.start, s.end) + me.pending[sid]
            fresh.append(value if me.value_dtype is None else value.to(me.value_dtype))
    return fresh


@sockets.handler
def master_values(session: int, slice_ids: list[int]) -> list[torch.Tensor]:
    """On a slice's master: the slices' current values, the deltas received for them included (what a group that
    replaces a lost one starts from)."""
    me = _table(session)
    with me.lock:
        me._check_masters(slice_ids)
        out = []
        for sid in slice_ids:
            s = me.slices[sid]
            out.append(ps_client.read_slice(me.params[s.param], me.params[s.param], s.start, s.end) + me.pending[sid])
    return out


class Hogwild(ParameterServerStrategy):
    name = "hogwild"

    def __init__(self, sync_freq: int | None = None, *, staleness_lr: bool = False, momentum_correction: bool = False,
                 dana: bool = True, relative_clip: float | None = 2.0):
        if sync_freq is not None and (not isinstance(sync_freq, int) or sync_freq < 1):
            raise ValueError(f"sync_freq must be a positive integer, got {sync_freq!r}")
        self.sync_freq = sync_freq
        self.staleness_lr, self.momentum_correction, self.dana = check_remedies(staleness_lr, momentum_correction,
                                                                                dana=dana)
        self.relative_clip = check_relative_clip(relative_clip)
        self.grad_norm = None  # running mean of this replica's gradient norms (relative_clip)
        self.groups = 1
        self._bytes_last = self._bytes_total = self._received_total = 0
        self.local = False
        self.session = None
        self.updates = 0
        self.lock = threading.Lock()

    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        local = self._begin_setup(optimizer, named_parameters, compression, op)
        self.params = [p for _, p in self.named]
        if local:
            return
        topo = runtime.topology()
        if self.sync_freq is None:
            self.sync_freq = topo.sync_freq
        self.group = runtime.worker_group()
        self.groups = topo.nworker_groups
        self.slices = slice_params([(n, p.numel()) for n, p in self.named], 1, topo.nserver_groups)
        self.mine = [s for s in self.slices if s.master_group == self.group]
        self.remote: dict[int, list] = {}
        for s in self.slices:
            if s.master_group != self.group:
                self.remote.setdefault(s.master_group, []).append(s)
        self.session = ps_client.next_session()
        self.packer = wire.Packer(self.compression)
        self.value_dtype = ps_client.value_dtype(self.compression)
        self.pending = {s.id: torch.zeros(s.numel, dtype=self.params[s.param].dtype) for s in self.mine}
        self.lost_groups: set[int] = set()  # groups singa-launch lost: their slices have other masters
        _live[self.session] = self
        transport.join()
        if runtime.tracks_lost():
            transport.listen()  # a group that replaces a lost one calls the masters there
        if runtime.is_replacement():
            with self.lock:
                self._drop_lost()  # (its own group among the lost: it masters nothing)
            self._take_masters_values()
        else:
            # Every group starts from worker 0's values, as the servers' initial values.
            broadcast_flat_([p.data for p in self.params], 0, "the initial values of every hogwild group")
        self.last_sync = {s.id: self._read(s) for group in self.remote.values() for s in group}
        self.known = [p.detach().clone() for p in self.params]  # this replica after its own last change
        self.syncs = 0
        runtime.on_shutdown(self.close)

    def _drop_lost(self) -> None:
        """Drop the groups singa-launch lost from the exchange: the slices they mastered go to the groups never lost
        in turn (every process computes the same from the job's store, whenever it looks), each taking its own
        replica's values as the master's. A group that replaced a lost one masters none. Under self.lock."""
        topo = runtime.topology()
        lost = {topo.role_of(p).group for p in runtime.times_lost() if p < topo.nworkers}
        if lost <= self.lost_groups:
            return
        self.lost_groups |= lost
        gone = {topo.role_of(p).group for p in runtime.lost_procs() if p < topo.nworkers}
        masters = [g for g in range(topo.nworker_groups) if g not in self.lost_groups]
        if not masters:
            raise RuntimeError(
                f"process {runtime.proc_rank()}: every worker group of this hogwild job has been lost at least once "
                f"(groups {', '.join(map(str, sorted(self.lost_groups)))}): the masters' values of the slices are gone "
                "with them, so the exchange cannot go on; restart the job from a checkpoint")
        self.groups = topo.nworker_groups - len(gone)  # the asynchrony the remedies correct for is the live groups'
        self.remote = {}
        for s in self.slices:
            master = s.master_group if s.master_group in masters else masters[s.id % len(masters)]
            if master == self.group:
                if s.id not in self.pending:
                    self.pending[s.id] = torch.zeros(s.numel, dtype=self.params[s.param].dtype)
                    self.last_sync.pop(s.id, None)
            else:
                self.pending.pop(s.id, None)
                self.remote.setdefault(master, []).append(s)
        self.mine = [s for s in self.slices if s.id in self.pending]

    def _take_masters_values(self) -> None:
        """A replacement group's start: every slice's current value from its master."""
        calls = []
        for master, slices in sorted(self.remote.items()):
            proc = runtime.topology().worker_ranks(master)[0]
            calls.append((proc, slices, transport.call_async(proc, master_values, self.session, [s.id for s in slices])))
        with torch.no_grad():
            for proc, slices, fut in calls:
                values = transport.wait(proc, fut, "the masters' values for a replacement group")
                self._received_total += wire.payload_bytes(values)
                for s, value in zip(slices, values):
                    ps_client.write_slice(self.params[s.param], s.start, s.end, value.to(self.params[s.param].dtype))

    def _check_masters(self, slice_ids: list[int]) -> None:
        """Raise unless this process masters these slices (under self.lock). A caller may learn first that a group
        was lost and that this process masters its slices now."""
        if any(sid not in self.pending for sid in slice_ids):
            self._drop_lost()
            if any(sid not in self.pending for sid in slice_ids):
                raise RuntimeError(f"process {runtime.proc_rank()} does not master hogwild slices "
                                   f"{[sid for sid in slice_ids if sid not in self.pending]}")

    def _read(self, s) -> torch.Tensor:
        return ps_client.read_slice(self.params[s.param], self.params[s.param], s.start, s.end)

    def synchronize(self) -> None:
        """Nothing to wait for: a Hogwild group applies its own gradients."""

    def _fold(self) -> None:
        """Add the deltas other groups sent for the slices this process masters (under self.lock)."""
        with torch.no_grad():
            for s in self.mine:
                pending = self.pending[s.id]
                if pending.any():
                    p = self.params[s.param]
                    ps_client.write_slice(p, s.start, s.end, self._read(s) + pending)
                    pending.zero_()

    def _adopt_user_values(self) -> None:
        """Values the user set since this replica's last own change (a load, a broadcast, an edit) are the
        replica's new state, not an update: they start the next delta afresh instead of being sent as one
        (which would count a load once per group). Under self.lock."""
        changed = {i for i, (p, k) in enumerate(zip(self.params, self.known)) if not torch.equal(p.detach(), k)}
        for s in self._remote_slices():
            if s.param in changed:
                self.last_sync[s.id] = self._read(s)

    def _remember(self) -> None:
        for p, k in zip(self.params, self.known):
            k.copy_(p.detach())

    def step(self, closure, local_step):
        if self.local:
            return local_step(closure)
        self._bytes_last = 0
        with self.lock:
            self._adopt_user_values()
            loss = self._local_update(closure, local_step)
            self._fold()
            self._remember()
        self.updates += 1
        if self.updates % self.sync_freq == 0:
            self.sync()
        return loss

    def _local_update(self, closure, local_step):
        """The user's optimizer step on this replica as an asynchronous update (ps.server.asynchronous_step): every
        group's steps are summed at the masters, each computed without the other groups' latest, so each counts as
        staleness groups - 1. The user's options and gradients are put back after the step."""
        if self.groups < 2 or not (self.staleness_lr or self.momentum_correction or self.relative_clip or self.dana):
            return local_step(closure)
        loss = self._run_closure(closure)
        sgd = isinstance(self.optimizer, torch.optim.SGD)
        given = [{k: g[k] for k in ("lr", "momentum", "weight_decay", "nesterov") if k in g}
                 for g in self.optimizer.param_groups]
        scale = 1.0
        for group, options in zip(self.optimizer.param_groups, given):
            changed, scale = asynchronous_step(options, self.groups - 1, self.groups, staleness_lr=self.staleness_lr,
                                               momentum_correction=self.momentum_correction, scales_gradient=sgd)
            if self.dana and sgd and changed.get("momentum") and not group.get("dampening"):
                # DANA's look-ahead by the one momentum a replica knows, its own: SGD's Nesterov form keeps the
                # replica at the point its momentum takes it to, where its next gradient is then computed.
                changed["nesterov"] = True
            group.update(changed)
        if self.relative_clip:  # as Downpour's servers: a catapult's gradients kept out of the replica's momentum
            clip, self.grad_norm = relative_clip_factor([p.grad for p in self.params], self.grad_norm,
                                                        self.relative_clip)
            scale *= clip
        grads = [(p, p.grad.clone()) for p in self.params if p.grad is not None] if scale != 1.0 else []
        try:
            for p, _ in grads:
                p.grad.mul_(scale)
            local_step(None)
        finally:
            for group, options in zip(self.optimizer.param_groups, given):
                group.update(options)
            for p, grad in grads:
                p.grad.copy_(grad)
        return loss

    def sync(self) -> None:
        """Exchange deltas with the master of every slice this process does not master. Under singa-launch a
        master whose group was lost is dropped, and its slices' new masters take the exchange."""
        if self.local:
            return
        with self.lock:
            self._drop_lost()
        try:
            self._exchange()
        except transport.PeerError as exc:
            if not self._lost_peer(exc.proc):
                raise
            with self.lock:
                self._drop_lost()
            self._exchange()

    def _lost_peer(self, proc: int) -> bool:
        """Whether singa-launch marks `proc` lost (it does within moments of the group's end)."""
        if not runtime.tracks_lost():
            return False
        deadline = time.monotonic() + LOST_WAIT_S
        while proc not in runtime.times_lost():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _exchange(self) -> None:
        futures = []
        for master, slices in sorted(self.remote.items()):
            with self.lock:
                sent = [self._read(s) for s in slices]
            deltas = [v - self.last_sync[s.id] for s, v in zip(slices, sent)]
            # Compressed deltas: what top-k or threshold holds back stays in the packer's residual and
            # goes with a later exchange.
            packet, nbytes = self.packer.pack([s.id for s in slices], deltas)
            self._bytes_last += nbytes
            self._bytes_total += nbytes
            proc = runtime.topology().worker_ranks(master)[0]
            futures.append((proc, slices, sent,
                            transport.call_async(proc, merge_deltas, self.session, [s.id for s in slices], packet)))
        failed = None
        for proc, slices, sent, fut in futures:
            try:
                fresh = transport.wait(proc, fut, "hogwild delta sync")
            except transport.PeerError as exc:
                # The other masters' answers are still taken: their deltas are in, and must not be sent again.
                failed = failed or exc
                continue
            self._received_total += wire.payload_bytes(fresh)
            with self.lock, torch.no_grad():
                for s, snap, value in zip(slices, sent, fresh):
                    value = value.to(snap.dtype)
                    own_since = self._read(s) - snap
                    ps_client.write_slice(self.params[s.param], s.start, s.end, value + own_since)
                    self.last_sync[s.id] = value
        if failed is not None:
            raise failed
        with self.lock:
            self._fold()
            self._remember()
        self.syncs += 1

    def flush(self) -> None:
        """Fold the deltas received so far into this replica now (otherwise done at the next step)."""
        if not self.local:
            with self.lock:
                self._fold()
                self._remember()

    @property
    def bytes_sent_last_step(self) -> int:
        """Delta payload bytes this process sent in its last step's exchange (0 on steps without one)."""
        return self._bytes_last

    @property
    def bytes_sent_total(self) -> int:
        return self._bytes_total

    @property
    def bytes_received_total(self) -> int:
        """Bytes of fresh values this process received from the slices' masters."""
        return self._received_total

    def state_dict(self) -> dict:
        # The server group's state is this process's own optimizer state, saved by the optimizer itself.
        if self.local:
            return {}
        state = {"updates": self.updates}
        residual = self.packer.residual_state(self._remote_slices(), self.params)
        if residual is not None:
            state["residual"] = residual
        return state

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0)) if state else 0
        if not self.local:
            self.packer.load_residual_state((state or {}).get("residual"), self._remote_slices())

    def _remote_slices(self) -> list:
        return [s for group in self.remote.values() for s in group]

    def close(self) -> None:
        """The last exchange, after which every replica holds the same values: once every group has finished, each
        sends what it has not sent yet, the masters fold it all in, and every group then takes the masters' values.
        (No delta may reach a master that has left: the groups wait for one another between the steps.)"""
        if self.local or self.session not in _live:
            return
        # Under singa-launch a group lost on the way is not waited for (the launcher marks it in the job's store).
        barrier = runtime.barrier_live if runtime.tracks_lost() else primitives.barrier
        try:
            # Every group has finished training first: a delta folded into a group still training would change
            # what it computes next, and the end result with it.
            barrier("the end of every hogwild group's training")
            self.sync()
            barrier("the last hogwild delta exchange")
            self.flush()  # every delta is in its master's replica now
            barrier("the masters' last fold")
            self.sync()  # nothing left to send: this fetches the masters' final values
            barrier("the last hogwild values")
        finally:
            _live.pop(self.session, None)
