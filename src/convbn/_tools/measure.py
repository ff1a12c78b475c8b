"""What the tools measure: bytes autograd keeps for backward, process memory, relative
error, and the machine's speed. Every tool reads these from here."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SavedBytes",
    "saved_bytes",
    "count_saved",
    "current_rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "PeakMemory",
    "rel_err",
    "matmul_gflops",
]


class _Held:
    """What the pack hook gives autograd to keep: alive exactly as long as the saved
    tensor is kept for backward. It holds the tensor detached: a node that saves its own
    output would otherwise keep itself alive through it, after its graph is dropped
    (backward reads the values; a graph of the backward, for double backward, is not
    made from tensors counted here)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()


class SavedBytes:
    """Bytes of the tensors autograd keeps for backward, saved inside :meth:`count` and
    still kept when it ends.

    Deduplicated by storage; tensors that share storage with ``exclude`` (the model's
    parameters and buffers) are left out. A tensor saved by a node that autograd has
    already dropped (a branch whose output nobody used) is not kept, and is not counted:
    its memory may already hold a later tensor, which the count would otherwise merge
    with it.
    """

    def __init__(self, exclude: list[torch.Tensor] | None = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in (exclude or []) if t.numel() > 0}
        self._held: list[weakref.ref] = []
        self.storages: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> object:
        held = _Held(t)
        self._held.append(weakref.ref(held))
        return held

    def _snapshot(self) -> None:
        for ref in self._held:
            held = ref()
            if held is None:
                continue
            try:
                storage = held.tensor.untyped_storage()
            except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
                continue
            ptr = storage.data_ptr()
            if ptr not in self._exclude and ptr != 0:
                self.storages[ptr] = storage.nbytes()
        self._held.clear()

    @contextlib.contextmanager
    def count(self) -> Iterator[SavedBytes]:
        """Count what the code inside saves and what autograd still keeps of it at the
        end (keep the outputs alive until then)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            try:
                yield self
            finally:
                self._snapshot()


def _unpack(held: _Held) -> torch.Tensor:
    return held.tensor


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


# --------------------------------------------------------------------------- process memory


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in KiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes: since the last
    :func:`reset_peak_rss` that worked, otherwise over the process's life."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (the peak where it cannot be read)."""
    kib = _status_kib("VmRSS")
    return peak_rss_bytes() if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above a baseline taken at construction.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at the baseline.
    CPU: peak RSS minus RSS at the baseline; the peak mark is reset at the baseline
    when the kernel allows it, otherwise the process's lifetime peak is used (which can
    only overstate). ``method`` says which.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
        else:
            reset = reset_peak_rss()
            self.base = current_rss_bytes()
            self.method = "peak RSS after reset" if reset else "peak RSS over the process's life"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return peak_rss_bytes() - self.base


# --------------------------------------------------------------------------- error


def rel_err(got: Tensor | Sequence[Tensor], ref: Tensor | Sequence[Tensor]) -> float:
    """How far ``got`` is from ``ref``: ``max|got - ref| / max|ref|`` over every element (of
    every tensor, when given sequences of tensors paired in order), in float64.

    ``max|got - ref|`` when ``ref`` is all zero; ``inf`` when the shapes or the counts of
    tensors differ, or ``got`` is not finite where ``ref`` is; 0 for empty tensors.
    """
    pairs = [(got, ref)] if isinstance(ref, Tensor) else list(zip(got, ref))
    if not isinstance(ref, Tensor) and len(got) != len(ref):
        return math.inf
    diff = scale = 0.0
    for a, b in pairs:
        if not isinstance(a, Tensor) or a.shape != b.shape:
            return math.inf
        if b.numel() == 0:
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        d = (a - b).abs().max().item()
        if math.isnan(d):
            return math.inf
        diff, scale = max(diff, d), max(scale, b.abs().max().item())
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------- speed


def matmul_gflops(device: str = "cpu", size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` float32 ``size``-square matrix products on
    ``device``, with this process's threads: how fast the machine computes right now.

    A shared or throttled machine changes speed over a run; taken at a benchmark's start
    and end it tells whether the modes were timed on one machine.
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
