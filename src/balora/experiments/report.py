"""The report of an experiment: Markdown and CSV tables in the paper's form, paired comparisons, figures.

``write_report(spec, store)`` (``balora experiment report SPEC_OR_STORE``) reads the store's
records and writes into ``<store>/report/`` (or ``out_dir``):

* ``report.md``: one table per metric (rows = methods, or method · variant; columns = data
  sets; each entry the mean ± sample std over the seeds; the best mean per column in bold; an
  Avg column, the mean of the row's column means), each titled with the split its numbers come
  from; the paired comparison of every row with the baseline row; the λs of cells that
  calibrated them (``lambdas: auto``, :mod:`balora.experiments.calibration_report`); the cost
  table (peak memory, wall time, paper Table 5); the choices made on the validation split (with
  ``select``); the cells that are not counted (failed, not run, interrupted, or run with
  another config) and the versions and commits the numbers come from;
* ``table_<metric>.csv`` (the tables, mean / std / n per data set), ``comparison.csv``,
  ``calibrated_lambdas.csv`` (with calibrated λs), ``cost.csv``, ``selection.csv`` (with
  ``select``) and ``cells.csv`` (every counted cell's value of every reported metric, the raw
  numbers behind the tables);
* ``task_loss.png`` (training task loss per method, per data set) and ``metrics.png`` (bars with
  the std over seeds as error bars);
* with ``merge``, the merge stage's sections, tables and figures (:mod:`balora.experiments.merge_report`).

An entry averages the FINISHED cells of its group only, and says so when it has fewer than
planned (``(2/3)``); the cells left out are listed. The paired comparison of a row with the
baseline pairs their cells by (data set, seed): the mean difference row − baseline with a 95%
percentile bootstrap interval over the pairs (seeded, :func:`balora.experiments.stats.paired_bootstrap`);
the text says when the interval includes 0.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from balora.experiments.calibration_report import calibration_section
from balora.experiments.convergence import SMOOTHING_WINDOW, STEPS_METRIC, common_threshold, steps_to_reach
from balora.experiments.figures import plot_metric_bars, plot_sweep, plot_task_loss
from balora.experiments.merge_report import merge_section
from balora.experiments.selection import Choice, result_cells
from balora.experiments.spec import Cell, ExperimentSpec, load_spec, lower_is_better
from balora.experiments.tables import DASH, csv_value, fmt, markdown_table, write_csv
from balora.experiments.stats import BOOTSTRAP_SEED, MIN_RELIABLE_PAIRS, PairedDifference, mean_std, paired_bootstrap
from balora.experiments.store import (FAILED, FINISHED, OOD_MEAN, RUNNING, ExperimentStore, default_store,
                                      metric_split, record_metric)

__all__ = ["Entry", "MetricTable", "Report", "build_report", "open_experiment", "write_report"]



def open_experiment(path: str | os.PathLike, store: str | os.PathLike | None = None
                    ) -> tuple[ExperimentSpec, ExperimentStore]:
    """A spec file (its store: ``store`` or the default) or a store directory (its saved spec)."""
    path = Path(path)
    if path.is_dir():
        experiment = ExperimentStore(path)
        plan = experiment.read_plan()
        return load_spec(plan["spec"], where=str(path / "experiment.json")), experiment
    spec = load_spec(path)
    return spec, ExperimentStore(store if store is not None else default_store(spec))


@dataclass
class Entry:
    """The values of one (row, data set) group: one per finished seed."""

    values: dict[int, float] = field(default_factory=dict)
    planned: int = 0
    name: str | None = None  # the metric's name (the headline resolved for this data set)

    @property
    def stats(self) -> tuple[float, float, int]:
        return mean_std([self.values[s] for s in sorted(self.values)])


@dataclass
class MetricTable:
    """One metric on one split: ``entries[row][data]``."""

    metric: str
    split: str
    rows: list[str]
    data: list[str]
    entries: dict[str, dict[str, Entry]]
    lower_is_better: tuple[str, ...] = ()

    def column_name(self, data: str) -> str:
        names = {self.entries[r][data].name for r in self.rows if self.entries[r][data].name}
        name = next(iter(names)) if len(names) == 1 else self.metric
        return data if self.metric != "headline" else f"{data} ({name})"

    def lower(self, data: str | None = None) -> bool:
        names = [self.entries[r][d].name for r in self.rows for d in ([data] if data else self.data)
                 if self.entries[r][d].name]
        return lower_is_better(names[0] if names else self.metric, self.lower_is_better)

    def mean(self, row: str, data: str) -> float:
        return self.entries[row][data].stats[0]

    def average(self, row: str) -> float:
        """The Avg column: the mean of the row's column means (NaN when a column has no value)."""
        means = [self.mean(row, d) for d in self.data]
        return math.nan if not means or any(math.isnan(m) for m in means) else float(sum(means) / len(means))

    def best(self, values: dict[str, float], lower: bool) -> set[str]:
        finite = {r: v for r, v in values.items() if not math.isnan(v)}
        if not finite:
            return set()
        target = (min if lower else max)(finite.values())
        return {r for r, v in finite.items() if v == target}


