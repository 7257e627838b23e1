"""`convert(model)`: swap every torch.nn layer that has a native counterpart for it, keeping its weights."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

# torch.nn class -> function building the native module from the torch one (weights included)
_CONVERSIONS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_conversion(torch_cls: type, build: Callable[[nn.Module], nn.Module]) -> None:
    """Declare how `torch_cls` becomes a native layer; each native layer module registers its own."""
    _CONVERSIONS[torch_cls] = build


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, each submodule whose exact type has a native counterpart; return the model.

    Only exact types are converted (a user's subclass of nn.Linear may carry behaviour we do not know),
    and modules already native are left as they are. A bare convertible module is converted and returned.
    """
    build = _CONVERSIONS.get(type(model))
    if build is not None:
        return _carry_mode(model, build(model))
    for name, child in list(model.named_children()):
        model.add_module(name, convert(child))
    return model


def _carry_mode(old: nn.Module, new: nn.Module) -> nn.Module:
    new.train(old.training)
    return new
