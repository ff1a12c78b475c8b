"""Producers: the linear maps whose output a BatchNorm can absorb.

Turns a producer module and its input into the :class:`OpSpec` of layer 1, with
padding modes and asymmetric ``"same"`` padding applied to the input exactly as
the module's own forward applies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from convbn._blocks.classes import base_class
from convbn._math.compat import autocast_dtype, autocast_enabled
from convbn._math.tune_autograd import OpSpec

__all__ = [
    "PRODUCER_TYPES",
    "is_producer",
    "producer_problem",
    "out_channels",
    "input_rank",
    "prepare",
]

PRODUCER_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_KNOWN_FORWARDS = {cls.forward for cls in PRODUCER_TYPES}


def is_producer(module: nn.Module) -> bool:
    return isinstance(module, PRODUCER_TYPES)


def producer_problem(module: nn.Module) -> str | None:
    """Why this producer cannot be folded, or None if it can."""
    cls = base_class(module)
    if cls.forward not in _KNOWN_FORWARDS:
        return f"{cls.__name__} overrides forward(); its computation is unknown"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not initialised yet; run one forward pass first"
    if module.weight is None:
        return "producer has no weight"
    return None


def out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def input_rank(module: nn.Module) -> int:
    """The rank of a batched input (and output): 2 for Linear+BatchNorm1d, N+2 for ConvNd."""
    if isinstance(module, nn.Linear):
        return 2
    return len(module.kernel_size) + 2


def _same_padding(module: _ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    # ATen pads the larger half on the right when the total is odd; do the same.
    left, pad = [], []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = d * (k - 1)
        left.append(total // 2)
        pad += [0, total - 2 * (total // 2)]
    if any(pad):
        x = F.pad(x, pad)
    return x, tuple(reversed(left))


def prepare(
    module: nn.Module, x: Tensor, output_size: list[int] | None = None
) -> tuple[Tensor, OpSpec]:
    """The producer's input as its convolution sees it, and the convolution's spec."""
    if isinstance(module, nn.Linear):
        return x, OpSpec(linear=True)
    if isinstance(module, _ConvTransposeNd):
        nd = len(module.kernel_size)
        output_padding = module._output_padding(
            x, output_size, module.stride, module.padding, module.kernel_size, nd, module.dilation
        )
        return x, OpSpec(
            transposed=True,
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
            output_padding=tuple(output_padding),
            groups=module.groups,
        )
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * nd
    elif module.padding == "same":
        x, padding = _same_padding(module, x)
    elif module.padding == "valid":
        padding = (0,) * nd
    else:
        padding = tuple(module.padding)
    return x, OpSpec(
        stride=tuple(module.stride),
        padding=padding,
        dilation=tuple(module.dilation),
        output_padding=(0,) * nd,
        groups=module.groups,
    )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the producer computes in: the autocast dtype when autocast applies."""
    device_type = x.device.type
    if x.is_floating_point() and autocast_enabled(device_type):
        return autocast_dtype(device_type)
    return x.dtype
