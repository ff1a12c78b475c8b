"""What the tools print and write: progress, tables (text or GitHub markdown), the machine
a result was measured on, JSON, plots. Every tool prints through these."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = [
    "MIB",
    "add_markdown_option",
    "log",
    "Progress",
    "format_table",
    "mib",
    "machine_info",
    "machine_line",
    "load_average",
    "describe_error",
    "json_safe",
    "write_json",
    "pyplot",
]

MIB = 2**20


def log(message: str) -> None:
    """A line on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Finished units of work, counted on stderr.

    On a terminal, one line redrawn in place (a bar, the count, the time so far and the
    last item); anywhere else (a log file, a pipe) one plain line per finished item, so
    that a log holds no carriage returns. Threads may share one.
    """

    WIDTH = 24

    def __init__(self, total: int, desc: str, stream: TextIO | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream)
        self.start = time.monotonic()
        self._drawn = 0
        self._lock = threading.Lock()

    def _text(self, label: str) -> str:
        elapsed = time.monotonic() - self.start
        text = f"{self.desc} {self.done}/{self.total} ({elapsed:.0f} s)"
        return f"{text} {label}" if label else text

    def step(self, label: str = "", n: int = 1) -> None:
        """``n`` more units done, the last of them described by ``label``."""
        with self._lock:
            self._step(label, n)

    def _step(self, label: str, n: int) -> None:
        self.done += n
        if not self.live:
            self.stream.write(self._text(label) + "\n")
            self.stream.flush()
            return
        filled = round(self.WIDTH * self.done / max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self._text(label)}"
        # A line longer than the terminal wraps, and a carriage return then redraws only
        # its last part: cut it to the width.
        line = line[: max(20, shutil.get_terminal_size().columns - 1)]
        self.stream.write("\r" + line.ljust(self._drawn))
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


# --------------------------------------------------------------------------- tables


def _looks_numeric(cell: str) -> bool:
    text = cell.replace(",", "").rstrip("%x")
    if text in ("", "-", "inf"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    markdown: bool = False,
    align: str | None = None,
) -> str:
    """``rows`` under ``header``: fixed-width text columns, or a GitHub markdown table.

    ``align`` has one letter per column, ``l`` or ``r``; by default a column is
    right-aligned when every cell of it reads as a number (or ``-``). Cells are ``str()``
    of anything; in markdown a ``|`` inside a cell is escaped.
    """
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        cells = [[c.replace("|", "\\|") for c in row] for row in cells]
    head = [str(h) for h in header]
    if align is None:
        align = "".join(
            "r" if cells and all(_looks_numeric(row[i]) for row in cells) else "l"
            for i in range(len(head))
        )
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(head)]
    if markdown:
        widths = [max(w, 3) for w in widths]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    if markdown:
        dashes = ["-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)]
        rule = "|" + "|".join(dashes) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(row) for row in cells])


def add_markdown_option(parser: argparse.ArgumentParser) -> None:
    """``--markdown``: the tables as GitHub markdown, each under the machine's line."""
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the tables as GitHub markdown, under a line naming the machine",
    )


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal; ``-`` for None."""
    return "-" if n is None else f"{n / MIB:.1f}"


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Versions, threads, CPU model, GPU name and load: what measured figures depend on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "convbn": _version("convbn"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": device,
    }
    loadavg = load_average()
    if loadavg is not None:
        info["loadavg_start"] = loadavg
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> str | None:
    """The system's load averages over 1, 5 and 15 minutes, or None where unknown."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine of :func:`machine_info`: CPU (and GPU), torch, threads."""
    where = info.get("cpu") or "unknown CPU"
    if info.get("gpu"):
        where = f"{info['gpu']} (CUDA {info.get('cuda')}), host {where}"
    threads = info.get("torch_threads")
    return f"Machine: {where}; torch {info.get('torch')}; {threads} thread{'' if threads == 1 else 's'}"


# --------------------------------------------------------------------------- files


def describe_error(error: BaseException) -> str:
    """The exception's type and the first line of its message, at most 300 characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def json_safe(value: Any) -> Any:
    """``value`` with NaN as None and infinities as ``"inf"``/``"-inf"``: standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` (through :func:`json_safe`) to ``path``, its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
