"""What the experiments share beyond the tools' own helpers: statistics of their runs and
how they print a result table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from convbn._tools.output import format_table, machine_line

__all__ = ["UsageError", "mean_std", "max_loss_diff", "result_table", "written"]


class UsageError(ValueError):
    """Options that do not go together, or a file that does not fit: nothing was run."""


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def max_loss_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest step-by-step difference of two loss curves; inf when their lengths differ
    (one stopped early) or they are empty."""
    if not a or len(a) != len(b):
        return math.inf
    return max(abs(x - y) for x, y in zip(a, b))


def result_table(
    payload: dict[str, Any], header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool
) -> str:
    """An experiment's table under the line naming the machine it ran on (its payload's
    ``environment``), as text or GitHub markdown."""
    table = format_table(header, rows, markdown=markdown)
    return f"{machine_line(payload['environment'])}\n\n{table}"


def written(path: object, plot: object | None) -> str:
    """The closing line: the result file, and the plot or why there is none."""
    return f"\nwritten: {path}, " + (str(plot) if plot else "no plot (matplotlib not installed)")
