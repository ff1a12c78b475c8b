"""The Tune-mode autograd function: one convolution (or linear map) computing
``bn_eval(op(x, w, b))`` without ever keeping the folded weight for backward.

The BN's scale ``a`` is per output channel, so it can ride on either side of the
producer: ``op(x, w * a) = op(x, w) * a`` and ``op^T(G, w * a) = op^T(G * a, w)``.
Forward and backward each scale whichever is smaller, the weight (early layers,
large feature maps) or the feature map (deep layers at small batch or
resolution), then call the kernels Deploy mode's autograd calls. The gradients
of ``w', b'`` map back to every tensor that asked for one (PAPER.md):

    dJ/dw     = a * dJ/dw'
    dJ/db     = a * sum(G)
    dJ/da     = sum_{in, k}(dJ/dw' * w) + sum(G) * (b - mu)
    dJ/dgamma = dJ/da / sqrt(var + eps)
    dJ/dbeta  = sum(G)
    dJ/dmu    = -a * sum(G)
    dJ/dvar   = -dJ/da * a / (2 (var + eps))

What autograd keeps: the input (only when a weight-side gradient is wanted) and
the module's own parameters and buffers, exactly what Deploy mode keeps.
Backward is written with differentiable operations, so double backward is right.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from convbn._math import pointwise
from convbn._math.compat import autocast_enabled, eager_plain_cpu, is_compiling
from convbn._math.folding import (
    bn_scale,
    cast,
    channel_view,
    fold_bias,
    fold_dtype,
    per_channel_dot,
    scale_weight,
)

__all__ = ["OpSpec", "apply_op", "tune_apply"]


@dataclass(frozen=True)
class OpSpec:
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
    # What follows from the shapes alone, worked out once per input and weight shape
    # (a converted pair keeps its spec between calls; see shape_facts): at small
    # sizes Tune's Python work per call costs as much as its kernels.
    shapes: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


class ShapeFacts(NamedTuple):
    out_numel: int  # elements of the producer's output
    # Whether the CPU pointwise path computes the forward / the backward with products
    # (pointwise.applies and pointwise.sizes_apply); usable() still checks the tensors.
    pointwise_forward: bool
    pointwise_backward: bool
    # The shape that views a per-output-channel vector against the weight (None for a
    # transposed convolution, whose channels are grouped: see folding.channel_view).
    weight_view: tuple[int, ...] | None


def shape_facts(spec: OpSpec, x_shape: torch.Size, weight: Tensor) -> ShapeFacts:
    """:class:`ShapeFacts` of ``spec`` for this input shape and weight, from its cache."""
    key = (x_shape, weight.shape)
    facts = spec.shapes.get(key)
    if facts is None:
        sizes = (False, False)
        if pointwise.applies(spec, weight.shape):
            sizes = pointwise.sizes_apply(spec, x_shape)
        facts = ShapeFacts(
            _out_numel(spec, x_shape, weight),
            *sizes,
            None if spec.transposed else (-1,) + (1,) * (weight.dim() - 1),
        )
        # Not while torch.compile traces: the cache would be a side effect to replay.
        if not is_compiling():
            if len(spec.shapes) >= _SHAPES_KEPT:
                spec.shapes.clear()
            spec.shapes[key] = facts
    return facts


_SHAPES_KEPT = 32  # input shapes remembered per pair (a few per resolution and batch size)


def apply_op(
    spec: OpSpec, x: Tensor, weight: Tensor, bias: Tensor | None, facts: ShapeFacts | None = None
) -> Tensor:
    """The producer's computation with the given weight and bias."""
    if spec.linear:
        return torch.nn.functional.linear(x, weight, bias)
    if facts is None:
        facts = shape_facts(spec, x.shape, weight)
    if facts.pointwise_forward and pointwise.usable(x, weight):
        return pointwise.forward(spec, x, weight, bias)
    # torch.convolution, not torch.ops.aten.convolution: the same operator without the
    # Python dispatch of an op packet (about 7 microseconds a call, measured on CPU).
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


