"""Training frameworks: how a DistributedOptimizer turns each worker's gradients into parameter updates.

Each strategy's whole story sits in one module here; `make()` resolves a name lazily so that a strategy's
module is imported only when used.
"""
from __future__ import annotations

import importlib

from .base import Strategy

_BY_NAME = {
    "allreduce": ("allreduce", "AllReduce"),
    "sandblaster": ("sandblaster", "Sandblaster"),
    "downpour": ("downpour", "Downpour"),
    "hogwild": ("hogwild", "Hogwild"),
    "hybrid": ("hybrid", "Hybrid"),
}


def strategy_class(name: str) -> type[Strategy]:
    try:
        module, cls = _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(_BY_NAME)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make(strategy: "str | Strategy | None", **options) -> Strategy:
    """A Strategy from a name, an instance (returned as is), or None (the launcher's strategy)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None:
        from .. import runtime
        strategy = runtime.strategy_name() if runtime.is_initialized() else "allreduce"
    return strategy_class(strategy)(**options)


__all__ = ["Strategy", "make", "strategy_class"]
