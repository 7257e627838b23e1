"""The workers' side of the parameter-server protocol: push gradients, pull values, checkpoint the servers."""
from __future__ import annotations

import collections
import itertools

import torch

from .. import runtime, timeline
from ..compression import Compressor
from ..compression import resolve as resolve_compression
from ..functions import user_optimizer_class
from . import server, transport
from .slicing import message_runs, slice_params
from .wire import Packer, payload_bytes

_sessions = itertools.count()


def next_session() -> int:
    """Every worker builds its strategies in the same order, so the n-th one has the same id everywhere."""
    return next(_sessions)


def value_dtype(compressor) -> torch.dtype | None:
    """The dtype values travel in from the servers: the 16-bit casts halve that traffic too (the servers keep
    full-precision values and optimizer state, as fp32 master weights do in mixed precision)."""
    return getattr(compressor, "wire_dtype", None) if isinstance(compressor, Compressor) else None


def write_slice(param: torch.Tensor, start: int, end: int, value: torch.Tensor) -> None:
    data = param.data
    if data.is_contiguous():
        data.view(-1)[start:end].copy_(value, non_blocking=False)
    else:
        flat = data.reshape(-1).clone()
        flat[start:end].copy_(value)
        data.copy_(flat.view_as(data))


def read_slice(tensor: torch.Tensor | None, param: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A host copy of elements [start, end) of `tensor` (zeros for a missing gradient); RPC sends whole
    storages, so slices are always copied, and CUDA tensors go through pinned memory."""
    if tensor is None:
        return torch.zeros(end - start, dtype=param.dtype)
    flat = tensor.detach().reshape(-1)[start:end]
    if flat.is_cuda:
        staged = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        staged.copy_(flat)
        return staged
    return flat.clone()


class StalenessLog:
    """The versions behind of each update applied, as a list indexed from the first update of the run, keeping
    only the last KEEP entries (older ones are gone, so that a long run's memory does not grow): `len()` counts
    every update, `log[i:]` gives the kept entries from update i on."""

    KEEP = 65536

    def __init__(self):
        self._kept: collections.deque = collections.deque(maxlen=self.KEEP)
        self._count = 0

    def append(self, stale: int) -> None:
        self._kept.append(stale)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return iter(self._kept)

    def __getitem__(self, index):
        first = self._count - len(self._kept)  # the update the oldest kept entry belongs to
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise ValueError("StalenessLog slices go forward one update at a time")
            start, stop, _ = index.indices(self._count)
            return list(itertools.islice(self._kept, max(start - first, 0), max(stop - first, 0)))
        index = index + self._count if index < 0 else index
        if not first <= index < self._count:
            raise IndexError(f"update {index} is not kept (updates {first} to {self._count - 1} are)")
        return self._kept[index - first]


class ServerTable:
    """Where one strategy's table lives (the servers of a worker group's server group, the slices each holds) and what
    any worker can do there alone, by point-to-point calls to those servers: read the table's state for a checkpoint,
    and restore it from one. No call here waits for another worker, so `opt.state_dict()` works on rank 0 alone."""

    def __init__(self, named, *, group: int, session: int, value_dtype: torch.dtype | None = None):
        topo = runtime.topology()
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group = group
        self.session = session
        self.value_dtype = value_dtype  # the dtype the servers send values in (see value_dtype())
        self.servers = topo.server_ranks(topo.server_group_of(group))
        self.slices = slice_params([(n, p.numel()) for n, p in named], topo.nservers_per_group,
                                   topo.nserver_groups)
        self.by_server = [[s for s in self.slices if s.server == i] for i in range(len(self.servers))]
        self.loads = 0  # checkpoints this worker loaded: the n-th waits for worker 0's n-th restore

    def state_dict(self) -> dict:
        """The servers' values, optimizer state and versions, per parameter name (independent of the slicing)."""
        futures = [transport.call_async(proc, server.fetch_state, self.session) for proc in self.servers]
        entries = {}
        for proc, fut in zip(self.servers, futures):
            entries.update(transport.wait(proc, fut, "fetch_state"))
        params, state, versions = {}, {}, {}
        for index, name in enumerate(self.names):
            parts = [s for s in self.slices if s.param == index]
            params[name] = torch.cat([entries[s.id]["value"] for s in parts]).view(self.params[index].shape)
            versions[name] = min(entries[s.id]["version"] for s in parts)
            merged = {}
            for key, first in entries[parts[0].id]["state"].items():
                if torch.is_tensor(first) and first.dim() == 1 and first.numel() == parts[0].numel:
                    merged[key] = torch.cat([entries[s.id]["state"][key] for s in parts])
                else:
                    merged[key] = first
            state[name] = merged
        return {"params": params, "state": state, "versions": versions}

    def load_state_dict(self, state: dict) -> list[int]:
        """Worker 0 restores the servers from `state`; every other worker waits on the servers (not on worker 0)
        until they have taken that restore, so that no update of its own is lost to it. Then each sets its
        parameters to the values of the checkpoint it loaded, as the servers send values: when every rank loads rank
        0's file, every worker of every group starts from the values restored, without asking the others. Returns
        the version of each server's table right after the restore."""
        missing = [name for name in self.names if name not in state["params"]]
        if missing:
            raise KeyError(f"the checkpoint has no parameter {missing[0]!r} (it has "
                           f"{', '.join(sorted(state['params']))})")
        self.loads += 1
        if runtime.rank() == 0:
            versions = self._restore(state)
        else:
            versions = self._await_restore()
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                value = state["params"][name].reshape(p.shape).to(p.dtype)
                p.data.copy_(value if self.value_dtype is None else value.to(self.value_dtype))
        return versions

    def _restore(self, state: dict) -> list[int]:
        futures = []
        for i, proc in enumerate(self.servers):
            entries = {}
            for s in self.by_server[i]:
                name = self.names[s.param]
                full = state["params"][name].reshape(-1)
                numel = full.numel()
                entries[s.id] = {
                    "value": full[s.start:s.end].clone(), "version": state["versions"][name],
                    "state": {k: (v[s.start:s.end].clone() if torch.is_tensor(v) and v.dim() == 1
                                  and v.numel() == numel else v)
                              for k, v in state["state"][name].items()}}
            futures.append(transport.call_async(proc, server.load_state, self.session, entries))
        return transport.wait_all(list(zip(self.servers, futures)), "load_state")

    def _await_restore(self) -> list[int]:
        calls = [(proc, transport.call_async(proc, server.restored, self.session, self.loads))
                 for proc in self.servers]
        try:
            return transport.wait_all(calls, "restored")
        except transport.PeerError as exc:
            if "did not answer within" not in str(exc):
                raise
            raise transport.PeerError(exc.proc, "restored", exc, message=(
                f"rank {runtime.rank()}: opt.load_state_dict() waited {runtime.timeout_s():g} s for rank 0 to restore "
                f"the parameter servers from the checkpoint ({transport.describe(exc.proc)} has not seen it): call "
                "opt.load_state_dict() on rank 0 too (rank 0 sends the checkpoint to the servers; the other workers "
                "wait for that, so that no update is lost to it), or on rank 0 alone followed by "
                "sd.broadcast_parameters(model.state_dict(), root_rank=0)")) from None


class ParameterClient(ServerTable):
    """One strategy's view of the servers of its server group: the worker that pushes to them (and pulls)."""

    def __init__(self, optimizer, named, *, group: int, session: int, replicas: int, staleness: int | None,
                 clients: int, create: bool, compression=None, staleness_lr: bool = False,
                 momentum_correction: bool = False, checkpoint: tuple | None = None, warmup_steps: int = 0,
                 dana: bool = False, relative_clip: float | None = None):
        self.packer = Packer(resolve_compression(compression))
        super().__init__(named, group=group, session=session, value_dtype=value_dtype(self.packer.compressor))
        self.bytes_sent_last_step = 0  # gradient payload pushed to the servers in the last push
        self.bytes_sent_total = 0
        self.bytes_received_total = 0  # values received from the servers
        self.optimizer = optimizer
        self.replicas = replicas
        self.set_messages(1)
        self.versions = [0] * len(self.servers)
        self.staleness_seen = StalenessLog()  # versions behind of each applied update (for tests and logs)
        self.closed = False
        group_of = {}
        for g, pg in enumerate(optimizer.param_groups):
            for p in pg["params"]:
                group_of[id(p)] = g
        self.param_group = [group_of[id(p)] for p in self.params]
        futures = []
        for i, proc in enumerate(self.servers):
            spec = None
            if create:
                mine = self.by_server[i]
                spec = {"slices": mine,
                        "values": [read_slice(self.params[s.param], self.params[s.param], s.start, s.end)
                                   for s in mine],
                        "param_group": [self.param_group[s.param] for s in mine],
                        "optimizer_class": user_optimizer_class(optimizer),
                        "defaults": dict(optimizer.defaults),
                        "group_options": self.options(),
                        "replicas": replicas, "staleness": staleness, "clients": clients,
                        "compression": self.packer.compressor,
                        "value_dtype": self.value_dtype,
                        "staleness_lr": staleness_lr, "momentum_correction": momentum_correction,
                        "warmup_steps": warmup_steps, "dana": dana, "relative_clip": relative_clip}
                if checkpoint is not None:  # (folder, every N updates): the servers checkpoint and resume there
                    spec["checkpoint_dir"], spec["checkpoint_every"] = checkpoint
            # A client that does not create the table says which slices it has there, to be checked.
            layout = None if create else [(s.name, s.start, s.end) for s in self.by_server[i]]
            futures.append(transport.call_async(proc, server.open_table, self.session, spec, group, layout))
        # What this worker last heard from the servers (or sent them): a parameter that differs from it at the
        # next push was set by the user (loaded, broadcast, edited) and the servers take its values.
        self.known = [p.detach().clone() for p in self.params]
        for i, (proc, fut) in enumerate(zip(self.servers, futures)):
            version, values = transport.wait(proc, fut, "open_table")
            self._adopt(i, version, values)

    def message_layout(self, messages: int) -> tuple:
        """How pushes with `messages` messages per server are cut: the runs of slices of each server."""
        return tuple(tuple(message_runs(mine, messages)) for mine in self.by_server)

    def set_messages(self, messages: int) -> None:
        """Send each push to a server as up to `messages` messages (runs of its slices), from the next push on:
        the server puts them together, so the update is the same; the worker packs the next message while the
        last one travels and is unpacked. Top-k's selection spans a whole push, so it is sent as one."""
        if messages < 1:
            raise ValueError(f"messages per server must be at least 1, got {messages}")
        if messages > 1 and self.packer.sparse:
            raise ValueError("a sparse compression (top-k, threshold) pushes one message per server")
        self.messages = messages
        self.runs = [list(r) for r in self.message_layout(messages)]

    def options(self) -> list[dict]:
        """The optimizer's current hyperparameters, sent with every push so that LR schedulers keep working."""
        return [{k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
                for g in self.optimizer.param_groups]

    def _adopt(self, i: int, version: int, values) -> None:
        self.versions[i] = version
        if values is None:
            return
        self.bytes_received_total += payload_bytes(values)
        with torch.no_grad():
            for s, v in zip(self.by_server[i], values):
                write_slice(self.params[s.param], s.start, s.end, v)
                write_slice(self.known[s.param], s.start, s.end, v)

    def _set_by_user(self) -> list[list[torch.Tensor | None]]:
        """For each server, the values of its slices that differ from what this worker last heard (None for the
        others); they are what the servers know from now on."""
        changed = {index for index, (p, k) in enumerate(zip(self.params, self.known))
                   if not torch.equal(p.detach(), k)}
        out = []
        for slices in self.by_server:
            values = []
            for s in slices:
                value = None
                if s.param in changed:
                    mine = self.params[s.param].detach().reshape(-1)[s.start:s.end]
                    if not torch.equal(mine, self.known[s.param].reshape(-1)[s.start:s.end]):
                        value = read_slice(self.params[s.param], self.params[s.param], s.start, s.end)
                values.append(value)
            out.append(values)
        for index in changed:
            self.known[index].copy_(self.params[index].detach())
        return out

    def push(self, want_values: bool, average: bool = True) -> None:
        """Send the gradients to every server; adopt the fresh values of those that answer with them."""
        t0 = timeline.now() if timeline.on else 0
        self._push(want_values, average)
        if t0:
            timeline.span("push", t0, tensor=self.describe(want_values))

    def describe(self, want_values: bool = False) -> str:
        """The timeline's name of this client's exchange: its parameters and servers."""
        shown = ", ".join(self.names[:3]) + (f", ... ({len(self.names)} tensors)" if len(self.names) > 3 else "")
        servers = ", ".join(map(str, self.servers))
        return f"({shown}) {'with' if want_values else 'to'} process{'es' * (len(self.servers) > 1)} {servers}"

    def _push(self, want_values: bool, average: bool) -> None:
        options = self.options()
        set_by_user = self._set_by_user()
        calls, owner = [], []
        sent = 0
        for i, proc in enumerate(self.servers):
            runs = self.runs[i]
            for j, (start, end) in enumerate(runs):
                mine = self.by_server[i][start:end]
                # None for a parameter without a gradient: the servers then leave its slices alone.
                grads = [None if self.params[s.param].grad is None else
                         read_slice(self.params[s.param].grad, self.params[s.param], s.start, s.end)
                         for s in mine]
                t0 = timeline.now() if timeline.on and self.packer.compresses else 0
                packet, nbytes = self.packer.pack([s.id for s in mine], grads)
                if t0:
                    timeline.span("compress", t0, tensor=f"gradients for process {proc}")
                sent += nbytes
                given = set_by_user[i][start:end]
                values = given if any(v is not None for v in given) else None
                part = None if len(runs) == 1 else (j, len(runs), start, end)
                calls.append((proc, transport.call_async(proc, server.push, self.session, self.group, packet,
                                                         options, want_values, average, values,
                                                         runtime.proc_rank(), part)))
                owner.append(i)
        self.bytes_sent_last_step = sent
        self.bytes_sent_total += sent
        t0 = timeline.now() if timeline.on else 0
        try:
            answers = transport.wait_all(calls, "push")
        except transport.PeerError as exc:
            if "did not answer within" in str(exc) and self.replicas > 1:
                raise self._missing_replicas(exc) from None
            raise
        if t0:  # idle: the servers gather the other replicas' pushes and apply the update
            timeline.span("wait", t0, tensor="the parameter servers' answers to a push")
        per_server: dict[int, list] = {}
        for i, (version, values, stale) in zip(owner, answers):  # a server's messages answer in slice order
            whole = per_server.setdefault(i, [version, None, stale])
            if values is not None:
                whole[1] = (whole[1] or []) + list(values)
        for i, (version, values, stale) in per_server.items():
            self.staleness_seen.append(stale)
            self._adopt(i, version, values)

    def _missing_replicas(self, error: Exception) -> Exception:
        """A push timed out: ask the server which workers of the group it is still waiting for, and name them
        (and where they are) instead of blaming the server."""
        proc = error.proc if isinstance(error, transport.PeerError) else self.servers[0]
        try:
            pushed = transport.call(proc, server.pushed, self.session, self.group, timeout=10.0)
        except Exception:
            return error
        me = runtime.proc_rank()
        missing = [r for r in runtime.topology().worker_ranks(self.group) if r not in pushed and r != me]
        if not missing:
            return error
        where = []
        for r in missing:
            w = runtime.where_is(r, wait_s=0.5)
            where.append(f"rank {r} " + (f"is in {w['where']} after {w['steps']} optimizer step(s)" if w else
                                         "said nothing of where it is (busy in its own code, or hung)"))
        names = ", ".join(map(str, missing))
        runtime.blame(missing, f"rank{'s' if len(missing) > 1 else ''} {names} did not push gradients to the "
                               "parameter servers")
        return transport.PeerError(proc, "push", error, message=(
            f"rank {me}: rank{'s' if len(missing) > 1 else ''} {names} did not push gradients for this update: "
            f"{transport.describe(proc)} waited {runtime.timeout_s():g} s for them with this rank's push (after "
            f"{runtime.steps()} optimizer step(s)); {'; '.join(where)}. Raise the timeout with "
            "sd.init(timeout=...) or SINGA_TIMEOUT if the ranks are merely slow"))

    def pull(self) -> None:
        t0 = timeline.now() if timeline.on else 0
        futures = [transport.call_async(proc, server.pull, self.session, self.group) for proc in self.servers]
        for i, answer in enumerate(transport.wait_all(list(zip(self.servers, futures)), "pull")):
            self._adopt(i, *answer)
        if t0:
            timeline.span("pull", t0, tensor=self.describe(True))

    def state_dict(self) -> dict:
        """The servers' state (ServerTable.state_dict), with this sender's compression residual if it keeps one."""
        out = super().state_dict()
        residual = self.packer.residual_state(self.slices, self.params)
        if residual is not None:
            out["residual"] = residual
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore the servers (worker 0) or wait for that (the others), and take the restored values. A worker group
        that replaced a lost one restores nothing: the servers' state is newer than any checkpoint it could load,
        and it reads that."""
        if runtime.is_replacement():
            self.packer.load_residual_state(state.get("residual"), self.slices)
            self.pull()
            return
        versions = super().load_state_dict(state)
        self.packer.load_residual_state(state.get("residual"), self.slices)
        self.versions = list(versions)
        for known, p in zip(self.known, self.params):
            known.copy_(p.detach())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        futures = [transport.call_async(proc, server.close_table, self.session, self.group, runtime.proc_rank(),
                                        runtime.steps()) for proc in self.servers]
        for proc, fut in zip(self.servers, futures):
            transport.wait(proc, fut, "close_table")

