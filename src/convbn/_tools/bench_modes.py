"""The benchmark's modes: what is done to a freshly built model before it trains.

Every mode starts from the same model in training mode. The modes that freeze
BatchNorm (all but ``train``) put each ``_BatchNorm`` in eval mode and leave every
parameter requiring grad: the frozen-BN fine-tuning setting. Detection models come
with torchvision's FrozenBatchNorm2d, which never uses batch statistics.

- ``train``: BN in train mode (batch statistics).
- ``eval``: BN in eval mode, computed as PyTorch computes it (the reference).
- ``tune``: ``convbn.tune`` on the ``eval`` model.
- ``deploy``: ``convbn.fuse`` on the ``eval`` model (BN folded into new producer params).
- ``tune-conv``: ``tune`` with the CPU pointwise path off (``CONVBN_CPU_POINTWISE=0``):
  every producer runs torch's own convolution, as in Deploy; shows what the path adds.
- ``deploy-products``: ``deploy`` whose folded producers run the kernels Tune picks (the CPU
  pointwise products where they apply, torch's convolution elsewhere), with nothing else
  of Tune: what Tune would take if its folding cost nothing. No Tune can beat it with
  these kernels, which is how far below Eval Tune can go on this machine.
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
from convbn._math import pointwise
from convbn._math.tune_autograd import OpSpec, _op_backward, apply_op
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
    "ProductConv",
]

MODES = (
    "train",
    "eval",
    "tune",
    "deploy",
    "tune-conv",
    "deploy-products",
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
    "deploy-products": "fused parameters w', b' replace w, b, gamma, beta",
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


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in list(model.modules()):
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new


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
    for producer, bn in pairs:
        _replace_everywhere(model, bn, nn.Identity())
        _replace_everywhere(model, producer, PaperTuneProducer(producer, bn))
    return len(pairs)


class _ProductConvFunction(torch.autograd.Function):
    """A convolution computed by Tune's kernel choice (``apply_op``, ``_op_backward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        ctx.has_bias = bias is not None
        return apply_op(spec, x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n = ctx.needs_input_grad
        mask = [n[0], n[1], ctx.has_bias and n[2]]
        gx, gw, gb = _op_backward(ctx.spec, grad_out, x, x.shape, weight, mask)
        return gx, gw, gb, None


class ProductConv(nn.Module):
    """A Conv1d/2d/3d (zeros padding) computed with the kernels Tune picks for it; holds
    the convolution, so its parameters and their names stay the same."""

    def __init__(self, conv: _ConvNd):
        super().__init__()
        if isinstance(conv, _ConvTransposeNd) or conv.padding_mode != "zeros":
            raise TypeError("ProductConv: a convolution with zeros padding, not transposed")
        if isinstance(conv.padding, str):
            raise TypeError("ProductConv: numeric padding only")
        self.conv = conv
        nd = len(conv.kernel_size)
        self.spec = OpSpec(
            stride=tuple(conv.stride),
            padding=tuple(conv.padding),
            dilation=tuple(conv.dilation),
            output_padding=(0,) * nd,
            groups=conv.groups,
        )

    def forward(self, x: Tensor) -> Tensor:
        return _ProductConvFunction.apply(x, self.conv.weight, self.conv.bias, self.spec)


def to_products(model: nn.Module, producers: list[nn.Module]) -> int:
    """Wrap each of ``producers`` (a pair's producer, folded) that Tune may compute as
    matrix products in :class:`ProductConv`; the others keep torch's convolution, as in
    Tune. The number wrapped."""
    convs = [
        m
        for m in producers
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and pointwise.applies(OpSpec(padding=tuple(m.padding), groups=m.groups), m.weight.shape)
    ]
    for conv in convs:
        _replace_everywhere(model, conv, ProductConv(conv))
    return len(convs)


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
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        _replace_everywhere(model, bn, FrozenScaleShift(bn).to(bn.running_mean.device))
    return len(bns)


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
    if mode == "tune-conv":
        pointwise.set_enabled(False)  # each (model, mode) runs in its own process
    if mode in ("tune", "tune-conv", "compiled-tune"):
        convbn.tune(model)
        pairs = len(convbn.report(model).converted)
    elif mode in ("deploy", "deploy-products"):
        convbn.tune(model)
        producers = [model.get_submodule(p) for p, _ in convbn.report(model).converted]
        pairs = len(producers)
        convbn.fuse(model)
        if mode == "deploy-products":
            to_products(model, producers)
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
