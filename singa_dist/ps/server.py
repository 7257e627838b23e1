"""Parameter-server processes: they own slices of the parameters and run the user's optimizer on them.

A server keeps one table per parameter-server strategy object (a "session"): its slices' values, a
torch optimizer of the user's class and hyperparameters over them (so the optimizer state lives here),
and the slices' versions. The RPC handlers below run on the server; workers call them through
`singa_dist.ps.client`:

- `open_table`: worker 0 creates the table with the initial values; every client then reads them.
- `push`: a worker's (or worker group's) gradients, packed as `wire` says (maybe compressed), and the values of
  the slices the worker set itself since it last heard from the server (a load, a broadcast, an edit), which the
  server adopts before stepping. The server
  waits for `replicas` pushes of a group (Sandblaster: every worker of the group), averages them, applies
  the optimizer, bumps the version and answers with the fresh values when asked (a pull). A slice whose
  parameter had no gradient on any replica is not stepped (torch's optimizers skip a None `.grad`).
  Groups are otherwise independent (Downpour); with a staleness bound N, an update that would leave
  another computing group more than N versions behind is held back until that group has pushed, and a
  group more than N versions behind is made to pull.
- `pull`, `fetch_state`, `load_state`: reads, checkpoints and restores (`load_state` comes from worker 0 alone);
  `restored`: answers a worker once the table has taken as many restores as it asks for (the workers other than
  worker 0 wait there, not for each other, when every one loads a checkpoint).
- `close_table`: a client leaves a table. The server exits once every worker of the job has said goodbye
  (`transport.release_servers`, from `singa_dist.shutdown()` on the workers).
"""
from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time

import torch
import torch.distributed.rpc as rpc

from .. import runtime, timeline
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..topology import strategy_kind
from . import sockets, transport, wire

_server: "ParameterServer | None" = None
LOST_POLL_S = 0.5  # how often a server of an asynchronous job looks for worker groups singa-launch lost
# torch builds without RPC support (rpc.is_available() is False) still import this module.
_async_execution = getattr(getattr(rpc, "functions", None), "async_execution", lambda fn: fn)


def asynchronous_step(options: dict, staleness: int, groups: int, *, staleness_lr: bool, momentum_correction: bool,
                      scales_gradient: bool, dana: bool = False) -> tuple[dict, float]:
    """The user's hyperparameters for one asynchronous update and the factor its gradient is scaled by, so that the
    user's synchronous settings work unchanged.

    `staleness_lr` (Zhang et al. 2016, staleness-aware async-SGD): the step of a gradient computed on values
    `staleness` versions old is scaled by 1 / (staleness + 1). G groups taking turns see staleness G - 1 and
    together move as far per sample as one synchronous step on their G batches. For SGD (`scales_gradient`) the
    gradient and the weight decay are scaled, so that each gradient keeps its own rate inside the momentum buffer;
    for optimizers that normalise the gradient's scale away (Adam, Adagrad, RMSprop, ...) the lr is.
    `momentum_correction` (Mitliagkas et al. 2016, "asynchrony begets momentum"): G asynchronous groups add an
    implicit momentum of about 1 - 1/G, taken off the explicit `momentum` (never below 0).
    With `dana` the share is 1 / sqrt(staleness + 1): DANA's look-ahead already takes the groups' momentum into account,
    so a stale gradient misses only the other groups' gradient steps (on the digits CNN the full 1 / (s + 1) left the
    strictly alternating groups 1-2 points below the runs whose groups took turns in bursts; the relative clip keeps the
    larger share stable). Options an optimizer does not have are left out of the rule."""
    out, scale = dict(options), 1.0
    if staleness_lr and staleness > 0:
        factor = (int(staleness) + 1) ** (-0.5 if dana else -1.0)
        if scales_gradient:
            scale = factor
            if out.get("weight_decay"):
                out["weight_decay"] = out["weight_decay"] * factor
        elif "lr" in out:
            out["lr"] = out["lr"] * factor
    if momentum_correction and out.get("momentum"):
        out["momentum"] = max(0.0, float(out["momentum"]) - (1.0 - 1.0 / max(int(groups), 1)))
    return out, scale


