"""Tune mode for one producer -> frozen-BatchNorm pair: ``bn_eval(op(x, w, b))`` computed
as ``op(x, w', b')``, with autograd keeping exactly what Deploy mode keeps.

Written for the host first (docs/method.md, "Tune mode on the host"): at the batches
people fine-tune with on a GPU, a step is bound by the host issuing kernels, so each
pair costs as few operators and as little Python as the guarantees allow. The fold is
BatchNorm's own eval-mode kernel applied to the weight (zero mean: ``w' = w * a``, per
output channel) and to the bias (``b' = (b - mu) * a + beta``). Backward uses that the
same kernel computes ``(r - mu) / sqrt(var + eps) * u + v`` per channel for any ``u``
and ``v``, not only gamma and beta. Per pair and training step, for a producer without
bias:

    forward:   w' = bn(w; 0, gamma)         b' = bn(0; mu, gamma, beta)
               out = op(x, w', b')
    backward:  w' = bn(w; 0, gamma)         dx, dJ/dw', dJ/db' = op_backward(G)
               dJ/dw, dJ/dgamma_w = bn_backward(dJ/dw', w)
               dJ/dgamma = bn(0; mu, dJ/db', dJ/dgamma_w)      dJ/dbeta = dJ/db'

Seven operators; with a bias, ``b`` replaces the zeros and ``dJ/db = bn(dJ/db'; 0,
gamma)`` is one more. A weight of 2^18 elements or more gets one more still: its input
gradient gets a call of its own, so that two weight-sized temporaries, not three, are
alive at once. No value is read on the host, and nothing made from the running
statistics is kept between calls (they can change in place, even untracked). What
autograd keeps: the input (only when a weight-side gradient is wanted) and the module's
own parameters, which is what Deploy's convolution keeps; ``w'`` is made again in
backward. Backward is made of differentiable operators, so double backward is right.

Where that path does not apply (running statistics that ask for a gradient,
``torch.func`` transforms, ``torch.jit.trace``), the same
function is computed with plain differentiable operators (:func:`_composite`); under
``torch.compile`` it is one custom operator with its own backward, so that the compiler
keeps what eager Tune keeps (:mod:`convbn._math.compiled`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from convbn._math.compat import functorch_active, is_compiling, is_tracing
from convbn._math.folding import cast, fold_dtype, fold_tensors, weight_of_rows, weight_rows

__all__ = ["OpSpec", "Constants", "apply_op", "tune_apply"]

_bn = torch._native_batch_norm_legit_no_training


def _boxed(name: str):
    """An ATen operator that has no ``torch.*`` function, called through the dispatcher's
    boxed entry: from Python the cheapest way in (an OpOverload's ``__call__`` adds
    Python, its ``_op`` a search of the arguments for ``__torch_function__`` first).
    Dispatch modes and ``__torch_dispatch__`` subclasses see it as usual; Python-level
    ``__torch_function__`` overrides do not. Its OpOverload's own function where torch
    lacks that entry."""
    try:
        handle = torch._C._dispatch_find_schema_or_throw(f"aten::{name}", "")
        return functools.partial(torch._C._dispatch_call_boxed, handle)
    except (AttributeError, RuntimeError):
        return getattr(torch.ops.aten, name).default._op


# Looked up once: they run at every pair's backward.
_bn_backward = _boxed("native_batch_norm_backward")
_conv_backward = _boxed("convolution_backward")
# From this many weight elements (1 MiB in float32) the backward makes the input's
# gradient in a call of its own: one operator more, one weight-sized temporary less.
_SPLIT_NUMEL = 2**18


class OpSpec:
    """How the producer maps its (already padded) input: a convolution or a linear map.

    ``padding`` is the symmetric zero padding that the convolution applies itself;
    padding modes and asymmetric ``"same"`` padding are applied to the input before.
    Made once per producer; what the per-call path needs is worked out here.
    """

    __slots__ = (
        "linear",
        "transposed",
        "stride",
        "padding",
        "dilation",
        "output_padding",
        "groups",
        "args",
        "plain_rows",
    )

    def __init__(
        self,
        linear: bool = False,
        transposed: bool = False,
        stride: tuple[int, ...] = (),
        padding: tuple[int, ...] = (),
        dilation: tuple[int, ...] = (),
        output_padding: tuple[int, ...] = (),
        groups: int = 1,
    ):
        self.linear = linear
        self.transposed = transposed
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.output_padding = tuple(output_padding)
        self.groups = groups
        # torch.convolution's and convolution_backward's geometry arguments, in order.
        self.args = (
            self.stride,
            self.padding,
            self.dilation,
            transposed,
            self.output_padding,
            groups,
        )
        # Whether the weight is BatchNorm's input after unsqueeze(0) (all but transposed).
        self.plain_rows = not transposed

    def _key(self):
        return (self.linear,) + self.args

    def __eq__(self, other):
        return isinstance(other, OpSpec) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__[:7])
        return f"OpSpec({fields})"


class _Zeros(NamedTuple):
    channels: Tensor  # (C,): the zero mean of the weight's fold
    row: Tensor  # (1, C): the bias of a producer without one
    empty: Tensor  # (0,): BatchNorm backward's unused saved statistics
    dtype: torch.dtype
    sizes: list  # [C]: convolution_backward's bias_sizes
    ones: Tensor  # (1, C): BatchNorm's eval kernel turns it into the scale a


class Constants:
    """A pair's constant tensors (zeros of its channel count), one set per device and dtype.

    Made on first use and kept: they are the same at every call, and making them anew
    would be operators on the host's path. The set used last is found again by the
    identity of the running variance it was made for (a module's ``.to()`` gives its
    buffers new tensors). Nothing made from the running statistics is kept: they can
    change in place without a trace (a write through ``.data`` leaves no version).
    """

    __slots__ = ("channels", "_sets", "_last")

    def __init__(self, channels: int):
        self.channels = channels
        self._sets: dict = {}
        # (running variance, its zeros), replaced in one assignment: threads share it.
        self._last: tuple[Tensor, _Zeros] | None = None

    def get(self, var: Tensor, dtype: torch.dtype) -> _Zeros:
        last = self._last
        if last is not None and last[0] is var and last[1].dtype is dtype:
            return last[1]
        key = (var.device, dtype)
        zeros = self._sets.get(key)
        if zeros is None:
            with torch.inference_mode(False):  # usable by a later training step
                channels = torch.zeros(self.channels, dtype=dtype, device=var.device)
                ones = torch.ones((1, self.channels), dtype=dtype, device=var.device)
                zeros = _Zeros(
                    channels, channels.view(1, -1), channels[:0], dtype, [self.channels], ones
                )
            if is_compiling():
                return zeros  # a side effect torch.compile would have to replay
            self._sets[key] = zeros
        self._last = (var, zeros)
        return zeros

    def __getstate__(self):
        return {"channels": self.channels}

    def __setstate__(self, state):
        self.channels = state["channels"]
        self._sets = {}
        self._last = None


def apply_op(spec: OpSpec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The producer's computation with the given weight and bias."""
    if spec.linear:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.convolution(x, weight, bias, *spec.args)


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
    return _conv_backward(grad, x, weight, [out_channels] if mask[2] else None, *spec.args, mask)


