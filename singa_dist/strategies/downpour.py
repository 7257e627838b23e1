"""Downpour: SINGA's asynchronous parameter-server framework.

Several worker groups train at their own pace. Inside a group the workers are synchronous: they all-reduce
their gradients over the group's process group (NCCL for CUDA tensors, Gloo otherwise); the group's first
worker pushes the group's gradient to the servers and gets fresh values back every `pull_freq` steps
(between pulls the group computes on the values it has), then broadcasts them inside the group. Servers
apply each group's update as it comes, without waiting for the other groups.

`staleness`: with a bound N, no group ever computes on values more than N versions older than the
servers' (a group that falls N versions behind is made to pull, and the servers hold back an update that
would put a computing group more than N behind until that group has pushed). None: no bound.

`staleness_lr` (on), `momentum_correction` (off): the servers' remedies for asynchrony, so that the user's
synchronous hyperparameters work unchanged (ps.server.asynchronous_step; Zhang et al. 2016, Mitliagkas et al.
2016): an update computed on values s versions old counts 1/(s + 1) (with `dana`, 1/sqrt(s + 1): the look-ahead
already covers the momentum's part of the staleness); the explicit momentum is lowered by the implicit momentum of
G groups, 1 - 1/G. Defaults as measured by benchmarks/async_accuracy.py.

`dana` (on): DANA (Hakimi et al. 2019, "Taming momentum in a distributed asynchronous environment"): the servers keep
the optimizer state (momentum) of each worker group apart, and answer a push with the values looked ahead by the
momentum part of the groups' next updates (SGD). A gradient computed on values one update old and fed to one
shared momentum of 0.9 makes the servers' step unstable at about a twentieth of the curvature synchronous SGD bears
(what threw back some seeds of the digits CNN); a group's own momentum and the look-ahead raise that about
fivefold. `warmup_steps` (0): Dean et al. 2012's warm start: the first N updates are synchronous (the groups'
gradients averaged into one fresh update, as AllReduce's), then every group goes asynchronous.
`relative_clip` (2.0): the servers scale down a group's gradient whose norm is more than that many times the running
mean of the group's gradient norms; a stale update past the edge of stability (lower than synchronous SGD's even with
DANA) throws the loss up, and the clip keeps that spike out of the group's momentum. None: no clip.

`checkpoint_dir`, `checkpoint_every`: each server writes its slices, their optimizer state and version there every
N updates (atomically; default 100); a server started again (singa-launch --max-restarts) resumes from its file, so
a job loses at most N updates. Unless given, they come from singa-launch --server-checkpoint-dir and
--server-checkpoint-every. Under singa-launch a worker group that dies is dropped and the other groups go on.

`messages_per_server`: as Sandblaster's (each push to a server cut into that many messages). "auto" tunes it per
worker group, since groups do not wait for each other and only a group's first worker pushes: the group's
workers agree on the count from their step times and switch at the same step; groups may settle differently.
"""
from __future__ import annotations

import os

from .. import runtime
from ..environment import server_checkpoint_defaults
from ..functions import allreduce_gradients_, broadcast_flat_
from ..ps import client as ps_client
from ..ps import transport
from .base import AUTOTUNE_MESSAGES, ParameterServerStrategy, check_relative_clip, check_remedies


