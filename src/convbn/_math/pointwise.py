"""Pointwise convolutions (every kernel size 1, no padding, one group) as matrix products on the CPU.

A pointwise convolution of a contiguous ``(N, C_in, *S)`` input is, per sample, the
matrix product ``W (C_out, C_in) @ X[n] (C_in, prod(S))``; a stride only subsamples
``X``. On the CPU, torch hands a contiguous (NCHW) float32 convolution to oneDNN,
which reorders the input into its blocked layout, computes, and reorders the output
back; for pointwise convolutions those reorders cost as much as the product itself.
Measured on a 2-core AMD EPYC (AVX2, torch 2.14.1, 2 threads), ResNet-50 shapes at
batch 8, each kernel alone: the 256 -> 64 input gradient at 56x56 took 38-43 ms
against 13-16 ms as a product, the strided 256 -> 512 downsample's input gradient
74-87 ms against 27 ms, the 64 -> 256 forward 36-42 ms against 10-14 ms (inside the
model that forward took about 12 ms either way: the gain there is in backward); at
7x7 the batched product is slower (8.5 against 6.5 ms), so the forward and the input
gradient use it only from ``_MIN_POSITIONS`` output positions per sample. The weight
gradient (a sum of one product per sample) was then taken as products at every size.
Measured again (2026-12-02, same machine, 2 threads, batch 8, each pointwise shape of
ResNet-50, MobileNetV2, RegNetY-400MF and ShuffleNetV2 alone, forward and backward):
below those sizes, where torch computes the input gradient anyway, the per-sample
weight gradient made the pair 1.01-1.17 times slower than one torch call for all three
gradients (25 shapes at 14 x 14 and 7 x 7), so there torch computes them all.
On a 2-core AMD EPYC with AVX-512 (2026-12-02), oneDNN's convolutions are faster and the
products gain less: inside ResNet-50 at batch 8, about 1% of a step (the 64 -> 256 at 56 x 56
most, 111 -> about 95 ms a step for its four; even at 28 x 28), and products only from 56 x 56
changed nothing measurable, so the thresholds stay.

Tune mode owns its pair's kernels, so it can pick these; Deploy mode and the user's
own layers keep torch's. ``CONVBN_CPU_POINTWISE=0`` in the environment turns the
path off (the benchmark's ``tune-conv`` mode does, to show what it contributes).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from convbn._math.compat import eager_plain_cpu

__all__ = ["enabled", "set_enabled", "applies", "sizes_apply", "usable", "forward", "backward"]

# Output positions per sample (the product of the output's spatial sizes) from which the
# forward and the input gradient are computed as products. At 56 x 56 the products won at
# every ResNet-50 shape; at 28 x 28 at all but one (a forward, 1.09x); at 35 x 35
# (Inception) the input gradient lost at 2 shapes of 5 (1.15x, 1.19x); 14 x 14 was even
# and 7 x 7 lost. A strided input gradient won from 14 x 14.
_MIN_POSITIONS = 28 * 28
_MIN_POSITIONS_STRIDED_GRAD = 14 * 14

_ENABLED = os.environ.get("CONVBN_CPU_POINTWISE", "1") != "0"


def enabled() -> bool:
    """Whether the pointwise path is on (``CONVBN_CPU_POINTWISE``, read at import)."""
    return _ENABLED


def set_enabled(value: bool) -> None:
    """Turn the path on or off for this process (tests and the benchmark)."""
    global _ENABLED
    _ENABLED = bool(value)


def applies(spec, weight_shape) -> bool:
    """Whether the producer is a pointwise, unpadded, ungrouped, untransposed convolution
    (what the shapes and the spec decide; :func:`usable` checks the tensors)."""
    return (
        not spec.linear
        and not spec.transposed
        and spec.groups == 1
        and all(k == 1 for k in weight_shape[2:])
        and not any(spec.padding)
    )


def sizes_apply(spec, x_shape) -> tuple[bool, bool]:
    """Whether, for this input shape, :func:`forward` and :func:`backward` compute with
    products rather than hand everything back to torch (for a producer that
    :func:`applies` to)."""
    positions = math.prod(_out_sizes(x_shape, spec.stride))
    strided = any(s != 1 for s in spec.stride)
    backward = positions >= _MIN_POSITIONS or (strided and positions >= _MIN_POSITIONS_STRIDED_GRAD)
    return positions >= _MIN_POSITIONS, backward


def usable(t: Tensor, weight: Tensor) -> bool:
    """Whether the path is on and the producer's input (forward) or output gradient
    (backward) ``t`` and ``weight`` are what it computes with: ``t`` a non-empty
    contiguous float32 CPU tensor (no subclass), outside torch.compile and
    ``torch.jit.trace``, which see torch's own convolution."""
    return (
        _ENABLED
        and t.dtype is torch.float32
        and weight.dtype is torch.float32
        and t.is_contiguous()
        and t.numel() > 0
        and eager_plain_cpu(t)
    )


