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
from convbn._math.compat import autocast_dtype, autocast_enabled, is_compiling
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


def _same_padding(module: _ConvNd, x: Tensor | None) -> tuple[Tensor | None, tuple[int, ...]]:
    # ATen pads the larger half on the right when the total is odd; do the same.
    left, pad = [], []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = d * (k - 1)
        left.append(total // 2)
        pad += [0, total - 2 * (total // 2)]
    if x is not None and any(pad):
        x = F.pad(x, pad)
    return x, tuple(reversed(left))


def prepare(
    module: nn.Module,
    x: Tensor,
    output_size: list[int] | None = None,
    cache: dict | None = None,
) -> tuple[Tensor, OpSpec]:
    """The producer's input as its convolution sees it, and the convolution's spec.

    ``cache``: a dict owned by the caller (one per producer) that keeps the spec
    between calls, so that its shape facts (``tune_autograd.shape_facts``) are
    worked out once; it is used only while the module's settings stay the same.
    """
    if isinstance(module, nn.Linear):
        key = None
    elif isinstance(module, _ConvTransposeNd):
        output_padding = module.output_padding
        if output_size is not None:
            output_padding = module._output_padding(
                x,
                output_size,
                module.stride,
                module.padding,
                module.kernel_size,
                len(module.kernel_size),
                module.dilation,
            )
        key = (module.stride, module.padding, module.dilation, module.groups, output_padding)
    else:
        key = (
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
            module.kernel_size,
        )
    if is_compiling():
        cache = None  # what torch.compile traces must not depend on it, nor change it
    spec = None
    if cache is not None and cache.get("key", _NONE) == key:
        spec = cache["spec"]
    if spec is None:
        spec = _spec(module, key)
        if cache is not None:
            cache["key"], cache["spec"] = key, spec
    if key is not None and not spec.transposed:
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        elif module.padding == "same":
            x = _same_padding(module, x)[0]
    return x, spec


_NONE = object()


def _spec(module: nn.Module, key) -> OpSpec:
    if key is None:
        return OpSpec(linear=True)
    nd = len(module.kernel_size)
    if isinstance(module, _ConvTransposeNd):
        return OpSpec(
            transposed=True,
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
            output_padding=tuple(key[4]),
            groups=module.groups,
        )
    if module.padding_mode != "zeros" or module.padding == "valid":
        padding = (0,) * nd
    elif module.padding == "same":
        padding = _same_padding(module, None)[1]
    else:
        padding = tuple(module.padding)
    return OpSpec(
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