class Downpour(ParameterServerStrategy):
    name = "downpour"

    def __init__(self, pull_freq: int = 1, staleness: int | None = None, messages_per_server: int | str | None = None,
                 *, staleness_lr: bool = True, momentum_correction: bool = False, dana: bool = True,
                 warmup_steps: int = 0, relative_clip: float | None = 2.0,
                 checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
                 autotune_messages=AUTOTUNE_MESSAGES, autotune_warmup: int = 2, autotune_steps: int = 8):
        if not isinstance(pull_freq, int) or pull_freq < 1:
            raise ValueError(f"pull_freq must be a positive integer, got {pull_freq!r}")
        if staleness is not None and (not isinstance(staleness, int) or staleness < 1):
            raise ValueError(f"staleness must be None or a positive number of versions, got {staleness!r} "
                             "(a bound of 0 is synchronous training: use the sandblaster strategy)")
        self.pull_freq = pull_freq
        self.staleness = staleness
        # Unless the script says, what singa-launch --server-checkpoint-dir/--server-checkpoint-every asked for.
        launcher_dir, launcher_every = server_checkpoint_defaults()
        checkpoint_dir = launcher_dir if checkpoint_dir is None else checkpoint_dir
        checkpoint_every = launcher_every if checkpoint_every is None else checkpoint_every
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of updates, got {checkpoint_every!r}")
        # Each server checkpoints its slices every `checkpoint_every` updates there and resumes from them.
        self.checkpoint = None if checkpoint_dir is None else (os.path.abspath(os.fspath(checkpoint_dir)),
                                                               checkpoint_every)
        self.staleness_lr, self.momentum_correction, self.dana = check_remedies(staleness_lr, momentum_correction,
                                                                                dana=dana)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a number of updates (0 or more), got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.relative_clip = check_relative_clip(relative_clip)
        self._init_messages(messages_per_server, autotune_messages, autotune_warmup, autotune_steps)
        self.client = None
        self.local = False
        self.synced = False
        self.steps = 0

    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        if self._begin_setup(optimizer, named_parameters, compression, op):
            return
        topo = runtime.topology()
        self.group = runtime.worker_group()
        self.group_ranks = topo.worker_ranks(self.group)
        self.leader = self.group_ranks[0]
        self.group_pg = runtime.group_process_group()
        transport.join()  # every process joins the RPC group, leaders or not
        session = ps_client.next_session()  # on every worker, so that the n-th table has one id everywhere
        if runtime.proc_rank() == self.leader:
            self.client = ps_client.ParameterClient(
                optimizer, self.named, group=self.group, session=session, replicas=1, staleness=self.staleness,
                clients=topo.nworker_groups, create=runtime.rank() == 0 and not runtime.is_replacement(),
                compression=self.compression, staleness_lr=self.staleness_lr,
                momentum_correction=self.momentum_correction, checkpoint=self.checkpoint,
                warmup_steps=self.warmup_steps, dana=self.dana, relative_clip=self.relative_clip)
        # The other workers of the group read and restore the servers' state through the same table, alone.
        self.table = self.client if self.client is not None else ps_client.ServerTable(
            self.named, group=self.group, session=session, value_dtype=ps_client.value_dtype(self.compression))
        self._broadcast_in_group()
        self._start_messages(self.group_pg, len(self.group_ranks), runtime.proc_rank() == self.leader)
        runtime.on_shutdown(self.close)

    def _broadcast_in_group(self) -> None:
        if len(self.group_ranks) > 1:
            nbytes = broadcast_flat_([p.data for _, p in self.named], 0,
                                     f"the values of worker group {self.group} from its first worker",
                                     group=self.group_pg)
            if self.client is not None:
                self.group_bytes_sent += nbytes
            else:
                self.group_bytes_received += nbytes

    def synchronize(self) -> None:
        """All-reduce the gradients inside this worker group."""
        if self.local or self.synced:
            return
        if len(self.group_ranks) > 1:
            nbytes = allreduce_gradients_(self.named, self.group_pg, len(self.group_ranks), self.average,
                                          what=f"gradients of worker group {self.group}")
            self.group_bytes_sent += nbytes
            self.group_bytes_received += nbytes
        self.synced = True

    def step(self, closure, local_step):
        if self.local:
            return local_step(closure)
        loss = self._run_closure(closure)
        self.synchronize()
        self.steps += 1
        if self.client is not None:
            self.client.push(want_values=self.steps % self.pull_freq == 0)
        self._broadcast_in_group()
        self.synced = False
        if self.tuner is not None:
            self._tune_step()
        return loss

    def _tune_who(self) -> str:
        n = len(self.group_ranks)
        return f"worker group {self.group}, slowest of {n} workers" if n > 1 else f"worker group {self.group}"

    def pull(self) -> None:
        """Fetch the servers' current values now (e.g. before evaluating); every worker of the group calls it."""
        if self.local:
            return
        if self.client is not None:
            self.client.pull()
        self._broadcast_in_group()

    @property
    def versions(self) -> list[int]:
        """The version of this group's values on each server."""
        return list(self.client.versions) if self.client else []

    @property
    def staleness_seen(self) -> list[int]:
        """For each of this group's applied updates: how many versions behind its values were."""
        return list(self.client.staleness_seen) if self.client else []

    def state_dict(self) -> dict:
        """The servers' state (values, optimizer state, versions) read from them by this worker alone, with the
        group's step count (and the first worker's compression residual, which only it keeps)."""
        if self.local:
            return {}
        return {**self.table.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 restores the servers; every other worker that loads waits on the servers for that restore and
        takes the checkpoint's values, without waiting for the others (rank 0 alone may load it and broadcast)."""
        if self.local:
            if state:
                raise ValueError("this downpour strategy runs in one process and keeps no server state")
            return
        if not state:
            return
        self.steps = state.get("steps", 0)
        if runtime.is_replacement():
            # The group replaces a lost one: its first worker reads the servers' current state, newer than any
            # checkpoint, and hands it to the group (the whole group starts together).
            if self.client is not None:
                self.client.load_state_dict(state)
            self._broadcast_in_group()
            return
        self.table.load_state_dict(state)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
