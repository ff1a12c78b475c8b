"""Swapping sub-modules of a model, for the tools that build their own variants of one."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["replace_modules", "formula_norms"]


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


def _batch_norm_formula(self, x: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - self.running_mean.view(shape)) / (self.running_var.view(shape) + self.eps).sqrt()
    if self.weight is not None:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


def formula_norms(model: nn.Module) -> nn.Module:
    """``model``, in place, with every stock BatchNorm in eval mode computing its formula
    with elementwise operators: the Eval reference for gradients without BatchNorm's
    kernels. torch 2.14's CPU backward of BatchNorm in eval mode is wrong when its
    gradient is channels-last and its input is not (a transpose after a BN, as in
    LeViT), which would be counted against Tune."""
    stock = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not m.training and type(m).forward in stock:
            m.forward = types.MethodType(_batch_norm_formula, m)
    return model