@dataclass
class Comparison:
    row: str
    baseline: str
    metric: str
    difference: PairedDifference
    lower_is_better: bool

    def reading(self) -> str:
        d = self.difference
        if d.includes_zero is None:
            return f"{d.n} pair(s): too few for an interval"
        if d.n < MIN_RELIABLE_PAIRS:
            return (f"only {d.n} pairs: too few for the interval to mean much (at least {MIN_RELIABLE_PAIRS}); "
                    "no conclusion")
        if d.includes_zero:
            return "the interval includes 0: no difference shown"
        better = (d.mean < 0) == self.lower_is_better
        return f"{self.row} is {'better' if better else 'worse'} than {self.baseline} (the interval excludes 0)"


@dataclass
class Report:
    """Everything the report shows, computed from the store (see :func:`build_report`)."""

    spec: ExperimentSpec
    store: ExperimentStore
    tables: list[MetricTable]
    comparisons: list[Comparison]
    cost: list[dict[str, Any]]
    choices: dict[tuple, Choice]
    counted: dict[str, dict]  # cell id -> record of every counted cell
    cells: list[Cell]
    not_counted: list[tuple[str, str, str]]  # (cell id, status, detail)
    waiting: list[tuple]
    curves: dict[str, dict[str, list]]
    thresholds: dict[str, float] = field(default_factory=dict)  # data set -> loss of the convergence table


def _rows(spec: ExperimentSpec) -> list[str]:
    return list(dict.fromkeys(c.row for c in spec.cells))


def build_report(spec: ExperimentSpec, store: ExperimentStore) -> Report:
    """Read the store and compute the tables, comparisons and cost of ``spec``."""
    records = store.records()
    cells, choices, waiting = result_cells(spec, records)
    counted, not_counted = {}, []
    for cell in cells:
        record = records.get(cell.id)
        status = record.get("status") if record else None
        if record is None:
            not_counted.append((cell.id, "not run", ""))
        elif record.get("config_hash") != cell.config_hash:
            not_counted.append((cell.id, "config changed", "ran with another config than the spec's: not counted"))
        elif status == FINISHED:
            counted[cell.id] = record
        elif status == FAILED:
            not_counted.append((cell.id, "failed", record.get("error") or ""))
        elif status == RUNNING:
            not_counted.append((cell.id, "interrupted", "started but not finished"))
    rows = _rows(spec)
    tables = []
    for metric in spec.report.metrics:
        entries = {r: {d: Entry() for d in spec.data} for r in rows}
        for cell in cells:
            entry = entries[cell.row][cell.data]
            entry.planned += 1
            if cell.id in counted:
                name, value = record_metric(counted[cell.id], metric, spec.report.split)
                entry.name = entry.name or name
                if value is not None:
                    entry.values[cell.seed] = value
        tables.append(MetricTable(metric, metric_split(metric, spec.report.split)[0], rows, list(spec.data), entries,
                                  spec.report.lower_is_better))
    curves = {d: {r: [] for r in rows} for d in spec.data}
    for cell in cells:
        if cell.id in counted:
            curves[cell.data][cell.row].append(counted[cell.id].get("task_loss") or [])
    convergence, thresholds = _convergence_table(spec, cells, counted, rows)
    if convergence is not None:
        tables.append(convergence)
    return Report(spec, store, tables, _comparisons(spec, cells, tables), _cost(spec, cells, counted), choices,
                  counted, cells, not_counted, waiting, curves, thresholds)


