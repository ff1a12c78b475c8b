"""Benchmark records: aggregation over rounds, equivalence with Eval, ratios, and the
outputs (results.json, results.csv, bench.png, the printed table and summary)."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from convbn._tools.bench_modes import COMPILED_MODES, GRADS_DIFFER
from convbn._tools.measure import rel_err
from convbn._tools.output import MIB, format_table, json_safe, mib, pyplot, write_json

__all__ = [
    "Record",
    "aggregate",
    "compare_with_eval",
    "add_ratios",
    "step_ratio",
    "median_interval",
    "write_results",
    "results_table",
    "format_summary",
    "plot",
]

# The coverage of the interval printed beside each step ratio (see median_interval).
INTERVAL_LEVEL = 0.95
NO_PAIR = "no pair converted"


@dataclass
class Record:
    """One (model, mode): its measurements and how they compare with Eval in the same run.

    ``saved_bytes``: bytes autograd keeps for backward in one step (parameters and buffers
    left out), from the initial weights. ``peak_bytes``: peak memory above the baseline
    over every step of the worker (warm-up and rounds). ``step_s``: median over rounds
    of each round's median step time; ``step_vs_eval``: :func:`step_ratio` to Eval,
    and ``step_vs_eval_low``/``_high`` the :func:`median_interval` of its rounds' ratios.
    ``out_rel_err`` / ``grad_rel_err``: :func:`~convbn._tools.measure.rel_err` against Eval
    (``max|a - b| / max|b|``; gradients: over every parameter gradient together), None
    when meaningless (``train``, Deploy's gradients) or not measured; ``minor_faults``:
    the median over timed steps of the minor page faults a step took (fresh pages from
    the kernel); ``error`` says why a run failed.
    """

    model: str
    mode: str
    batch: int
    size: int
    dtype: str
    device: str
    frames: int | None = None
    channels_last: bool = False
    compiled: bool = False
    pairs: int | None = None
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    step_s: float | None = None
    step_s_rounds: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    out_rel_err: float | None = None
    grad_rel_err: float | None = None
    grad_params: str | None = None
    minor_faults: int | None = None
    saved_vs_eval: float | None = None
    peak_vs_eval: float | None = None
    step_vs_eval: float | None = None
    step_vs_eval_low: float | None = None
    step_vs_eval_high: float | None = None
    error: str | None = None
    note: str = ""


def aggregate(record: Record, results: list[dict[str, Any]]) -> Record:
    """Fill ``record`` from the worker results of its rounds (round 1 first).

    A failed round sets ``error`` (the first failure); the successful rounds' figures stay.
    """
    ok = [r for r in results if not r.get("error")]
    failed = [r for r in results if r.get("error")]
    if failed:
        record.error = failed[0]["error"]
    if results and results[0].get("check_error"):
        record.note = _join(record.note, f"check failed: {results[0]['check_error']}")
    if not ok:
        return record
    first = ok[0]
    record.pairs = first.get("pairs")
    record.saved_bytes = first.get("saved_bytes")
    record.first_step_s = first.get("first_step_s")
    record.minor_faults = first.get("minor_faults")
    record.note = _join(record.note, first.get("note", ""))
    peaks = [r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None]
    record.peak_bytes = int(statistics.median(peaks)) if peaks else None
    record.step_s_rounds = [r["step_s"] for r in ok if r.get("step_s") is not None]
    record.step_s = statistics.median(record.step_s_rounds) if record.step_s_rounds else None
    return record


def _join(a: str, b: str) -> str:
    return "; ".join(x for x in (a, b) if x)


def compare_with_eval(records: list[Record], checks: dict[str, Path]) -> None:
    """Set ``out_rel_err``/``grad_rel_err`` of one model's records from the check files
    (mode -> path) its workers wrote; Eval's is the reference."""
    eval_path = checks.get("eval")
    if eval_path is None or not eval_path.exists():
        return
    ref = torch.load(eval_path, weights_only=True)
    for record in records:
        path = checks.get(record.mode)
        if record.mode in ("eval", "train") or path is None or not path.exists():
            if record.mode == "train":
                record.note = _join(record.note, "train: no equivalence (batch statistics)")
            continue
        got = torch.load(path, weights_only=True)
        record.out_rel_err = rel_err(got["out"], ref["out"])
        if record.mode in GRADS_DIFFER:
            record.note = _join(record.note, f"grads not compared: {GRADS_DIFFER[record.mode]}")
            continue
        common = [n for n in ref["grads"] if n in got["grads"]]
        record.grad_params = f"{len(common)}/{len(ref['grads'])}"
        if common:
            record.grad_rel_err = rel_err(
                [got["grads"][n] for n in common], [ref["grads"][n] for n in common]
            )


def add_ratios(records: list[Record]) -> None:
    """``*_vs_eval`` for each record from the Eval record of the same model in this run."""
    evals = {r.model: r for r in records if r.mode == "eval" and not r.error}
    for r in records:
        e = evals.get(r.model)
        if e is None:
            continue
        r.saved_vs_eval = _ratio(r.saved_bytes, e.saved_bytes)
        r.peak_vs_eval = _ratio(r.peak_bytes, e.peak_bytes)
        r.step_vs_eval = step_ratio(r, e)
        interval = _interval(r, e)
        if interval is not None:
            r.step_vs_eval_low, r.step_vs_eval_high = interval


def step_ratio(a: Record, b: Record) -> float | None:
    """How much longer ``a``'s step takes than ``b``'s: the median of the per-round ratios.

    Round k of every mode runs at about the same time (the rounds are interleaved), so
    the ratio within a round cancels the machine's slow changes of speed; the ratio
    of the two medians does not, when a slow spell falls on one mode's rounds and not
    the other's. With fewer than two rounds, or a round lost to a failure, the medians'
    ratio.
    """
    ratios = _round_ratios(a, b)
    if ratios:
        return statistics.median(ratios)
    return _ratio(a.step_s, b.step_s)


def _round_ratios(a: Record, b: Record) -> list[float] | None:
    """``a / b`` round by round, when every round of both was measured."""
    ra, rb = a.step_s_rounds, b.step_s_rounds
    if a.error or b.error or len(ra) < 2 or len(ra) != len(rb) or not all(y > 0 for y in rb):
        return None
    return [x / y for x, y in zip(ra, rb)]


def median_interval(
    values: list[float], level: float = INTERVAL_LEVEL
) -> tuple[float, float] | None:
    """An interval that holds, with probability at least ``level``, the median of the
    distribution that ``values`` are independent draws from, whatever its shape: the k-th
    smallest and the k-th largest value, for the largest k with P(Binomial(n, 1/2) < k)
    at most ``(1 - level) / 2`` (each value falls below the median with probability 1/2).
    For 10 rounds at 95%: the 2nd smallest and the 2nd largest (coverage 97.9%). None
    when there are too few values for any such interval (fewer than 6 at 95%).
    """
    n = len(values)
    tail = (1 - level) / 2
    k, below = 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) = k)
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def _interval(a: Record, b: Record) -> tuple[float, float] | None:
    """The :func:`median_interval` of the per-round ratios ``a / b``, when they pair."""
    ratios = _round_ratios(a, b)
    return median_interval(ratios) if ratios else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def write_results(out: Path, machine: dict[str, Any], records: list[Record], argv: list[str]):
    """``results.json`` and ``results.csv`` under ``out`` (created)."""
    rows = [json_safe(asdict(r)) for r in records]
    payload = {"machine": machine, "command": ["convbn", "bench", *argv], "records": rows}
    write_json(out / "results.json", payload)
    names = [f.name for f in fields(Record)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            row = dict(row)
            row["step_s_rounds"] = ";".join(f"{x:.4f}" for x in row["step_s_rounds"])
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


# --------------------------------------------------------------------------- text


def _converted_nothing(record: Record) -> bool:
    """A mode that converts pairs (``pairs`` is counted) and found none: nothing to compare."""
    return record.pairs == 0


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def results_table(records: list[Record], markdown: bool = False) -> str:
    """One line per record: its measurements, its ratios to Eval in the same run (with the
    95% interval of the step ratio), the error against Eval, and errors or notes last."""
    header = (
        "model", "mode", "pairs", "saved MiB", "peak MiB", "step s", "saved/eval",
        "peak/eval", "step/eval", f"{INTERVAL_LEVEL:.0%} interval", "out err", "grad err",
        "note",
    )  # fmt: skip
    rows = []
    for r in records:
        compiled = r.compiled and r.mode not in COMPILED_MODES
        reference = r.mode == "eval" and not r.error
        compare = not _converted_nothing(r)
        interval = "-"
        if compare and not reference and r.step_vs_eval_low is not None:
            interval = f"{r.step_vs_eval_low:.3f}-{r.step_vs_eval_high:.3f}"
        rows.append(
            (
                r.model,
                r.mode + (" (compiled)" if compiled else ""),
                "-" if r.pairs is None else str(r.pairs),
                mib(r.saved_bytes),
                mib(r.peak_bytes),
                _fmt(r.step_s, ".3f"),
                _fmt(r.saved_vs_eval if compare else None, ".3f"),
                _fmt(r.peak_vs_eval if compare else None, ".3f"),
                _fmt(r.step_vs_eval if compare else None, ".3f"),
                interval,
                "ref" if reference else _fmt(r.out_rel_err, ".1e"),
                "ref" if reference else _fmt(r.grad_rel_err, ".1e"),
                r.error or ("" if compare else NO_PAIR),
            )
        )
    return format_table(header, rows, markdown=markdown, align="llrrrrrrrrrrl")


def _spread(a: Record, b: Record) -> str:
    """The range of the per-round ratios ``a / b`` (how far the noise goes), the
    :func:`median_interval` of their median, and the ratio of the two medians, when
    :func:`step_ratio` used the rounds."""
    ratios = _round_ratios(a, b)
    if not ratios:
        return ""
    medians = _ratio(a.step_s, b.step_s)
    interval = median_interval(ratios)
    held = (
        f", {INTERVAL_LEVEL:.0%} interval {interval[0]:.3f}-{interval[1]:.3f}"
        if interval is not None
        else f", too few rounds for a {INTERVAL_LEVEL:.0%} interval"
    )
    return f" [rounds {min(ratios):.2f}-{max(ratios):.2f}{held}, medians' ratio {medians:.3f}]"


def _model_summary(modes: dict[str, Record]) -> list[str]:
    """The lines of one model's summary: Tune's saved bytes and step time against the other
    modes, Deploy's step against Eval's, the page faults per step."""
    parts = [f"{mode}: {NO_PAIR}" for mode, r in modes.items() if _converted_nothing(r)]
    modes = {mode: r for mode, r in modes.items() if not _converted_nothing(r)}
    tune, deploy, eval_ = modes.get("tune"), modes.get("deploy"), modes.get("eval")
    if tune is not None:
        for other in ("deploy", "eval", "tune-paper", "inductor", "compiled-tune"):
            ratio = _ratio(tune.saved_bytes, modes[other].saved_bytes) if other in modes else None
            if ratio is not None:
                parts.append(f"saved tune/{other} {ratio:.3f}")
        for other in ("eval", "deploy"):
            ratio = step_ratio(tune, modes[other]) if other in modes else None
            if ratio is not None:
                parts.append(f"step tune/{other} {ratio:.3f}{_spread(tune, modes[other])}")
    if deploy is not None and eval_ is not None:
        ratio = step_ratio(deploy, eval_)
        if ratio is not None:
            parts.append(f"step deploy/eval {ratio:.3f}{_spread(deploy, eval_)} (no BN at all)")
    if tune is not None:
        for other in ("tune-paper", "inductor"):
            ratio = step_ratio(tune, modes[other]) if other in modes else None
            if ratio is not None:
                parts.append(f"step tune/{other} {ratio:.3f}")
    faults = [(m, r.minor_faults) for m, r in modes.items() if r.minor_faults is not None]
    if faults:
        parts.append(
            "minor page faults per step (median): "
            + ", ".join(f"{m} {n:,}" for m, n in faults)
            + " (fresh pages from the kernel; each costs time inside the step)"
        )
    return parts


def format_summary(records: list[Record], markdown: bool = False) -> str:
    """Per model, Tune against the other modes (ratios, the per-round spread and the 95%
    interval of each step ratio), and the runs that failed; a bulleted list in markdown."""
    lines = []
    by_model: dict[str, dict[str, Record]] = {}
    for r in records:
        if not r.error:
            by_model.setdefault(r.model, {})[r.mode] = r
    for model, modes in by_model.items():
        parts = _model_summary(modes)
        if not parts:
            continue
        if markdown:
            lines += ([""] if lines else []) + [f"{model}:", ""] + [f"- {p}" for p in parts]
        else:
            lines += [f"{model}:"] + [f"  {p}" for p in parts]
    failed = [r for r in records if r.error and not r.error.startswith("unavailable")]
    if failed:
        lines += [""] if markdown and lines else []
        lines.append(
            f"{len(failed)} run(s) failed: " + ", ".join(f"{r.model}/{r.mode}" for r in failed)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(records: list[Record], path: Path, title: str) -> bool:
    """Bar charts of saved bytes, peak memory and step time per mode, per model (ratios to
    Eval when every model has an Eval record, absolute otherwise). False, with nothing
    written, when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in records if not r.error]
    models = list(dict.fromkeys(r.model for r in ok))
    modes = list(dict.fromkeys(r.mode for r in ok))
    relative = bool(models) and all(
        any(r.model == m and r.mode == "eval" for r in ok) for m in models
    )
    panels = (
        ("saved_vs_eval", "saved_bytes", "saved for backward", MIB, "MiB"),
        ("peak_vs_eval", "peak_bytes", "peak memory", MIB, "MiB"),
        ("step_vs_eval", "step_s", "step time", 1, "s"),
    )
    width = max(6.0, 0.55 * len(models) * max(1, len(modes)) / 3 + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(width, 24), 8.5), squeeze=False)
    bar = 0.8 / max(1, len(modes))
    for ax, (ratio_key, abs_key, label, unit, unit_name) in zip(axes[:, 0], panels):
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, model in enumerate(models):
                rec = next((r for r in ok if r.model == model and r.mode == mode), None)
                value = None
                if rec is not None:
                    value = getattr(rec, ratio_key) if relative else getattr(rec, abs_key)
                    if value is not None and not relative:
                        value = value / unit
                if value is not None:
                    xs.append(i + (j - (len(modes) - 1) / 2) * bar)
                    ys.append(value)
            ax.bar(xs, ys, width=bar, label=mode)
        ax.set_ylabel(f"{label} / eval" if relative else f"{label} ({unit_name})")
        if relative:
            ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30 if len(models) > 4 else 0, ha="right", fontsize=8)
    if modes:  # nothing to label when every run failed
        axes[0, 0].legend(ncol=len(modes), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
