"""Tensor-level Tune mode: fold a pair, or run it, without converting a model.

>>> import torch, convbn
>>> conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval()
>>> x = torch.randn(2, 3, 16, 16)
>>> torch.allclose(convbn.functional.tune_forward(x, conv, bn), bn(conv(x)), atol=1e-5)
True
"""

from __future__ import annotations

from torch import Tensor, nn

from convbn._blocks.block import fold_pair, tune_pair
from convbn._math.folding import fold_tensors

__all__ = ["fold", "tune_forward", "fold_tensors"]


def fold(producer: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The Deploy-mode weight and bias of ``bn(producer(.))``.

    Args:
        producer: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``.
        bn: a BatchNorm (any ``_BatchNorm``, ``SyncBatchNorm``, ``FrozenBatchNorm2d``, or
            a module with ``running_mean``, ``running_var``, ``eps`` and optional
            ``weight``/``bias``) that normalises with its running statistics.

    Returns:
        ``(weight, bias)`` in the producer's weight layout and dtype (folded in at
        least float32); ``bias`` always exists. Differentiable with respect to the
        producer's and the BN's tensors.

    Raises:
        ValueError: the BN is in training mode or has no running statistics, the
            producer is unsupported, or the channel counts differ.
    """
    return fold_pair(producer, bn)


def tune_forward(
    x: Tensor, producer: nn.Module, bn: nn.Module, output_size: list[int] | None = None
) -> Tensor:
    """What ``bn(producer(x))`` returns with ``bn`` in eval mode, computed in Tune mode.

    One convolution with the folded weight; autograd keeps only what Deploy mode
    keeps (the input, and nothing weight-sized: the folded weight is recomputed in
    backward). Gradients to ``x``, the producer's weight and bias and the BN's
    weight and bias equal Eval mode's. Under autocast the producer computes in the
    autocast dtype; folding is done in float32. ``output_size`` is passed on to a
    ConvTranspose producer, as in its forward.

    Raises:
        ValueError: as :func:`fold`, or when ``x`` is not a batched input of the
            producer's rank.
    """
    return tune_pair(producer, bn, x, output_size)
