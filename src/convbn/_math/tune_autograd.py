"""The Tune-mode autograd function: one convolution (or linear map) with a folded
weight that is computed on the fly and never kept for backward.

Forward computes ``w', b'`` from the producer's and the BN's tensors, then one
convolution. Backward recomputes ``w'`` (weight-sized work), calls the same
``convolution_backward`` kernel that Deploy mode's autograd uses, and maps the
gradients of ``w', b'`` back to every tensor that asked for one (PAPER.md):

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
from dataclasses import dataclass

import torch
from torch import Tensor

from convbn._math.compat import autocast_enabled
from convbn._math.folding import (
    cast,
    channel_view,
    fold_dtype,
    fold_tensors,
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


def apply_op(spec: OpSpec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The producer's computation with the given weight and bias."""
    if spec.linear:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.aten.convolution(
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
    if x is None:
        # Only the shape of the input matters for its gradient (as in torch.nn.grad).
        x = grad_out.new_empty(1).expand(x_shape)
    out_channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
    return torch.ops.aten.convolution_backward(
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


@contextlib.contextmanager
def _autocast_off(device_type: str):
    # Entering torch.autocast costs tens of microseconds: only when it is on.
    if autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def _forward(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, dtype):
    w_f, b_f = fold_tensors(
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        gamma,
        beta,
        transposed=spec.transposed,
        groups=spec.groups,
        dtype=dtype,
    )
    return apply_op(spec, x, cast(w_f, x.dtype), cast(b_f, x.dtype))


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
        mask = [n[0], n[1] or need_scale_grad, any(n[1:7])]
        grads: list[Tensor | None] = [None] * 9
        with _autocast_off(grad_out.device.type):
            # a = gamma / sqrt(var + eps), as bn_scale computes it, keeping 1 / sqrt(var + eps)
            # for dJ/dgamma: two kernels fewer per pair (they count at small batch on GPU).
            var_eps = cast(running_var, dtype) + eps
            inv_std = torch.rsqrt(var_eps)
            scale = inv_std * cast(gamma, dtype) if gamma is not None else inv_std
            w_f = cast(
                scale_weight(cast(weight, dtype), scale, spec.transposed, spec.groups), x_dtype
            )
            gx, gw_f, gb_f = _op_backward(spec, cast(grad_out, x_dtype), x, ctx.x_shape, w_f, mask)
            del w_f
            grads[0] = gx
            if gw_f is not None:
                gw_f = cast(gw_f, dtype)
            if gb_f is not None:
                gb_f = cast(gb_f, dtype)
            if need_scale_grad:
                mean = cast(running_mean, dtype)
                g_scale = per_channel_dot(gw_f, cast(weight, dtype), spec.transposed, spec.groups)
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
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad
        for t in (x, weight, bias, running_mean, running_var, gamma, beta)
    ):
        dtype = fold_dtype(weight, bias, running_mean, running_var, gamma, beta)
        with torch.no_grad(), _autocast_off(x.device.type):
            return _forward(
                x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, dtype
            )
    return _TuneFunction.apply(
        x, weight, bias, running_mean, running_var, gamma, beta, float(eps), spec
    )
