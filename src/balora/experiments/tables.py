"""Number formatting, Markdown tables and CSV files of the experiment reports (one home for both
the grid report, :mod:`balora.experiments.report`, and the merge stage's, :mod:`~balora.experiments.merge_report`)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DASH", "csv_value", "fmt", "markdown_table", "write_csv"]

#: What a table shows for a missing or undefined number.
DASH = "—"


def fmt(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals; :data:`DASH` for None or NaN."""
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def csv_value(value: Any) -> Any:
    """An empty cell for None or NaN, the value otherwise."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
