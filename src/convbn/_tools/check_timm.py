"""``convbn check --timm``: every timm architecture that has a BatchNorm-like module,
converted and checked, one model per fresh process.

For each model (``pretrained=False``, nothing downloaded; 10 classes; input 2 x 3 x 64 x 64,
or the model built for 64-pixel images when it does not run on them as it is):

- ``bn``: its BatchNorm-like modules (``torch.nn.modules.batchnorm._BatchNorm`` instances,
  which timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` are, and any module whose class
  name contains ``FrozenBatchNorm``);
- ``fed``: those fed directly by a producer, found without convbn (:func:`fed_directly`);
- what :func:`convbn.tune` converted and skipped (:func:`convbn.report`);
- the float64 relative error of Tune against Eval (the same model after
  :func:`convbn.restore`), outputs and every parameter gradient, BN statistics randomized;
- the bytes autograd keeps for backward in float32: Eval, Tune, and Deploy
  (:func:`convbn.fuse` of a copy).

Only convbn's public API is used. Results go to ``<out>/check.json`` (written after every
model; ``--resume`` keeps what it holds) and ``<out>/check.md``: the machine's line, one row
per model and a summary.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import re
import resource
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import convbn
from convbn._tools.bench_models import randomize_norms
from convbn._tools.measure import rel_err, saved_bytes
from convbn._tools.modules import formula_norms
from convbn._tools.output import (
    Progress,
    describe_error,
    format_table,
    machine_info,
    machine_line,
    mib,
    write_json,
)
from convbn._tools.process import Worker, WorkerFailed, call_forked

__all__ = [
    "PRODUCERS",
    "is_bn_like",
    "calibrate_norms",
    "fed_directly",
    "timm_names",
    "check_timm_model",
    "run_model",
    "summary",
    "table",
    "sweep",
]

SIZE = 64
BATCH = 2
CLASSES = 10
EXACT = 1e-9  # a model is exact in float64 when Tune's error against Eval is below this,
# or below FLOOR_TIMES Eval's own floor where that floor is below FLOOR_LIMIT (see exact)
FLOOR_TIMES = 10
FLOOR_LIMIT = 1e-6


def _within(err: float, floor: float) -> bool:
    return err < EXACT or (floor < FLOOR_LIMIT and err < FLOOR_TIMES * floor)


def _exact_as_random(record: dict) -> bool:
    """Exact with the random statistics the model was checked with."""
    return _within(float(record["exact_err"]), float(record.get("err_floor", float("inf"))))


def exact(record: dict) -> bool:
    """Tune equals Eval in float64: its error below :data:`EXACT`, or below
    :data:`FLOOR_TIMES` Eval's own floor (see :func:`_tune_against_eval`) when that floor
    is below :data:`FLOOR_LIMIT` (above, the network amplifies rounding so much that the
    comparison says nothing); with the random statistics, or, where those make the network
    chaotic, with statistics measured on the input (``calibrated_err``)."""
    if _exact_as_random(record):
        return True
    return "calibrated_err" in record and _within(
        float(record["calibrated_err"]), float(record.get("calibrated_floor", float("inf")))
    )


def calibrate_norms(model: nn.Module, inputs: tuple) -> nn.Module:
    """Each BN-like module's running statistics set to those of its own input on
    ``inputs``, in one forward (each sees inputs its predecessors already normalise), as
    a trained network's roughly are; its affine parameters are kept."""

    def measure(module, args):
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] == module.running_var.numel():
            dims = [d for d in range(x.dim()) if d != 1]
            with torch.no_grad():
                module.running_mean.copy_(x.mean(dims))
                module.running_var.copy_(x.var(dims, unbiased=False))

    handles = [
        m.register_forward_pre_hook(measure)
        for m in model.modules()
        if is_bn_like(m) and isinstance(getattr(m, "running_var", None), Tensor)
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return model


SWEEP = "timm"  # the kind of sweep check.json holds

# Every Conv1d/2d/3d and ConvTranspose1d/2d/3d (and subclasses), and Linear.
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_RESHAPES = frozenset(
    {torch.flatten, Tensor.flatten, torch.reshape, Tensor.reshape, Tensor.view}
)  # fmt: skip


def is_bn_like(module: nn.Module) -> bool:
    """A ``_BatchNorm`` instance, or a module whose class name contains ``FrozenBatchNorm``."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or (
        "FrozenBatchNorm" in type(module).__name__
    )


# --------------------------------------------------------------------------- fed directly


class _Produced:
    """Tensors output by producer calls (or reshaped from a Linear's output): by ``id``, each
    with the tensor itself (kept alive, so that no other tensor takes its ``id``), its
    version counter when recorded, and whether it comes from a Linear."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[Tensor, int, bool]] = {}

    def add(self, tensor: Tensor, linear: bool) -> None:
        self.by_id[id(tensor)] = (tensor, tensor._version, linear)

    def lookup(self, tensor: Any) -> tuple[Tensor, int, bool] | None:
        """The entry of ``tensor`` when it is that very tensor and unchanged in place since."""
        entry = self.by_id.get(id(tensor))
        if entry is None or entry[0] is not tensor or entry[1] != tensor._version:
            return None
        return entry


class _TrackReshapes(TorchFunctionMode):
    """Records the output of ``flatten``/``reshape``/``view`` of a Linear's output (or of
    such a reshape) as that Linear's output."""

    def __init__(self, produced: _Produced):
        super().__init__()
        self.produced = produced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and args and isinstance(out, Tensor):
            entry = self.produced.lookup(args[0])
            if entry is not None and entry[2]:
                self.produced.add(out, linear=True)
        return out


def fed_directly(model: nn.Module, inputs: tuple) -> tuple[list[str], list[str]]:
    """The BatchNorm-like modules of ``model`` fed directly by a producer, and those called,
    from one forward of ``model(*inputs)`` (no gradients), without convbn.

    A BN-like module is fed directly when, at some call, its input is (the very tensor,
    unchanged in place since) the output of a call of a :data:`PRODUCERS` module
    (subclasses included), or a ``flatten``/``reshape``/``view`` of a Linear's output.
    """
    produced = _Produced()
    fed: set[str] = set()
    called: set[str] = set()
    handles = []

    def producer_hook(linear: bool):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                produced.add(output, linear)

        return hook

    def bn_hook(name: str):
        def hook(module, args, kwargs):
            called.add(name)
            first = args[0] if args else next(iter(kwargs.values()), None)
            if produced.lookup(first) is not None:
                fed.add(name)

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, PRODUCERS):
                linear = isinstance(module, nn.Linear)
                handles.append(module.register_forward_hook(producer_hook(linear)))
            if is_bn_like(module):
                handles.append(module.register_forward_pre_hook(bn_hook(name), with_kwargs=True))
        with torch.no_grad(), _TrackReshapes(produced):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, m in model.named_modules() if is_bn_like(m)]
    return [n for n in order if n in fed], [n for n in order if n in called]