def _strided(stride) -> tuple[slice, ...]:
    """The index of the positions a pointwise convolution with ``stride`` reads."""
    return (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)


def _subsample(x: Tensor, stride) -> Tensor:
    """``x`` at the positions a pointwise convolution with ``stride`` reads, as ``(N, C, P)``."""
    if any(s != 1 for s in stride):
        x = x[_strided(stride)]
    return x.reshape(x.shape[0], x.shape[1], -1)


def _out_sizes(x_shape, stride) -> list[int]:
    return [(size - 1) // s + 1 for size, s in zip(x_shape[2:], stride)]


def forward(spec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The convolution's output, for an input shape where :func:`sizes_apply` says so."""
    n = x.shape[0]
    w = weight.reshape(weight.shape[0], weight.shape[1])
    # Written into the output's own storage: an autograd Function must not return a view.
    out = x.new_empty([n, w.shape[0]] + _out_sizes(x.shape, spec.stride))
    flat = out.view(n, w.shape[0], -1)
    torch.bmm(w.expand(n, -1, -1), _subsample(x, spec.stride), out=flat)
    if bias is not None:
        flat.add_(bias.view(1, -1, 1))
    return out


def backward(
    spec, grad_out: Tensor, x: Tensor | None, x_shape, weight: Tensor, mask
) -> tuple[list[Tensor | None], list[bool]]:
    """The gradients in ``mask`` computed here, and the mask of those left to torch, for
    an input shape where :func:`sizes_apply` says so (below it one torch call computes
    every gradient: see the module's docstring).

    ``grad_out`` must be contiguous (:func:`usable` checks it).
    """
    grads: list[Tensor | None] = [None, None, None]
    rest = list(mask)
    n, c_out = grad_out.shape[0], grad_out.shape[1]
    g = grad_out.view(n, c_out, -1)
    strided = any(s != 1 for s in spec.stride)
    w = weight.reshape(weight.shape[0], weight.shape[1])
    if mask[0]:
        gx = torch.bmm(w.t().expand(n, -1, -1), g)
        if strided:
            full = gx.new_zeros(x_shape)
            full[_strided(spec.stride)] = gx.view(
                [n, w.shape[1]] + _out_sizes(x_shape, spec.stride)
            )
            gx = full
        else:
            gx = gx.view(x_shape)
        grads[0], rest[0] = gx, False
    if mask[1] and x is not None:
        xs = _subsample(x, spec.stride)
        # sum_n G[n] @ X[n]^T, accumulated in place: no (N, C_out, C_in) intermediate.
        gw = torch.mm(g[0], xs[0].t())
        for i in range(1, n):
            gw.addmm_(g[i], xs[i].t())
        grads[1], rest[1] = gw.view(weight.shape), False
    if mask[2]:
        grads[2], rest[2] = g.sum((0, 2)), False
    return grads, rest
