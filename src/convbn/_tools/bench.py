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
``<out>/logs/<model>-<mode>.log``, the stderr of each failed worker; on stdout the table
(GitHub markdown with ``--markdown``) under a line naming the machine, and a summary of
the ratios with their 95% intervals.

``--host-cost`` measures something else instead, in this process: what each converted pair
costs the host per step (:mod:`convbn._tools.host_cost`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convbn._tools.bench_modes import COMPILED_MODES, DEFAULT_MODES, MODES, unavailable
from convbn._tools.host_cost import HOST_COST_DEFAULTS, run_from_args
from convbn._tools.output import (
    Progress,
    add_markdown_option,
    load_average,
    machine_info,
    machine_line,
)
from convbn._tools.process import Worker, WorkerFailed

__all__ = ["main", "Plan", "make_plan", "build_parser", "parse_args"]

DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
ZOOS = ("paper",)
WORKER = "convbn._tools.bench_worker"
# Time for one answer of a worker (a compiled detector's warm-up on a small CPU takes long);
# a worker that takes longer counts as failed.
WORKER_TIMEOUT_S = 3600
# The defaults of the options that --host-cost gives other defaults (HOST_COST_DEFAULTS).
BENCH_DEFAULTS = {"rounds": 6, "steps": 1, "warmup": 1, "modes": ",".join(DEFAULT_MODES)}


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
    markdown: bool = False


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--batch", type=int, default=8, help="images per training step (default 8)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side (default 224; inception_v3 299, video 112)",
    )
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 (the latter two by autocast)")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="models and inputs in channels-last memory format",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile every mode")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 6; with --host-cost 30)")
    p.add_argument(
        "--steps", type=int, help="timed steps per mode per round (default 1; with --host-cost 20)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed steps per mode before the rounds (default 1; with --host-cost 3)",
    )
    p.add_argument(
        "--modes",
        help=f"comma-separated: {', '.join(MODES)} (default {BENCH_DEFAULTS['modes']}; "
        f"with --host-cost {HOST_COST_DEFAULTS['modes']})",
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
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random weights, statistics, inputs and loss (default 0)",
    )
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results/)")
    add_markdown_option(p)
    p.add_argument(
        "--host-cost",
        action="store_true",
        help="instead of the models: what each converted pair costs the host per training "
        "step (ATen operators, host reads, microseconds), on a chain of tiny Conv2d+BN2d "
        "pairs, every mode in this process (takes --modes, --rounds, --steps, --warmup, "
        "--device, --threads, --seed, --out, --markdown)",
    )
    p.add_argument(
        "--pairs", type=int, default=50, help="with --host-cost: pairs in the chain (default 50)"
    )
    p.add_argument(
        "--conv-bias",
        action="store_true",
        help="with --host-cost: the chain's convolutions have a bias (default: none)",
    )
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options; those not given take the defaults of the run asked for."""
    args = build_parser().parse_args(argv)
    for name, value in (HOST_COST_DEFAULTS if args.host_cost else BENCH_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
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
    if args.conv_bias or args.pairs != build_parser().get_default("pairs"):
        raise _Usage("--pairs and --conv-bias go with --host-cost")
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
        args.markdown,
    )


# --------------------------------------------------------------------------- running


def _answer(worker: Worker, target: str | None, **kwargs: Any) -> dict[str, Any]:
    """``WORKER:target(**kwargs)`` in ``worker`` (None: only wait for the answer to what was
    sent before); ``{"error": ...}`` when the worker failed, crashed or did not answer."""
    try:
        if target is not None:
            worker.send(f"{WORKER}:{target}", **kwargs)
        return worker.receive()
    except WorkerFailed as e:
        return {"error": str(e)}


def _each(
    workers: dict[str, Worker], modes: list[str], target: str, jobs: int, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """``target`` called in each of ``modes``' live workers, ``jobs`` at a time."""
    live = [m for m in modes if workers[m].alive]
    if jobs <= 1:
        return {m: _answer(workers[m], target, **kwargs) for m in live}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {m: pool.submit(_answer, workers[m], target, **kwargs) for m in live}
        return {m: f.result() for m, f in futures.items()}


