"""Shared pieces of the experiments: processes per mode, progress, JSON, tables, plots."""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from convbn._tools.measure import peak_rss_bytes

__all__ = [
    "MIB",
    "log",
    "Progress",
    "current_rss_bytes",
    "run_isolated",
    "environment",
    "write_json",
    "mean_std",
    "format_table",
    "pyplot",
    "fmt_mib",
]

MIB = 1024 * 1024


def log(message: str) -> None:
    """A progress line on stderr (stdout is kept for the result tables)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class Progress:
    """Counts units of work on stderr: tqdm when it is installed, plain lines otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.start = time.perf_counter()
        try:
            from tqdm import tqdm  # optional
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def step(self, what: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        log(f"{self.desc} {self.done}/{self.total} {what} ({elapsed:.0f} s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


# --------------------------------------------------------------------------- processes

_WORKER = (
    "import sys\n"
    "from convbn._tools.experiments.common import _worker_main\n"
    "sys.exit(_worker_main(sys.argv[1], sys.argv[2]))\n"
)


def _worker_main(in_path: str, out_path: str) -> int:
    with open(in_path) as f:
        job = json.load(f)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    module_name, _, func_name = job["target"].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**job["kwargs"])
    result["peak_rss_bytes"] = peak_rss_bytes()
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def run_isolated(
    target: str, kwargs: dict[str, Any], *, isolate: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """``target`` ("module:function", returning a JSON-able dict) called with ``kwargs``.

    With ``isolate`` it runs in a fresh Python process, so that the ``peak_rss_bytes`` added
    to its result is that run's own peak resident memory. Without it, it runs here and the
    peak is this process's peak so far (only meaningful for the first run).
    """
    if not isolate:
        module_name, _, func_name = target.partition(":")
        result = getattr(importlib.import_module(module_name), func_name)(**kwargs)
        result["peak_rss_bytes"] = peak_rss_bytes()
        return result
    with tempfile.TemporaryDirectory(prefix="convbn-exp-") as tmp:
        in_path, out_path = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(in_path, "w") as f:
            json.dump({"target": target, "kwargs": kwargs, "threads": threads}, f)
        env = dict(os.environ)
        # The child must import this very convbn, installed or not.
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run([sys.executable, "-c", _WORKER, in_path, out_path], env=env)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"experiment worker {target} failed (exit {proc.returncode})")
        with open(out_path) as f:
            return json.load(f)


# --------------------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so that the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(_clean(payload), f, indent=1)
    return path


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as text too)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt
