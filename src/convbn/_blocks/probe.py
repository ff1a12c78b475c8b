"""What a module's own forward computes, seen on a probe input.

Producer and norm subclasses that override ``forward`` (timm's ``Conv2dSame``, its
norm-and-activation modules, user code like them) are recognised by what they do, not by
their names: their forward runs once on a small random input while a
``TorchFunctionMode`` records every operation it makes outside its children, and
forward hooks record the calls of its children.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["Trace", "trace_forward", "METADATA"]

# Operations that read a tensor's metadata, not its values.
METADATA = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "size",
        "dim",
        "ndim",
        "ndimension",
        "numel",
        "stride",
        "is_contiguous",
        "requires_grad",
        "layout",
        "is_floating_point",
        "is_complex",
        "element_size",
        "is_cuda",
        "get_device",
        "__len__",
        "names",
        "is_leaf",
        "grad_fn",
        "is_sparse",
        "is_quantized",
        "data_ptr",
        "storage_offset",
        "_version",
    }
)


def func_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


@dataclass
class Op:
    func: object
    name: str
    args: tuple
    kwargs: dict
    out: object


@dataclass
class Trace:
    """A forward seen from outside its children: its operations in order (``ops``), the
    calls of its children (``children``: name, input, output), and what it returned.
    ``first_child_input`` is a copy of what the first child was given, taken before an
    in-place child (``ReLU(inplace=True)``) could change it."""

    input: Tensor
    output: object = None
    ops: list[Op] = field(default_factory=list)
    children: list[tuple[str, object, object]] = field(default_factory=list)
    # Index into ``ops`` of the first operation made after the first child call.
    ops_before_children: int = -1
    first_child_input: object = None

    def tensors_read(self, op: Op) -> list[Tensor]:
        return [t for t in tree_flatten((op.args, op.kwargs))[0] if isinstance(t, Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func_name(func)
        if not self.depth and name not in METADATA:
            self.trace.ops.append(Op(func, name, args, kwargs, out))
        return out


def trace_forward(module: nn.Module, x: Tensor, *args) -> Trace:
    """Run ``module(x, *args)`` once, under no_grad, and record what its forward does.

    The module's ``__dict__`` is restored afterwards (a forward that caches values on
    ``self`` leaves nothing behind).
    """
    trace = Trace(x)
    recorder = _Recorder(trace)
    handles = []

    def pre(child_name):
        def hook(_, inputs):
            recorder.depth += 1  # first: the copy below is not the forward's operation
            if recorder.depth == 1 and trace.ops_before_children < 0:
                trace.ops_before_children = len(trace.ops)
                first = inputs[0] if inputs else None
                trace.first_child_input = first.clone() if isinstance(first, Tensor) else first

        return hook

    def post(child_name):
        def hook(_, inputs, output):
            recorder.depth -= 1
            if recorder.depth == 0:
                trace.children.append((child_name, inputs[0] if inputs else None, output))

        return hook

    for name, child in module.named_children():
        handles.append(child.register_forward_pre_hook(pre(name)))
        handles.append(child.register_forward_hook(post(name)))
    saved = dict(module.__dict__)
    try:
        with torch.no_grad(), recorder:
            trace.output = module(x, *args)
    finally:
        for h in handles:
            h.remove()
        module.__dict__.clear()
        module.__dict__.update(saved)
    if trace.ops_before_children < 0:
        trace.ops_before_children = len(trace.ops)
    return trace


def probe_copy(module: nn.Module) -> nn.Module:
    """A deep copy to probe, so that nothing the forward does can touch the model."""
    return copy.deepcopy(module)
