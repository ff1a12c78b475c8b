"""One model in one mode, in a worker process of its own for the whole benchmark run.

The parent (``convbn._tools.bench``) starts a :class:`~convbn._tools.process.Worker` per
mode of a model and calls, in it:

- :func:`start` with the fields of a :class:`WorkerSpec`: builds the model (seeded), its
  inputs, puts it in the mode, snapshots its tensors and reads the memory baseline;
  answers the number of converted pairs and a note;
- :func:`steps` ``(n)``: n training steps (forward, backward, SGD with momentum), answered
  with each step's wall time and minor page faults;
- :func:`finish`: the peak memory over all steps, then, when ``check_path`` is set, the
  snapshot is put back and one forward + backward on the check input counts the bytes
  autograd saves (``saved_bytes``) and writes the output and the parameter gradients
  (named as in the Eval model) for the parent's equivalence check; answered with the
  :class:`WorkerResult`.

The parent keeps every mode's worker alive and takes turns between them, so the rounds
interleave without a process start per round.
"""

from __future__ import annotations

import contextlib
import resource
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from convbn._tools.measure import PeakMemory, count_saved
from convbn._tools.output import describe_error

__all__ = ["WorkerSpec", "WorkerResult", "Session", "start", "steps", "finish"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR = 1e-4
MOMENTUM = 0.9


@dataclass
class WorkerSpec:
    model: str
    mode: str
    batch: int
    size: int | None
    check_path: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    threads: int | None = None


@dataclass
class WorkerResult:
    """What ``finish`` answers (the step times went out with each ``steps``)."""

    error: str | None = None
    peak_bytes: int | None = None
    peak_method: str = ""
    saved_bytes: int | None = None
    check_error: str | None = None
    pairs: int | None = None
    threads: int = 0
    note: str = ""


# --------------------------------------------------------------------------- the run


def _to_device(value: Any, device: torch.device, memory_format: torch.memory_format | None):
    if isinstance(value, Tensor):
        value = value.to(device)
        if memory_format is not None and value.dim() in (4, 5):
            value = value.contiguous(memory_format=memory_format)
        return value
    if isinstance(value, dict):
        return {k: _to_device(v, device, None) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, memory_format) for v in value)
    return value


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Session:
    """The model of one (model, mode) and its training step, between commands."""

    def __init__(self, spec: WorkerSpec):
        from convbn._tools.bench_models import Loss, build_model, make_batch, resolve
        from convbn._tools.bench_modes import apply_mode

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        result = self.result = WorkerResult(threads=torch.get_num_threads())
        device = self.device = torch.device(spec.device)
        info = resolve(spec.model, spec.size)
        result.note = info.note
        model = build_model(info, spec.seed)
        args, returns_losses = make_batch(info, spec.batch, spec.seed)
        memory_format = None
        if spec.channels_last:
            memory_format = torch.channels_last_3d if info.kind == "video" else torch.channels_last
        model = model.to(device)
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
        args = _to_device(args, device, memory_format)
        self.loss_fn = Loss(returns_losses, spec.seed)
        # Parameter names of the Eval model, for the gradients of the equivalence check.
        eval_params = {id(p): (name, p) for name, p in model.named_parameters()}
        prepared = self.prepared = apply_mode(model, spec.mode, spec.compile)
        result.pairs = prepared.pairs
        self.grad_names = {
            id(p): eval_params[id(p)][0]
            for p in prepared.model.parameters()
            if id(p) in eval_params and eval_params[id(p)][1] is p
        }
        del eval_params
        module = prepared.module
        self.params = [p for p in prepared.model.parameters() if p.requires_grad]
        self.snapshot = []
        if spec.check_path:
            self.snapshot = [
                (t, t.detach().clone())
                for t in list(prepared.model.parameters()) + list(prepared.model.buffers())
            ]
        autocast = torch.autocast(
            device.type, dtype=DTYPES[spec.dtype], enabled=spec.dtype != "fp32"
        )

        def forward() -> Any:
            with autocast:
                return module(*args)

        self.forward = forward
        self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM)
        self.memory = PeakMemory(device)
        result.peak_method = self.memory.method

    def steps(self, n: int) -> tuple[list[float], list[int]]:
        """``n`` training steps; the wall time and the minor page faults of each.

        A minor page fault is the kernel handing the process a fresh page: on the CPU,
        glibc's malloc gives large freed blocks back to the kernel and takes new ones,
        and every first touch of a new page costs a fault (a few microseconds each).
        """
        times, faults = [], []
        for _ in range(n):
            _sync(self.device)
            before = _minor_faults()
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.forward())
            loss.backward()
            self.optimizer.step()
            del loss
            _sync(self.device)
            times.append(time.perf_counter() - start)
            faults.append(_minor_faults() - before)
        return times, faults

    def finish(self) -> WorkerResult:
        """The peak memory over every step, then the check (when asked for)."""
        result = self.result
        result.peak_bytes = self.memory.peak()
        del self.optimizer
        if self.spec.check_path:
            try:
                result.saved_bytes = _check(
                    self.spec,
                    self.prepared,
                    self.snapshot,
                    self.params,
                    self.grad_names,
                    self.forward,
                    self.loss_fn,
                )
            except Exception as e:
                # The timings stand; only the check is lost.
                traceback.print_exc()
                result.check_error = describe_error(e)
        return result


def _check(spec, prepared, snapshot, params, grad_names, forward, loss_fn) -> int:
    """Saved bytes of one step from the initial weights; writes output and gradients."""
    from convbn._tools.bench_models import flat_output

    with torch.no_grad():
        for t, saved in snapshot:
            t.copy_(saved)
    snapshot.clear()
    for p in params:
        p.grad = None
    counter = count_saved(prepared.model)
    torch.manual_seed(spec.seed + 4)  # dropout masks, detection samplers
    with _no_tf32(), counter.count():
        out = forward()
        loss = loss_fn(out)
    with _no_tf32():
        loss.backward()
    grads = {
        grad_names[id(p)]: p.grad.detach().float().cpu()
        for p in prepared.model.parameters()
        if id(p) in grad_names and p.grad is not None
    }
    torch.save({"out": flat_output(out), "grads": grads}, spec.check_path)
    return counter.total


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off: on CUDA, cuDNN and cuBLAS round fp32 inputs to 10-bit mantissas by
    default, which alone moves gradients by 1e-1 relative between two algorithms: the
    equivalence check compares the modes' arithmetic, not TF32's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_session: Session | None = None


def start(**spec: Any) -> dict[str, Any]:
    """Set up this process's :class:`Session` from the fields of a :class:`WorkerSpec`."""
    global _session
    _session = Session(WorkerSpec(**spec))
    return {"pairs": _session.result.pairs, "note": _session.result.note}


def steps(n: int) -> dict[str, list]:
    """``n`` training steps of the session: each one's wall time and minor page faults."""
    times, faults = _session.steps(int(n))
    return {"times": times, "faults": faults}


def finish() -> dict[str, Any]:
    """The session's :class:`WorkerResult` (peak memory, then the check when asked for)."""
    return asdict(_session.finish())