def _run_model(
    plan: Plan, info: Any, runnable: list[str], folder: Path, checks: dict[str, Path],
    log_dir: Path, progress: Progress,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Every mode of one model, interleaved; per mode, its rounds as ``aggregate`` reads them."""
    workers: dict[str, Worker] = {}
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
        for mode in runnable:  # they set up together; then wait for each to be ready
            workers[mode] = Worker(
                log=folder / f"{_tag(info.name, mode)}.stderr", timeout=WORKER_TIMEOUT_S
            )
            spec = _worker_spec(plan, info.name, mode, checks[mode])
            workers[mode].send(f"{WORKER}:start", **spec)
        for mode in runnable:
            answer = _answer(workers[mode], None)
            if take(mode, answer):
                state[mode].update(pairs=answer.get("pairs"), note=answer.get("note", ""))
        progress.step(f"{info.name}: set up", len(runnable))
        # Warm-up, one mode at a time (a compiled mode compiles here, timed alone).
        for mode in runnable:
            compiled = mode in COMPILED_MODES or plan.compile
            # A second untimed step for compiled code: recompilations happen there.
            warmup = max(plan.warmup, 2) if compiled else plan.warmup
            if warmup and workers[mode].alive:
                answer = _answer(workers[mode], "steps", n=warmup)
                if take(mode, answer):
                    state[mode]["first_step_s"] = answer["times"][0]
        for round_ in range(plan.rounds):
            shift = round_ % len(runnable)
            order = runnable[shift:] + runnable[:shift]
            answers = _each(workers, order, "steps", plan.jobs, n=plan.steps)
            for mode in order:
                if mode in answers and take(mode, answers[mode]):
                    times = answers[mode]["times"]
                    state[mode].setdefault("first_step_s", times[0])
                    rounds[mode].append(statistics.median(times))
                    faults[mode] += answers[mode].get("faults", [])
            progress.step(f"{info.name}: round {round_ + 1}/{plan.rounds}", len(runnable))
        for mode in runnable:
            if workers[mode].alive:
                answer = _answer(workers[mode], "finish")
                if take(mode, answer):
                    state[mode].update(answer)
        progress.step(f"{info.name}: memory and equivalence checked", len(runnable))
    finally:
        for mode, worker in workers.items():
            worker.close()
            if mode in errors or state[mode].get("check_error"):
                # The traceback, for whoever reads the error column.
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / f"{_tag(info.name, mode)}.log").write_text(worker.log_text())
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
        plot,
        results_table,
        write_results,
    )

    machine = machine_info(plan.device, plan.threads)
    machine["matmul_gflops_start"] = _speed(plan)
    runnable = [m for m in plan.modes if unavailable(m) is None]
    log_dir = plan.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # ours: the failures of an earlier run
    progress = Progress(len(plan.models) * (plan.rounds + 2) * len(runnable), "convbn bench")
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
            machine["loadavg_end"] = load_average()
            write_results(plan.out, machine, records, argv)
    progress.close()
    machine["matmul_gflops_end"] = _speed(plan)
    write_results(plan.out, machine, records, argv)
    title = (
        f"convbn bench: batch {plan.batch}, {plan.dtype}, {plan.device}"
        f"{', channels-last' if plan.channels_last else ''}{', compiled' if plan.compile else ''}"
    )
    print(f"{title}\n{machine_line(machine)}\n")
    print(results_table(records, markdown=plan.markdown))
    print(
        f"\nLoad average at start {machine.get('loadavg_start')}, at end "
        f"{machine.get('loadavg_end')} on {machine['cpu_count']} CPUs: other processes slow "
        f"the steps down. Float32 matrix product at start {machine['matmul_gflops_start']} "
        f"GFLOP/s, at end {machine['matmul_gflops_end']}: a change means the machine's speed "
        "changed."
    )
    summary = format_summary(records, markdown=plan.markdown)
    if summary:
        print("\n" + summary)
    written = f"{plan.out / 'results.json'}, results.csv"
    if plot(records, plan.out / "bench.png", f"{title}\n{machine_line(machine)}"):
        print(f"\nwrote {written}, bench.png")
    else:
        print(f"\nwrote {written} (matplotlib not installed: no plot)")
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
    if args.host_cost:
        return run_from_args(args, argv)
    try:
        plan = make_plan(args)
    except _Usage as e:
        print(f"convbn bench: error: {e}", file=sys.stderr)
        return 2
    return run_plan(plan, argv)


if __name__ == "__main__":
    sys.exit(main())
