"""Which class a module had before convbn converted it.

Converting a module swaps its ``__class__`` to the tuned subclass (as
``torch.nn.utils.parametrize`` does); restoring swaps it back. The module object,
its parameters, buffers, hooks and state_dict keys never change. The subclasses
are created on demand (``convbn._blocks.pair.tuned_class``); instances pickle
through their base class, so a pickle never names a generated class.
"""

from __future__ import annotations

from torch import nn

__all__ = ["base_class", "is_tuned"]


def base_class(module: nn.Module) -> type:
    return getattr(type(module), "_convbn_base", type(module))


def is_tuned(module: nn.Module) -> bool:
    return "_convbn_base" in type(module).__dict__
