"""BatchNorm-like modules: what a producer can absorb.

Recognised: every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
SyncBatchNorm, lazy variants) with the stock forward; torchvision's
``FrozenBatchNorm2d``; any class named ``*FrozenBatchNorm*`` (detectron2, timm)
with BN's four buffers. :func:`norm_stats` also accepts, for the functional API,
any module exposing ``running_mean``, ``running_var``, ``eps`` and optional
``weight``/``bias``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from convbn._blocks.classes import base_class

__all__ = ["NormStats", "is_norm", "norm_problem", "norm_stats", "uses_running_stats"]

_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


class NormStats(NamedTuple):
    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None


def _has_stats(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "running_mean", None), Tensor)
        and isinstance(getattr(module, "running_var", None), Tensor)
        and hasattr(module, "eps")
    )


def is_frozen(module: nn.Module) -> bool:
    """Always normalises with running statistics, whatever ``training`` says."""
    return not isinstance(module, _BatchNorm) and "FrozenBatchNorm" in base_class(module).__name__


def is_norm(module: nn.Module) -> bool:
    """A module convbn may fold into its producer (model-level discovery)."""
    return isinstance(module, _BatchNorm) or (is_frozen(module) and _has_stats(module))


def norm_problem(module: nn.Module) -> str | None:
    """Why this norm can never be folded, or None."""
    if isinstance(module, _BatchNorm):
        if base_class(module).forward not in _BN_FORWARDS:
            return f"{base_class(module).__name__} overrides forward(); its computation is unknown"
        if module.running_mean is None or module.running_var is None:
            return "BatchNorm without running statistics (track_running_stats=False)"
    elif not _has_stats(module):
        return "no running_mean/running_var/eps"
    else:
        # A frozen BN known by its name: it must be nothing but the normalisation. timm's
        # FrozenBatchNormAct2d, for one, applies an activation and dropout after it.
        extra = [n for n, m in module.named_children() if not isinstance(m, nn.Identity)]
        if extra:
            return (
                f"{base_class(module).__name__} applies {', '.join(extra)} after normalising; "
                "only a plain frozen BN can be folded"
            )
    return None


def uses_running_stats(module: nn.Module) -> bool:
    """True when the module normalises with its running statistics right now."""
    if isinstance(module, _BatchNorm):
        # Read from _buffers, where nn.Module keeps them: Module.__getattr__ costs a
        # microsecond or more a call, and this runs at every call of every pair.
        buffers = module._buffers
        if "running_mean" in buffers and "running_var" in buffers:
            mean, var = buffers["running_mean"], buffers["running_var"]
        else:
            mean, var = module.running_mean, module.running_var
        return not module.training and mean is not None and var is not None
    if is_frozen(module):
        return True
    return not module.training and _has_stats(module)


def norm_stats(module: nn.Module, checked: bool = False) -> NormStats:
    """The tensors folding needs; a ValueError when the module does not use running statistics.

    ``checked``: the caller has just seen :func:`uses_running_stats` say True.
    """
    if checked and isinstance(module, _BatchNorm):
        # A stock BatchNorm keeps these in its _parameters and _buffers; a
        # parametrization, for one, moves them out, and then the attributes are read.
        params, buffers = module._parameters, module._buffers
        if (
            "weight" in params
            and "bias" in params
            and "running_mean" in buffers
            and "running_var" in buffers
        ):
            return NormStats(
                buffers["running_mean"],
                buffers["running_var"],
                float(module.eps),
                params["weight"],
                params["bias"],
            )
    if not _has_stats(module):
        raise ValueError(
            f"{type(module).__name__} has no running statistics "
            "(running_mean, running_var, eps): it cannot be folded"
        )
    if not uses_running_stats(module):
        raise ValueError(
            f"{type(module).__name__} is in training mode and normalises with batch "
            "statistics: Tune mode needs it in eval mode (call .eval() on it)"
        )
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return NormStats(
        module.running_mean,
        module.running_var,
        float(module.eps),
        weight if isinstance(weight, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )
