"""Autocast and compiler queries across the supported torch versions (>= 2.3)."""

from __future__ import annotations

import torch

__all__ = ["autocast_enabled", "autocast_dtype", "is_compiling", "eager_plain_cpu"]

try:
    torch.is_autocast_enabled("cpu")
    _DEVICE_ARG = True
except TypeError:  # torch < 2.4: one query per device family
    _DEVICE_ARG = False


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


# Looked up once: Tune asks on every pair, forward and backward.
_IS_COMPILING = _compiling_query()


def is_compiling() -> bool:
    """Whether torch.compile is tracing the running code."""
    return _IS_COMPILING()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_plain_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain CPU tensor (no subclass, whose operations may refuse a
    plain ``out=``) in code that neither torch.compile nor ``torch.jit.trace`` is
    tracing: where Tune may use its own CPU kernels and scratch memory."""
    # t.is_cpu, not t.device.type: the attribute is read without building a device object.
    return type(t) in _PLAIN and t.is_cpu and not _IS_COMPILING() and not torch.jit.is_tracing()
