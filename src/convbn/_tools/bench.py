"""``convbn bench``: every mode and existing tool side by side.

Each (model, mode) runs in a fresh subprocess (:mod:`convbn._tools.bench_worker`)
that lives for the whole model: all of a model's modes are set up at once, then
take turns, one at a time, under this process's direction: the warm-up steps,
then the rounds (round 1: every mode once, round 2: ...; each round starts one
mode further along, so that no mode always follows the same one), so that a slow
period of the machine hits every mode alike. At the end each worker reports its
peak memory and, from the initial weights, the saved bytes and the output and
gradients that the equivalence check compares with Eval's. While one mode steps,
the others wait, holding their model in memory (on CUDA, their cached blocks too).

Guarantees: an unknown model, mode, dtype or device is refused (exit status 2)
before anything runs; a failure of one (model, mode), exception or crash, is a
record with ``error`` set and loses no other record (exit status 1); results are
rewritten after every model, so an interrupted run keeps what it finished.
Outputs: ``<out>/results.json``, ``<out>/results.csv``, ``<out>/bench.png``, and
``<out>/logs/<model>-<mode>.log``, the stderr of each failed worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convbn._tools.bench_modes import COMPILED_MODES, DEFAULT_MODES, MODES, unavailable

__all__ = ["main", "Plan", "make_plan", "parse_args"]

DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
ZOOS = ("paper",)
WORKER = "convbn._tools.bench_worker"
# Enough for a compiled detector on two cores; a worker that takes longer to answer one
# command counts as failed.
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
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument(
        "--steps", type=int, default=1, help="timed steps per mode per round (default 1)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per mode before the rounds (default 1)"
    )
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
        help="modes stepped at once (default 1; more is faster, but step times "
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


class _Worker:
    """One worker process and its command channel (see :mod:`convbn._tools.bench_worker`)."""

    def __init__(self, spec: dict[str, Any], folder: Path, tag: str):
        spec_path = folder / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        self.tag = tag
        self.stderr_path = folder / f"{tag}.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER, str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.alive = True

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def ask(self, command: dict[str, Any] | None) -> dict[str, Any]:
        """Send ``command`` (None: only wait for the next answer) and return the answer;
        ``{"error": ...}`` when the worker failed, crashed or did not answer in time."""
        if not self.alive:
            return {"error": "worker no longer running"}
        try:
            if command is not None:
                self.proc.stdin.write(json.dumps(command) + "\n")
                self.proc.stdin.flush()
            line = self._replies.get(timeout=WORKER_TIMEOUT_S)
        except queue.Empty:
            self.close()
            return {"error": f"worker did not answer within {WORKER_TIMEOUT_S} s"}
        except OSError:  # the pipe broke: the process is gone
            line = None
        if line is None:
            status = self.proc.wait()
            self.close()
            tail = " | ".join(self.stderr().strip().splitlines()[-3:])[-300:]
            return {"error": f"worker crashed (exit status {status}): {tail}"}
        answer = json.loads(line)
        if answer.get("error"):
            self.close()
        return answer

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive:
            self.alive = False
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._stderr.close()


def _each(
    workers: dict[str, _Worker], modes: list[str], command: dict[str, Any], jobs: int
) -> dict[str, Any]:
    """``command`` sent to each of ``modes``' live workers, ``jobs`` at a time."""
    live = [m for m in modes if workers[m].alive]
    if jobs <= 1:
        return {m: workers[m].ask(command) for m in live}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {m: pool.submit(workers[m].ask, command) for m in live}
        return {m: f.result() for m, f in futures.items()}


