"""The report section of a grid's merge stage (:mod:`balora.experiments.merges`): I-LoRA's metrics.

From the merge records (and nothing else), per (method, variant) row, mean ± sample std over seeds:

* **single adapters** (the routing-tuning ablation): each data set's score of the task's own adapter,
  and its **general retention** = similarity AUC of the adapted encoder ÷ the pre-trained one's
  (:func:`balora.merging.metrics.generalization_retention`);
* **the reference merge of every row**: the mean **remaining performance** (merged score ÷ the row's
  own single adapter's score, :func:`~balora.merging.metrics.remaining_performance`, averaged over
  the data sets), the mean **normalized score** (merged score ÷ the single adapter of
  ``merge.normalize_by``'s variant, :func:`~balora.merging.metrics.mean_normalized_score`, so rows
  trained differently are measured against one reference), and the merged model's general retention;
* **every merge method** (the ρ and merge-function ablation): remaining performance per data set
  and mean, the **degradation ratio** (1 − mean remaining performance) and the general retention;
* **adding tasks one by one** (``merge.incremental``): the mean remaining performance over the
  first k data sets of the reference merge of k data sets;
* **paired comparisons** of each row with the baseline row (``report.baseline`` when it names a
  variant, else ``merge.normalize_by``), paired by (data set, seed), with the 95% bootstrap interval
  of :func:`balora.experiments.stats.paired_bootstrap`.

Ratios are per seed (merged and single of one seed), then averaged; a seed whose single score is
missing gives no ratio. Files: ``merge_single.csv``, ``merge_methods.csv``, ``merge_incremental.csv``,
``merge_comparison.csv``, and the figures ``merge_methods.png``, ``merge_sweep.png`` (with
``merge.sweep``) and ``merge_incremental.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balora.experiments.figures import plot_sweep
from balora.experiments.merges import BASE, MERGE, SINGLE, merge_records, plan_merges
from balora.experiments.spec import ExperimentSpec
from balora.experiments.stats import BOOTSTRAP_SEED, MIN_RELIABLE_PAIRS, mean_std, paired_bootstrap
from balora.experiments.store import FINISHED, ExperimentStore
from balora.experiments.tables import DASH, csv_value, fmt, markdown_table, write_csv
from balora.merging.metrics import generalization_retention, ratio

__all__ = ["merge_section"]



def _stat_text(values: Sequence[float], planned: int | None = None) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    mean, std, n = mean_std(values)
    if n == 0:
        return DASH
    text = fmt(mean) if n < 2 else f"{fmt(mean)} ± {fmt(std)}"
    return text + (f" ({n}/{planned})" if planned is not None and n < planned else "")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    write_csv(path, header, [[csv_value(v) for v in row] for row in rows])


class _Results:
    """The finished merge records of a spec, indexed for the tables."""

    def __init__(self, spec: ExperimentSpec, store: ExperimentStore):
        self.spec, self.settings = spec, spec.merge
        records = merge_records(store)
        self.jobs = plan_merges(spec)
        self.done = {j.id: records[j.id] for j in self.jobs
                     if records.get(j.id, {}).get("status") == FINISHED and records[j.id].get("signature") == j.signature}
        self.missing = [(j.id, records.get(j.id, {}).get("status", "not run"), records.get(j.id, {}).get("error") or "")
                        for j in self.jobs if j.id not in self.done]
        base = self.done.get(BASE)
        self.base_auc = (base.get("general") or {}).get("similarity_auc") if base else None
        self.multi_method = len(spec.methods) > 1
        self.single: dict[tuple, dict] = {}  # (method, variant, seed, data) -> record
        self.merged: dict[tuple, dict] = {}  # (method, variant, merge, k, seed) -> record
        for job in self.jobs:
            record = self.done.get(job.id)
            if record is None or job.kind == BASE:
                continue
            cell = job.cells[0]
            if job.kind == SINGLE:
                self.single[(cell.method, cell.variant, cell.seed, cell.data)] = record
            elif job.kind == MERGE:
                self.merged[(cell.method, cell.variant, job.merge, len(job.cells), cell.seed)] = record
        self.rows = list(dict.fromkeys((c.method, c.variant) for c in spec.cells))

    def row_name(self, method: str, variant: str | None) -> str:
        if variant is None:
            return method
        return f"{method} · {variant}" if self.multi_method else variant

    def score(self, record: dict | None, data: str) -> float:
        value = ((record or {}).get("scores") or {}).get(data, {}).get(self.settings.score)
        return math.nan if value is None else float(value)

    def retention(self, record: dict | None) -> float:
        auc = ((record or {}).get("general") or {}).get("similarity_auc")
        if auc is None or self.base_auc is None:
            return math.nan
        return generalization_retention(auc, self.base_auc)

    def single_score(self, method, variant, seed, data) -> float:
        return self.score(self.single.get((method, variant, seed, data)), data)

    def remaining(self, method, variant, merge, k, seed) -> dict[str, float]:
        """data -> merged ÷ own single score of one merge (the first k data sets)."""
        record = self.merged.get((method, variant, merge, k, seed))
        if record is None:
            return {}
        return {d: ratio(self.score(record, d), self.single_score(method, variant, seed, d))
                for d in self.spec.data[:k]}

    def normalized(self, method, variant, merge, seed) -> dict[str, float]:
        """data -> merged score ÷ the single score of ``normalize_by``'s variant (same method, seed)."""
        n = len(self.spec.data)
        record = self.merged.get((method, variant, merge, n, seed))
        if record is None:
            return {}
        reference = self.settings.normalize_by if self.settings.normalize_by is not None else variant
        return {d: ratio(self.score(record, d), self.single_score(method, reference, seed, d)) for d in self.spec.data}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _single_section(r: _Results, out: Path) -> list[str]:
    spec, s, n = r.spec, r.settings, len(r.spec.data)
    header = ["row", *[f"{d} {s.score}" for d in spec.data]]
    if s.general:
        header.append("single: general retention")
    header += [f"{s.reference}: remaining performance", f"{s.reference}: normalized score"]
    if s.general:
        header.append(f"{s.reference}: general retention")
    lines, csv_rows = [], []
    for method, variant in r.rows:
        line = [r.row_name(method, variant)]
        for d in spec.data:
            values = [r.single_score(method, variant, seed, d) for seed in spec.seeds]
            line.append(_stat_text(values, len(spec.seeds)))
            csv_rows += [[line[0], seed, d, "single_score", v] for seed, v in zip(spec.seeds, values)]
        if s.general:
            kept = [r.retention(r.single.get((method, variant, seed, d))) for seed in spec.seeds for d in spec.data]
            line.append(_stat_text(kept, len(spec.seeds) * n))
            csv_rows += [[line[0], seed, d, "single_general_retention",
                          r.retention(r.single.get((method, variant, seed, d)))] for seed in spec.seeds for d in spec.data]
        rp = [_mean(r.remaining(method, variant, s.reference, n, seed).values()) for seed in spec.seeds]
        ns = [_mean(r.normalized(method, variant, s.reference, seed).values()) for seed in spec.seeds]
        line += [_stat_text(rp, len(spec.seeds)), _stat_text(ns, len(spec.seeds))]
        csv_rows += [[line[0], seed, "mean", "merged_remaining_performance", v] for seed, v in zip(spec.seeds, rp)]
        csv_rows += [[line[0], seed, "mean", "merged_normalized_score", v] for seed, v in zip(spec.seeds, ns)]
        if s.general:
            kept = [r.retention(r.merged.get((method, variant, s.reference, n, seed))) for seed in spec.seeds]
            line.append(_stat_text(kept, len(spec.seeds)))
            csv_rows += [[line[0], seed, "mean", "merged_general_retention", v] for seed, v in zip(spec.seeds, kept)]
        lines.append(line)
    _write_csv(out / "merge_single.csv", ["row", "seed", "data", "metric", "value"], csv_rows)
    norm = f"the single adapter of `{s.normalize_by}`" if s.normalize_by else "the row's own single adapter"
    text = [f"## Merging: single adapters and the reference merge `{s.reference}`", "",
            f"Test-split `{s.score}` of each task's own adapter (scored again by the merge stage, with the code that "
            "scores the merged adapters), mean ± std over seeds. Remaining performance: the merged adapter's score "
            f"÷ the row's own single adapter's (same seed), averaged over the {n} data sets; normalized score: the "
            f"merged score ÷ {norm} (same seed), averaged, so rows trained differently meet one reference."]
    if s.general:
        text += ["", f"General retention: the zero-shot similarity AUC on `{s.general}` of the adapted encoder ÷ "
                     f"the pre-trained encoder's ({fmt(r.base_auc)}); 1 = all of the pre-trained skill kept."]
    return text + ["", markdown_table(header, lines)]


