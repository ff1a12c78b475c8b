"""One producer -> BatchNorm pair in Tune and Deploy mode, module-level entry points."""

from __future__ import annotations

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convbn._blocks.classes import base_class
from convbn._blocks.norms import norm_problem, norm_stats, uses_running_stats
from convbn._blocks.producers import (
    CONV_FUNCTIONS,
    ConvCall,
    compute_dtype,
    input_rank,
    is_producer,
    out_channels,
    own_forward,
    prepare,
    producer_problem,
)
from convbn._math.compat import any_autocast
from convbn._math.folding import fold_tensors
from convbn._math.tune_autograd import Constants, tune_apply

__all__ = [
    "check_pair",
    "device_problem",
    "fold_pair",
    "tune_pair",
    "run_tune",
    "run_call",
    "run_own_forward",
]


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
    constants = Constants(out_channels(producer))
    if own_forward(producer):
        args = () if output_size is None else (output_size,)
        out, tuned = run_own_forward(producer, bn, x, args, {}, constants)
        if tuned is None:
            raise ValueError(
                f"{type(producer).__name__}.forward did not convolve with its own weight"
            )
        return out
    out = run_tune(producer, bn, x, output_size, constants)
    if out is None:
        raise ValueError(f"{type(bn).__name__} does not use running statistics")
    return out


def run_tune(
    producer: nn.Module,
    bn: nn.Module,
    x: Tensor,
    output_size,
    constants: Constants,
    cache: dict | None = None,
) -> Tensor | None:
    """Tune mode's forward of the pair, or None when the BN has no running statistics
    to use (a BatchNorm whose ``running_mean`` was set to None); the caller has seen it
    in eval mode.

    ``cache``: the converted producer's own dict (see ``prepare``).
    """
    buffers = bn._buffers
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    owner = bn._parameters if "weight" in bn._parameters else buffers
    if mean is None or var is None or "weight" not in owner or "bias" not in owner:
        # Statistics moved out of the module's dicts (a parametrization): the attributes.
        if not uses_running_stats(bn):
            return None
        stats = norm_stats(bn, checked=True)
        mean, var, gamma, beta = stats.running_mean, stats.running_var, stats.weight, stats.bias
    else:
        gamma, beta = owner["weight"], owner["bias"]
    x, spec = prepare(producer, x, output_size, cache)
    if any_autocast():
        dtype = compute_dtype(x)
        if x.dtype is not dtype:
            x = x.to(dtype)
    params = producer._parameters
    weight = params.get("weight")
    if weight is None:  # a parametrization moves them out of _parameters
        weight, bias = producer.weight, producer.bias
    else:
        bias = params.get("bias")
    return tune_apply(x, weight, bias, mean, var, gamma, beta, bn.eps, spec, constants)


class _Intercept(TorchFunctionMode):
    """Computes a producer's own convolution call, inside its own forward, in Tune mode."""

    def __init__(self, producer: nn.Module, bn: nn.Module, constants: Constants):
        super().__init__()
        self.producer = producer
        self.bn = bn
        self.constants = constants
        self.out = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parse = CONV_FUNCTIONS.get(func)
        if parse is not None and self.out is None:
            call = parse(*args, **kwargs)
            if call is not None and call.weight is self.producer.weight:
                self.out = run_call(self.bn, call, self.constants)
                return self.out
        return func(*args, **kwargs)


def run_own_forward(
    producer: nn.Module, bn: nn.Module, x: Tensor, args, kwargs, constants: Constants
) -> tuple[object, Tensor | None]:
    """Run a producer subclass's own forward with its convolution computed in Tune mode.

    Returns the forward's output and the Tune-mode tensor, None when the forward did not
    convolve with its weight this time (its output is then the producer's own). A forward
    that returns anything else than that tensor is an error: its caller would see a
    normalised value where it expects the producer's.
    """
    mode = _Intercept(producer, bn, constants)
    with mode:
        out = base_class(producer).forward(producer, x, *args, **kwargs)
    if mode.out is not None and out is not mode.out:
        raise RuntimeError(
            f"convbn: {type(producer).__name__}.forward returned something other than its "
            "convolution's output, unlike when it was converted; call convbn.restore(model)"
        )
    return out, mode.out


def run_call(bn: nn.Module, call: ConvCall, constants: Constants) -> Tensor:
    """Tune mode's result of one convolution call inside a producer's own forward."""
    stats = norm_stats(bn, checked=True)
    x = call.input
    dtype = compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    return tune_apply(
        x,
        call.weight,
        call.bias,
        stats.running_mean,
        stats.running_var,
        stats.weight,
        stats.bias,
        stats.eps,
        call.spec,
        constants,
    )