def _convergence_table(spec: ExperimentSpec, cells: list[Cell], counted: dict[str, dict], rows: list[str]
                       ) -> tuple[MetricTable | None, dict[str, float]]:
    """Steps to the training task-loss threshold per (row, data set) and the threshold per data set
    (:mod:`balora.experiments.convergence`); None when no counted cell logged a task loss."""
    thresholds = {}
    for data in spec.data:
        found = [counted[c.id].get("task_loss") or [] for c in cells if c.data == data and c.id in counted]
        found = [c for c in found if c]
        level = spec.report.loss_threshold if spec.report.loss_threshold is not None else common_threshold(found)
        if found and level is not None:
            thresholds[data] = level
    if not thresholds:
        return None, {}
    entries = {r: {d: Entry() for d in spec.data} for r in rows}
    for cell in cells:
        entry = entries[cell.row][cell.data]
        entry.planned += 1
        entry.name = STEPS_METRIC
        curve = counted[cell.id].get("task_loss") if cell.id in counted else None
        if curve and cell.data in thresholds:
            step = steps_to_reach(curve, thresholds[cell.data])
            if step is not None:
                entry.values[cell.seed] = step
    return MetricTable(STEPS_METRIC, "train", rows, list(spec.data), entries,
                       (*spec.report.lower_is_better, STEPS_METRIC)), thresholds


def _baseline_pairs(spec: ExperimentSpec, cells: list[Cell]) -> list[tuple[str, str]]:
    """(row, baseline row) pairs: every row against the row named ``report.baseline``, or, when it
    names a method, against that method's row of the same variant."""
    from balora.methods import parse_method

    def canonical(method: str) -> str:
        try:
            return parse_method(method).name
        except ValueError:
            return method

    rows = _rows(spec)
    baseline = spec.report.baseline
    if baseline in rows and (spec.variants is None or baseline not in spec.methods):
        return [(r, baseline) for r in rows if r != baseline]
    target = canonical(baseline)
    by_row = {c.row: c for c in cells}
    pairs = []
    for row in rows:
        cell = by_row.get(row)
        if cell is None or canonical(cell.method) == target:
            continue
        partner = next((r for r, c in by_row.items() if canonical(c.method) == target and c.variant == cell.variant),
                       None)
        if partner is not None:
            pairs.append((row, partner))
    return pairs


def _comparisons(spec: ExperimentSpec, cells: list[Cell], tables: list[MetricTable]) -> list[Comparison]:
    out = []
    for row, baseline in _baseline_pairs(spec, cells):
        for table in tables:
            diffs = []
            for data in table.data:
                mine, theirs = table.entries[row][data].values, table.entries[baseline][data].values
                diffs += [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))]
            out.append(Comparison(row, baseline, table.metric, paired_bootstrap(diffs, seed=BOOTSTRAP_SEED),
                                  table.lower()))
    return out


def _cost(spec: ExperimentSpec, cells: list[Cell], counted: dict[str, dict]) -> list[dict[str, Any]]:
    """Peak memory and time per (row, data set), over its counted cells (paper Table 5)."""
    out = []
    for row in _rows(spec):
        for data in spec.data:
            records = [counted[c.id] for c in cells if c.row == row and c.data == data and c.id in counted]
            if not records:
                continue
            peaks = [r["peak_rss_bytes"] / 2**20 for r in records if r.get("peak_rss_bytes")]
            walls = [r["timings"].get("wall_seconds") for r in records if r["timings"].get("wall_seconds") is not None]
            trains = [r["timings"].get("train_seconds") for r in records
                      if r["timings"].get("train_seconds") is not None]
            processes = [r["timings"].get("process_seconds") for r in records
                         if r["timings"].get("process_seconds") is not None]
            params = sorted({r["facts"].get("trainable_parameters") for r in records} - {None})
            out.append({
                "row": row, "data": data, "cells": len(records),
                "peak_rss_mib_mean": mean_std(peaks)[0], "peak_rss_mib_max": max(peaks) if peaks else math.nan,
                "wall_seconds_mean": mean_std(walls)[0], "wall_seconds_std": mean_std(walls)[1],
                "train_seconds_mean": mean_std(trains)[0], "process_seconds_mean": mean_std(processes)[0],
                "trainable_parameters": params[0] if len(params) == 1 else "/".join(map(str, params)),
                "isolation": "/".join(sorted({r.get("isolation") or "?" for r in records})),
                "resumed": sum(1 for r in records if r.get("resumed_from")),
            })
    return out


