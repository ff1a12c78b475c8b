"""Producers: the linear maps whose output a BatchNorm can absorb.

Turns a producer module and its input into the :class:`OpSpec` of layer 1, with
padding modes and asymmetric ``"same"`` padding applied to the input exactly as
the module's own forward applies them. A producer subclass with its own forward is
convertible when that forward, seen on a probe input, ends in one convolution (or
linear map) with the module's own weight whose output it returns, whatever it does to
the input before (timm's ``Conv2dSame`` pads by an amount that depends on the input's
size): Tune mode then computes that call (:data:`CONV_FUNCTIONS`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from convbn._blocks.classes import base_class
from convbn._blocks.probe import trace_forward
from convbn._math.compat import any_autocast, autocast_dtype, autocast_enabled, is_compiling
from convbn._math.tune_autograd import OpSpec

__all__ = [
    "PRODUCER_TYPES",
    "CONV_FUNCTIONS",
    "ConvCall",
    "is_producer",
    "producer_problem",
    "own_forward",
    "out_channels",
    "input_rank",
    "prepare",
    "compute_dtype",
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


def own_forward(module: nn.Module) -> bool:
    """Whether the module's class overrides its producer type's forward."""
    return base_class(module).forward not in _KNOWN_FORWARDS


def producer_problem(module: nn.Module) -> str | None:
    """Why this producer cannot be folded, or None if it can."""
    cls = base_class(module)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not initialised yet; run one forward pass first"
    if getattr(module, "weight", None) is None:
        return "producer has no weight"
    if own_forward(module):
        why = _own_forward_problem(module)
        if why is not None:
            return f"{cls.__name__} overrides forward(); {why}"
    return None


def _own_forward_problem(module: nn.Module) -> str | None:
    """Why a producer's own forward is not "prepare the input, then one call of its
    convolution with its own weight, returned as is", seen on a probe input."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        shape = (2, module.in_features)
    else:
        reach = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation)]
        shape = (1, module.in_channels) + tuple(
            max(r, 4) + 2 * s for r, s in zip(reach, module.stride)
        )
    x = torch.randn(shape, dtype=weight.dtype, device=weight.device)
    try:
        trace = trace_forward(module, x)
    except Exception as e:
        return f"it fails on a probe input ({type(e).__name__})"
    convs = [op for op in trace.ops if op.func in CONV_FUNCTIONS]
    if trace.children:
        return "it calls other modules"
    if len(convs) != 1 or convs[0].out is not trace.output:
        return "it does not return one convolution's output"
    call = CONV_FUNCTIONS[convs[0].func](*convs[0].args, **convs[0].kwargs)
    if call is None or call.weight is not weight:
        return "its convolution does not use its own weight as Tune can compute it"
    if call.bias is not module.bias:
        return "its convolution's bias is not its own"
    for op in trace.ops:
        if op is not convs[0] and any(t is weight for t in trace.tensors_read(op)):
            return "it reads its weight elsewhere"
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
    between calls; the caller empties it whenever the module's attributes are set (a
    converted producer's class does). A transposed convolution given ``output_size``
    keeps it only while the output padding that follows stays the same.
    """
    if is_compiling():
        cache = None  # what torch.compile traces must not depend on it, nor change it
    entry = None if cache is None or output_size is not None else cache.get("entry")
    if entry is not None:
        spec, pad = entry
    else:
        spec, pad = _spec_and_pad(module, x, output_size, cache)
    if pad == 1:
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif pad == 2:
        x = _same_padding(module, x)[0]
    return x, spec


def _spec_and_pad(module: nn.Module, x: Tensor, output_size, cache: dict | None):
    """``(spec, pad)``: the OpSpec, and how the input is padded first (0: by the
    convolution itself, 1: ``F.pad`` with the module's padding mode, 2: "same")."""
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
            if cache is not None and cache.get("sized", (None,))[0] == output_padding:
                return cache["sized"][1], 0
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
    spec = _spec(module, key)
    pad = 0
    if key is not None and not spec.transposed:
        pad = 1 if module.padding_mode != "zeros" else 2 if module.padding == "same" else 0
    if cache is not None:
        if output_size is None:
            cache["entry"] = (spec, pad)
        else:
            cache["sized"] = (key[4], spec)
    return spec, pad


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


class ConvCall(NamedTuple):
    """One call of a convolution function: its input, weight, bias and geometry."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    spec: OpSpec


def _tuple(value, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def _conv_call(n: int):
    def parse(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if isinstance(padding, str):
            if padding != "valid":
                return None  # "same": asymmetric in general, not one symmetric padding
            padding = 0
        return ConvCall(
            input,
            weight,
            bias,
            OpSpec(
                stride=_tuple(stride, n),
                padding=_tuple(padding, n),
                dilation=_tuple(dilation, n),
                output_padding=(0,) * n,
                groups=groups,
            ),
        )

    return parse


def _transposed_call(n: int):
    def parse(
        input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
    ):
        return ConvCall(
            input,
            weight,
            bias,
            OpSpec(
                transposed=True,
                stride=_tuple(stride, n),
                padding=_tuple(padding, n),
                dilation=_tuple(dilation, n),
                output_padding=_tuple(output_padding, n),
                groups=groups,
            ),
        )

    return parse


def _linear_call(input, weight, bias=None):
    return ConvCall(input, weight, bias, OpSpec(linear=True))


# The functions a producer's own forward may end with, and how to read their arguments.
CONV_FUNCTIONS = {
    torch.conv1d: _conv_call(1),
    torch.conv2d: _conv_call(2),
    torch.conv3d: _conv_call(3),
    torch.conv_transpose1d: _transposed_call(1),
    torch.conv_transpose2d: _transposed_call(2),
    torch.conv_transpose3d: _transposed_call(3),
    F.linear: _linear_call,
}


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the producer computes in: the autocast dtype when autocast applies."""
    if not any_autocast():
        return x.dtype
    device_type = x.device.type
    if x.is_floating_point() and autocast_enabled(device_type):
        return autocast_dtype(device_type)
    return x.dtype