def _methods_section(r: _Results, out: Path) -> tuple[list[str], dict]:
    spec, s, n = r.spec, r.settings, len(r.spec.data)
    header = ["row", "merge", *[f"{d}" for d in spec.data], "mean", "degradation"]
    if s.general:
        header.append("general retention")
    lines, csv_rows, bars = [], [], {}
    for method, variant in r.rows:
        row = r.row_name(method, variant)
        for entry in s.methods:
            if entry.variants is not None and variant not in entry.variants:
                continue
            per_seed = [r.remaining(method, variant, entry.name, n, seed) for seed in spec.seeds]
            line = [row, entry.name]
            for d in spec.data:
                line.append(_stat_text([p.get(d, math.nan) for p in per_seed], len(spec.seeds)))
            means = [_mean(p.values()) if p else math.nan for p in per_seed]
            line += [_stat_text(means, len(spec.seeds)), _stat_text([1 - m for m in means], len(spec.seeds))]
            if s.general:
                kept = [r.retention(r.merged.get((method, variant, entry.name, n, seed))) for seed in spec.seeds]
                line.append(_stat_text(kept, len(spec.seeds)))
            else:
                kept = [math.nan] * len(spec.seeds)
            lines.append(line)
            for seed, p, m, g in zip(spec.seeds, per_seed, means, kept):
                csv_rows += [[row, entry.name, seed, d, p.get(d, math.nan)] for d in spec.data]
                csv_rows += [[row, entry.name, seed, "mean", m], [row, entry.name, seed, "general_retention", g]]
            mean, std, _ = mean_std([m for m in means if not math.isnan(m)])
            bars[f"{row} · {entry.name}"] = (mean, std)
    _write_csv(out / "merge_methods.csv", ["row", "merge", "seed", "data", "remaining_performance"], csv_rows)
    text = ["## Merging: every merge method (remaining performance)", "",
            f"Per data set, merged `{s.score}` ÷ the row's own single adapter's (same seed), mean ± std over seeds; "
            "mean: over the data sets; degradation: 1 − mean. Options of each merge:", ""]
    text += [f"- `{m.name}`: " + ", ".join(f"{k}={v}" for k, v in m.options) for m in s.methods]
    return text + ["", markdown_table(header, lines)], bars


def _incremental_section(r: _Results, out: Path) -> tuple[list[str], dict]:
    spec, s, n = r.spec, r.settings, len(r.spec.data)
    if not s.incremental:
        return [], {}
    header = ["row", *[f"k={k} ({', '.join(spec.data[:k])})" for k in range(2, n + 1)]]
    lines, csv_rows, panel = [], [], {}
    for method, variant in r.rows:
        row = r.row_name(method, variant)
        line, points = [row], []
        for k in range(2, n + 1):
            means = [_mean(p.values()) if (p := r.remaining(method, variant, s.reference, k, seed)) else math.nan
                     for seed in spec.seeds]
            line.append(_stat_text(means, len(spec.seeds)))
            csv_rows += [[row, k, seed, m] for seed, m in zip(spec.seeds, means)]
            mean, std, _ = mean_std([m for m in means if not math.isnan(m)])
            points.append((float(k), mean, std))
        lines.append(line)
        panel[row] = points
    _write_csv(out / "merge_incremental.csv", ["row", "tasks_merged", "seed", "mean_remaining_performance"], csv_rows)
    text = [f"## Merging: adding tasks one by one (`{s.reference}`)", "",
            "The reference merge of the first k data sets; each entry the mean remaining performance over those k "
            "data sets, mean ± std over seeds."]
    return text + ["", markdown_table(header, lines)], {f"mean remaining performance ({s.score})": panel}


def _comparison_section(r: _Results, out: Path) -> list[str]:
    spec, s, n = r.spec, r.settings, len(r.spec.data)
    variants = [v for _, v in r.rows]
    baseline = spec.report.baseline if spec.report.baseline in variants else s.normalize_by
    if baseline is None:
        return []
    measures = {
        f"single {s.score}": lambda m, v, seed, d: r.single_score(m, v, seed, d),
        f"merged ({s.reference}) normalized score": lambda m, v, seed, d: r.normalized(m, v, s.reference, seed).get(d, math.nan),
        f"merged ({s.reference}) remaining performance":
            lambda m, v, seed, d: r.remaining(m, v, s.reference, n, seed).get(d, math.nan),
    }
    if s.general:
        measures["single general retention"] = lambda m, v, seed, d: r.retention(r.single.get((m, v, seed, d)))
    lines, csv_rows = [], []
    for method, variant in r.rows:
        if variant == baseline:
            continue
        row = r.row_name(method, variant)
        for name, value in measures.items():
            diffs = [value(method, variant, seed, d) - value(method, baseline, seed, d)
                     for seed in spec.seeds for d in spec.data]
            diffs = [x for x in diffs if not math.isnan(x)]
            diff = paired_bootstrap(diffs, seed=BOOTSTRAP_SEED)
            if diff.n < MIN_RELIABLE_PAIRS or diff.includes_zero is None:
                reading = f"too few pairs ({diff.n}) to conclude"
            elif diff.includes_zero:
                reading = "within the noise (interval includes 0)"
            else:
                reading = "higher" if diff.mean > 0 else "lower"
            interval = DASH if diff.includes_zero is None else f"[{fmt(diff.low)}, {fmt(diff.high)}]"
            lines.append([f"{row} − {r.row_name(method, baseline)}", name, str(diff.n), fmt(diff.mean), interval,
                          reading])
            csv_rows.append([row, baseline, name, diff.n, diff.mean, diff.low, diff.high, diff.includes_zero])
    _write_csv(out / "merge_comparison.csv",
               ["row", "baseline", "measure", "pairs", "mean_difference", "low", "high", "includes_zero"], csv_rows)
    return [f"## Merging: paired comparison with `{baseline}`", "",
            "Each row minus the baseline row, paired by (data set, seed): the mean difference and its 95% percentile "
            f"bootstrap interval (seed {BOOTSTRAP_SEED}).", "",
            markdown_table(["comparison", "measure", "pairs", "mean difference", "95% interval", "reading"], lines)]


