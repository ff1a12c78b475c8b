"""Tune mode for one producer -> frozen-BatchNorm pair: ``bn_eval(op(x, w, b))`` computed
as ``op(x, w', b')``, with autograd keeping exactly what Deploy mode keeps.

Written for the host first (docs/method.md, "Tune mode on the host"): at the batches
people fine-tune with on a GPU, a step is bound by the host issuing kernels, so each
pair costs as few operators and as little Python as the guarantees allow. The fold is
BatchNorm's own eval-mode kernel applied to the weight (zero mean: ``w' = w * a``, per
output channel) and to the bias (``b' = (b - mu) * a + beta``); BatchNorm's backward
kernel maps the gradients of ``w', b'`` back to ``w, b, gamma`` in one call each. Per
pair and training step:

    forward:   w' = bn(w)   b' = bn(b or 0)   out = op(x, w', b')
    backward:  w' = bn(w)   dx, dJ/dw', dJ/db' = op_backward(G)
               dJ/dw, dJ/dgamma_w = bn_backward(dJ/dw', w)
               dJ/db, dJ/dgamma_b = bn_backward(dJ/db', b or 0)
               dJ/dgamma = dJ/dgamma_w + dJ/dgamma_b        dJ/dbeta = dJ/db'

Eight operators, no value read on the host. What autograd keeps: the input (only when a
weight-side gradient is wanted) and the module's own parameters, which is what Deploy's
convolution keeps; ``w'`` is made again in backward. Backward is made of differentiable
operators, so double backward is right.

Where that path does not apply (running statistics that ask for a gradient,
``torch.func`` transforms, ``torch.jit.trace``), the same
function is computed with plain differentiable operators (:func:`_composite`); under
``torch.compile`` it is one custom operator with its own backward, so that the compiler
keeps what eager Tune keeps (:mod:`convbn._math.compiled`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from convbn._math.compat import functorch_active, is_compiling, is_tracing
from convbn._math.folding import cast, fold_dtype, fold_tensors, weight_of_rows, weight_rows

__all__ = ["OpSpec", "Constants", "apply_op", "tune_apply"]

_bn = torch._native_batch_norm_legit_no_training
# Looked up once: an OpOverload's own call costs more than the operator at small sizes.
_bn_backward = torch.ops.aten.native_batch_norm_backward.default
_conv_backward = torch.ops.aten.convolution_backward.default


class OpSpec(NamedTuple):
    """How the producer maps its (already padded) input: a convolution or a linear map.

    ``padding`` is the symmetric zero padding that the convolution applies itself;
    padding modes and asymmetric ``"same"`` padding are applied to the input before.
    """

    linear: bool = False
    transposed: bool = False
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    groups: int = 1


class _Zeros(NamedTuple):
    channels: Tensor  # (C,): the zero mean of the weight's fold
    row: Tensor  # (1, C): the bias of a producer without one
    empty: Tensor  # (0,): BatchNorm backward's unused saved statistics


class Constants:
    """A pair's constant tensors (zeros of its channel count), one set per device and dtype.

    Made on first use and kept: they are the same at every call, and making them anew
    would be operators on the host's path.
    """

    __slots__ = ("channels", "_sets")

    def __init__(self, channels: int):
        self.channels = channels
        self._sets: dict = {}

    def get(self, like: Tensor, dtype: torch.dtype) -> _Zeros:
        key = (like.device, dtype)
        zeros = self._sets.get(key)
        if zeros is None:
            channels = torch.zeros(self.channels, dtype=dtype, device=like.device)
            zeros = _Zeros(channels, channels.view(1, -1), channels[:0])
            if not is_compiling():
                self._sets[key] = zeros
        return zeros

    def __getstate__(self):
        return {"channels": self.channels}

    def __setstate__(self, state):
        self.channels = state["channels"]
        self._sets = {}


def apply_op(spec: OpSpec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The producer's computation with the given weight and bias."""
    if spec.linear:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.convolution(
        x,
        weight,
        bias,
        spec.stride,
        spec.padding,
        spec.dilation,
        spec.transposed,
        spec.output_padding,
        spec.groups,
    )


