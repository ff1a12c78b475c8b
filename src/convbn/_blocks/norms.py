"""BatchNorm-like modules: what a producer can absorb.

Candidates: every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
SyncBatchNorm, lazy variants, and subclasses such as timm's ``BatchNormAct2d`` and
``SyncBatchNormAct``), and any class named ``*FrozenBatchNorm*`` with BN's buffers
(torchvision's, detectron2's, timm's ``FrozenBatchNorm2d`` and ``FrozenBatchNormAct2d``).
The stock forwards are known; any other forward is recognised by what it computes
(:func:`norm_tail`): normalising its input with its own statistics in eval mode, then
nothing but a chain of its own children (dropout, activation), which Tune mode runs on
the folded output. :func:`norm_stats` also accepts, for the functional API, any module
exposing ``running_mean``, ``running_var``, ``eps`` and optional ``weight``/``bias``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from convbn._blocks.classes import base_class
from convbn._blocks.probe import probe_copy, trace_forward

__all__ = [
    "NormStats",
    "is_norm",
    "norm_problem",
    "norm_tail",
    "norm_stats",
    "uses_running_stats",
]


def _stock_forwards() -> set:
    forwards = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
    try:
        from torchvision.ops import FrozenBatchNorm2d

        forwards.add(FrozenBatchNorm2d.forward)
    except ImportError:  # torchvision is a dependency, but the core does not need it here
        pass
    return forwards


_STOCK_FORWARDS = _stock_forwards()


class NormStats(NamedTuple):
    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None


def _has_stats(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "running_mean", None), Tensor)
        and isinstance(getattr(module, "running_var", None), Tensor)
        and hasattr(module, "eps")
    )


def is_frozen(module: nn.Module) -> bool:
    """Always normalises with running statistics, whatever ``training`` says."""
    return not isinstance(module, _BatchNorm) and "FrozenBatchNorm" in base_class(module).__name__


def is_norm(module: nn.Module) -> bool:
    """A module convbn may fold into its producer (model-level discovery)."""
    return isinstance(module, _BatchNorm) or (is_frozen(module) and _has_stats(module))


def norm_problem(module: nn.Module) -> str | None:
    """Why this norm can never be folded, whatever its forward does, or None."""
    if isinstance(module, _BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return "BatchNorm without running statistics (track_running_stats=False)"
    elif not _has_stats(module):
        return "no running_mean/running_var/eps"
    return None


def norm_tail(module: nn.Module, rank: int) -> tuple[tuple[str, ...], str | None]:
    """``(tail, problem)``: the children that ``module``'s forward applies, in order, to
    its normalised input, or why its forward is not "normalise, then those children".

    A stock forward has no tail. Any other runs once, in eval mode, on a copy with
    random statistics and a random input of rank ``rank``: what enters its first child
    (or what it returns) must be BatchNorm's eval output, made from its input and its
    own four tensors only, and each child must take the previous one's output, the
    last one's being returned.
    """
    name = base_class(module).__name__
    if base_class(module).forward in _STOCK_FORWARDS and (
        not is_frozen(module) or not any(True for _ in module.children())
    ):
        return (), None
    probe = probe_copy(module)
    probe.eval()
    like = probe.running_mean
    dtype, tolerance = torch.float64, 1e-9
    try:
        probe.to(dtype)
    except (RuntimeError, TypeError):  # a device without float64
        dtype, tolerance = torch.float32, 1e-4
        probe.to(dtype)
    g = torch.Generator().manual_seed(0)
    c = like.numel()
    own = {}
    with torch.no_grad():
        for attr, low, high in (
            ("running_mean", -1.0, 1.0),
            ("running_var", 0.5, 2.0),
            ("weight", 0.5, 2.0),
            ("bias", -1.0, 1.0),
        ):
            t = getattr(probe, attr, None)
            if isinstance(t, Tensor) and t.numel() == c:
                t.copy_(torch.rand(c, generator=g, dtype=dtype) * (high - low) + low)
                own[attr] = t
    x = torch.randn((2, c) + (3,) * (rank - 2), generator=g, dtype=dtype).to(like.device)
    try:
        trace = trace_forward(probe, x)
    except Exception as e:
        return (), f"{name}.forward fails on a probe input ({type(e).__name__})"
    chain = _child_chain(trace)
    if isinstance(chain, str):
        return (), f"{name}.forward {chain}"
    names, normalised = chain
    allowed = {id(t) for t in own.values()}
    stored = {id(t) for t in probe.parameters()} | {id(t) for t in probe.buffers()}
    for op in trace.ops[: trace.ops_before_children]:
        for t in trace.tensors_read(op):
            if id(t) in stored and id(t) not in allowed:
                return (), f"{name}.forward reads tensors other than its statistics"
    reference = torch.batch_norm(
        x,
        own.get("weight"),
        own.get("bias"),
        own["running_mean"],
        own["running_var"],
        False,
        0.0,
        float(probe.eps),
        False,
    )

    def normalises(t) -> bool:
        return (
            isinstance(t, Tensor)
            and t.shape == reference.shape
            and bool(torch.allclose(t, reference, rtol=tolerance, atol=tolerance))
        )

    if not normalises(normalised):
        head = trace.ops[: trace.ops_before_children]
        for i, op in enumerate(head):
            if normalises(op.out):
                after = ", ".join(o.name for o in head[i + 1 :])
                return (), f"{name}.forward applies {after} after normalising (not a child module)"
        return (), f"{name}.forward does not normalise its input as BatchNorm does in eval mode"
    return names, None


def _child_chain(trace) -> tuple[tuple[str, ...], object] | str:
    """The children applied one after the other to one tensor, and that tensor; or why not."""
    after = [op.name for op in trace.ops[trace.ops_before_children :]]
    if after:
        return f"applies {', '.join(after)} after its children"
    if not trace.children:
        return (), trace.output
    previous = None
    for i, (_, child_in, child_out) in enumerate(trace.children):
        if i and child_in is not previous:
            return "does not apply its children one after the other"
        previous = child_out
    if trace.output is not previous:
        return "returns something other than its last child's output"
    return tuple(n for n, _, _ in trace.children), trace.first_child_input


def uses_running_stats(module: nn.Module) -> bool:
    """True when the module normalises with its running statistics right now."""
    if isinstance(module, _BatchNorm):
        # Read from _buffers, where nn.Module keeps them: Module.__getattr__ costs a
        # microsecond or more a call, and this runs at every call of every pair.
        buffers = module._buffers
        if "running_mean" in buffers and "running_var" in buffers:
            return (
                not module.training
                and buffers["running_mean"] is not None
                and buffers["running_var"] is not None
            )
        return not module.training and _has_stats(module)
    if is_frozen(module):
        return True
    return not module.training and _has_stats(module)


def norm_stats(module: nn.Module, checked: bool = False) -> NormStats:
    """The tensors folding needs; a ValueError when the module does not use running statistics.

    ``checked``: the caller has just seen :func:`uses_running_stats` say True.
    """
    if checked:
        # A stock BatchNorm keeps these in its _parameters and _buffers; a
        # parametrization, for one, moves them out, and then the attributes are read.
        # FrozenBatchNorm keeps weight and bias as buffers.
        params, buffers = module._parameters, module._buffers
        owner = params if "weight" in params else buffers
        if (
            "weight" in owner
            and "bias" in owner
            and "running_mean" in buffers
            and "running_var" in buffers
        ):
            return NormStats(
                buffers["running_mean"],
                buffers["running_var"],
                module.eps,
                owner["weight"],
                owner["bias"],
            )
    if not _has_stats(module):
        raise ValueError(
            f"{type(module).__name__} has no running statistics "
            "(running_mean, running_var, eps): it cannot be folded"
        )
    if not uses_running_stats(module):
        raise ValueError(
            f"{type(module).__name__} is in training mode and normalises with batch "
            "statistics: Tune mode needs it in eval mode (call .eval() on it)"
        )
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return NormStats(
        module.running_mean,
        module.running_var,
        float(module.eps),
        weight if isinstance(weight, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )
