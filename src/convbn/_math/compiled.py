"""Tune mode under ``torch.compile``: the pair as one custom operator with its own backward.

Traced through, the eager autograd function becomes a forward and a backward graph
whose partitioner chooses what to keep between them, and it keeps the folded weight
(and more): measured on ResNet-18, many times eager Tune's bytes. As a custom operator
the forward is opaque, so the compiler can keep only what :func:`_setup_context` saves,
the input and the module's own tensors, exactly as eager Tune; the backward, traced
from :func:`_backward`, recomputes ``w'`` like the eager one. Nothing reads a value on
the host, so CUDA graphs can capture it (``mode="reduce-overhead"``).

Needs ``torch.library.custom_op`` (torch >= 2.4); on older torch the caller falls back
to the plain operators.
"""

# No ``from __future__ import annotations``: custom_op reads the operator's schema from
# the annotations of _tune_pair.
import torch
from torch import Tensor

from convbn._math.folding import cast, fold_dtype, weight_of_rows, weight_rows

__all__ = ["available", "tune_op"]

_bn = torch.ops.aten._native_batch_norm_legit_no_training.default
_bn_backward = torch.ops.aten.native_batch_norm_backward.default
_conv_backward = torch.ops.aten.convolution_backward.default


def available() -> bool:
    return _OP is not None


def _fold_weight(weight, gamma, var, eps, transposed, groups, dtype):
    zeros = var.new_zeros(var.shape, dtype=dtype)
    rows = weight_rows(cast(weight, dtype), transposed, groups)
    w_f, saved_mean, saved_invstd = _bn(rows, gamma, None, zeros, cast(var, dtype), 0.0, eps)
    return rows, zeros, w_f, saved_mean, saved_invstd


def _bias_rows(bias, var, dtype):
    if bias is None:
        return var.new_zeros((1, var.shape[0]), dtype=dtype)
    return cast(bias, dtype).view(1, -1)


def _run(x, w_f, b_f, linear, stride, padding, dilation, transposed, output_padding, groups):
    if linear:
        return torch.nn.functional.linear(x, w_f, b_f)
    return torch.convolution(
        x, w_f, b_f, stride, padding, dilation, transposed, output_padding, groups
    )


def _tune_pair(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    linear: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
) -> Tensor:
    dtype = fold_dtype(weight, bias, mean, var, gamma, beta)
    gamma_f = None if gamma is None else cast(gamma, dtype)
    beta_f = None if beta is None else cast(beta, dtype)
    _, _, w_f, _, _ = _fold_weight(weight, gamma_f, var, eps, transposed, groups, dtype)
    w_f = weight_of_rows(w_f, transposed, groups)
    b_rows = _bias_rows(bias, var, dtype)
    b_f = _bn(b_rows, gamma_f, beta_f, cast(mean, dtype), cast(var, dtype), 0.0, eps)[0].view(-1)
    geometry = (stride, padding, dilation, transposed, output_padding, groups)
    return _run(x, w_f.to(x.dtype), b_f.to(x.dtype), linear, *geometry)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gamma, beta, mean, var, eps, *geometry = inputs
    needs = ctx.needs_input_grad
    weight_side = needs[1] or needs[3]
    ctx.save_for_backward(x if weight_side else None, weight, bias, gamma, mean, var)
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.eps = eps
    ctx.geometry = geometry
    ctx.beta_dtype = None if beta is None else beta.dtype
    ctx.dtype = fold_dtype(weight, bias, mean, var, gamma, beta)


def _backward(ctx, grad):
    x, weight, bias, gamma, mean, var = ctx.saved_tensors
    linear, stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
    need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
    dtype, eps = ctx.dtype, ctx.eps
    gamma_f = None if gamma is None else cast(gamma, dtype)
    mean_f, var_f = cast(mean, dtype), cast(var, dtype)
    rows, zeros, w_f, _, _ = _fold_weight(weight, gamma_f, var, eps, transposed, groups, dtype)
    # Empty saved statistics: the eval-mode backward works from the running ones.
    saved_mean = saved_invstd = zeros[:0]
    w_op = weight_of_rows(w_f, transposed, groups).to(grad.dtype)
    if linear:
        gx = grad.matmul(w_op) if need_x else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw_f = g2.t().matmul(x.reshape(-1, x.shape[-1])) if (need_w or need_gamma) else None
        gb_f = g2.sum(0)
    else:
        if x is None:
            x = grad.new_empty(1).expand(ctx.x_shape)
        out_channels = w_op.shape[1] * groups if transposed else w_op.shape[0]
        conv_args = (stride, padding, dilation, transposed, output_padding, groups)
        mask = [need_x, need_w or need_gamma, True]
        gx, gw_f, gb_f = _conv_backward(grad, x, w_op, [out_channels], *conv_args, mask)
    gb_f = gb_f.to(dtype)
    gw = gb = g_gamma = None
    if need_w or need_gamma:
        gw, g_gamma, _ = _bn_backward(
            weight_rows(gw_f.to(dtype), transposed, groups),
            rows,
            gamma_f,
            zeros,
            var_f,
            saved_mean,
            saved_invstd,
            False,
            eps,
            [need_w, need_gamma, False],
        )
        gw = weight_of_rows(gw, transposed, groups).to(weight.dtype) if need_w else None
    if need_b or need_gamma:
        gb, g_gamma_b, _ = _bn_backward(
            gb_f.view(1, -1),
            _bias_rows(bias, var, dtype),
            gamma_f,
            mean_f,
            var_f,
            saved_mean,
            saved_invstd,
            False,
            eps,
            [need_b, need_gamma, False],
        )
        gb = gb.view(-1).to(bias.dtype) if need_b else None
        if need_gamma:
            g_gamma = (g_gamma + g_gamma_b).to(gamma.dtype)
    g_beta = gb_f.to(ctx.beta_dtype) if need_beta and ctx.beta_dtype is not None else None
    return (gx, gw, gb, g_gamma, g_beta) + (None,) * 10


def _register():
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    op = custom_op("convbn::tune_pair", mutates_args=())(_tune_pair)
    op.register_fake(_tune_pair)
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


_OP = _register()


def tune_op(x, weight, bias, mean, var, gamma, beta, eps, spec) -> Tensor:
    """``bn_eval(op(x, weight, bias))`` as the ``convbn::tune_pair`` operator."""
    return _OP(
        x,
        weight,
        bias,
        gamma,
        beta,
        mean,
        var,
        float(eps),
        spec.linear,
        list(spec.stride),
        list(spec.padding),
        list(spec.dilation),
        spec.transposed,
        list(spec.output_padding),
        spec.groups,
    )
