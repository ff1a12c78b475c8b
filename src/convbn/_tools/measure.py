"""Measuring what autograd keeps for backward, and peak memory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["SavedBytes", "saved_bytes", "count_saved", "peak_rss_bytes", "matmul_gflops"]


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside :meth:`count`.

    Deduplicated by storage; tensors that share storage with ``exclude`` (the
    model's parameters and buffers) are left out, as are storages already alive
    before counting started only if they belong to ``exclude``.
    """

    def __init__(self, exclude: list[torch.Tensor] | None = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in (exclude or []) if t.numel() > 0}
        self.storages: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
            return t
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr != 0:
            self.storages[ptr] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def count(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def count_saved(model: nn.Module) -> SavedBytes:
    """A :class:`SavedBytes` that leaves out ``model``'s parameters and buffers."""
    return SavedBytes(list(model.parameters()) + list(model.buffers()))


def saved_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes autograd keeps for backward while ``run()`` executes (model tensors left out)."""
    counter = count_saved(model)
    with counter.count():
        out = run()
    del out
    return counter.total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def matmul_gflops(device: str = "cpu", size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` float32 ``size``-square matrix products on
    ``device``, with this process's threads: how fast the machine computes right now.

    A shared or throttled machine changes speed over a run (one session here measured
    139 GFLOP/s at its start and 55-70 an hour later on the same 2-core VM); taken at a
    benchmark's start and end it tells whether the modes were timed on one machine.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pool, library initialisation
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