def _rows(weight: Tensor, spec: OpSpec, dtype) -> Tensor:
    """The weight, in the folding dtype, as BatchNorm's input: output channel in dim 1."""
    if weight.dtype is not dtype:
        weight = weight.to(dtype)
    if spec.plain_rows:
        return weight[None]
    return weight_rows(weight, True, spec.groups)


def _of_rows(rows: Tensor, spec: OpSpec) -> Tensor:
    if spec.plain_rows:
        return rows[0]
    return weight_of_rows(rows, True, spec.groups)


def _forward(x, weight, bias, gamma, beta, info):
    mean, var, eps, spec, zeros = info
    dtype = zeros.dtype
    if spec.plain_rows and weight.dtype is dtype:
        w_f = _bn(weight[None], gamma, None, zeros.channels, var, 0.0, eps)[0][0]
    else:
        w_f = _of_rows(
            _bn(_rows(weight, spec, dtype), gamma, None, zeros.channels, var, 0.0, eps)[0], spec
        )
    rows = zeros.row if bias is None else cast(bias, dtype).view(1, -1)
    b_f = _bn(rows, gamma, beta, mean, var, 0.0, eps)[0][0]
    if x.dtype is not dtype:  # autocast: the producer computes in x's dtype
        w_f, b_f = w_f.to(x.dtype), b_f.to(x.dtype)
    if spec.linear:
        return torch.nn.functional.linear(x, w_f, b_f)
    return torch.convolution(x, w_f, b_f, *spec.args)


