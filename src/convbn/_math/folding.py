"""The folding arithmetic of a producer -> BatchNorm pair, written once.

Deploy export (``convbn.fuse``), the public ``convbn.functional.fold_tensors`` and Tune's
plain-operator path compute ``w' = w * a`` and ``b' = (b - mu) * a + beta`` here, with
``a = gamma / sqrt(var + eps)`` per output channel (docs/method.md). Tune's own path does
the same arithmetic with BatchNorm's eval kernel (``tune_autograd``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cast",
    "fold_dtype",
    "bn_scale",
    "channel_view",
    "scale_weight",
    "fold_tensors",
    "weight_rows",
    "weight_of_rows",
]


def fold_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype folding is done in: float64 if any input is float64, else float32.

    Folding in half precision loses the small running variances that real
    pre-trained models contain, so it never happens below float32.
    """
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would do nothing (this is a hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def bn_scale(running_var: Tensor, eps: float, gamma: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``a = gamma / sqrt(var + eps)`` (``1 / sqrt(var + eps)`` without gamma), shape ``(C,)``."""
    scale = torch.rsqrt(cast(running_var, dtype) + eps)
    if gamma is not None:
        scale = scale * cast(gamma, dtype)
    return scale


def channel_view(per_channel: Tensor, weight: Tensor, transposed: bool, groups: int) -> Tensor:
    """Reshape a per-output-channel vector so that it broadcasts against ``weight``.

    Convolution and Linear weights are laid out ``(C_out, ...)``. Transposed
    convolution weights are ``(C_in, C_out // groups, *k)``: output channel
    ``g * (C_out // groups) + j`` lives in rows of group ``g``, column ``j``, so the
    vector is returned with shape ``(groups, 1, C_out // groups, 1, ...)`` and the
    weight must be viewed as ``(groups, C_in // groups, C_out // groups, *k)``.
    """
    if not transposed:
        return per_channel.view((-1,) + (1,) * (weight.dim() - 1))
    out_per_group = weight.shape[1]
    return per_channel.reshape((groups, 1, out_per_group) + (1,) * (weight.dim() - 2))


def _grouped(weight: Tensor, transposed: bool, groups: int) -> Tensor:
    if not transposed:
        return weight
    return weight.reshape((groups, weight.shape[0] // groups) + tuple(weight.shape[1:]))


def scale_weight(weight: Tensor, scale: Tensor, transposed: bool, groups: int) -> Tensor:
    """``weight * scale`` per output channel, in ``weight``'s own layout."""
    grouped = _grouped(weight, transposed, groups)
    scaled = grouped * channel_view(scale, weight, transposed, groups)
    return scaled.reshape(weight.shape) if transposed else scaled


def fold_tensors(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold a frozen BatchNorm into the producer that feeds it.

    Args:
        weight: the producer's weight, ``(C_out, C_in/groups, *k)`` for ConvNd and
            Linear, ``(C_in, C_out/groups, *k)`` for ConvTransposeNd (``transposed=True``).
        bias: the producer's bias ``(C_out,)`` or None.
        running_mean, running_var, eps, gamma, beta: the BatchNorm's statistics and
            affine parameters (``gamma``/``beta`` None when ``affine=False``).
        dtype: the arithmetic's dtype; default :func:`fold_dtype` of the inputs.

    Returns:
        ``(w', b')`` in ``dtype``, ``w'`` in ``weight``'s layout, such that the producer
        with ``w', b'`` computes ``bn(producer(x))`` with the BN in eval mode.
        Differentiable with respect to every tensor argument.
    """
    if dtype is None:
        dtype = fold_dtype(weight, bias, running_mean, running_var, gamma, beta)
    scale = bn_scale(running_var, eps, gamma, dtype)
    folded_weight = scale_weight(cast(weight, dtype), scale, transposed, groups)
    return folded_weight, fold_bias(bias, running_mean, scale, beta, dtype)


def fold_bias(
    bias: Tensor | None,
    running_mean: Tensor,
    scale: Tensor,
    beta: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """``b' = (b - mu) * a + beta``, with absent ``b``/``beta`` taken as zero."""
    mean = cast(running_mean, dtype)
    if bias is None:
        if beta is None:
            return (mean * scale).neg()
        return torch.addcmul(cast(beta, dtype), mean, scale, value=-1)
    shift = cast(bias, dtype) - mean
    if beta is None:
        return shift * scale
    return torch.addcmul(cast(beta, dtype), shift, scale)


def weight_rows(weight: Tensor, transposed: bool, groups: int) -> Tensor:
    """``weight`` laid out as BatchNorm's input ``(N, C_out, ...)``: output channel in dim 1.

    A view for convolutions and linear maps (``(1, C_out, ...)``) and for ungrouped
    transposed convolutions (their weight is ``(C_in, C_out, *k)`` already); a copy for
    grouped transposed ones, whose output channels are spread over the groups' rows.
    """
    if not transposed:
        return weight.unsqueeze(0)
    if groups == 1:
        return weight
    return weight.unflatten(0, (groups, -1)).transpose(0, 1).flatten(1, 2)


def weight_of_rows(rows: Tensor, transposed: bool, groups: int) -> Tensor:
    """The inverse of :func:`weight_rows`: a tensor in the weight's own layout."""
    if not transposed:
        return rows[0]
    if groups == 1:
        return rows
    return rows.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)