def _sweep_figure(r: _Results, out: Path) -> list[str]:
    sweep = r.settings.sweep
    if sweep is None:
        return []
    spec, n = r.spec, len(r.spec.data)
    panels: dict[str, dict] = {}
    for method, variant in r.rows:
        row = r.row_name(method, variant)
        for merge, x in sweep.values:
            entry = r.settings.by_name[merge]
            if entry.variants is not None and variant not in entry.variants:
                continue
            per_seed = [r.remaining(method, variant, merge, n, seed) for seed in spec.seeds]
            for d in (*spec.data, "mean"):
                values = [(_mean(p.values()) if d == "mean" else p.get(d, math.nan)) if p else math.nan
                          for p in per_seed]
                mean, std, _ = mean_std([v for v in values if not math.isnan(v)])
                panels.setdefault(f"remaining performance, {d}", {}).setdefault(row, []).append((x, mean, std))
    plot_sweep(panels, out / "merge_sweep.png", xlabel=sweep.name, log_x=sweep.log,
               title=f"{spec.name}: remaining performance against {sweep.name} (mean over seeds, error bars = std)")
    return ["", f"![remaining performance against {sweep.name}](merge_sweep.png)"]


def _plot_merge_bars(bars: dict[str, tuple[float, float]], path: Path, xlabel: str, title: str) -> Path:
    """One horizontal bar per (row · merge) at its mean over seeds, the std as error bar, in table order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from balora.plots import save_figure

    labels = list(bars)
    means = [0.0 if math.isnan(bars[k][0]) else bars[k][0] for k in labels]
    stds = [0.0 if math.isnan(bars[k][1]) else bars[k][1] for k in labels]
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.32 * len(labels)))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, means, xerr=stds, capsize=3, color="tab:blue", alpha=0.8)
    for yi, k, m in zip(y, labels, means):
        ax.text(m, yi, f" {_fmt_or_blank(bars[k][0])}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, title, title_size=10)


def _fmt_or_blank(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3f}"


def merge_section(spec: ExperimentSpec, store: ExperimentStore, out: Path) -> list[str]:
    """The Markdown lines of the merge stage's part of ``report.md`` (and its CSV and PNG files in
    ``out``); [] for a spec without ``merge``."""
    if spec.merge is None:
        return []
    r = _Results(spec, store)
    parts = _single_section(r, out)
    methods, bars = _methods_section(r, out)
    parts += ["", *methods]
    incremental, panel = _incremental_section(r, out)
    if incremental:
        parts += ["", *incremental]
    comparison = _comparison_section(r, out)
    if comparison:
        parts += ["", *comparison]
    figures = ["## Merging: figures"]
    if bars:
        _plot_merge_bars(bars, out / "merge_methods.png", xlabel=f"mean remaining performance ({spec.merge.score})",
                         title=f"{spec.name}: mean remaining performance per merge (mean over seeds, error bars = std)")
        figures += ["", "![remaining performance per merge method](merge_methods.png)"]
    figures += _sweep_figure(r, out)
    if panel:
        plot_sweep(panel, out / "merge_incremental.png", xlabel="tasks merged",
                   title=f"{spec.name}: adding tasks one by one ({spec.merge.reference})")
        figures += ["", "![adding tasks one by one](merge_incremental.png)"]
    parts += ["", *figures, "", "## Merging: jobs not counted", ""]
    if r.missing:
        parts.append(markdown_table(["job", "status", "detail"],
                            [[i, st, e.replace("|", "\\|").splitlines()[0] if e else ""] for i, st, e in r.missing]))
    else:
        parts.append("None: every planned merge job finished and is counted.")
    return parts