def _weight_backward(g_rows, rows, gamma, var, eps, zeros: _Zeros, mask):
    """``(dJ/dw, dJ/dgamma_w, _)``: BatchNorm's eval-mode backward at the weight's rows,
    zero mean. Empty saved statistics: the kernel then works from the running ones it is
    given (and a forward's might not be the ones of this call)."""
    return _bn_backward(
        g_rows, rows, gamma, zeros.channels, var, zeros.empty, zeros.empty, False, eps, mask
    )


def _bias_grads(gb_f, g_gamma_w, bias, gamma, mean, var, eps, zeros: _Zeros, need_b, need_gamma):
    """``(dJ/db, dJ/dgamma)`` from ``dJ/db'`` and the weight side's ``dJ/dgamma``, with
    ``b' = (b - mu) * a + beta`` (``b`` zero for a producer without bias).

    BatchNorm's eval kernel computes ``(r - mu) / sqrt(var + eps) * u + v`` per channel
    for any ``u, v``: with ``r = b``, ``u = dJ/db'`` and ``v`` the weight side's part it is
    the whole of ``dJ/dgamma``, in one operator; with ``r = dJ/db'``, zero mean and
    ``u = gamma`` it is ``dJ/db``. Made from the live statistics at every call: nothing
    derived from them is kept between steps."""
    rows = zeros.row if bias is None else bias.view(1, -1)
    gb = g_gamma = None
    if need_gamma:
        g_gamma = _bn(rows, gb_f, g_gamma_w, mean, var, 0.0, eps)[0][0]
    if need_b:
        gb = _bn(gb_f.view(1, -1), gamma, None, zeros.channels, var, 0.0, eps)[0][0]
    return gb, g_gamma


def _plain_backward(grad, x, weight, bias, gamma, info, needs):
    """:meth:`_Tune.backward` for what fine-tuning runs most: a convolution (not
    transposed) whose weight, bias and gradient are in the folding dtype, with a weight
    below ``_SPLIT_NUMEL`` elements and its input kept. The same steps as the general
    path, without its casts, layout changes and splits."""
    mean, var, eps, spec, zeros = info
    need_x, need_w, need_b, need_gamma, need_beta, _ = needs
    rows = weight[None]
    w_op = _bn(rows, gamma, None, zeros.channels, var, 0.0, eps)[0][0] if need_x else weight
    weight_side = need_w or need_gamma
    bias_side = need_b or need_gamma or need_beta
    gx, gw_f, gb_f = _conv_backward(
        grad,
        x,
        w_op,
        zeros.sizes if bias_side else None,
        *spec.args,
        [need_x, weight_side, bias_side],
    )
    del w_op
    gw = gb = g_gamma = None
    if weight_side:
        if gw_f.stride() != weight.stride():  # see the general path
            gw_f, rows = gw_f.contiguous(), weight.contiguous()[None]
        gw, g_gamma, _ = _weight_backward(
            gw_f[None], rows, gamma, var, eps, zeros, [need_w, need_gamma, False]
        )
        if need_w:
            gw = gw[0]
    if bias is None:
        if need_gamma:  # see _bias_grads
            g_gamma = _bn(zeros.row, gb_f, g_gamma, mean, var, 0.0, eps)[0][0]
    elif need_b or need_gamma:
        gb, g_gamma = _bias_grads(
            gb_f, g_gamma, bias, gamma, mean, var, eps, zeros, need_b, need_gamma
        )
    return gx, gw, gb, g_gamma, gb_f if need_beta else None, None


