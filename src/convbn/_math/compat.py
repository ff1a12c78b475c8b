"""Autocast, compiler, tracer and transform queries across the supported torch versions (>= 2.3)."""

from __future__ import annotations

import torch

__all__ = [
    "any_autocast",
    "autocast_enabled",
    "autocast_dtype",
    "is_compiling",
    "functorch_active",
    "is_tracing",
]

try:
    torch.is_autocast_enabled("cpu")
    _DEVICE_ARG = True
except TypeError:  # torch < 2.4: one query per device family
    _DEVICE_ARG = False


any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
"""Whether autocast is on for any device (always True on torch without the query)."""


def autocast_enabled(device_type: str) -> bool:
    if _DEVICE_ARG:
        return torch.is_autocast_enabled(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled()
    return device_type == "cuda" and torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def _compiling_query():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    return torch._dynamo.is_compiling


is_compiling = _compiling_query()
"""Whether torch.compile is tracing the running code (the query itself, looked up once:
Tune asks on every pair, forward and backward)."""


# The two queries below run at every pair's call: the builtins themselves, no wrapper.
try:
    functorch_active = torch._C._are_functorch_transforms_active
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running."""
except AttributeError:  # older torch: ask the interpreter stack

    def functorch_active() -> bool:
        return torch._C._functorch.peek_interpreter_stack() is not None


is_tracing = torch._C._is_tracing
"""Whether ``torch.jit.trace`` is recording."""