def _run_model(
    plan: Plan, info: Any, runnable: list[str], folder: Path, checks: dict[str, Path],
    log_dir: Path, progress: _Progress,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Every mode of one model, interleaved; per mode, its rounds as ``aggregate`` reads them."""
    workers = {
        mode: _Worker(
            _worker_spec(plan, info.name, mode, checks[mode]), folder, _tag(info.name, mode)
        )
        for mode in runnable
    }
    state: dict[str, dict[str, Any]] = {mode: {} for mode in runnable}
    rounds: dict[str, list[float]] = {mode: [] for mode in runnable}
    faults: dict[str, list[int]] = {mode: [] for mode in runnable}
    errors: dict[str, str] = {}

    def take(mode: str, answer: dict[str, Any]) -> bool:
        if answer.get("error"):
            errors.setdefault(mode, answer["error"])
            return False
        return True

    try:
        for mode in runnable:  # they start together; wait for each to be ready
            answer = workers[mode].ask(None)
            if take(mode, answer):
                state[mode].update(pairs=answer.get("pairs"), note=answer.get("note", ""))
            progress.step(f"{info.name} {mode} ready")
        # Warm-up, one mode at a time (a compiled mode compiles here, timed alone).
        for mode in runnable:
            compiled = mode in COMPILED_MODES or plan.compile
            # A second untimed step for compiled code: recompilations happen there.
            warmup = max(plan.warmup, 2) if compiled else plan.warmup
            if warmup and workers[mode].alive:
                answer = workers[mode].ask({"cmd": "steps", "n": warmup})
                if take(mode, answer):
                    state[mode]["first_step_s"] = answer["times"][0]
        for round_ in range(plan.rounds):
            shift = round_ % len(runnable)
            order = runnable[shift:] + runnable[:shift]
            answers = _each(workers, order, {"cmd": "steps", "n": plan.steps}, plan.jobs)
            for mode in order:
                if mode in answers and take(mode, answers[mode]):
                    times = answers[mode]["times"]
                    state[mode].setdefault("first_step_s", times[0])
                    rounds[mode].append(statistics.median(times))
                    faults[mode] += answers[mode].get("faults", [])
                progress.step(f"{info.name} {mode} round {round_ + 1}")
        for mode in runnable:
            if workers[mode].alive:
                answer = workers[mode].ask({"cmd": "finish"})
                if take(mode, answer):
                    state[mode].update(answer)
            progress.step(f"{info.name} {mode} finished")
    finally:
        for mode, worker in workers.items():
            worker.close()
            if mode in errors or state[mode].get("check_error"):
                # The traceback, for whoever reads the error column.
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / f"{worker.tag}.log").write_text(worker.stderr())
    results: dict[str, list[dict[str, Any]]] = {}
    for mode in runnable:
        steps = rounds[mode]
        per_round = [dict(state[mode], step_s=steps[0] if steps else None)]
        if faults[mode]:
            per_round[0]["minor_faults"] = int(statistics.median(faults[mode]))
        per_round += [{"step_s": x} for x in steps[1:]]
        if mode in errors:
            if not steps:
                per_round = []
            per_round.append({"error": errors[mode]})
        results[mode] = per_round
    return results


def _worker_spec(plan: Plan, model: str, mode: str, check: Path | None) -> dict[str, Any]:
    """The :class:`~convbn._tools.bench_worker.WorkerSpec` fields of one run."""
    return {
        "model": model,
        "mode": mode,
        "batch": plan.batch,
        "size": plan.size,
        "check_path": str(check) if check is not None else None,
        "dtype": plan.dtype,
        "device": plan.device,
        "channels_last": plan.channels_last,
        "compile": plan.compile,
        "seed": plan.seed,
        "threads": plan.threads,
    }


def _tag(model: str, mode: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return f"{safe}-{mode}"


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _speed(plan: Plan) -> float | None:
    """The machine's matrix-product speed now, with the workers' thread count
    (None when the device cannot run it: the workers then report the error)."""
    import torch

    from convbn._tools.measure import matmul_gflops

    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        return round(matmul_gflops(plan.device), 1)
    except (RuntimeError, AssertionError):
        return None
    finally:
        torch.set_num_threads(threads)


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
    machine["matmul_gflops_start"] = _speed(plan)
    runnable = [m for m in plan.modes if unavailable(m) is None]
    log_dir = plan.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # ours: the failures of an earlier run
    progress = _Progress(len(plan.models) * (plan.rounds + 2) * len(runnable))
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
            checks = {m: folder / f"{len(records)}-{m}.check.pt" for m in runnable}
            results = _run_model(plan, info, runnable, folder, checks, log_dir, progress)
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
    machine["matmul_gflops_end"] = _speed(plan)
    write_results(plan.out, machine, records, argv)
    title = (
        f"convbn bench: batch {plan.batch}, {plan.dtype}, {plan.device}"
        f"{', channels-last' if plan.channels_last else ''}{', compiled' if plan.compile else ''}"
        f" (torch {machine['torch']}, {machine.get('gpu') or machine['cpu']}, "
        f"{machine['torch_threads']} threads)"
    )
    print(format_table(records))
    print(
        f"(load average at start {machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}"
        f" on {machine['cpu_count']} CPUs: other processes slow the steps down; float32 "
        f"matrix product at start {machine['matmul_gflops_start']} GFLOP/s, at end "
        f"{machine['matmul_gflops_end']}: a change means the machine's speed changed)"
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
