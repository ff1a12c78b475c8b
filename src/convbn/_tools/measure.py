"""Measuring what autograd keeps for backward, and peak memory."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["SavedBytes", "saved_bytes", "count_saved", "peak_rss_bytes"]


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