# --------------------------------------------------------------------------- one model


def timm_names(pattern: str | None = None, limit: int | None = None) -> list[str]:
    """``timm.list_models()`` (its names matching the comma-separated shell patterns of
    ``pattern``), at most ``limit`` of them."""
    import timm

    names = timm.list_models()
    if pattern:
        patterns = [p for p in pattern.split(",") if p]
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names[:limit] if limit is not None else names


def _create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def meta_census(name: str) -> dict[str, int] | None:
    """The model's BN-like modules and parameters, counted on a build on the meta device
    (no memory, no initialisation); None when it does not build there."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = _create(name)
    except Exception:
        return None
    return {
        "bn": sum(is_bn_like(m) for m in model.modules()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _inputs(dtype: torch.dtype, size: int) -> tuple[Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(BATCH, 3, size, size, generator=g).to(dtype),)


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_OutOfTime` in this (main) thread after ``seconds``; None: no limit."""
    if not seconds:
        yield
        return

    def alarm(signum, frame):
        raise _OutOfTime(f"out of time: over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or "can't allocate memory" in text
        or ("not enough memory" in text)
        # oneDNN's words when it cannot allocate, in a worker whose memory is limited.
        or ("could not create a primitive" in text and _memory_limited())
    )


def _memory_limited() -> bool:
    return resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY


def _build_and_run(name: str, size: int, record: dict) -> tuple[nn.Module, nn.Module, tuple]:
    """The model built as it is, or for ``size``-pixel images when it does not run on
    them as it is, or as it is at the image size its configuration gives when it runs on
    neither (``record["size"]``), with randomized BN statistics, in eval mode: in float32 and never run
    (some models keep non-leaf tensors after a forward, which ``copy.deepcopy`` refuses),
    and in float64 after one forward on the float64 input (the :func:`fed_directly`
    census); and that input."""
    x64 = _inputs(torch.float64, size)
    attempts: list[tuple[dict, BaseException]] = []
    plan: list[tuple[dict, int]] = [({}, size), ({"img_size": size}, size)]
    for kwargs, side in plan:
        if x64[0].shape[-1] != side:
            x64 = _inputs(torch.float64, side)
        record["stage"] = "build"
        try:
            model = _create(name, **kwargs)
        except Exception as e:
            if _out_of_memory(e) or isinstance(e, _OutOfTime):
                raise
            attempts.append((kwargs, e))
            continue
        record["build_kwargs"] = kwargs
        record["params"] = sum(p.numel() for p in model.parameters())
        record["bn"] = sum(is_bn_like(m) for m in model.modules())
        if not record["bn"]:
            return model, model, x64
        default = _default_side(model)
        if default is not None and default > size and len(plan) == 2:
            # A model that runs only at its own image size (windowed attention, a large
            # final pooling) is checked there when the smaller size fails.
            plan.append(({}, default))
        record["stage"] = f"run at {side}x{side}"
        model = randomize_norms(model).eval()
        m64 = copy.deepcopy(model).double()
        try:
            fed, called = fed_directly(m64, x64)
        except Exception as e:
            if _out_of_memory(e) or isinstance(e, _OutOfTime):
                raise
            attempts.append((kwargs, e))
            model = m64 = None  # freed before the next attempt
            continue
        record["fed"] = len(fed)
        record["fed_names"] = fed
        record["bn_called"] = len(called)
        if side != size:
            record["size"] = side
        return model, m64, x64
    # Every attempt failed: report the first (the model as it is), in its stage.
    kwargs, error = attempts[0]
    record["stage"] = "build" if "bn" not in record else f"run at {size}x{size}"
    record["build_kwargs"] = kwargs
    raise error


