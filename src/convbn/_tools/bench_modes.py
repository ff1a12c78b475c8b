"""The benchmark's modes: what is done to a freshly built model before it trains.

Every mode starts from the same model in training mode. The modes that freeze
BatchNorm (all but ``train``) put each ``_BatchNorm`` in eval mode and leave every
parameter requiring grad: the frozen-BN fine-tuning setting. Detection models come
with torchvision's FrozenBatchNorm2d, which never uses batch statistics.

- ``train``: BN in train mode (batch statistics).
- ``eval``: BN in eval mode, computed as PyTorch computes it (the reference).
- ``tune``: ``convbn.tune`` on the ``eval`` model.
- ``deploy``: ``convbn.fuse`` on the ``eval`` model (BN folded into new producer params).
- ``tune-paper``: the paper's formulation: each pair's BN replaced by ``nn.Identity`` and
  its producer wrapped so that it computes ``conv(x, *fold_tensors(...))`` with autograd
  through the fold (the folded weight is kept for backward). Same parameter objects.
- ``inductor``: ``torch.compile`` with ``efficient_conv_bn_eval_fx_passes`` on.
- ``compiled-tune``: ``convbn.tune`` then ``torch.compile``.
- ``frozenbn``: every BatchNorm replaced by a frozen scale-and-shift (gamma, beta frozen).
- ``mmengine``: MMEngine's ``turn_on_efficient_conv_bn_eval`` (only when installed).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

import convbn
from convbn._tools.modules import replace_modules
from convbn.functional import fold_tensors

__all__ = [
    "MODES",
    "DEFAULT_MODES",
    "COMPILED_MODES",
    "GRADS_DIFFER",
    "unavailable",
    "Prepared",
    "apply_mode",
    "PaperTuneProducer",
    "FrozenScaleShift",
]

MODES = (
    "train",
    "eval",
    "tune",
    "deploy",
    "tune-paper",
    "inductor",
    "compiled-tune",
    "frozenbn",
    "mmengine",
)
DEFAULT_MODES = ("train", "eval", "tune", "deploy")
COMPILED_MODES = frozenset({"inductor", "compiled-tune"})
# Modes whose parameter gradients cannot be compared with Eval's, and why.
GRADS_DIFFER = {
    "train": "batch statistics: a different function",
    "deploy": "fused parameters w', b' replace w, b, gamma, beta",
}


def unavailable(mode: str) -> str | None:
    """Why ``mode`` cannot run on this installation, or None."""
    if mode == "mmengine" and importlib.util.find_spec("mmengine") is None:
        return "unavailable: mmengine is not installed"
    return None


@dataclass
class Prepared:
    """A model ready to train in some mode: ``module`` is what to call (maybe compiled),
    ``model`` the underlying ``nn.Module``; ``pairs`` the number of folded pairs."""

    module: nn.Module
    model: nn.Module
    pairs: int | None = None


def freeze_bn(model: nn.Module) -> nn.Module:
    """``model.train()``, with every ``_BatchNorm`` in eval mode (running statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return model


class PaperTuneProducer(nn.Module):
    """The paper's Tune mode for one pair: ``w', b' = fold_tensors(...)`` with autograd,
    then the producer's operation with ``w', b'``. Autograd keeps ``w'`` for backward.

    Holds the original producer and BN (same parameter objects, so gradients reach
    w, b, gamma and beta); the BN must stay in eval mode.
    """

    def __init__(self, producer: nn.Module, bn: nn.Module):
        super().__init__()
        self.producer = producer
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        p, bn = self.producer, self.bn
        weight, bias = fold_tensors(
            p.weight,
            p.bias,
            bn.running_mean,
            bn.running_var,
            float(bn.eps),
            getattr(bn, "weight", None),
            getattr(bn, "bias", None),
            transposed=isinstance(p, _ConvTransposeNd),
            groups=getattr(p, "groups", 1),
        )
        weight, bias = weight.to(p.weight.dtype), bias.to(p.weight.dtype)
        if isinstance(p, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(p, _ConvTransposeNd):
            nd = len(p.kernel_size)
            output_padding = p._output_padding(
                x, None, p.stride, p.padding, p.kernel_size, nd, p.dilation
            )
            op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
            return op(x, weight, bias, p.stride, p.padding, output_padding, p.groups, p.dilation)
        if isinstance(p, _ConvNd):
            return p._conv_forward(x, weight, bias)
        raise TypeError(f"tune-paper: unsupported producer {type(p).__name__}")


def to_paper_tune(model: nn.Module) -> int:
    """Convert ``model`` (BNs frozen) to :class:`PaperTuneProducer` pairs, in place.

    Pairs are those ``convbn.tune`` finds (the same discovery, then restored).
    Returns the number of pairs.
    """
    convbn.tune(model)
    pairs = [
        (model.get_submodule(p), model.get_submodule(b)) for p, b in convbn.report(model).converted
    ]
    convbn.restore(model)
    new: dict[nn.Module, nn.Module] = {}
    for producer, bn in pairs:
        new[bn] = nn.Identity()
        new[producer] = PaperTuneProducer(producer, bn)
    replace_modules(model, new.get)
    return len(pairs)


class FrozenScaleShift(nn.Module):
    """A BatchNorm1d/2d/3d frozen as ``x * scale + shift`` (like torchvision's
    FrozenBatchNorm2d, any rank): its four tensors are buffers, nothing trains."""

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        c = bn.num_features
        like = bn.running_mean if bn.running_mean is not None else bn.weight
        ones, zeros = torch.ones(c, dtype=like.dtype), torch.zeros(c, dtype=like.dtype)
        self.eps = float(bn.eps)
        for name, default in (("weight", ones), ("bias", zeros)):
            value = getattr(bn, name)
            self.register_buffer(name, (value if value is not None else default).detach().clone())
        for name, default in (("running_mean", zeros), ("running_var", ones)):
            value = getattr(bn, name)
            self.register_buffer(name, (value if value is not None else default).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)


def to_frozen(model: nn.Module) -> int:
    """Replace every ``_BatchNorm`` by :class:`FrozenScaleShift`; the number replaced."""
    return replace_modules(
        model,
        lambda m: (
            FrozenScaleShift(m).to(m.running_mean.device) if isinstance(m, _BatchNorm) else None
        ),
    )


def _mmengine(model: nn.Module) -> None:
    from mmengine.model.efficient_conv_bn_eval import (
        turn_on_efficient_conv_bn_eval_for_single_model,
    )

    try:
        turn_on_efficient_conv_bn_eval_for_single_model(model)
    except Exception:
        # Whole models that fx cannot trace: MMEngine is applied per sub-module.
        for child in model.children():
            turn_on_efficient_conv_bn_eval_for_single_model(child)


def apply_mode(model: nn.Module, mode: str, compile_model: bool = False) -> Prepared:
    """Put ``model`` (freshly built) in ``mode``, in place; compile it when the mode is a
    compiled one or ``compile_model`` is set. Raises for an unknown or unavailable mode."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    reason = unavailable(mode)
    if reason:
        raise RuntimeError(reason)
    pairs = None
    if mode == "train":
        model.train()
    else:
        freeze_bn(model)
    if mode in ("tune", "compiled-tune"):
        convbn.tune(model)
        pairs = len(convbn.report(model).converted)
    elif mode == "deploy":
        convbn.tune(model)
        pairs = len(convbn.report(model).converted)
        convbn.fuse(model)
    elif mode == "tune-paper":
        pairs = to_paper_tune(model)
    elif mode == "frozenbn":
        to_frozen(model)
    elif mode == "mmengine":
        _mmengine(model)
    module = model
    if mode in COMPILED_MODES or compile_model:
        import torch._inductor.config as inductor_config

        inductor_config.efficient_conv_bn_eval_fx_passes = mode == "inductor"
        # Dropout in compiled code draws from Inductor's own generator unless told
        # otherwise: the equivalence check needs Eval's random masks.
        inductor_config.fallback_random = True
        module = torch.compile(model)
    return Prepared(module, model, pairs)
