"""``convbn bench``: every mode and existing tool side by side.

Each (model, mode, round) runs in a fresh subprocess (:mod:`convbn._tools.bench_worker`);
rounds are interleaved (round 1: every mode once, round 2: ...), so that a slow
period of the machine hits every mode alike. Round 1 also measures the saved bytes
and writes the output and gradients that the equivalence check compares with Eval's.

Guarantees: an unknown model, mode, dtype or device is refused (exit status 2)
before anything runs; a failure of one (model, mode), exception or crash, is a
record with ``error`` set and loses no other record (exit status 1); results are
rewritten after every model, so an interrupted run keeps what it finished.
Outputs: ``<out>/results.json``, ``<out>/results.csv``, ``<out>/bench.png``, and
``<out>/logs/<model>-<mode>-<round>.log``, the stderr of each failed worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convbn._tools.bench_modes import COMPILED_MODES, DEFAULT_MODES, MODES, unavailable

__all__ = ["main", "Plan", "make_plan", "parse_args"]

DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
ZOOS = ("paper",)
WORKER = "convbn._tools.bench_worker"
# Enough for a compiled detector on two cores; a worker past it counts as failed.
WORKER_TIMEOUT_S = 3600


class _Usage(Exception):
    pass


@dataclass
class Plan:
    """What a ``convbn bench`` invocation will run, after every check passed."""

    models: list[Any]  # ModelInfo
    modes: list[str]
    batch: int
    dtype: str
    device: str
    channels_last: bool
    compile: bool
    rounds: int
    steps: int
    warmup: int
    seed: int
    size: int | None
    threads: int | None
    jobs: int
    out: Path


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convbn bench",
        description="Train steps of torchvision models in every ConvBN mode, side by side: "
        "saved bytes, peak memory, step time, and equivalence with Eval mode. "
        "Default: resnet50, batch 8, 224x224, fp32, CPU, modes train,eval,tune,deploy.",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated: torchvision names, timm:<name>, package.module:callable "
        "(default resnet50 unless --zoo is given)",
    )
    p.add_argument("--zoo", choices=ZOOS, help="a model set: 'paper' (18 models)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side (default 224; inception_v3 299, video 112)",
    )
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 (the latter two by autocast)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile every mode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round (default 1)")
    p.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated: {', '.join(MODES)}"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: torch's)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="workers run at once (default 1; more is faster, but step times and peaks "
        "then disturb each other: for smoke tests)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results/)")
    args = p.parse_args(argv)
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """Check everything the run needs; ``_Usage`` with the message otherwise."""
    modes = list(dict.fromkeys(_csv(args.modes)))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise _Usage(
            f"unknown mode(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(MODES)}"
        )
    if args.dtype not in DTYPES:
        raise _Usage(f"unknown dtype {args.dtype!r}; one of {', '.join(DTYPES)}")
    if args.device not in DEVICES:
        raise _Usage(f"unknown device {args.device!r}; one of {', '.join(DEVICES)}")
    for name in ("batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise _Usage(f"--{name} must be at least 1")
    if args.warmup < 0 or (args.size is not None and args.size < 1):
        raise _Usage("--warmup must be >= 0 and --size >= 1")
    if args.threads is not None and args.threads < 1:
        raise _Usage("--threads must be at least 1")
    if args.jobs < 1:
        raise _Usage("--jobs must be at least 1")
    from convbn._tools.bench_models import PAPER_ZOO, BenchUsageError, resolve

    names = list(PAPER_ZOO) if args.zoo == "paper" else []
    if args.models is not None:
        names += _csv(args.models)
    elif not names:
        names = ["resnet50"]
    names = list(dict.fromkeys(names))
    if not names:
        raise _Usage("no model given")
    try:
        models = [resolve(n, args.size) for n in names]
    except BenchUsageError as e:
        raise _Usage(str(e)) from e
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _Usage("--device cuda: no CUDA device is available")
    return Plan(
        models,
        modes,
        args.batch,
        args.dtype,
        args.device,
        args.channels_last,
        args.compile,
        args.rounds,
        args.steps,
        args.warmup,
        args.seed,
        args.size,
        args.threads,
        args.jobs,
        Path(args.out),
    )


# --------------------------------------------------------------------------- running


class _Progress:
    """A text progress bar on stderr (tqdm when installed)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit="run", file=sys.stderr)
        except ImportError:
            self.bar = None

    def step(self, label: str, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(n)
            return
        filled = int(30 * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.start
        print(
            f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
            f"{elapsed:6.0f}s  {label}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_worker(spec: dict[str, Any], folder: Path, tag: str, log_dir: Path) -> dict[str, Any]:
    """Run one worker; its result, or an ``error`` when it crashed or timed out. The
    stderr of a failed worker is kept in ``log_dir/<tag>.log``."""
    spec_path = folder / f"{tag}.spec.json"
    result_path = Path(spec["result_path"])
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER, str(spec_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    result = None
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    else:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-300:]
        result = {"error": f"worker crashed (exit status {proc.returncode}): {tail}"}
    if result.get("error") or result.get("check_error"):
        # The traceback, for whoever reads the error column.
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{tag}.log").write_text(proc.stderr)
    return result


def _worker_spec(
    plan: Plan, model: str, mode: str, folder: Path, check: Path | None
) -> dict[str, Any]:
    """The :class:`~convbn._tools.bench_worker.WorkerSpec` fields of one run."""
    compiled = mode in COMPILED_MODES or plan.compile
    return {
        "model": model,
        "mode": mode,
        "batch": plan.batch,
        "size": plan.size,
        "result_path": str(folder / f"{mode}.result.json"),
        "check_path": str(check) if check is not None else None,
        "dtype": plan.dtype,
        "device": plan.device,
        "channels_last": plan.channels_last,
        "compile": plan.compile,
        # A second untimed step for compiled code: recompilations happen there.
        "warmup": max(plan.warmup, 2) if compiled else plan.warmup,
        "steps": plan.steps,
        "seed": plan.seed,
        "threads": plan.threads,
    }


def _tag(model: str, mode: str, round_: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return f"{safe}-{mode}-{round_ + 1}"


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def run_plan(plan: Plan, argv: list[str]) -> int:
    """Run every (model, mode, round); write results after each model; 1 if any failed."""
    from convbn._tools.bench_report import (
        Record,
        add_ratios,
        aggregate,
        compare_with_eval,
        format_summary,
        format_table,
        machine_info,
        plot,
        write_results,
    )

    machine = machine_info(plan.device, plan.threads)
    runnable = [m for m in plan.modes if unavailable(m) is None]
    log_dir = plan.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # ours: the failures of an earlier run
    progress = _Progress(len(plan.models) * plan.rounds * len(runnable))
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="convbn-bench-") as tmp:
        folder = Path(tmp)
        for info in plan.models:
            model_records = {
                mode: Record(
                    model=info.name,
                    mode=mode,
                    batch=plan.batch,
                    size=info.size,
                    dtype=plan.dtype,
                    device=plan.device,
                    frames=info.frames,
                    channels_last=plan.channels_last,
                    compiled=plan.compile or mode in COMPILED_MODES,
                    error=unavailable(mode),
                )
                for mode in plan.modes
            }
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in runnable}
            checks = {m: folder / f"{len(records)}-{m}.check.pt" for m in runnable}
            for round_ in range(plan.rounds):
                specs = {}
                for mode in runnable:
                    label = f"{info.name} {mode} round {round_ + 1}"
                    if round_ > 0 and (not results[mode] or results[mode][0].get("error")):
                        progress.step(label + " (skipped: round 1 failed)")
                        continue
                    check = checks[mode] if round_ == 0 else None
                    specs[mode] = _worker_spec(plan, info.name, mode, folder, check)
                with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
                    futures = {
                        pool.submit(
                            _run_worker, spec, folder, _tag(info.name, mode, round_), log_dir
                        ): mode
                        for mode, spec in specs.items()
                    }
                    for future in as_completed(futures):
                        mode = futures[future]
                        results[mode].append(future.result())
                        progress.step(f"{info.name} {mode} round {round_ + 1}")
            for mode in runnable:
                aggregate(model_records[mode], results[mode])
            compare_with_eval(list(model_records.values()), checks)
            for path in checks.values():
                path.unlink(missing_ok=True)
            records += model_records.values()
            add_ratios(records)
            machine["loadavg_end"] = _loadavg()
            write_results(plan.out, machine, records, argv)
    progress.close()
    title = (
        f"convbn bench: batch {plan.batch}, {plan.dtype}, {plan.device}"
        f"{', channels-last' if plan.channels_last else ''}{', compiled' if plan.compile else ''}"
        f" (torch {machine['torch']}, {machine.get('gpu') or machine['cpu']}, "
        f"{machine['torch_threads']} threads)"
    )
    print(format_table(records))
    print(
        f"(load average at start {machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}"
        f" on {machine['cpu_count']} CPUs: other processes slow the steps down)"
    )
    summary = format_summary(records)
    if summary:
        print("\n" + summary)
    if plot(records, plan.out / "bench.png", title):
        print(f"\nwrote {plan.out / 'results.json'}, results.csv, bench.png")
    else:
        print(
            f"\nwrote {plan.out / 'results.json'}, results.csv (matplotlib not installed: no plot)"
        )
    return (
        1 if any(r.error for r in records if not (r.error or "").startswith("unavailable")) else 0
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``convbn bench``: 0 all ran, 1 some run failed, 2 usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a malformed option (2)
        return int(e.code or 0)
    try:
        plan = make_plan(args)
    except _Usage as e:
        print(f"convbn bench: error: {e}", file=sys.stderr)
        return 2
    return run_plan(plan, argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