def _op_backward(
    spec: OpSpec,
    grad_out: Tensor,
    x: Tensor | None,
    x_shape: torch.Size,
    weight: Tensor,
    mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if spec.linear:
        gx = grad_out.matmul(weight) if mask[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gw = g2.t().matmul(x.reshape(-1, x.shape[-1])) if mask[1] else None
        gb = g2.sum(0) if mask[2] else None
        return gx, gw, gb
    gx = gw = gb = None
    if shape_facts(spec, x_shape, weight).pointwise_backward and pointwise.usable(grad_out, weight):
        (gx, gw, gb), mask = pointwise.backward(spec, grad_out, x, x_shape, weight, mask)
        if not any(mask):
            return gx, gw, gb
    if x is None:
        # Only the shape of the input matters for its gradient (as in torch.nn.grad).
        x = grad_out.new_empty(1).expand(x_shape)
    out_channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
    grads = torch.ops.aten.convolution_backward(
        grad_out,
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
    return (
        gx if gx is not None else grads[0],
        gw if gw is not None else grads[1],
        gb if gb is not None else grads[2],
    )


def _autocast_off(device_type: str):
    """A context that turns autocast off, if it is on (entering torch.autocast costs
    about 8 microseconds, a generator-based context manager several more)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def _out_numel(spec: OpSpec, x_shape: torch.Size, weight: Tensor) -> int:
    """How many elements the producer's output has, from the shapes alone."""
    if spec.linear:
        return math.prod(x_shape[:-1]) * weight.shape[0]
    k = weight.shape[2:]
    if spec.transposed:
        channels = weight.shape[1] * spec.groups
        sizes = [
            (i - 1) * s - 2 * p + d * (kk - 1) + op + 1
            for i, s, p, d, kk, op in zip(
                x_shape[2:], spec.stride, spec.padding, spec.dilation, k, spec.output_padding
            )
        ]
    else:
        channels = weight.shape[0]
        sizes = [
            (i + 2 * p - d * (kk - 1) - 1) // s + 1
            for i, s, p, d, kk in zip(x_shape[2:], spec.stride, spec.padding, spec.dilation, k)
        ]
    return x_shape[0] * channels * math.prod(sizes)


def _out_view(per_channel: Tensor, spec: OpSpec, ndim: int) -> Tensor:
    """A per-output-channel vector shaped to broadcast against the producer's output."""
    if spec.linear:
        return per_channel
    return per_channel.view((1, -1) + (1,) * (ndim - 2))


def _scale_feature_map(spec: OpSpec, numel: int, weight: Tensor, dtype, x_dtype) -> bool:
    """Whether to scale the (smaller) feature map per channel instead of the weight.

    ``op(x, w * a) = op(x, w) * a`` and ``op^T(G, w * a) = op^T(G * a, w)`` (the scale
    is per output channel), so either tensor can carry the scale; scaling the one
    with fewer elements is the cheaper pass. Deep layers at small batch and
    resolution have far fewer output elements than weight elements. Only without
    a dtype change: under autocast the weight must be folded in float32 first.
    """
    return dtype == x_dtype and weight.dtype == x_dtype and numel < weight.numel()


def _forward(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, dtype):
    scale = bn_scale(running_var, eps, gamma, dtype)
    b_f = fold_bias(bias, running_mean, scale, beta, dtype)
    facts = shape_facts(spec, x.shape, weight)
    if _scale_feature_map(spec, facts.out_numel, weight, dtype, x.dtype):
        out = apply_op(spec, x, weight, None, facts)
        # out = out * a + b', in place: ``out`` is ours alone.
        return torch.addcmul(
            _out_view(b_f, spec, out.dim()), out, _out_view(scale, spec, out.dim()), out=out
        )
    w_f = _folded_weight(weight, scale, spec, dtype, x.dtype, facts)
    return apply_op(spec, x, w_f, cast(b_f, x.dtype), facts)


def _reduce_to_channels(grad_out: Tensor, spec: OpSpec) -> Tensor:
    """``sum(G)`` over everything but the output channel."""
    if spec.linear:
        return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_out.sum([d for d in range(grad_out.dim()) if d != 1])


def _can_divide(scale: Tensor) -> bool:
    """Whether ``t * a / a`` gives ``t`` back to rounding, for every channel's ``a``.

    Not for ``a = 0`` (a zero-initialised gamma), nor for ``|a|`` so small that
    ``t * a`` could fall into the subnormal range. Only on the CPU, where reading
    the answer costs nothing; on an accelerator it would wait for the device at
    every layer.
    """
    if scale.device.type != "cpu" or is_compiling():
        return False  # under torch.compile the answer would be a data-dependent guard
    return float(scale.detach().abs().min()) >= _DIVIDE_MIN[scale.dtype]


_DIVIDE_MIN = {dtype: torch.finfo(dtype).tiny ** 0.5 for dtype in (torch.float32, torch.float64)}


# ---------------------------------------------------------------- CPU scratch memory
#
# Tune's transient tensors (w' in forward and again in backward, G * a in backward, the
# product of the per-channel dot for dJ/da) are dead as soon as the kernel that reads
# them returns. On the CPU each was a fresh allocation, which glibc's malloc often takes
# from, and gives back to, the kernel: measured on ResNet-50, batch 8, 224² (one process
# per mode, 3 steps each), Tune took 86,000-154,000 minor page faults a step against
# Deploy's 27,000-63,000, and 0.3-0.5 s of system time against 0.07-0.22 s. One buffer
# per thread and dtype, reused by every pair, removes them. On accelerators the caching
# allocator already does this.

_SCRATCH = threading.local()
_SCRATCH_MAX_BYTES = 64 * 2**20  # a larger tensor is allocated as before


def _scratch(shape: torch.Size, like: Tensor) -> Tensor | None:
    """A contiguous tensor of ``shape`` in this thread's scratch buffer, or None.

    None unless ``like`` is a plain tensor (no subclass, whose operations may not
    accept a plain ``out=``) on the CPU, no graph is being recorded (the result is
    overwritten by the next pair, so it must never be saved), neither torch.compile
    nor ``torch.jit.trace`` is tracing, and the tensor takes at most
    ``_SCRATCH_MAX_BYTES``. The caller must be done with it before anything else asks.
    """
    if torch.is_grad_enabled() or not eager_plain_cpu(like):
        return None
    # The view of each (dtype, shape) is made once: slicing and viewing the buffer
    # cost more than the small kernels of a pair (about 4.6 microseconds a call).
    views = _SCRATCH.__dict__.get("views")
    if views is None:
        views = _SCRATCH.views = {}
        _SCRATCH.buffers = {}
    key = (like.dtype, shape)
    view = views.get(key, _MISSING)
    if view is _MISSING:
        view = views[key] = _new_scratch_view(shape, like.dtype, views)
    return view


_MISSING = object()


def _new_scratch_view(shape: torch.Size, dtype: torch.dtype, views: dict) -> Tensor | None:
    numel = math.prod(shape)
    if numel * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return None
    buffers = _SCRATCH.buffers
    buf = buffers.get(dtype)
    # Neither the buffer nor its views are made under inference_mode: they would be
    # inference tensors, or views that cannot be written outside it.
    with torch.inference_mode(False):
        if buf is None or buf.numel() < numel:
            buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
            # Views of the old, smaller buffer would keep it alive: make them anew.
            for key in [k for k in views if k[0] == dtype]:
                del views[key]
        return buf[:numel].view(shape)


def _folded_weight(
    weight: Tensor, scale: Tensor, spec: OpSpec, dtype, x_dtype, facts: ShapeFacts | None = None
) -> Tensor:
    """``w' = w * a`` in the dtype the producer computes in, in scratch memory when it can."""
    if weight.dtype == dtype == x_dtype and weight.is_contiguous():
        out = _scratch(weight.shape, weight)
        if out is not None:
            if facts is not None and facts.weight_view is not None:
                return torch.mul(weight, scale.view(facts.weight_view), out=out)
            return scale_weight(weight, scale, spec.transposed, spec.groups, out=out)
    return cast(scale_weight(cast(weight, dtype), scale, spec.transposed, spec.groups), x_dtype)


def _scaled_grad(grad_out: Tensor, scale: Tensor, spec: OpSpec) -> Tensor:
    """``G * a`` per output channel, in scratch memory when it can."""
    view = _out_view(scale, spec, grad_out.dim())
    if grad_out.is_contiguous():
        out = _scratch(grad_out.shape, grad_out)
        if out is not None:
            return torch.mul(grad_out, view, out=out)
    return grad_out * view


# Up to this many elements (64 KiB in float32, under glibc's 128 KiB mmap threshold) a
# weight-sized temporary comes from malloc's heap, not from fresh pages: there the
# per-channel dot is one call (torch.linalg.vecdot) instead of a product in scratch
# memory and a sum.
_SMALL_WEIGHT = 2**14


class _TuneFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, gamma, beta, eps, spec):
        dtype = fold_dtype(weight, bias, running_mean, running_var, gamma, beta)
        with _autocast_off(x.device.type):
            out = _forward(
                x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, dtype
            )
        needs = ctx.needs_input_grad
        weight_side = needs[1] or needs[4] or needs[5]
        ctx.save_for_backward(
            x if weight_side else None, weight, bias, running_mean, running_var, gamma, beta
        )
        ctx.eps = eps
        ctx.spec = spec
        ctx.dtype = dtype
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, running_mean, running_var, gamma, beta = ctx.saved_tensors
        spec: OpSpec = ctx.spec
        eps, dtype, x_dtype = ctx.eps, ctx.dtype, ctx.x_dtype
        n = ctx.needs_input_grad
        need_scale_grad = n[4] or n[5]
        grads: list[Tensor | None] = [None] * 9
        with _autocast_off(grad_out.device.type):
            # a = gamma / sqrt(var + eps), as bn_scale computes it, keeping 1 / sqrt(var + eps)
            # for dJ/dgamma: two kernels fewer per pair (they count at small batch on GPU).
            var_eps = cast(running_var, dtype) + eps
            inv_std = torch.rsqrt(var_eps)
            scale = inv_std * cast(gamma, dtype) if gamma is not None else inv_std
            grad_out = cast(grad_out, x_dtype)
            if _scale_feature_map(spec, grad_out.numel(), weight, dtype, x_dtype):
                grads[0], gw, gw_f, gb_f = _backward_scaling_grad(
                    ctx, grad_out, x, weight, scale, need_scale_grad
                )
            else:
                grads[0], gw, gw_f, gb_f = _backward_refolding(
                    ctx, grad_out, x, weight, scale, need_scale_grad
                )
            # Here gb_f = dJ/db' and either gw_f = dJ/dw' or gw = dJ/dw = a * dJ/dw'.
            if need_scale_grad:
                mean = cast(running_mean, dtype)
                g_w = gw_f if gw_f is not None else gw
                w = cast(weight, dtype)
                product = None
                if g_w.numel() > _SMALL_WEIGHT and g_w.is_contiguous() and g_w.dtype == w.dtype:
                    product = _scratch(g_w.shape, g_w)
                g_scale = per_channel_dot(g_w, w, spec.transposed, spec.groups, out=product)
                if gw_f is None:
                    # sum(dJ/dw' * w) = sum(dJ/dw * w) / a: _can_divide said a allows it.
                    g_scale = g_scale / scale
                # g_scale += gb_f * (b - mu), one fused kernel
                if bias is None:
                    g_scale = torch.addcmul(g_scale, gb_f, mean, value=-1)
                else:
                    g_scale = torch.addcmul(g_scale, gb_f, cast(bias, dtype) - mean)
                if n[4]:
                    grads[4] = cast(-0.5 * g_scale * scale / var_eps, running_var.dtype)
                if n[5]:
                    grads[5] = cast(g_scale * inv_std, gamma.dtype)
            if n[1]:
                if gw is None:
                    if torch.is_grad_enabled() or spec.transposed:
                        gw = scale_weight(gw_f, scale, spec.transposed, spec.groups)
                    else:
                        # gw_f is ours alone: scale it in place, one weight-sized buffer fewer.
                        gw = gw_f.mul_(channel_view(scale, gw_f, False, 1))
                grads[1] = cast(gw, weight.dtype)
            if n[2] or n[3]:
                gb_scaled = gb_f * scale
                if n[2]:
                    grads[2] = cast(gb_scaled, bias.dtype)
                if n[3]:
                    grads[3] = cast(-gb_scaled, running_mean.dtype)
            if n[6]:
                grads[6] = cast(gb_f, beta.dtype)
        return tuple(grads)


def _backward_refolding(ctx, grad_out, x, weight, scale, need_scale_grad):
    """Recompute ``w'`` and run Deploy mode's backward with it: ``gx, None, gw_f, gb_f``."""
    spec: OpSpec = ctx.spec
    n = ctx.needs_input_grad
    mask = [n[0], n[1] or need_scale_grad, any(n[1:7])]
    facts = shape_facts(spec, ctx.x_shape, weight)
    w_f = _folded_weight(weight, scale, spec, ctx.dtype, ctx.x_dtype, facts)
    gx, gw_f, gb_f = _op_backward(spec, grad_out, x, ctx.x_shape, w_f, mask)
    del w_f
    gw_f = cast(gw_f, ctx.dtype) if gw_f is not None else None
    gb_f = cast(gb_f, ctx.dtype) if gb_f is not None else None
    return gx, None, gw_f, gb_f


def _backward_scaling_grad(ctx, grad_out, x, weight, scale, need_scale_grad):
    """Scale ``G`` per channel instead of refolding the weight: ``gx, gw, gw_f, gb_f``.

    ``dJ/dx = op^T(G * a, w)`` and ``dJ/dw = a * dJ/dw' = dJ/dw (G * a)``: with the
    scaled ``G``, one call gives both, and the weight is neither refolded nor
    rescaled. ``dJ/da`` needs ``dJ/dw'``: it is ``dJ/dw / a`` when every ``a`` allows
    the division, else a second call with the unscaled ``G`` gives it. Likewise
    ``sum(G)`` is the same call's bias gradient ``sum(G * a)`` divided by ``a``.
    """
    spec: OpSpec = ctx.spec
    n = ctx.needs_input_grad
    want_w = n[1] or need_scale_grad
    want_b = any(n[2:7])
    gx = gw = gw_f = None
    divisible = want_w and (need_scale_grad or want_b) and _can_divide(scale)
    if want_w and (not need_scale_grad or divisible):
        scaled = _scaled_grad(grad_out, scale, spec)
        # The same call's bias slot gives sum(G * a) = a * sum(G), fused with dJ/dw.
        divide = want_b and divisible
        gx, gw, gb_scaled = _op_backward(spec, scaled, x, ctx.x_shape, weight, [n[0], True, divide])
        if divide:
            return gx, gw, None, gb_scaled / scale
    else:
        if n[0]:
            scaled = _scaled_grad(grad_out, scale, spec)
            gx = _op_backward(spec, scaled, x, ctx.x_shape, weight, [True, False, False])[0]
        if want_w:
            gw_f = _op_backward(spec, grad_out, x, ctx.x_shape, weight, [False, True, False])[1]
    gb_f = _reduce_to_channels(grad_out, spec) if want_b else None
    return gx, gw, gw_f, gb_f


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
) -> Tensor:
    """``bn_eval(op(x, weight, bias))`` computed as ``op(x, w', b')``, memory-optimal.

    ``x`` must already be in the dtype the producer computes in (under autocast:
    the autocast dtype); folding happens in at least float32. When no gradient is
    required at all, no autograd node is created.
    """
    grad_mode = torch.is_grad_enabled()
    if not grad_mode or not (
        x.requires_grad
        or weight.requires_grad
        or running_mean.requires_grad
        or running_var.requires_grad
        or (bias is not None and bias.requires_grad)
        or (gamma is not None and gamma.requires_grad)
        or (beta is not None and beta.requires_grad)
    ):
        dtype = fold_dtype(weight, bias, running_mean, running_var, gamma, beta)
        # no_grad also lets the transients use scratch memory (see _scratch).
        with torch.no_grad() if grad_mode else _NO_CONTEXT, _autocast_off(x.device.type):
            return _forward(
                x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, dtype
            )
    return _TuneFunction.apply(
        x, weight, bias, running_mean, running_var, gamma, beta, float(eps), spec
    )
