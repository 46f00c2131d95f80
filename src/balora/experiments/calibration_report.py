"""The report section on the λs that ``regularizers.lambdas: auto`` chose (paper D.1, automated).

A run with ``lambdas: auto`` trains with the λs its calibration proposed (:mod:`balora.calibrate`);
they differ per cell, so a table of results is read beside them. :func:`calibrated_lambdas` finds
a record's λs: ``info.calibrated_lambdas`` (from the run's ``metrics.json``), or else the
``proposed`` λs of its run directory's ``calibration.json`` (records written before runs kept
them in their metrics). :func:`calibration_section` writes the table (one line per method ·
variant and data set, the λ of each calibrated term per seed and their mean) and
``calibrated_lambdas.csv`` (one line per cell and term).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from balora.experiments.spec import Cell
from balora.experiments.stats import mean_std
from balora.experiments.store import ExperimentStore
from balora.experiments.tables import DASH, csv_value, markdown_table, write_csv
from balora.run_dir import CALIBRATION_FILE

__all__ = ["calibrated_lambdas", "calibration_section"]

TERMS = ("consistency", "diversity", "svd")


def calibrated_lambdas(record: dict[str, Any], store: ExperimentStore) -> dict[str, float] | None:
    """The λs a finished cell trained with when its run calibrated them, else None."""
    found = (record.get("info") or {}).get("calibrated_lambdas")
    if isinstance(found, dict):
        return {k: float(v) for k, v in found.items()}
    if not record.get("run_dir"):
        return None
    path = store.absolute(record["run_dir"]) / CALIBRATION_FILE
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["proposed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _g(value: float) -> str:
    """Three significant digits (calibrated λs span orders of magnitude); DASH for NaN."""
    return DASH if value != value else f"{value:.3g}"


def _calibrated_terms(record: dict[str, Any]) -> tuple[str, ...]:
    """The terms the cell's calibration set (``regularizers.calibration_terms``; None = all three)."""
    terms = ((record.get("config") or {}).get("regularizers") or {}).get("calibration_terms")
    return tuple(t for t in TERMS if terms is None or t in terms)


def calibration_section(cells: list[Cell], counted: dict[str, dict], store: ExperimentStore, seeds: list[int],
                        out: Path) -> list[str]:
    """The Markdown lines of the section, [] when no counted cell calibrated its λs."""
    found: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    terms: dict[str, None] = {}
    csv_rows = []
    for cell in cells:
        record = counted.get(cell.id)
        lambdas = calibrated_lambdas(record, store) if record else None
        if lambdas is None:
            continue
        for term in _calibrated_terms(record):
            if term in lambdas:
                terms[term] = None
                found.setdefault((cell.row, cell.data), {}).setdefault(cell.seed, {})[term] = lambdas[term]
                csv_rows.append([cell.id, cell.row, cell.data, cell.seed, term, csv_value(lambdas[term])])
    if not found:
        return []
    header = ["method", "data", "term", *[f"seed {s}" for s in seeds], "mean ± std"]
    rows = []
    for (row, data), by_seed in found.items():
        for term in terms:
            values = {s: v[term] for s, v in by_seed.items() if term in v}
            if not values:
                continue
            mean, std, _ = mean_std(list(values.values()))
            rows.append([row, data, f"λ ({term})", *[_g(values[s]) if s in values else DASH for s in seeds],
                         f"{_g(mean)} ± {_g(std)}"])
    write_csv(out / "calibrated_lambdas.csv", ["cell", "row", "data", "seed", "term", "lambda"], csv_rows)
    return ["## λs calibrated per cell (regularizers.lambdas: auto)", "",
            "Each cell trained with the λs its own calibration proposed (paper D.1, automated: on the cell's "
            "training batches, so they differ by seed and data set); the table lists the calibrated terms. The "
            "other λs are the spec's.", "", markdown_table(header, rows)]
