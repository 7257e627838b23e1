"""Training frameworks: how a DistributedOptimizer turns each worker's gradients into parameter updates.

Each strategy's whole story sits in one module here. Which class a name means comes from the strategy
table (`singa_dist.topology.STRATEGIES`); a strategy's module is imported only when used, so that the
parameter-server ones bring the RPC transport and the server loop only into jobs that use them.
"""
from __future__ import annotations

import importlib

from .. import runtime
from ..topology import STRATEGIES, TopologyError, strategy_kind
from .base import Strategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of the strategy called `name` in the strategy table."""
    try:
        kind = strategy_kind(name)
    except TopologyError as exc:
        raise ValueError(str(exc)) from None
    module, _, cls = kind.cls.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def default_name() -> str:
    """The strategy a script that names none gets: the launcher's."""
    return runtime.job_strategy() if runtime.is_initialized() else "allreduce"


def make(strategy: "str | Strategy | None", **options) -> Strategy:
    """A Strategy from a name, an instance (returned as is), or None (the launcher's strategy)."""
    if isinstance(strategy, Strategy):
        return strategy
    return strategy_class(strategy if strategy is not None else default_name())(**options)


__all__ = ["STRATEGIES", "Strategy", "default_name", "make", "strategy_class"]