def _op_backward(spec: OpSpec, grad: Tensor, x: Tensor | None, x_shape, weight: Tensor, mask):
    """``(dJ/dx, dJ/dweight, dJ/dbias)`` of :func:`apply_op`, each only where ``mask`` asks."""
    if spec.linear:
        gx = grad.matmul(weight) if mask[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t().matmul(x.reshape(-1, x.shape[-1])) if mask[1] else None
        gb = g2.sum(0) if mask[2] else None
        return gx, gw, gb
    if x is None:
        # Only the input's shape matters for its gradient (as in torch.nn.grad).
        x = grad.new_empty(1).expand(x_shape)
    out_channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
    return _conv_backward(
        grad,
        x,
        weight,
        [out_channels] if mask[2] else None,
        spec.stride,
        spec.padding,
        spec.dilation,
        spec.transposed,
        spec.output_padding,
        spec.groups,
        mask,
    )


def _weight_rows(weight: Tensor, spec: OpSpec) -> Tensor:
    """The weight as BatchNorm's input, its output channel in dimension 1."""
    if spec.transposed:
        return weight_rows(weight, True, spec.groups)
    return weight.unsqueeze(0)


def _weight_of_rows(rows: Tensor, spec: OpSpec) -> Tensor:
    if spec.transposed:
        return weight_of_rows(rows, True, spec.groups)
    return rows[0]


def _forward(x, weight, bias, gamma, beta, info):
    mean, var, eps, spec, zeros, dtype = info
    rows = _weight_rows(cast(weight, dtype), spec)
    w_f = _weight_of_rows(_bn(rows, gamma, None, zeros.channels, var, 0.0, eps)[0], spec)
    b_in = zeros.row if bias is None else cast(bias, dtype).view(1, -1)
    b_f = _bn(b_in, gamma, beta, mean, var, 0.0, eps)[0].view(-1)
    if x.dtype != dtype:  # autocast: the producer computes in x's dtype
        w_f, b_f = w_f.to(x.dtype), b_f.to(x.dtype)
    return apply_op(spec, x, w_f, b_f)


class _Tune(torch.autograd.Function):
    """The pair as one autograd node; ``info`` holds what needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, info):
        needs = ctx.needs_input_grad
        ctx.save_for_backward(x if needs[1] or needs[3] else None, weight, bias, gamma)
        ctx.info = info
        ctx.x_shape = x.shape
        return _forward(x, weight, bias, gamma, beta, info)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, gamma = ctx.saved_tensors
        mean, var, eps, spec, zeros, dtype = ctx.info
        need_x, need_w, need_b, need_gamma, need_beta, _ = ctx.needs_input_grad
        rows = _weight_rows(cast(weight, dtype), spec)
        op_dtype = grad.dtype
        saved_mean = saved_invstd = zeros.empty
        if need_x:
            w_f, saved_mean, saved_invstd = _bn(rows, gamma, None, zeros.channels, var, 0.0, eps)
            w_op = cast(_weight_of_rows(w_f, spec), op_dtype)
        else:
            w_op = cast(weight, op_dtype)  # only its shape is read
        mask = [need_x, need_w or need_gamma, need_b or need_gamma or need_beta]
        gx, gw_f, gb_f = _op_backward(spec, grad, x, ctx.x_shape, w_op, mask)
        gw = gb = g_gamma = None
        if need_w or need_gamma:
            gw, g_gamma, _ = _bn_backward(
                _weight_rows(cast(gw_f, dtype), spec),
                rows,
                gamma,
                zeros.channels,
                var,
                saved_mean,
                saved_invstd,
                False,
                eps,
                [need_w, need_gamma, False],
            )
            gw = cast(_weight_of_rows(gw, spec), weight.dtype) if need_w else None
        if gb_f is not None:
            gb_f = cast(gb_f, dtype)
        if need_b or need_gamma:
            b_in = zeros.row if bias is None else cast(bias, dtype).view(1, -1)
            gb, g_gamma_b, _ = _bn_backward(
                gb_f.view(1, -1),
                b_in,
                gamma,
                mean,
                var,
                saved_mean,
                saved_invstd,
                False,
                eps,
                [need_b, need_gamma, False],
            )
            gb = cast(gb.view(-1), bias.dtype) if need_b else None
            if need_gamma:
                g_gamma = cast(g_gamma + g_gamma_b, gamma.dtype)
        g_beta = None
        if need_beta:
            g_beta = gb_f
        return gx, gw, gb, g_gamma, g_beta, None


def _compiled(x, weight, bias, mean, var, gamma, beta, eps, spec) -> Tensor:
    """Under torch.compile: one custom operator, whose backward the compiler cannot
    rewrite into keeping ``w'`` (see :mod:`convbn._math.compiled`)."""
    from convbn._math import compiled

    if mean.requires_grad or var.requires_grad or not compiled.available():
        return _composite(x, weight, bias, mean, var, gamma, beta, eps, spec)
    return compiled.tune_op(x, weight, bias, mean, var, gamma, beta, eps, spec)


def _composite(x, weight, bias, mean, var, gamma, beta, eps, spec) -> Tensor:
    """The same function with plain differentiable operators (autograd keeps ``w'``)."""
    w_f, b_f = fold_tensors(
        weight, bias, mean, var, eps, gamma, beta, transposed=spec.transposed, groups=spec.groups
    )
    return apply_op(spec, x, cast(w_f, x.dtype), cast(b_f, x.dtype))


_FAST_DTYPES = (torch.float32, torch.float64)


def tune_apply(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
    spec: OpSpec,
    constants: Constants,
) -> Tensor:
    """``bn_eval(op(x, weight, bias))`` computed as ``op(x, w', b')``, memory-optimal.

    ``x`` must already be in the dtype the producer computes in (under autocast: the
    autocast dtype); folding happens in at least float32. With no gradient required,
    no autograd node is created.
    """
    if is_compiling():
        return _compiled(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec)
    if (
        running_mean.requires_grad
        or running_var.requires_grad
        or functorch_active()
        or is_tracing()
    ):
        return _composite(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec)
    dtype = weight.dtype
    if not (
        dtype in _FAST_DTYPES
        and running_var.dtype is dtype
        and running_mean.dtype is dtype
        and (gamma is None or gamma.dtype is dtype)
        and (beta is None or beta.dtype is dtype)
        and (bias is None or bias.dtype is dtype)
    ):
        dtype = fold_dtype(weight, bias, running_mean, running_var, gamma, beta)
        running_mean, running_var = cast(running_mean, dtype), cast(running_var, dtype)
        # gamma and beta join the autograd graph through their casts.
        gamma = None if gamma is None else cast(gamma, dtype)
        beta = None if beta is None else cast(beta, dtype)
    zeros = constants.get(running_var, dtype)
    info = (running_mean, running_var, eps, spec, zeros, dtype)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or weight.requires_grad
        or (gamma is not None and gamma.requires_grad)
        or (beta is not None and beta.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return _Tune.apply(x, weight, bias, gamma, beta, info)
    with torch.no_grad():
        return _forward(x, weight, bias, gamma, beta, info)