class _Tune(torch.autograd.Function):
    """The pair as one autograd node; ``info`` holds what needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, info):
        needs = ctx.needs_input_grad
        if needs[1] or needs[3]:
            ctx.save_for_backward(x, weight, bias, gamma)
        else:
            ctx.save_for_backward(None, weight, bias, gamma)
            ctx.x_shape = x.shape
        ctx.info = info
        return _forward(x, weight, bias, gamma, beta, info)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, gamma = ctx.saved_tensors
        info = ctx.info
        mean, var, eps, spec, zeros = info
        dtype = zeros.dtype
        if (
            x is not None
            and spec.plain_rows
            and not spec.linear
            and weight.dtype is dtype
            and grad.dtype is dtype
            and (bias is None or bias.dtype is dtype)
            and weight.numel() < _SPLIT_NUMEL
        ):
            return _plain_backward(grad, x, weight, bias, gamma, info, ctx.needs_input_grad)
        need_x, need_w, need_b, need_gamma, need_beta, _ = ctx.needs_input_grad
        rows = _rows(weight, spec, dtype)
        if need_x:
            w_op = _of_rows(_bn(rows, gamma, None, zeros.channels, var, 0.0, eps)[0], spec)
            if w_op.dtype is not grad.dtype:
                w_op = w_op.to(grad.dtype)
        else:
            w_op = weight if weight.dtype is grad.dtype else weight.to(grad.dtype)
        weight_side = need_w or need_gamma
        bias_side = need_b or need_gamma or need_beta
        mask = [need_x, weight_side, bias_side]
        if need_x and weight_side and w_op.numel() >= _SPLIT_NUMEL:
            # A large weight: the input's gradient first, so that w' is gone before
            # dJ/dw' and dJ/dw are made (one weight-sized temporary alive, not two).
            gx = _op_backward(spec, grad, x, None, w_op, [True, False, False])[0]
            w_op = w_op if spec.linear else weight  # only its shape is read now
            mask[0] = False
        else:
            gx = None
        if spec.linear or x is None:
            gx2, gw_f, gb_f = _op_backward(spec, grad, x, getattr(ctx, "x_shape", None), w_op, mask)
        else:
            gx2, gw_f, gb_f = _conv_backward(
                grad, x, w_op, zeros.sizes if bias_side else None, *spec.args, mask
            )
        if gx is None:
            gx = gx2
        # w' is dead now, dJ/dw' once dJ/dw is made: at most two weight-sized at a time.
        del w_op, gx2
        gw = gb = g_gamma = g_beta = None
        if weight_side:
            if gw_f.dtype is not dtype:
                gw_f = gw_f.to(dtype)
            if gw_f.stride() != weight.stride():
                # BatchNorm's CPU backward is wrong when its gradient and its input have
                # different memory formats (torch 2.14): give it one layout.
                gw_f, rows = gw_f.contiguous(), _rows(weight.contiguous(), spec, dtype)
            in_place = (
                need_w
                and gw_f.numel() >= _SPLIT_NUMEL
                and (spec.plain_rows or spec.groups == 1)
                and not torch.is_grad_enabled()
            )
            gw, g_gamma, _ = _weight_backward(
                gw_f[None] if spec.plain_rows else weight_rows(gw_f, True, spec.groups),
                rows,
                gamma,
                var,
                eps,
                zeros,
                [need_w and not in_place, need_gamma, False],
            )
            if in_place:
                # A large weight: dJ/dw = a * dJ/dw' in dJ/dw''s own memory, so that no
                # second weight-sized tensor is made (two operators more: a, and the product).
                a = _bn(zeros.ones, gamma, None, zeros.channels, var, 0.0, eps)[0]
                shape = (-1,) + (1,) * (gw_f.dim() - 1) if spec.plain_rows else (1, -1)
                gw = gw_f.mul_(a.view(shape + (1,) * (gw_f.dim() - len(shape))))
            del gw_f
            if need_w:
                if not in_place:
                    gw = _of_rows(gw, spec)
                if gw.dtype is not weight.dtype:
                    gw = gw.to(weight.dtype)
        if bias_side:
            if gb_f.dtype is not dtype:
                gb_f = gb_f.to(dtype)
            if need_gamma or (need_b and bias is not None):
                gb, g_gamma = _bias_grads(
                    gb_f,
                    g_gamma,
                    None if bias is None else cast(bias, dtype),
                    gamma,
                    mean,
                    var,
                    eps,
                    zeros,
                    need_b,
                    need_gamma,
                )
                if need_b:
                    gb = cast(gb, bias.dtype)
                if need_gamma:
                    g_gamma = cast(g_gamma, gamma.dtype)
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
    info = (running_mean, running_var, eps, spec, constants.get(running_var, dtype))
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
