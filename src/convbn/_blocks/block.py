"""One producer -> BatchNorm pair in Tune and Deploy mode, module-level entry points."""

from __future__ import annotations

from torch import Tensor, nn

from convbn._blocks.norms import norm_problem, norm_stats
from convbn._blocks.producers import (
    compute_dtype,
    input_rank,
    is_producer,
    out_channels,
    prepare,
    producer_problem,
)
from convbn._math.folding import fold_tensors
from convbn._math.tune_autograd import tune_apply

__all__ = ["check_pair", "device_problem", "fold_pair", "tune_pair"]


def device_problem(producer: nn.Module, bn: nn.Module) -> str | None:
    """Why the pair cannot run together: tensors on different devices (as Eval would fail)."""
    device = producer.weight.device
    if bn.running_var.device != device:
        return (
            f"{type(producer).__name__} is on {device} but {type(bn).__name__} is on "
            f"{bn.running_var.device}"
        )
    return None


def check_pair(producer: nn.Module, bn: nn.Module) -> None:
    """ValueError unless ``producer`` is a supported producer whose channels match ``bn``."""
    if not is_producer(producer):
        raise ValueError(
            f"{type(producer).__name__} is not a supported producer "
            "(ConvNd, ConvTransposeNd or Linear)"
        )
    problem = producer_problem(producer) or norm_problem(bn)
    if problem is not None:
        raise ValueError(problem)
    stats = norm_stats(bn)
    problem = device_problem(producer, bn)
    if problem is not None:
        raise ValueError(problem)
    channels = out_channels(producer)
    if stats.running_mean.numel() != channels:
        raise ValueError(
            f"{type(bn).__name__} has {stats.running_mean.numel()} channels but "
            f"{type(producer).__name__} produces {channels}"
        )


def fold_pair(producer: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Deploy-mode ``(weight, bias)`` of the pair in the producer's dtype and layout."""
    check_pair(producer, bn)
    stats = norm_stats(bn)
    transposed = bool(getattr(producer, "transposed", False))
    weight, bias = fold_tensors(
        producer.weight,
        producer.bias,
        stats.running_mean,
        stats.running_var,
        stats.eps,
        stats.weight,
        stats.bias,
        transposed=transposed,
        groups=getattr(producer, "groups", 1),
    )
    return weight.to(producer.weight.dtype), bias.to(producer.weight.dtype)


def tune_pair(
    producer: nn.Module, bn: nn.Module, x: Tensor, output_size: list[int] | None = None
) -> Tensor:
    """``bn(producer(x))`` with ``bn`` in eval mode, computed in Tune mode."""
    check_pair(producer, bn)
    if x.dim() != input_rank(producer):
        raise ValueError(
            f"Tune mode needs a batched input of rank {input_rank(producer)} for "
            f"{type(producer).__name__} -> {type(bn).__name__}, got shape {tuple(x.shape)}"
        )
    check_dim = getattr(bn, "_check_input_dim", None)
    if check_dim is not None:
        check_dim(x)
    return _run(producer, bn, x, output_size)


def _run(
    producer: nn.Module, bn: nn.Module, x: Tensor, output_size=None, cache: dict | None = None
) -> Tensor:
    """Tune mode's forward of the pair. ``cache``: the converted pair's own dict, given
    once its BN was seen to use running statistics (see ``prepare``)."""
    stats = norm_stats(bn, checked=cache is not None)
    dtype = compute_dtype(x)
    x, spec = prepare(producer, x, output_size, cache)
    if x.dtype != dtype:
        x = x.to(dtype)
    return tune_apply(
        x,
        producer.weight,
        producer.bias,
        stats.running_mean,
        stats.running_var,
        stats.weight,
        stats.bias,
        stats.eps,
        spec,
    )
