"""Sandblaster: SINGA's synchronous parameter server.

One worker group of n workers and one group of s separate server processes. Every step each worker pushes
its gradients for each server's slices; a server waits for all n pushes, averages them, runs the user's
optimizer (class and hyperparameters, so its state lives on the server) on its slices, bumps the slices'
version and answers every worker with the new values. Training therefore equals one process on the
whole batch. The optimizer's current hyperparameters travel with each push, so LR schedulers on the
workers keep working.

`messages_per_server`: each worker's push to a server goes as that many messages (runs of the server's slices),
so that packing the next one overlaps sending the last; the server puts them together before its update, so
the values are those of one message. "auto" (or `singa-launch --autotune`) tunes it during the first steps by
measured step time (every worker takes the same count at the same step), then keeps it.
"""
from __future__ import annotations

from .. import runtime
from ..functions import allreduce_gradients_
from ..ps import client as ps_client
from ..ps import transport
from .base import AUTOTUNE_MESSAGES, ParameterServerStrategy


class Sandblaster(ParameterServerStrategy):
    name = "sandblaster"

    def __init__(self, messages_per_server: int | str | None = None, *, autotune_messages=AUTOTUNE_MESSAGES,
                 autotune_warmup: int = 2, autotune_steps: int = 8):
        self._init_messages(messages_per_server, autotune_messages, autotune_warmup, autotune_steps)
        self.client = None
        self.local = False
        self.synced = False

    def setup(self, optimizer, named_parameters, *, backward_passes_per_step=1, compression=None, op=None):
        if self._begin_setup(optimizer, named_parameters, compression, op):
            return
        topo = runtime.topology()
        transport.join()
        self.client = ps_client.ParameterClient(
            optimizer, self.named, group=0, session=ps_client.next_session(), replicas=topo.nworkers_per_group,
            staleness=None,
            clients=topo.nworkers, create=runtime.rank() == 0, compression=self.compression)
        self._start_messages(None, runtime.size(), runtime.rank() == 0)
        runtime.on_shutdown(self.close)

    def synchronize(self) -> None:
        """Average the gradients over the workers now (e.g. to clip them before step())."""
        if self.local or self.synced:
            return
        nbytes = allreduce_gradients_(self.named, None, runtime.size(), self.average)
        self.group_bytes_sent += nbytes
        self.group_bytes_received += nbytes
        self.synced = True

    def step(self, closure, local_step):
        if self.local:
            return local_step(closure)
        loss = self._run_closure(closure)
        # After synchronize() every worker pushes the same averaged gradient: averaging copies changes nothing.
        self.client.push(want_values=True, average=self.average or self.synced)
        self.synced = False
        if self.tuner is not None:
            self._tune_step()
        return loss

    @property
    def versions(self) -> list[int]:
        """The version of this worker's values on each server (updates applied since the start)."""
        return list(self.client.versions) if self.client else []

    def state_dict(self) -> dict:
        return self.client.state_dict() if self.client else {}

    def load_state_dict(self, state: dict) -> None:
        if self.client is None:
            if state:
                raise ValueError("this sandblaster strategy runs in one process and keeps no server state")
            return
        if state:
            self.client.load_state_dict(state)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
