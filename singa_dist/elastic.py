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
import enum
import functools
import math
import queue
import random

import torch

from . import rendezvous, runtime
from .collectives import broadcast_object
from .functions import broadcast_optimizer_state, broadcast_parameters
from .primitives import CollectiveError

# Horovod's name for what a failed collective raises (HorovodInternalError is CollectiveError).
HorovodInternalError = CollectiveError


class HostUpdateResult(enum.IntFlag):
    """What singa-launch changed in a round it published for a change of hosts (Horovod's HostUpdateResult)."""
    no_update = 0
    removed = 1
    added = 2
    mixed = removed | added


class HostsUpdatedInterrupt(RuntimeError):
    """The set of workers of an elastic job changed (Horovod's elastic interrupt). skip_sync: the state need not
    be broadcast again (only workers left, none came)."""

    def __init__(self, skip_sync: bool = False):
        super().__init__("the hosts of the job changed")
        self.skip_sync = skip_sync


# --------------------------------------------------------------------------------------------------------------
# Notifications: what singa-launch announces in the job's store, read as Horovod's host messages

_store = None  # this worker's connection to the job's store for reading announcements


class _HostMessages(queue.Queue):
    """Horovod's queue of host messages, `(timestamp, HostUpdateResult)`, filled from the job's store whenever it is
    looked at: one message for each round singa-launch published for a change of hosts (not for a failure, which a
    collective reports itself) after the round this worker is in; the round number is the timestamp. (Read when
    asked, by the thread that asks, instead of by a thread of its own as Horovod's notification service does.)"""

    def __init__(self):
        super().__init__()
        self._read = -1  # the newest round looked at

    def _take_announcements(self) -> None:
        global _store
        if not runtime.is_elastic():
            return
        current, newest = runtime.elastic_round(), runtime.newest_round()
        if newest <= max(self._read, current):
            return
        if _store is None:
            _store = rendezvous.connect(60.0)
        for number in range(max(self._read, current) + 1, newest + 1):
            update = rendezvous.Round.from_json(number, _store.get(rendezvous.round_key(number))).update
            if update:
                self.put((number, HostUpdateResult(update)))
        self._read = newest

    def empty(self) -> bool:
        self._take_announcements()
        return super().empty()

    def qsize(self) -> int:
        self._take_announcements()
        return super().qsize()

    def get(self, block: bool = True, timeout: float | None = None):
        self._take_announcements()
        return super().get(block, timeout)


# --------------------------------------------------------------------------------------------------------------
# State

class State:
    """What an elastic job keeps across a change of workers: `save()` (at commit), `restore()` (after a failure),
    `sync()` (from rank 0 to everyone after a change), `reset()` (after a change, before the sync). Subclasses say
    how for their values.

    Arguments:
        bcast_object: broadcasts a picklable value from rank 0 (default: singa_dist's broadcast_object).
        get_rank: this worker's rank (default: singa_dist.rank), as Horovod's State takes them."""

    def __init__(self, bcast_object=None, get_rank=None):
        self._bcast_object = bcast_object or _broadcast_from_rank_0
        self._rank = get_rank or runtime.rank
        self._host_messages: queue.Queue = _HostMessages()
        self._last_updated_timestamp = 0
        self._reset_callbacks: list = []

    def register_reset_callbacks(self, callbacks) -> None:
        """Functions called with no argument after every change of workers (e.g. to scale the learning rate
        with the new size())."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self._host_messages = _HostMessages()  # (announcements of the rounds before the one joined are stale)
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: int, update_res: HostUpdateResult) -> None:
        self._host_messages.put((timestamp, update_res))

    def commit(self) -> None:
        """Save the state (a later failure rolls back to here), then check for a change of hosts."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise HostsUpdatedInterrupt on every worker at once when singa-launch announced a change of hosts
        since the last check (rank 0's announcements count for everyone, so that no worker moves alone)."""
        last = prev = self._last_updated_timestamp
        update = HostUpdateResult.no_update
        while not self._host_messages.empty():
            timestamp, res = self._host_messages.get()
            if timestamp > last:
                last = timestamp
                update |= res
        if not runtime.is_elastic():
            self._last_updated_timestamp = last
            return
        prev, self._last_updated_timestamp, update = self._bcast_object((prev, last, int(update)))
        if self._last_updated_timestamp > prev:
            raise HostsUpdatedInterrupt(update == HostUpdateResult.removed)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Called after a change of workers, before the sync: rebuild what depends on size() and rank()."""


def _broadcast_from_rank_0(obj):
    return broadcast_object(obj, root_rank=0, name="elastic.State.sync")


class ObjectState(State):
    """Picklable values kept as attributes (`state.epoch`, `state.batch`, ...), synced from rank 0."""

    def __init__(self, bcast_object=None, get_rank=None, **kwargs):
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

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


class StateHandler:
    """How TorchState keeps one value of a kind (Horovod's StateHandler): save, restore, sync."""

    def __init__(self, value):
        self.value = value

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """After a change of workers (before the sync)."""

    def set_value(self, value) -> None:
        self.value = value
        self.save()


class _StateDictHandler(StateHandler):
    """An object with state_dict()/load_state_dict(): its state_dict copied in memory at commit."""

    def __init__(self, value):
        super().__init__(value)
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)


class ModelStateHandler(_StateDictHandler):
    """An nn.Module: rank 0's parameters and buffers at sync."""

    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class OptimizerStateHandler(_StateDictHandler):
    """A torch optimizer (or singa_dist's DistributedOptimizer): rank 0's state at sync."""

    def sync(self) -> None:
        broadcast_optimizer_state(self.value, root_rank=0)


class SamplerStateHandler(StateHandler):
    """An ElasticSampler: its epoch and processed_num; rank 0's at sync; shared out anew at a reset."""

    def __init__(self, sampler):
        super().__init__(sampler)
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        self.value.load_state_dict(_broadcast_from_rank_0(self.value.state_dict()))

    def reset(self) -> None:
        self.value.reset()  # (a reset without sync, workers having only left, shares out the rest all the same)


class TorchState(ObjectState):
    """Models, optimizers, ElasticSamplers and any other values (Horovod's TorchState).

    Every keyword argument becomes an attribute. nn.Modules, optimizers and ElasticSamplers are kept by their
    handlers (see `get_handler_registry`): save() copies their state_dicts in memory, restore() loads them back,
    sync() gives every worker rank 0's. Other values are kept as ObjectState keeps them. Assigning a new model
    (`state.model = other`) makes it the one kept, saved at once."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        kwargs.update(model=model, optimizer=optimizer)
        handlers, values = {}, {}
        for name, value in kwargs.items():
            handler = _handler_for(value)
            if handler is not None:
                handlers[name] = handler
            else:
                values[name] = value
        self._handlers = handlers
        for name, handler in handlers.items():
            setattr(self, name, handler.value)
        super().__init__(**values)

    def save(self) -> None:
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def reset(self) -> None:
        for handler in self._handlers.values():
            handler.reset()

    def sync(self) -> None:
        for handler in self._handlers.values():
            handler.sync()
        super().sync()
        for handler in self._handlers.values():
            handler.save()  # what every worker holds now is the point to roll back to

    def __setattr__(self, name, value):
        if "_handlers" in self.__dict__ and name in self._handlers and hasattr(self, name):
            self._handlers[name].set_value(value)
        super().__setattr__(name, value)


_handler_registry: list = []  # (type, handler class), first match wins: set after ElasticSampler is defined


def get_handler_registry() -> list:
    """The (type, StateHandler subclass) pairs TorchState uses, first match first (Horovod's)."""
    return _handler_registry


def set_handler_registry(registry: list) -> None:
    """Replace the (type, StateHandler subclass) pairs TorchState uses, e.g. to keep another kind of value."""
    global _handler_registry
    _handler_registry = registry


def _handler_for(value) -> StateHandler | None:
    for kind, handler in _handler_registry:
        if isinstance(value, kind):
            return handler(value)
    return None


# --------------------------------------------------------------------------------------------------------------
# Data

class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's ElasticSampler (0.24 and later): partitions the dataset among the workers, as DistributedSampler
    does, and again among the workers left or come after a change, leaving out the samples already processed in
    the epoch.

    Progress is a count, `processed_num`: the samples of the epoch (in its shuffled order) that the job has
    processed, all workers together. Kept in a TorchState, it rolls back with the state and is rank 0's after a
    sync.

    Use it so: keep it in the TorchState; call `record_batch(batch_idx, batch_size)` after each batch (every
    worker, each for its own batch); call `set_epoch(epoch)` at the end of an epoch (not at the start: an epoch
    interrupted and resumed must not process its samples again).

    Arguments:
        dataset: the dataset (of constant size).
        shuffle: shuffle the indices (the same order on every worker), anew each epoch (default True).
        seed: the shuffle's seed, the same on every worker (default 0)."""

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_indices: set = set()  # (Horovod keeps the name; progress is processed_num)
        self.num_replicas = self.rank = 0
        self.remaining_indices: list = []
        self.indices: list = []
        self.num_samples = self.total_size = 0
        self.processed_num = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`: a new shuffle, nothing processed yet."""
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """A batch of `batch_size` samples has been processed on every worker: processed_num grows by
        batch_size * (workers). `batch_idx` is not needed for the count (Horovod takes it too)."""
        self.processed_num += batch_size * self.num_replicas

    def record_indices(self, indices) -> None:
        """Horovod 0.23's call, for scripts written against it: this worker has processed `indices` (each
        worker as many), counted as record_batch counts."""
        self.processed_num += len(indices) * self.num_replicas

    def get_indices(self, batch_idx: int, batch_size: int) -> list:
        """Horovod 0.23's call: this worker's indices of batch `batch_idx` in its current pass."""
        start = batch_idx * batch_size
        return self.indices[start:min(start + batch_size, len(self.indices))]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self.processed_num = state_dict["processed_num"]
        self.reset()

    def reset(self) -> None:
        """Share out the epoch's samples not yet processed among the current workers."""
        initialized = runtime.is_initialized()
        self.num_replicas = runtime.size() if initialized else 1
        self.rank = runtime.rank() if initialized else 0
        indices = list(range(len(self.dataset)))
        if self.shuffle:  # the same order on every worker
            random.Random(self.seed + self.epoch).shuffle(indices)
        self.remaining_indices = indices[self.processed_num:]
        self.num_samples = int(math.ceil(len(self.remaining_indices) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        indices = list(self.remaining_indices)
        indices += indices[:self.total_size - len(indices)]  # equal shares: the first samples again
        self.indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


_handler_registry[:] = [(torch.nn.Module, ModelStateHandler), (torch.optim.Optimizer, OptimizerStateHandler),
                        (ElasticSampler, SamplerStateHandler)]


# --------------------------------------------------------------------------------------------------------------
# The loop

def run(func):
    """Decorate the training function `func(state, *args, **kwargs)` so that it survives changes of workers
    (Horovod's hvd.elastic.run): after a failure, the state rolls back to its last commit; after any change,
    this process joins the job's next round, the state is synced from rank 0, reset callbacks run, and `func`
    is called again. Outside an elastic job it is `func` after one sync of the state."""

    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs):
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
            # (singa-launch --reset-limit bounds the changes: it ends the job past the limit, as horovodrun)
            runtime.reset()
            state.on_reset()

    return wrapper
