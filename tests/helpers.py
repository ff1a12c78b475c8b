"""Helpers shared by the tests: reference computations and measurements."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convbn._tools.measure import SavedBytes, rel_err  # noqa: F401 (one error metric)
from convbn._tools.modules import formula_norms as explicit_norms  # noqa: F401


def randomize_norms(model: nn.Module, seed: int = 0, extreme: bool = False) -> nn.Module:
    """Give every BN-like module non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        rm = getattr(m, "running_mean", None)
        if not isinstance(rm, torch.Tensor):
            continue
        c = rm.numel()
        with torch.no_grad():
            rm.copy_(torch.rand(c, generator=g) - 0.5)
            var = torch.rand(c, generator=g) * 1.5 + 0.5
            if extreme:
                picks = torch.tensor([0.0, 1e-40, 5.6e-45, 1e3], dtype=var.dtype)
                idx = torch.randint(0, 5, (c,), generator=g)
                var = torch.where(idx < 4, picks[idx.clamp(max=3)], var)
            m.running_var.copy_(var)
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                w.copy_(torch.rand(c, generator=g) + 0.5)
                if extreme:
                    picks = torch.tensor([1e3, 1e-6, -2.0, 0.0], dtype=w.dtype)
                    idx = torch.randint(0, 5, (c,), generator=g)
                    w.copy_(torch.where(idx < 4, picks[idx.clamp(max=3)], w))
            b = getattr(m, "bias", None)
            if (
                isinstance(b, torch.Tensor)
                and isinstance(m, (_BatchNorm,))
                or (isinstance(b, torch.Tensor) and "Frozen" in type(m).__name__)
            ):
                b.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def tensors_requiring_grad(*modules: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in modules:
        out += [p for p in m.parameters() if p.requires_grad]
    return out


def saved_during(run, exclude: list[torch.Tensor]) -> int:
    counter = SavedBytes(exclude)
    with counter.count():
        out = run()
    del out
    return counter.total


def double_copy(*modules: nn.Module) -> list[nn.Module]:
    return [copy.deepcopy(m).double() for m in modules]