# --------------------------------------------------------------------------- writing


def _entry_text(entry: Entry) -> str:
    mean, std, n = entry.stats
    if n == 0:
        return DASH
    text = fmt(mean) if n < 2 else f"{fmt(mean)} ± {fmt(std)}"
    return text + (f" ({n}/{entry.planned})" if n < entry.planned else "")


def _split_text(spec: ExperimentSpec, split: str) -> str:
    if split == "validation":
        return ("**validation** split (carved from the TRAINING data by data.validation_fraction, seeded; "
                "stratified by class for classification, by template for gsm-symbolic)")
    if split == "train":
        return "**training** task loss logged during each run (the convergence table: see its text)"
    if split == OOD_MEAN:
        return ("**out-of-distribution** splits (data.ood_tasks: the mean over the evaluation splits of the "
                "tasks each cell names, scored by the model trained on the cell's task)")
    if split.startswith("ood/"):
        return (f"**out-of-distribution** split `{split}` (the evaluation split of {split[4:]}, scored by the "
                "model trained on each cell's task)")
    return "**test** split (each task's evaluation split: data.eval_file or the task's own held-out split)"


def _table_markdown(table: MetricTable) -> str:
    header = ["method", *[table.column_name(d) for d in table.data], "Avg"]
    best = {d: table.best({r: table.mean(r, d) for r in table.rows}, table.lower(d)) for d in table.data}
    best_avg = table.best({r: table.average(r) for r in table.rows}, table.lower())
    lines = []
    for row in table.rows:
        line = [row]
        for d in table.data:
            text = _entry_text(table.entries[row][d])
            line.append(f"**{text}**" if row in best[d] else text)
        avg = fmt(table.average(row))
        line.append(f"**{avg}**" if row in best_avg else avg)
        lines.append(line)
    return markdown_table(header, lines)


