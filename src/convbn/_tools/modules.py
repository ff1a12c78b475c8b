"""Swapping sub-modules of a model, for the tools that build their own variants of one."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["replace_modules"]


def replace_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put ``replacement(m)`` in the place of every sub-module ``m`` of ``model`` for which it
    is not None, in place; the number of modules replaced.

    ``replacement`` is asked once per module: a module registered under several names gets
    the same new module under each. The sub-modules of a replaced module are not visited.
    ``model`` itself is never replaced.
    """
    decided: dict[int, nn.Module | None] = {}
    replaced: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        if id(module) not in decided:
            decided[id(module)] = replacement(module)
        new = decided[id(module)]
        if new is None:
            continue
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, new)
        replaced.append(name)
    return sum(new is not None for new in decided.values())