def _default_side(model: nn.Module) -> int | None:
    """The image side timm's configuration of ``model`` gives, if any."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shape = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(shape[-1]) if shape else None


def _outputs_and_grads(model: nn.Module, inputs: tuple) -> tuple[list[Tensor], list[Tensor]]:
    model.zero_grad(set_to_none=True)
    outs = [
        t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor) and t.is_floating_point()
    ]
    sum(t.square().mean() for t in outs).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return [t.detach() for t in outs], grads


EXAMPLE_HINT = "pass example_inputs to convbn.tune"


def _tune(model: nn.Module, inputs: tuple, record: dict) -> tuple[nn.Module, tuple | None]:
    """``convbn.tune(model)``; when that raises, ``convbn.tune(model, inputs)`` (the first
    error noted). The example inputs used, or None."""
    try:
        return convbn.tune(model), None
    except Exception as e:
        record["tune_note"] = f"convbn.tune(model) raised {describe_error(e)}; with example_inputs"
    return convbn.tune(model, inputs), inputs


def _tune_against_eval(m64: nn.Module, x64: tuple) -> tuple[float, float, float]:
    """Errors of the converted float64 model's outputs and gradients against Eval's (BN
    written out as its formula; the model is restored), and Eval's own floor: how far it
    moves when its input moves by one rounding step, or when its BatchNorms are torch's
    kernels instead of the formula, whichever is more (a deep model with random
    statistics can amplify rounding far above 1e-9)."""
    out_t, grad_t = _outputs_and_grads(m64, x64)
    convbn.restore(m64)
    out_k, grad_k = _outputs_and_grads(m64, x64)
    formula_norms(m64)
    out_e, grad_e = _outputs_and_grads(m64, x64)
    nudged = tuple(t * (1 + 2**-52) for t in x64)
    out_n, grad_n = _outputs_and_grads(m64, nudged)
    floor = max(
        rel_err(out_n, out_e),
        rel_err(grad_n, grad_e),
        rel_err(out_k, out_e),
        rel_err(grad_k, grad_e),
    )
    return rel_err(out_t, out_e), rel_err(grad_t, grad_e), floor


def reason_kind(reason: str, module_names: list[str]) -> str:
    """A skip reason with the model's module names as ``<m>`` and numbers as ``N``: the
    same kind of reason reads the same in every model."""
    if module_names:
        names = sorted((n for n in module_names if n), key=len, reverse=True)
        pattern = "|".join(re.escape(n) for n in names)
        reason = re.sub(rf"(?<![\w.])(?:{pattern})(?![\w.])", "<m>", reason)
    return re.sub(r"(?<![\w<])\d+(?![\w>])", "N", reason)


def check_timm_model(name: str, size: int = SIZE, timeout: float | None = None) -> dict:
    """Check one timm model; never raises (an error is recorded, with its ``stage``)."""
    record: dict[str, Any] = {"model": name, "stage": "build"}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), _time_limit(timeout):
            warnings.simplefilter("ignore")
            m32, m64, x64 = _build_and_run(name, size, record)
            if not record["bn"]:
                record.pop("stage", None)
                return record
            x32 = tuple(t.float() for t in x64)
            names = [n for n, _ in m64.named_modules()]

            record["stage"] = "convbn.tune"
            m64, example = _tune(m64, x64, record)
            report = convbn.report(m64)
            if example is None and any(EXAMPLE_HINT in r for _, r in report.skipped):
                # What the report asks for: modules torch.fx cannot trace are converted
                # from one recorded forward on example inputs.
                record["tune_note"] = "convbn.tune(model) asked for example_inputs; given"
                m64, example = convbn.tune(convbn.restore(m64), x64), x64
                report = convbn.report(m64)
            converted = list(dict.fromkeys(bn for _, bn in report.converted))
            fed = set(record["fed_names"])
            reasons = dict(report.skipped)
            record.update(
                method=report.method,
                converted_pairs=len(report.converted),
                converted_bns=len(converted),
                fed_converted=len(fed.intersection(converted)),
                fed_not_converted=[
                    [bn, reasons.get(bn, "not in the report")]
                    for bn in record["fed_names"]
                    if bn not in converted
                ],
                converted_not_fed=[bn for bn in converted if bn not in fed],
                skipped=[list(s) for s in report.skipped],
                skip_kinds=[reason_kind(r, names) for _, r in report.skipped],
            )

            record["stage"] = "float64 Tune against Eval"
            err_out, err_grad, floor = _tune_against_eval(m64, x64)
            record.update(err_out=err_out, err_grad=err_grad, err_floor=floor)
            record["exact_err"] = max(err_out, err_grad)
            del m64
            if not exact(record):
                # Random statistics can make a deep network chaotic (its floor shows how
                # much): check again with statistics measured on the input.
                record["stage"] = "float64 Tune against Eval, statistics calibrated"
                m64 = calibrate_norms(copy.deepcopy(m32).double(), x64)
                m64 = convbn.tune(m64, example)
                err_out, err_grad, floor = _tune_against_eval(m64, x64)
                record["calibrated_err"] = max(err_out, err_grad)
                record["calibrated_floor"] = floor
                del m64

            # Copies of the model before any forward of it; Deploy is a converted copy fused.
            record["stage"] = "convbn.tune in float32"
            example32 = x32 if example is not None else None
            tuned = convbn.tune(copy.deepcopy(m32), example32)
            record["stage"] = "convbn.fuse"
            deploy = convbn.fuse(convbn.tune(copy.deepcopy(m32), example32), example32)
            side = x64[0].shape[-1]
            record["stage"] = f"run at {side}x{side} in float32 with gradients"
            record["saved_eval"] = saved_bytes(m32, lambda: m32(*x32))
            record["stage"] = "kept bytes of Tune and Deploy"
            record["saved_tune"] = saved_bytes(tuned, lambda: tuned(*x32))
            record["saved_deploy"] = saved_bytes(deploy, lambda: deploy(*x32))
            record.pop("stage")
    except Exception as e:  # one model's failure is a result, not the end of the sweep
        record["error"] = describe_error(e)
        if isinstance(e, _OutOfTime):
            record["failure"] = "out of time"
        elif _out_of_memory(e):
            record["failure"] = "out of memory"
        elif record.get("stage") == "build":
            record["failure"] = "build"
        elif str(record.get("stage", "")).startswith("run at"):
            record["failure"] = "run"
        else:
            record["failure"] = "convbn"
            record["traceback"] = traceback.format_exc(limit=-8)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


# --------------------------------------------------------------------------- isolation


def worker_check(
    name: str,
    size: int,
    timeout: float | None,
    memory_gib: float | None,
    threads: int | None = None,
) -> dict:
    """:func:`check_timm_model` as run in a fresh worker process: nothing downloaded, and
    the process's data (heap and anonymous mappings) limited to ``memory_gib``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if threads:
        torch.set_num_threads(threads)
    import timm  # noqa: F401  (imported before the model's clock starts)

    if memory_gib:
        limit = int(memory_gib * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return {"record": check_timm_model(name, size, timeout)}


def run_model(
    name: str,
    size: int = SIZE,
    *,
    timeout: float | None = None,
    memory_gib: float | None = None,
    isolate: bool = True,
    threads: int | None = None,
    fork: bool = False,
) -> dict:
    """One model's record: in a fresh worker process (its peak memory recorded; a crash
    or a worker that does not answer within ``timeout`` plus a minute is a failed record),
    or, without ``isolate``, here (no memory limit). ``fork``: the worker is a child forked
    from this process (see :func:`convbn._tools.process.call_forked`), not a new
    interpreter."""
    if not isolate:
        return check_timm_model(name, size, timeout)
    kwargs = {"name": name, "size": size, "timeout": timeout, "memory_gib": memory_gib}
    try:
        if fork:
            out, peak = call_forked(
                "convbn._tools.check_timm:worker_check",
                kwargs | {"threads": threads},
                timeout=timeout + 60 if timeout else None,
            )
            rec = out["record"]
            rec["peak_rss_bytes"] = peak
        else:
            with Worker(threads=threads, timeout=timeout + 60 if timeout else None) as worker:
                rec = worker.call("convbn._tools.check_timm:worker_check", **kwargs)["record"]
                rec["peak_rss_bytes"] = worker.call("convbn._tools.measure:peak_rss_bytes")
    except WorkerFailed as e:
        text = str(e)
        failure = "out of time" if "did not answer" in text else "crash"
        if any(k in text for k in ("MemoryError", "can't allocate memory", "exit status -9")):
            failure = "out of memory"
        return {"model": name, "error": text[:300], "failure": failure}
    return rec


# --------------------------------------------------------------------------- results


def _checked(records: list[dict]) -> list[dict]:
    """Records of models with BN-like modules, or whose BN-like modules are unknown."""
    return [r for r in records if r.get("bn") != 0]


def _group(texts: list[str], limit: int = 8) -> str:
    counts = Counter(texts).most_common()
    shown = [f"{t} ({n})" for t, n in counts[:limit]]
    if len(counts) > limit:
        rest = sum(n for _, n in counts[limit:])
        shown.append(f"{len(counts) - limit} other kinds ({rest})")
    return "; ".join(shown)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def summary(records: list[dict], listed: list[str] | None = None, size: int = SIZE) -> list[str]:
    """The sweep in a few lines: models, failures grouped by reason, BN-like modules fed
    directly by a producer and how many of those were converted, exact models, skip reasons."""
    checked = _checked(records)
    without = len(records) - len(checked)
    failed = [r for r in checked if "error" in r]
    by_kind: dict[str, list[dict]] = {}
    for r in failed:
        by_kind.setdefault(r.get("failure", "crash"), []).append(r)
    of = ""
    if listed is not None:
        swept = len({r["model"] for r in records}.intersection(listed))
        of = f" ({swept} of the {len(listed)} names this run lists)"
    lines = [
        f"Models swept: {len(records)}{of}; {without} without a BatchNorm-like module (not in "
        f"the table), {len(checked)} in the table, {len(checked) - len(failed)} checked "
        f"through, {len(failed)} failed."
    ]
    labels = {
        "build": "failed to build",
        "run": f"did not run at {size}x{size}",
        "out of time": "ran out of time",
        "out of memory": "ran out of memory",
        "crash": "worker crashed",
        "convbn": "convbn raised",
    }
    for kind, label in labels.items():
        group = by_kind.get(kind, [])
        if not group:
            continue
        if kind == "convbn":
            detail = _group([f"{r.get('stage')}: {reason_kind(r['error'], [])}" for r in group])
            lines.append(
                f"{label}: {len(group)} ({', '.join(r['model'] for r in group)}): {detail}"
            )
        else:
            # Numbers as N: errors that differ only by a size or a count are one group.
            errors = [reason_kind(r["error"], []) for r in group]
            lines.append(f"{label}: {len(group)}: {_group(errors)}")
    done = [r for r in checked if "exact_err" in r and "error" not in r]
    bns = sum(r.get("bn", 0) for r in done)
    fed = sum(r.get("fed", 0) for r in done)
    fed_conv = sum(r.get("fed_converted", 0) for r in done)
    converted = sum(r.get("converted_bns", 0) for r in done)
    not_fed = sum(len(r.get("converted_not_fed", [])) for r in done)
    lines.append(
        f"BatchNorm-like modules in the {len(done)} models checked through: {bns}; fed directly "
        f"by a producer: {fed}; of those converted: {fed_conv} ({_pct(fed_conv, fed)}). "
        f"BNs converted in all: {converted} ({not_fed} not fed directly by the census)."
    )
    exact_count = sum(exact(r) for r in done)
    by_floor = sum(_exact_as_random(r) and float(r["exact_err"]) >= EXACT for r in done)
    calibrated = sum(exact(r) and not _exact_as_random(r) for r in done)
    lines.append(
        f"Exact in float64: {exact_count} of {len(done)} models (error against Eval, with "
        f"BatchNorm written out as its formula, below {EXACT:g}, or below {FLOOR_TIMES}x what "
        f"Eval itself moves for one rounding step of its input or with torch's BatchNorm "
        f"kernel for the formula, where that is below {FLOOR_LIMIT:g}: {by_floor} models; "
        f"with BatchNorm statistics measured on the input, "
        f"for deep models that random statistics make chaotic: {calibrated} models)."
    )
    kept = [r for r in done if "saved_deploy" in r]
    lines.append(
        f"Kept bytes: Tune keeps Deploy's in {sum(r['saved_tune'] == r['saved_deploy'] for r in kept)}"
        f" of {len(kept)} models, at most Eval's in "
        f"{sum(r['saved_tune'] <= r['saved_eval'] for r in kept)}."
    )
    kinds = [k for r in done for k in r.get("skip_kinds", [])]
    lines.append(f"Skipped BNs: {len(kinds)}; reasons: {_group(kinds, limit=12) or '-'}.")
    return lines


def _err(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1e}"


def table(records: list[dict], markdown: bool) -> str:
    """One row per model with a BN-like module (or that failed before it could tell)."""
    header = (
        "model", "params M", "BN", "fed", "conv. pairs", "conv. BNs", "fed conv.", "skip.",
        "fp64 err", "Eval floor", "saved MiB Eval / Tune / Deploy", "s", "note",
    )  # fmt: skip
    rows = []
    for r in sorted(_checked(records), key=lambda r: r["model"]):
        if "error" in r:
            note = f"{r.get('failure', '')}: {r['error']}"
        else:
            note = "; ".join(dict.fromkeys(r.get("skip_kinds", [])))
            if r.get("tune_note"):
                note = f"{note}; {r['tune_note']}".strip("; ")
            if "calibrated_err" in r:
                note = (
                    f"statistics calibrated: fp64 err {_err(r['calibrated_err'])}, floor "
                    f"{_err(r.get('calibrated_floor'))}; {note}"
                ).strip("; ")
        saved = " / ".join(mib(r.get(k)) for k in ("saved_eval", "saved_tune", "saved_deploy"))
        rows.append(
            (
                r["model"],
                f"{r['params'] / 1e6:.1f}" if "params" in r else "-",
                r.get("bn", "-"),
                r.get("fed", "-"),
                r.get("converted_pairs", "-"),
                r.get("converted_bns", "-"),
                r.get("fed_converted", "-"),
                len(r["skipped"]) if "skipped" in r else "-",
                _err(r.get("exact_err")),
                _err(r.get("err_floor")),
                saved,
                r.get("seconds", "-"),
                note[:140],
            )
        )
    return format_table(header, rows, markdown=markdown, align="lrrrrrrrrrlrl")


def write_results(
    out: Path, machine: dict, records: list[dict], listed: list[str], size: int
) -> None:
    """``check.json`` (what ``--resume`` reads) and ``check.md``: the machine's line, the
    table in markdown and the summary."""
    payload = {"sweep": SWEEP, "machine": machine, "size": size, "records": records}
    write_json(out / "check.json", payload)
    lines = summary(records, listed, size)
    text = "\n\n".join([machine_line(machine), table(records, True), "\n\n".join(lines)])
    (out / "check.md").write_text(text + "\n")


def _failed(record: dict) -> bool:
    return "error" in record


def sweep(
    out: Path,
    *,
    pattern: str | None = None,
    limit: int | None = None,
    size: int = SIZE,
    timeout: float | None = 600,
    memory_gib: float | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    isolate: bool = True,
    markdown: bool = False,
    command: str = "convbn check --timm",
) -> int:
    """The sweep; 0, or 2 when timm is missing or ``out`` holds another sweep's results."""
    try:
        names = timm_names(pattern, limit)
    except ImportError:
        print("convbn check --timm: timm is not installed (pip install timm)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info("cpu") | {"command": command}
    records: list[dict] = []
    path = out / "check.json"
    if resume and path.exists():
        payload = json.loads(path.read_text())
        if payload.get("sweep") != SWEEP:
            print(f"convbn check --timm: {path} holds no timm sweep", file=sys.stderr)
            return 2
        if payload.get("size") != size:
            print(
                f"convbn check --timm: {path} was swept at size {payload.get('size')}, not {size}",
                file=sys.stderr,
            )
            return 2
        records = payload["records"]
        if retry_failed:
            records = [r for r in records if not _failed(r)]
    done = {r["model"] for r in records}
    progress = Progress(len(names), "convbn check --timm")
    for name in names:
        if name in done:
            progress.step(f"{name}: kept from the earlier run")
            continue
        census = meta_census(name)
        if census is not None and census["bn"] == 0:
            # Counted on the meta device: no process, no memory, no initialisation.
            rec = {"model": name, "bn": 0, "params": census["params"], "counted_on": "meta"}
        else:
            rec = run_model(
                name,
                size,
                timeout=timeout,
                memory_gib=memory_gib,
                isolate=isolate,
                threads=torch.get_num_threads(),
                # The sweep has built models on the meta device only: no thread pool yet.
                fork=hasattr(os, "fork"),
            )
        records.append(rec)
        # Written after every model: an interrupted sweep keeps what it has checked.
        write_results(out, machine, records, names, size)
        if rec.get("bn") == 0:
            status = "no BatchNorm-like module"
        elif "error" in rec:
            status = f"{rec.get('failure')}: {rec['error'][:100]}"
        else:
            status = f"{rec.get('fed_converted')}/{rec.get('fed')} fed BNs converted"
        progress.step(f"{name}: {status} ({rec.get('seconds', 0)} s)")
    progress.close()
    write_results(out, machine, records, names, size)
    print(f"{machine_line(machine)}\n")
    print(table(records, markdown))
    # In markdown, one paragraph per line, as in check.md.
    print("\n" + ("\n\n" if markdown else "\n").join(summary(records, names, size)))
    return 0