def write_report(spec: ExperimentSpec, store: ExperimentStore, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the report files (see the module docstring); returns the path of ``report.md``."""
    report = build_report(spec, store)
    out = Path(out_dir) if out_dir is not None else store.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    s = spec.report
    planned = spec.planned_count()
    seeds = ", ".join(map(str, spec.seeds))
    parts = [f"# Experiment `{spec.name}`", ""]
    if spec.description:
        parts += [spec.description.strip(), ""]
    parts += [
        f"Store: `{store.root}`. {planned} cells planned"
        + (f" ({_unused_candidates(report)} of them candidates of the selection that are not behind the tables)"
           if spec.select is not None else "")
        + f"; of the {len(report.cells)} cells behind the tables, {len(report.counted)} finished and are counted, "
        f"{len(report.not_counted)} are not (listed below). Seeds: {seeds}.",
        "",
        f"Every number of the metric tables comes from the {_split_text(spec, s.split)}: the mean ± sample "
        "standard deviation over the seeds of each (method, data set); an entry with fewer finished seeds than "
        "planned says so, e.g. (2/3). Best mean per column in **bold**. Avg: the mean of the row's column means "
        f"({DASH} when a column has no value).",
    ]
    if spec.select is not None:
        sel = spec.select
        parts += ["", f"`{sel.key}` was chosen per data set × method{' × variant' if spec.variants else ''} among "
                      f"{', '.join(map(str, sel.values))} on the {_split_text(spec, 'validation')}: best mean "
                      f"validation {sel.metric} ({sel.goal}) over seeds {', '.join(map(str, sel.seeds))}; the "
                      "test split was not used for the choice. The tables report the chosen value's cells."]
    for table in report.tables:
        parts += ["", f"## {table.metric} ({table.split} split)", ""]
        if table.metric == STEPS_METRIC:
            parts += [_convergence_text(report), ""]
        elif table.split != s.split:
            parts += [f"From the {_split_text(spec, table.split)}.", ""]
        parts += [_table_markdown(table)]
        write_csv(out / f"table_{table.metric.replace('/', '_')}.csv",
                   ["row", *[f"{d} {k}" for d in table.data for k in ("mean", "std", "n")], "Avg"],
                   [[r, *[csv_value(v) for d in table.data for v in table.entries[r][d].stats], csv_value(table.average(r))]
                    for r in table.rows])
    parts += ["", *_comparison_section(report, out)]
    calibration = calibration_section(report.cells, report.counted, store, spec.seeds, out)
    if calibration:
        parts += ["", *calibration]
    parts += ["", *_cost_section(report, out)]
    if spec.select is not None:
        parts += ["", *_selection_section(report, out)]
    parts += ["", *_figures_section(report, out)]
    if spec.merge is not None:
        parts += ["", *merge_section(spec, store, out)]
    parts += ["", *_not_counted_section(report)]
    parts += ["", *_provenance_section(report)]
    _write_cells_csv(report, out / "cells.csv")
    path = out / "report.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


def _convergence_text(report: Report) -> str:
    given = report.spec.report.loss_threshold is not None
    levels = ", ".join(f"{d}: {fmt(v)}" for d, v in report.thresholds.items())
    return ("Convergence speed: the first logged training step at which the task loss, smoothed by a trailing "
            f"mean over {SMOOTHING_WINDOW} logged points, is at or below "
            + ("report.loss_threshold" if given else
               "the level every counted cell of the data set reaches (the largest of the cells' lowest smoothed "
               "losses)")
            + f" ({levels}); lower is faster. Its resolution is train.logging_steps; a cell that never gets "
            "there has no value (an entry then shows fewer finished seeds than planned).")


def _unused_candidates(report: Report) -> int:
    used = {c.id for c in report.cells}
    return sum(1 for c in report.spec.selection_cells() if c.id not in used)


def _comparison_section(report: Report, out: Path) -> list[str]:
    lines = [f"## Paired comparison with {report.spec.report.baseline}", ""]
    if not report.comparisons:
        return lines + [f"No row to compare: the grid has no row for `{report.spec.report.baseline}` "
                        "(report.baseline) or no other row."]
    lines += ["Each row minus its baseline, paired by (data set, seed) over the cells both finished: the mean "
              "difference and its 95% percentile bootstrap interval (scipy.stats.bootstrap, "
              f"seed {BOOTSTRAP_SEED}), on the {report.spec.report.split} split. An interval that includes 0 "
              "means the difference is within the noise of this many runs; with fewer than "
              f"{MIN_RELIABLE_PAIRS} pairs no conclusion is drawn.", ""]
    rows = []
    for c in report.comparisons:
        d = c.difference
        interval = DASH if d.includes_zero is None else f"[{fmt(d.low)}, {fmt(d.high)}]"
        rows.append([f"{c.row} − {c.baseline}", c.metric, str(d.n), fmt(d.mean), interval, c.reading()])
    lines.append(markdown_table(["comparison", "metric", "pairs", "mean difference", "95% interval", "reading"],
                                 rows))
    write_csv(out / "comparison.csv",
               ["row", "baseline", "metric", "pairs", "mean_difference", "low", "high", "includes_zero"],
               [[c.row, c.baseline, c.metric, c.difference.n, csv_value(c.difference.mean),
                 csv_value(c.difference.low), csv_value(c.difference.high), c.difference.includes_zero]
                for c in report.comparisons])
    return lines


def _cost_section(report: Report, out: Path) -> list[str]:
    lines = ["## Cost (paper Table 5)", "",
             "Peak resident memory (RSS, sampled while the cell ran: the whole cell in its own process, or the "
             "runner's process with `--in-process`) and wall time of each cell (model loading, training and "
             "evaluation; the next column adds the child process's start-up), mean over the counted cells.", ""]
    rows = [[c["row"], c["data"], str(c["cells"]), fmt(c["peak_rss_mib_mean"], 0), fmt(c["peak_rss_mib_max"], 0),
             f"{fmt(c['wall_seconds_mean'], 1)} ± {fmt(c['wall_seconds_std'], 1)}", fmt(c["train_seconds_mean"], 1),
             fmt(c["process_seconds_mean"], 1),
             f"{c['trainable_parameters']:,}" if isinstance(c["trainable_parameters"], int)
             else str(c["trainable_parameters"]), c["isolation"]] for c in report.cost]
    lines.append(markdown_table(["method", "data", "cells", "peak RSS (MiB)", "max peak RSS (MiB)", "wall time (s)",
                                  "train time (s)", "with process start (s)", "trainable params", "isolation"], rows)
                 if rows
                 else "No finished cell.")
    write_csv(out / "cost.csv", list(report.cost[0]) if report.cost else ["row"],
               [[csv_value(v) for v in c.values()] for c in report.cost])
    return lines


def _selection_section(report: Report, out: Path) -> list[str]:
    sel = report.spec.select
    lines = [f"## Choice of {sel.key} (validation split)", "",
             f"Mean validation {sel.metric} over seeds {', '.join(map(str, sel.seeds))} (finished/planned cells); "
             "the chosen value in bold.", ""]
    rows, csv_rows = [], []
    for group, choice in report.choices.items():
        label = " · ".join(g for g in group if g)
        if report.spec.candidates(group) == [None]:
            rows.append([label, f"{sel.key} does not apply (single candidate)", ""])
            continue
        texts = []
        for value, mean, n, planned in choice.scores:
            text = f"{value}: {fmt(mean)} ({n}/{planned})"
            texts.append(f"**{text}**" if value == choice.value else text)
            csv_rows.append([label, value, csv_value(mean), n, planned, value == choice.value])
        best = [m for _, m, _, _ in choice.scores if m is not None]
        tie = len(best) > 1 and sum(m == (max(best) if sel.goal == "max" else min(best)) for m in best) > 1
        notes = ["no candidate finished: not chosen"] if choice.value is None else []
        notes += [f"chosen without {len(choice.missing)} unfinished cell(s)"] if choice.missing else []
        notes += ["a tie: the first listed value is taken"] if tie and choice.value is not None else []
        note = "; ".join(notes)
        rows.append([label, "; ".join(texts), note])
    lines.append(markdown_table(["data · method", "candidates", "note"], rows))
    write_csv(out / "selection.csv", ["group", "value", "validation_mean", "finished", "planned", "chosen"], csv_rows)
    return lines


def _figures_section(report: Report, out: Path) -> list[str]:
    spec = report.spec
    plot_task_loss(report.curves, out / "task_loss.png",
                   title=f"{spec.name}: training task loss per method (mean over seeds)")
    bars = {}
    for table in report.tables:
        names = sorted({e.name for row in table.entries.values() for e in row.values() if e.name})
        label = f"headline: {', '.join(names)}" if table.metric == "headline" and names else table.metric
        bars[f"{label} ({table.split})"] = {
            d: {r: table.entries[r][d].stats[:2] for r in table.rows} for d in table.data}
    plot_metric_bars(bars, out / "metrics.png", title=f"{spec.name}: mean over seeds, error bars = std")
    lines = ["## Figures", "", "![training task loss](task_loss.png)", "",
             f"![metrics, {spec.report.split} split](metrics.png)"]
    return lines + _sweep_figure(report, out) + _tsne_figures(report, out)


def _sweep_figure(report: Report, out: Path) -> list[str]:
    """``sweep.png`` (with ``report.sweep``): every table's mean ± std against the swept value, one
    line per method, one panel per (metric, data set)."""
    sweep = report.spec.report.sweep
    if sweep is None:
        return []
    value = dict(sweep.values)
    rows = {}  # method -> [(x, row)]
    for cell in report.cells:
        if cell.variant in value and (value[cell.variant], cell.row) not in rows.setdefault(cell.method, []):
            rows[cell.method].append((value[cell.variant], cell.row))
    panels = {}
    for table in report.tables:
        for data in table.data:
            panels[f"{table.metric} ({table.split}), {data}"] = {
                method: [(x, *table.entries[row][data].stats[:2]) for x, row in points]
                for method, points in rows.items()}
    plot_sweep(panels, out / "sweep.png", xlabel=sweep.name, log_x=sweep.log,
               title=f"{report.spec.name}: mean over seeds against {sweep.name}, error bars = std")
    return ["", f"![metrics against {sweep.name}](sweep.png)"]


def _tsne_figures(report: Report, out: Path) -> list[str]:
    """Per data set, a t-SNE panel per row of the test split's final-layer features (``features.npy``,
    saved by runs with ``data.class_counts``) of its first counted seed; [] when no run saved any."""
    from balora.evaluation.features import FEATURES_FILE, plot_tsne
    from balora.run_dir import PREDICTIONS_FILE

    lines = []
    for data in report.spec.data:
        features, labels, seeds = {}, {}, {}
        for row in _rows(report.spec):
            for cell in sorted((c for c in report.cells if c.row == row and c.data == data and c.id in report.counted),
                               key=lambda c: report.spec.seeds.index(c.seed)):
                run = report.counted[cell.id].get("run_dir")
                folder = report.store.root / run if run else None
                if folder is None or not (folder / FEATURES_FILE).is_file() or not (folder / PREDICTIONS_FILE).is_file():
                    continue
                with open(folder / PREDICTIONS_FILE) as handle:
                    labels[row] = [json.loads(line)["label"] for line in handle if line.strip()]
                features[row], seeds[row] = np.load(folder / FEATURES_FILE), cell.seed
                break
        if not features:
            continue
        names = sorted({name for found in labels.values() for name in found})
        ids = {row: [names.index(n) for n in found] for row, found in labels.items()}
        name = f"tsne_{data}.png"
        plot_tsne(features, ids, names, out / name,
                  title=f"{report.spec.name}, {data}: t-SNE of the test split's final-layer features "
                        f"(seed {', '.join(sorted({str(s) for s in seeds.values()}))})")
        lines += ["", f"![t-SNE of the final-layer features, {data}]({name})"]
    return lines


def _not_counted_section(report: Report) -> list[str]:
    lines = ["## Cells not counted", ""]
    if not report.not_counted and not report.waiting:
        return lines + ["None: every planned cell finished and is counted."]
    rows = [[cell_id, status, detail.replace("|", "\\|")] for cell_id, status, detail in report.not_counted]
    rows += [[" · ".join(g for g in group if g), "waiting", "no candidate of the selection finished"]
             for group in report.waiting]
    return lines + [markdown_table(["cell", "status", "detail"], rows)]


def _provenance_section(report: Report) -> list[str]:
    records = list(report.counted.values())
    lines = ["## Provenance", ""]
    if not records:
        return lines + ["No finished cell."]
    commits = sorted({f"{r['git']['commit'][:12]}{' (uncommitted changes)' if r['git'].get('dirty') else ''}"
                      for r in records if r.get("git")})
    versions = {}
    for r in records:
        for name, version in (r.get("versions") or {}).items():
            versions.setdefault(name, set()).add(str(version))
    machines = sorted({f"{m.get('platform')}, {m.get('cpus')} CPUs{', CUDA' if m.get('cuda') else ''}"
                       for r in records if (m := r.get("machine"))})
    lines.append(f"- code: {', '.join(commits) or 'not in a git checkout'}")
    lines.append("- versions: " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items())))
    lines += [f"- machine: {m}" for m in machines]
    return lines


def _write_cells_csv(report: Report, path: Path) -> None:
    rows = []
    for cell in report.cells:
        record = report.counted.get(cell.id)
        if record is None:
            continue
        for metric in report.spec.report.metrics:
            for split in ("test", "validation") if not metric.startswith("ood/") else ("test",):
                name, value = record_metric(record, metric, split)
                if value is not None:
                    rows.append([cell.id, cell.data, cell.method, cell.variant or "",
                                 "" if cell.value is None else cell.value, cell.seed,
                                 metric_split(metric, split)[0], name, value])
    write_csv(path, ["cell", "data", "method", "variant", "selected", "seed", "split", "metric", "value"], rows)