def relative_clip_factor(grads: list, mean: float | None, ratio: float) -> tuple[float, float | None]:
    """The factor that scales `grads` (None entries skipped) down to `ratio` times `mean`, the running mean of earlier
    gradients' norms (1.0 when under it, or for the first gradient), and the running mean taking this (clipped) norm
    with weight 0.1, so norms may still grow 10% per update. A stale update past the edge of stability throws the loss
    up (the digits CNN's catapults), and its large gradients would feed the momentum for many updates."""
    given = [g for g in grads if g is not None]
    if not given:
        return 1.0, mean
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in given])))
    factor = 1.0
    if mean is not None and norm > ratio * mean:
        factor, norm = ratio * mean / norm, ratio * mean
    return factor, (norm if mean is None else 0.9 * mean + 0.1 * norm)


class _Table:
    """One strategy's slices on this server."""

    def __init__(self, spec: dict):
        self.lock = threading.Lock()
        self.slice_ids = [s.id for s in spec["slices"]]
        self.layout = [(s.name, s.start, s.end) for s in spec["slices"]]  # what a client's slices must be
        self.dropped_groups: set[int] = set()  # groups lost while they pushed here (each one took away a turn)
        self.awaited: set[int] = set()  # lost groups whose replacement is on its way (the table stays open for it)
        self.params = [torch.nn.Parameter(v.detach().clone(), requires_grad=False) for v in spec["values"]]
        self.param_group = spec["param_group"]  # the user's param group of each slice
        self.replicas = spec["replicas"]
        self.staleness = spec["staleness"]
        self.clients = spec["clients"]
        self.groups = max(1, self.clients // self.replicas)  # worker groups that push to this table
        # Values the user set, adopted already: slice -> (the values, the groups that pushed since). A group that
        # sets the same values before it has heard of the first (every group loading one checkpoint) is not
        # adopted again over the updates made since; once every group has pushed, the entry is forgotten.
        self.user_values: dict[int, tuple[torch.Tensor, set]] = {}
        self.closed = 0
        self.version = 0
        self.restores = 0  # checkpoints worker 0 restored into the table (load_state)
        self.restored_version = 0  # the table's version right after the last restore
        self.restore_waiters: list = []  # (restores awaited, future) of workers waiting in `restored`
        self.slice_versions = [0] * len(self.params)
        self.base: dict[int, int] = {}  # worker group -> version of the values it computes on
        self.computing: set[int] = set()  # groups that are computing (no push waiting here)
        self.gathering: dict[int, list] = {}  # group -> pushes received for its next update
        self.queue: list = []  # updates held back by the staleness bound
        self.left: dict[int, tuple] = {}  # group -> (process, steps) of its first worker to close the table
        self.parts: dict[tuple, dict] = {}  # (group, process) -> the messages of a push cut into several
        self.compressor = spec.get("compression")
        self.value_dtype = spec.get("value_dtype")  # values answered in this dtype (16-bit compressions)
        self.numels = [p.numel() for p in self.params]
        # Checkpoints of this table every N updates (strategy's checkpoint_dir/checkpoint_every); see checkpoint().
        self.checkpoint_path, self.checkpoint_every = None, spec.get("checkpoint_every")
        # Downpour/Hybrid's remedies for asynchrony (asynchronous_step); off for synchronous tables.
        self.staleness_lr = bool(spec.get("staleness_lr", False))
        self.momentum_correction = bool(spec.get("momentum_correction", False))
        # Downpour/Hybrid's warm start: the first `warmup_steps` updates are synchronous (see _warm_step).
        self.warmup_steps = int(spec.get("warmup_steps", 0) or 0)
        self.warm: list = []  # the groups' pushes for the synchronous update in the making
        self.groups_at_start = self.groups
        # DANA (Hakimi et al. 2019): optimizer state per worker group, values answered looked ahead (see values()).
        self.dana = bool(spec.get("dana", False)) and self.groups > 1  # a lone group is synchronous: nothing to tame
        self.group_states: dict[int, dict] = {}
        self.group_steps: dict[int, list] = {}  # group -> (lr, momentum) of its last update, per param group
        # Downpour/Hybrid's relative clip of asynchronous gradients (see _clip); a lone group is synchronous.
        self.relative_clip = spec.get("relative_clip") if self.groups > 1 else None
        self.grad_norms: dict[int, float] = {}  # group -> running mean of its gradients' norms (this server's slices)
        self.optimizer, self.group_index = self._make_optimizer(spec)
        # Each slice's param group in the optimizer (the look-ahead reads that group's lr and momentum).
        self.position = [self.group_index.index(g) for g in self.param_group] if self.optimizer is not None else []

    def _make_optimizer(self, spec):
        by_group: dict[int, list] = {}
        for p, g in zip(self.params, self.param_group):
            by_group.setdefault(g, []).append(p)
        if not by_group:
            return None, []
        order = sorted(by_group)
        groups = [{**spec["group_options"][g], "params": by_group[g]} for g in order]
        cls = spec["optimizer_class"]
        try:
            optimizer = cls(groups, **spec["defaults"])
        except TypeError:
            optimizer = cls(groups)
        return optimizer, order

    # ---- under self.lock ---------------------------------------------------------------------------
    def readmit(self, group: int) -> None:
        """A group that replaces a lost one is back: it pushes again, with optimizer state of its own."""
        if group in self.left:
            del self.left[group]
            self.closed -= 1
        if group in self.dropped_groups:
            self.dropped_groups.discard(group)
            self.groups += 1
        self.awaited.discard(group)
        for per_group in (self.group_states, self.group_steps, self.grad_norms):
            per_group.pop(group, None)

    def mismatch(self, layout: list) -> str | None:
        """How a client's slices differ from this table's (a replacement group built another model), or None."""
        if layout == self.layout:
            return None
        mine = {name: end - start for name, start, end in self.layout}
        theirs = {name: end - start for name, start, end in layout}
        for name, n in theirs.items():
            if name not in mine:
                return f"it has parameter {name!r}, which the table does not"
            if mine[name] != n:
                return f"its slice of parameter {name!r} has {n} elements, the table's {mine[name]}"
        missing = [name for name in mine if name not in theirs]
        if missing:
            return f"it lacks parameter {missing[0]!r}"
        return "its parameters are sliced differently"

    def register(self, group: int):
        self.base[group] = self.version
        self.computing.add(group)
        return self.version, self.values()

    def values(self, look_ahead: bool = False) -> list[torch.Tensor]:
        """The slices' values; `look_ahead` (DANA): minus the momentum part of every group's next update (the sum over
        the groups of lr * momentum * momentum buffer, each at the group's own lr: groups that drift apart may be at
        different points of an LR schedule), where the group's next gradient will be applied (SGD)."""
        out = [p.detach() for p in self.params]
        if look_ahead and isinstance(self.optimizer, torch.optim.SGD):
            current = [(float(pg["lr"]), float(pg.get("momentum") or 0)) for pg in self.optimizer.param_groups]
            for i, p in enumerate(self.params):
                for g, state in self.group_states.items():
                    buf = state.get(p, {}).get("momentum_buffer")
                    lr, momentum = self.group_steps.get(g, current)[self.position[i]]
                    if buf is not None and momentum:
                        out[i] = out[i] - lr * momentum * buf
        if self.value_dtype is not None:
            return [v.to(self.value_dtype, copy=True) for v in out]
        return [v.clone() for v in out]

    def _group_state(self, group: int) -> dict:
        """DANA: the optimizer state of one worker group. The groups' states start, all at once, from the shared state
        (that of the warm start's synchronous updates), each momentum a 1/G share of it."""
        if group not in self.group_states:
            for g in {group} | (set(self.base) if not self.group_states else set()):
                state = self.group_states[g] = collections.defaultdict(dict)
                for p, st in self.optimizer.state.items():
                    state[p] = {k: (x.detach() / self.groups if k == "momentum_buffer" else x.detach().clone())
                                if torch.is_tensor(x) else x for k, x in st.items()}
        return self.group_states[group]

    def _clip(self, group: int, grads: list) -> list:
        """The group's gradient clipped relative to its running norm on this server's slices (relative_clip_factor)."""
        factor, self.grad_norms[group] = relative_clip_factor(grads, self.grad_norms.get(group), self.relative_clip)
        return grads if factor == 1.0 else [None if g is None else g * factor for g in grads]

    def _apply(self, grads: list[torch.Tensor], options: list[dict], values=None, group: int = 0,
               stale: int = 0, others: tuple = (), synchronous: bool = False) -> None:
        """Adopt the values workers set themselves (loaded, broadcast, edited), then step on the gradients
        (computed on values `stale` versions old) of `group` (and of the `others` a synchronous update averages)."""
        t0 = timeline.now() if timeline.on else 0
        for i, (p, value) in enumerate(zip(self.params, values or ())):
            if value is None:
                continue
            seen = self.user_values.get(i)
            if seen is not None and torch.equal(seen[0], value):
                continue
            p.data.copy_(value)
            self.user_values[i] = (value.clone(), set())
        for i in list(self.user_values):
            self.user_values[i][1].update((group, *others))
            if len(self.user_values[i][1]) >= self.groups:
                del self.user_values[i]
        if self.optimizer is not None:
            if self.relative_clip and not synchronous:
                grads = self._clip(group, grads)
            scale = 1.0
            for k, g in enumerate(self.group_index):
                given = options[g]
                if (self.staleness_lr or self.momentum_correction) and not synchronous:
                    given, scale = asynchronous_step(given, stale, self.groups, staleness_lr=self.staleness_lr,
                                                     momentum_correction=self.momentum_correction,
                                                     scales_gradient=isinstance(self.optimizer, torch.optim.SGD),
                                                     dana=self.dana)
                for key, value in given.items():
                    self.optimizer.param_groups[k][key] = value
            for p, grad in zip(self.params, grads):
                p.grad = None if grad is None else grad.to(p.dtype)  # None: the optimizer skips the slice
                if scale != 1.0 and p.grad is not None:
                    p.grad = p.grad * scale  # a stale gradient's share (asynchronous_step)
            if self.dana and not synchronous:
                # DANA: each group steps through its own optimizer state (momentum), as if it trained alone.
                self.group_steps[group] = [(float(pg["lr"]), float(pg.get("momentum") or 0))
                                           for pg in self.optimizer.param_groups]
                shared, self.optimizer.state = self.optimizer.state, self._group_state(group)
                try:
                    self.optimizer.step()
                finally:
                    self.optimizer.state = shared
            else:
                self.optimizer.step()
            for p in self.params:
                p.grad = None
        self.version += 1
        self.slice_versions = [self.version] * len(self.params)
        if self.checkpoint_path is not None and self.version % self.checkpoint_every == 0:
            self.checkpoint()
        if t0:
            timeline.span("apply", t0, lane="updates", tensor=f"worker group {group}'s update (version {self.version})")

    def _may_apply(self, group: int) -> bool:
        if self.staleness is None:
            return True
        return all(self.version + 1 - self.base[c] <= self.staleness for c in self.computing if c != group)

    def _warm_step(self) -> list:
        """The warm start's synchronous update (Dean et al. 2012 warm-started Downpour before "unleashing the other
        replicas"; every group computing on the same values through the first steps of training is AllReduce's
        path): once every group still in the job has pushed, their gradients are averaged and applied as one
        fresh update, and every group gets the new values. (futures, answer) pairs to complete."""
        needed = self.groups_at_start - len(self.left)
        if not self.warm or len({w[0] for w in self.warm}) < needed:
            return []
        warm, self.warm = self.warm, []
        average = warm[0][5]
        grads, values = [], None
        for i in range(len(self.params)):
            given = [w[1][i] for w in warm if w[1][i] is not None]
            # As Sandblaster's replicas: a group without this gradient counts as zeros.
            grads.append(None if not given else torch.stack(given).sum(0) / (len(warm) if average else 1))
        if any(w[4] for w in warm):
            values = []
            for i in range(len(self.params)):
                given = [w[4][i] for w in warm if w[4] and w[4][i] is not None]
                values.append(None if not given else torch.stack(given).mean(0))
        self._apply(grads, warm[0][2], values, warm[0][0], 0, tuple(w[0] for w in warm[1:]), synchronous=True)
        fresh = self.values()
        done = []
        for group, _, _, futures, _, _ in warm:
            if group in self.base:
                self.base[group] = self.version
                self.computing.add(group)
            done.append((futures, (self.version, fresh, 0)))
        return done

    def drain(self) -> list:
        """Apply every queued update the staleness bound allows (and the warm start's synchronous update once
        complete); (futures, answer) pairs to complete."""
        done = self._warm_step()
        progress = True
        while progress:
            progress = False
            # Oldest values first: their gradients are the stalest already.
            for item in sorted(self.queue, key=lambda it: self.base.get(it[0], self.version)):
                group, grads, options, futures, want, stale, values = item
                if not self._may_apply(group):
                    continue
                self.queue.remove(item)
                # Staleness when applied (Zhang et al.'s): a held-back update has grown staler while it waited.
                self._apply(grads, options, values, group, self.version - self.base.get(group, self.version))
                if self.staleness is not None and self.version - self.base.get(group, self.version) > self.staleness:
                    want = True  # a group too far behind must compute on fresh values
                values = None
                if want:
                    self.base[group] = self.version
                    values = self.values(look_ahead=self.dana)
                if group in self.base:
                    self.computing.add(group)
                done.append((futures, (self.version, values, stale)))
                progress = True
        return done

    def gather_part(self, group: int, proc, part: tuple, grads, values, future) -> dict | None:
        """One message of a push cut into `part[1]` messages: the whole push once its last message is here."""
        index, count, start, end = part
        n = len(self.params)
        with self.lock:
            entry = self.parts.setdefault((group, proc), {"grads": [None] * n, "values": None, "got": set(),
                                                          "waiters": []})
            entry["grads"][start:end] = grads
            if values is not None:
                if entry["values"] is None:
                    entry["values"] = [None] * n
                entry["values"][start:end] = values
            entry["got"].add(index)
            entry["waiters"].append((future, start, end))
            if len(entry["got"]) < count:
                return None
            return self.parts.pop((group, proc))

    def left_error(self, group: int, waiting: int = 1) -> RuntimeError:
        proc, steps = self.left[group]
        who = "a worker" if proc is None else f"worker process {proc}"
        after = "" if steps is None else f" after {steps} optimizer step(s)"
        return RuntimeError(
            f"the ranks ran different numbers of steps: {who} of worker group {group} left the parameter "
            f"server{after} (singa_dist.shutdown(), or the end of its script) while {waiting} push(es) of the "
            f"group's other workers wait for it on this server (process {runtime.proc_rank()}); give every rank "
            "the same number of steps")

    def push(self, group: int, grads, options, want: bool, average: bool, values=None, proc: int | None = None):
        future = torch.futures.Future()
        with self.lock:
            if group in self.left and self.replicas > 1:  # a replica of this group is gone: this push would wait
                future.set_result(self.left_error(group))
                return future, []
            pushes = self.gathering.setdefault(group, [])
            pushes.append((grads, future, want, values, proc))
            if len(pushes) < self.replicas:
                return future, []
            del self.gathering[group]
            # A slice with a gradient from any replica is stepped, the others counting as zeros (as DDP's
            # find_unused_parameters); a slice with none from every replica is not.
            total = []
            for i in range(len(grads)):
                given = [p[0][i] for p in pushes if p[0][i] is not None]
                if not given:
                    total.append(None)
                    continue
                t = torch.stack(given).sum(0) if len(given) > 1 else given[0]
                total.append(t / self.replicas if average and self.replicas > 1 else t)
            self.computing.discard(group)
            # How many versions behind the servers' values were when the group finished computing on them.
            stale = self.version - self.base.get(group, self.version)
            # Values a worker set itself come with its push: the mean of those given (one replica's, or the same
            # values from every replica after a load or a broadcast) replaces the slice before the step.
            adopted = None
            if any(p[3] for p in pushes):
                adopted = []
                for i in range(len(grads)):
                    given = [p[3][i] for p in pushes if p[3] and p[3][i] is not None]
                    adopted.append(None if not given else
                                   given[0] if len(given) == 1 else torch.stack(given).mean(0))
            if self.version < self.warmup_steps:
                self.warm.append((group, total, options, [p[1] for p in pushes], adopted, average))
            else:
                self.queue.append((group, total, options, [p[1] for p in pushes], any(p[2] for p in pushes), stale,
                                   adopted))
            return future, self.drain()

    def state(self) -> dict:
        entries = {}
        for sid, p, v in zip(self.slice_ids, self.params, self.slice_versions):
            st = dict(self.optimizer.state.get(p, {})) if self.optimizer is not None else {}
            for g, group_state in sorted(self.group_states.items()):  # DANA's: "group<g>.<key>"
                st.update({f"group{g}.{k}": x for k, x in group_state.get(p, {}).items()})
            entries[sid] = {"value": p.detach().clone(), "version": v,
                            "state": {k: (x.detach().clone() if torch.is_tensor(x) else x) for k, x in st.items()}}
        return entries

    def load(self, entries: dict) -> None:
        self.group_states = {}
        for sid, p in zip(self.slice_ids, self.params):
            entry = entries[sid]
            p.data.copy_(entry["value"])
            if self.optimizer is not None:
                shared = {}
                for k, x in entry["state"].items():
                    x = x.clone().to(p.device) if torch.is_tensor(x) else x
                    of_group = re.fullmatch(r"group(\d+)\.(.+)", k)
                    if of_group:
                        state = self.group_states.setdefault(int(of_group[1]), collections.defaultdict(dict))
                        state[p][of_group[2]] = x
                    else:
                        shared[k] = x
                self.optimizer.state[p] = shared
        self.version = max([e["version"] for e in entries.values()], default=self.version)
        self.slice_versions = [entries[sid]["version"] for sid in self.slice_ids]
        for g in self.base:
            self.base[g] = self.version

    def checkpoint(self) -> None:
        """Write the slices, their optimizer state and versions atomically (a restarted server resumes from them)."""
        save_checkpoint(self.checkpoint_path, {"slice_ids": self.slice_ids, "numels": self.numels,
                                               "version": self.version, "slices": self.state()})

    def resume(self, path: str, every: int) -> bool:
        """Checkpoint to `path` every `every` updates from now on, and first resume from it if it exists (True)."""
        self.checkpoint_path, self.checkpoint_every = path, every
        try:
            saved = load_checkpoint(path)  # a file that cannot be read raises CheckpointError naming it
        except FileNotFoundError:
            return False
        if not isinstance(saved, dict) or saved.get("slice_ids") != self.slice_ids or saved.get("numels") != self.numels:
            raise CheckpointError(
                f"parameter-server checkpoint {path} holds other slices than this server's (written for another "
                "model, number of servers or strategy order); move it away to start afresh")
        self.load(saved["slices"])
        self.version = saved["version"]
        return True


class ParameterServer:
    """The tables of one server process, and who has said goodbye."""

    def __init__(self, nworkers: int):
        self.lock = threading.Lock()
        self.tables: dict[int, _Table] = {}
        self.waiting: dict[int, list] = {}
        self.nworkers = nworkers
        self.stopped_by: set[int] = set()
        self.dropped: dict[int, int] = {}  # worker -> times it was dropped, lost with its group (asynchronous jobs)
        self.readmitted: dict[int, int] = {}  # worker group -> the generation of replacement taken back last
        self.closed_sessions: set[int] = set()  # tables every client closed
        self.stopped = threading.Event()

    def table(self, session: int) -> _Table:
        table = self.tables.get(session)
        if table is None:
            raise RuntimeError(f"parameter server process {runtime.proc_rank()} has no table {session} "
                               "(was it closed, or did worker 0 not create it?)")
        return table


def _me() -> ParameterServer:
    if _server is None:
        raise RuntimeError(f"process {runtime.proc_rank()} is not serving parameters")
    return _server


def _complete(done: list) -> None:
    for futures, answer in done:
        for f in futures:
            f.set_result(answer)


# ---- handlers (run on the server; through torch RPC, or ps.sockets from a replacement) ------------------------
@sockets.handler
@_async_execution
def open_table(session: int, spec: dict | None, group: int, layout: list | None = None) -> torch.futures.Future:
    """`layout`: the (name, start, end) of the client's slices here, checked against the table's (a replacement
    worker group, whose model no other worker compared with theirs)."""
    server = _me()
    future = torch.futures.Future()
    with server.lock:
        if spec is None and session in server.closed_sessions:
            future.set_result(RuntimeError(
                f"{transport.describe(runtime.proc_rank())} closed table {session}: every worker group that used it "
                f"had finished when worker group {group} came to open it"))
            return future
        waiters = [(future, group)]
        if spec is not None:
            table = _Table(spec)
            waiters += server.waiting.pop(session, [])
            if spec.get("checkpoint_dir"):
                try:
                    _resume(table, session, spec["checkpoint_dir"], spec["checkpoint_every"])
                except Exception as exc:  # every client is told: nothing saved is overwritten
                    for f, _ in waiters:
                        f.set_result(exc)
                    return future
            server.tables[session] = table
        elif session not in server.tables:
            server.waiting.setdefault(session, []).append((future, group))
            return future
        table = server.tables[session]
    wrong = table.mismatch(layout) if layout is not None else None
    if wrong is not None:
        future.set_result(ValueError(
            f"worker group {group} does not train the model of table {session} on "
            f"{transport.describe(runtime.proc_rank())}: {wrong} (every worker group must build the same model)"))
        return future
    for f, g in waiters:
        with table.lock:
            answer = table.register(g)
        f.set_result(answer)
    return future


def _resume(table: _Table, session: int, folder: str, every: int) -> None:
    """Checkpoint the table in `folder` (one file per server and strategy) and resume from the file there."""
    role = runtime.role()
    path = os.path.join(folder, f"server{role.group}.{role.index}-table{session}.pt")
    if table.resume(path, every):
        print(f"{transport.describe(runtime.proc_rank())}: resumed table {session} from {path} at version "
              f"{table.version}", file=sys.stderr, flush=True)


def _answer_parts(whole: torch.futures.Future, waiters: list) -> None:
    """Answer each message of a push cut into several with the values of its own slices."""
    def split(done):
        answer = done.value()
        for future, start, end in waiters:
            if isinstance(answer, BaseException):
                future.set_result(answer)
            else:
                version, values, stale = answer
                future.set_result((version, None if values is None else values[start:end], stale))
    whole.add_done_callback(split)


@sockets.handler
@_async_execution
def push(session: int, group: int, packet: tuple, options: list, want: bool, average: bool, values=None,
         proc: int | None = None, part: tuple | None = None):
    """A worker's push; `part` = (index, count, start, end) when it is one of `count` messages, carrying the
    table's slices [start, end)."""
    t0 = timeline.now() if timeline.on else 0
    table = _me().table(session)
    start, end = (0, len(table.numels)) if part is None else part[2:]
    grads = wire.unpack(table.compressor, packet, table.numels[start:end])
    lane = f"pushes of process {proc}"
    if t0 and getattr(table.compressor, "name", "none") != "none":
        timeline.span("decompress", t0, lane=lane, tensor=f"gradients of process {proc}")
    if part is None:
        future, done = table.push(group, grads, options, want, average, values, proc)
    else:
        future = torch.futures.Future()
        entry = table.gather_part(group, proc, part, grads, values, future)
        if entry is None:
            return future  # answered when the push's last message has come
        whole, done = table.push(group, entry["grads"], options, want, average, entry["values"], proc)
        _answer_parts(whole, entry["waiters"])
    _complete(done)
    if t0:
        timeline.span("push", t0, lane=lane, tensor=f"from process {proc} (worker group {group})")
    return future


@sockets.handler
def pushed(session: int, group: int) -> list:
    """The workers whose pushes for the group's next update this server holds (the others are awaited)."""
    table = _me().table(session)
    with table.lock:
        return [p[4] for p in table.gathering.get(group, [])]


@sockets.handler
def pull(session: int, group: int | None):
    t0 = timeline.now() if timeline.on else 0
    table = _me().table(session)
    with table.lock:
        if group is not None and group in table.base:
            table.base[group] = table.version
        answer = table.version, table.values()
    if t0:
        timeline.span("pull", t0, lane="pulls", tensor=f"by worker group {group}")
    return answer


@sockets.handler
def fetch_state(session: int) -> dict:
    table = _me().table(session)
    with table.lock:
        return table.state()


@sockets.handler
def load_state(session: int, entries: dict) -> int:
    table = _me().table(session)
    with table.lock:
        table.load(entries)
        table.restores += 1
        version = table.restored_version = table.version
        ready = [f for count, f in table.restore_waiters if count <= table.restores]
        table.restore_waiters = [(count, f) for count, f in table.restore_waiters if count > table.restores]
    for future in ready:
        future.set_result(version)
    return version


@sockets.handler
@_async_execution
def restored(session: int, count: int) -> torch.futures.Future:
    """Answers with the table's version right after the restore, once worker 0 has restored it `count` times."""
    table = _me().table(session)
    future = torch.futures.Future()
    with table.lock:
        if table.restores < count:
            table.restore_waiters.append((count, future))
            return future
        version = table.restored_version
    future.set_result(version)
    return future


@sockets.handler
def close_table(session: int, group: int, proc: int | None = None, steps: int | None = None) -> None:
    server = _me()
    table = server.tables.get(session)
    if table is None:
        return
    with table.lock:
        table.closed += 1
        table.computing.discard(group)
        table.base.pop(group, None)
        # Pushes of the group's other replicas that wait for this one would wait forever: it ran fewer steps.
        table.left.setdefault(group, (proc, steps))
        orphans = table.gathering.pop(group, [])
        done = table.drain()  # updates that waited for the group that left
        last = table.closed >= table.clients and not table.awaited
    _complete(done)
    for push_entry in orphans:
        push_entry[1].set_result(table.left_error(group, len(orphans)))
    if last:
        with server.lock:
            server.tables.pop(session, None)
            server.closed_sessions.add(session)


def _goodbye(worker_proc: int) -> None:
    server = _me()
    with server.lock:
        server.stopped_by.add(worker_proc)
        if len(server.stopped_by) >= server.nworkers:
            server.stopped.set()


def _drop_lost(times_lost: dict) -> None:
    """Drop the worker groups singa-launch lost (an asynchronous job; {worker: times lost}, a group replaced since
    counted too): each table closes for the group, which releases updates the staleness bound held back for it, and
    its workers count as gone."""
    server = _me()
    topo = runtime.topology()
    with server.lock:
        new = sorted(p for p, n in times_lost.items() if server.dropped.get(p, 0) < n and p < topo.nworkers)
        for p in new:
            server.dropped[p] = times_lost[p]
    if not new:
        return
    groups = sorted({topo.role_of(p).group for p in new})
    coming = runtime.replacements_coming()
    # Groups a replacement is on its way for (singa-launch says so before the loss): their tables stay open for it.
    awaited = {topo.role_of(p).group for p in new if coming.get(p, 0) >= times_lost[p]}
    print(f"{transport.describe(runtime.proc_rank())}: dropped worker group{'s' * (len(groups) > 1)} "
          f"{', '.join(map(str, groups))} (process{'es' * (len(new) > 1)} {', '.join(map(str, new))}), lost; the "
          f"other groups go on{' (a replacement is on its way)' if awaited else ''}", file=sys.stderr, flush=True)
    for session, table in list(server.tables.items()):
        for group in groups:
            with table.lock:
                if group in awaited:
                    table.awaited.add(group)
                else:  # (a replacement that was lost in turn, with none to follow it)
                    table.awaited.discard(group)
            if group not in table.left:  # a group that closed the table before it was lost is gone already
                with table.lock:  # it will not push again: not counted among the groups that take turns
                    if table.groups > 1:
                        table.groups -= 1
                        table.dropped_groups.add(group)
                close_table(session, group)
    for proc in new:
        if topo.role_of(proc).group not in awaited:  # no replacement on its way: the worker is gone for good
            _goodbye(proc)


def _readmit(worker_proc: int, generation: int) -> None:
    """The `generation`-th replacement of lost worker `worker_proc` has joined: the loss is taken in first (if this
    server has not seen it yet), then the worker counts again, and its group is back in every table."""
    server = _me()
    group = runtime.topology().role_of(worker_proc).group
    _drop_lost({worker_proc: generation})
    with server.lock:
        server.stopped_by.discard(worker_proc)
        first = server.readmitted.get(group, 0) < generation
        server.readmitted[group] = max(generation, server.readmitted.get(group, 0))
        tables = list(server.tables.values())
    if first:
        for table in tables:
            with table.lock:
                table.readmit(group)
        print(f"{transport.describe(runtime.proc_rank())}: worker group {group} is back (replacement {generation})",
              file=sys.stderr, flush=True)


def serve() -> None:
    """A server process's whole life: join the job, serve parameters until every worker has stopped (or, in an
    asynchronous job, was lost with its worker group)."""
    global _server
    runtime.init(_serve=False)
    role = runtime.role()
    if not role.is_server:
        raise RuntimeError(f"process {runtime.proc_rank()} is a worker; only server processes run serve()")
    _server = ParameterServer(runtime.topology().nworkers)
    transport.on_goodbye(_goodbye)
    transport.on_readmit(_readmit)
    transport.join()
    watch = strategy_kind(runtime.job_strategy()).asynchronous
    if runtime.tracks_lost():
        transport.listen()  # where a worker group that replaces a lost one calls
    while not _server.stopped.wait(LOST_POLL_S if watch else None):
        _drop_lost(runtime.times_lost())
    time.sleep(0.2)  # let the answers to the last goodbyes leave before the agent goes
    transport.leave()
    transport.on_goodbye(None)
    transport.on_readmit(None)
    _server = None
