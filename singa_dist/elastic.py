"""Elastic training, as Horovod's elastic API has it: workers may fail or be added while the job runs.

    import singa_dist as sd                      # or: import singa_dist.horovod as hvd; hvd.elastic.run ...
    sd.init()
    sampler = sd.elastic.ElasticSampler(dataset)
    optimizer = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())

    @sd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for state.batch, (x, y) in enumerate(loader, start=state.batch):   # loader over `sampler`
                ... forward, backward, optimizer.step() ...
                state.sampler.record_batch(state.batch, batch_size)
                if state.batch % 10 == 0:
                    state.commit()
            state.batch = 0
            state.sampler.set_epoch(state.epoch + 1)

    state = sd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0, batch=0)
    train(state)

Start it with `singa-launch -np 3 --min-np 2 --max-np 4 python train.py` (launchers/elastic.py). When a worker
fails, the collective the others wait in raises HorovodInternalError on each of them; `run` rolls their state
back to the last `commit()`, joins the next round of the job (without the failed worker: `sd.size()` is
smaller, ranks may change), broadcasts the state from the new rank 0 and calls the function again. When
workers are added, every worker learns of it at its next `commit()` (they agree on it there, so all move
together): HostsUpdatedInterrupt, then the same reset and sync, now with the new workers, who start from the
broadcast state. Steps between the last commit and a failure are done again; committed ones are kept.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import random

import torch

from . import runtime
from .collectives import allgather_object, broadcast_object
from .functions import broadcast_optimizer_state, broadcast_parameters
from .primitives import CollectiveError

# Horovod's name for what a failed collective raises (HorovodInternalError is CollectiveError).
HorovodInternalError = CollectiveError


class HostsUpdatedInterrupt(RuntimeError):
    """The set of workers of an elastic job changed (Horovod's elastic interrupt). skip_sync: the state need not
    be broadcast again (only workers left, none came)."""

    def __init__(self, skip_sync: bool = False):
        super().__init__("the hosts of the job changed")
        self.skip_sync = skip_sync


def _reset_limit() -> int | None:
    for name in ("SINGA_ELASTIC_RESET_LIMIT", "HOROVOD_ELASTIC_RESET_LIMIT"):
        text = os.environ.get(name)
        if text:
            return int(text)
    return None


# --------------------------------------------------------------------------------------------------------------
# State

class State:
    """What an elastic job keeps across a change of workers: `save()` (at commit), `restore()` (after a failure),
    `sync()` (from rank 0 to everyone after a change). Subclasses say how for their values."""

    def __init__(self):
        self._reset_callbacks: list = []

    def register_reset_callbacks(self, callbacks) -> None:
        """Functions called with no argument after every change of workers (e.g. to scale the learning rate
        with the new size())."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Save the state (a later failure rolls back to here), then check for added workers."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise HostsUpdatedInterrupt on every worker at once when singa-launch changed the job's workers since
        this round began (rank 0 looks; everyone follows its answer, so that no worker moves alone)."""
        if not runtime.is_elastic():
            return
        newest = runtime.newest_round() if runtime.rank() == 0 else None
        newest = broadcast_object(newest, root_rank=0, name="elastic.check_host_updates")
        if newest is not None and newest > runtime.elastic_round():
            raise HostsUpdatedInterrupt(skip_sync=False)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class ObjectState(State):
    """Picklable values kept as attributes (`state.epoch`, `state.batch`, ...), synced from rank 0."""

    def __init__(self, bcast_object=None, get_rank=None, **kwargs):
        self._bcast_object = bcast_object or (lambda obj: broadcast_object(obj, root_rank=0,
                                                                           name="elastic.ObjectState.sync"))
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__()

    def save(self) -> None:
        self._saved_state = {name: copy.deepcopy(getattr(self, name)) for name in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, copy.deepcopy(value))


class TorchState(ObjectState):
    """A model, an optimizer, ElasticSamplers and any other values (Horovod's TorchState).

    save(): copies of the model's and optimizer's state_dicts (in memory) and of each sampler's progress;
    restore(): loads them back; sync(): rank 0's model, optimizer state and values on every worker, and the
    samples processed by any worker counted as processed everywhere."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer
        self._samplers = {name: value for name, value in kwargs.items() if isinstance(value, ElasticSampler)}
        for name, sampler in self._samplers.items():
            setattr(self, name, sampler)
        values = {name: value for name, value in kwargs.items() if name not in self._samplers}
        self._saved_model = self._saved_optimizer = None
        self._saved_samplers: dict = {}
        super().__init__(**values)
        self._save_torch()

    def _save_torch(self) -> None:
        if self.model is not None:
            self._saved_model = copy.deepcopy(self.model.state_dict())
        if self.optimizer is not None:
            self._saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self._saved_samplers = {name: copy.deepcopy(s.state_dict()) for name, s in self._samplers.items()}

    def save(self) -> None:
        self._save_torch()
        super().save()

    def restore(self) -> None:
        if self.model is not None:
            self.model.load_state_dict(self._saved_model)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._saved_optimizer)
        for name, sampler in self._samplers.items():
            sampler.load_state_dict(copy.deepcopy(self._saved_samplers[name]))
        super().restore()

    def on_reset(self) -> None:
        """The samplers share the epoch's remaining samples out among the new workers first, so that the reset
        callbacks see them as the new size() has them."""
        for sampler in self._samplers.values():
            sampler.reset()
        super().on_reset()

    def sync(self) -> None:
        if self.model is not None:
            broadcast_parameters(self.model.state_dict(), root_rank=0)
        if self.optimizer is not None:
            broadcast_optimizer_state(self.optimizer, root_rank=0)
        for sampler in self._samplers.values():
            sampler.sync()
        super().sync()
        self._save_torch()  # what every worker holds now is the point to roll back to


# --------------------------------------------------------------------------------------------------------------
# Data

class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's ElasticSampler: this worker's share of the samples not yet processed in this epoch, shared out
    again among the workers whenever they change, so that an epoch sees each sample once whatever happens.

    Record progress with `record_batch(batch_idx, batch_size)` (or `record_indices`) after each batch, and
    call `set_epoch(epoch)` at the start of every epoch (it forgets the processed samples)."""

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_indices: set = set()
        self.num_replicas = self.rank = self.num_samples = self.total_size = 0
        self.remaining_indices: list = []
        self.indices: list = []
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.processed_indices = set()
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """The batch_idx-th batch of this worker's share (of batch_size samples) has been processed."""
        self.record_indices(self.get_indices(batch_idx, batch_size))

    def record_indices(self, indices) -> None:
        self.processed_indices.update(int(i) for i in indices)

    def get_indices(self, batch_idx: int, batch_size: int) -> list:
        start = batch_idx * batch_size
        return self.indices[start:min(start + batch_size, len(self.indices))]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_indices": set(self.processed_indices)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.processed_indices = set(state["processed_indices"])
        self.reset()

    def sync(self) -> None:
        """Every worker's processed samples count as processed on all of them, and rank 0's epoch is everyone's."""
        processed = set()
        for part in allgather_object(self.processed_indices, name="elastic.ElasticSampler.sync"):
            processed |= part
        state = broadcast_object({"epoch": self.epoch, "processed_indices": processed}, root_rank=0,
                                 name="elastic.ElasticSampler.sync")
        self.load_state_dict(state)

    def reset(self) -> None:
        """Share out the remaining samples among the current workers."""
        initialized = runtime.is_initialized()
        self.num_replicas = runtime.size() if initialized else 1
        self.rank = runtime.rank() if initialized else 0
        self.remaining_indices = [i for i in range(len(self.dataset)) if i not in self.processed_indices]
        self.num_samples = int(math.ceil(len(self.remaining_indices) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.indices = self._mine()

    def _mine(self) -> list:
        indices = list(self.remaining_indices)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        if indices:
            while len(indices) < self.total_size:  # equal shares: the first samples again
                indices += indices[:self.total_size - len(indices)]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        self.indices = self._mine()
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------------------------------------------
# The loop

def run(func):
    """Decorate the training function `func(state, *args, **kwargs)` so that it survives changes of workers
    (Horovod's hvd.elastic.run): after a failure, the state rolls back to its last commit; after any change,
    this process joins the job's next round, the state is synced from rank 0, reset callbacks run, and `func`
    is called again. Outside an elastic job it is `func` after one sync of the state."""

    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs):
        resets = 0
        limit = _reset_limit()
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except CollectiveError:
                if not runtime.is_elastic():
                    raise
                state.restore()
                skip_sync = False
            except HostsUpdatedInterrupt as interrupt:
                skip_sync = interrupt.skip_sync
            resets += 1
            if limit is not None and resets > limit:
                raise RuntimeError(f"the elastic job changed its workers more than {limit} times "
                                   "(SINGA_ELASTIC_RESET_LIMIT / HOROVOD_ELASTIC_RESET_LIMIT)")
            runtime.reset()
            state.on_reset()

    return wrapper
