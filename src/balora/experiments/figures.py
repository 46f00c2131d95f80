"""Figures of an experiment report: task-loss curves per method, metric bars with error bars, and
sweep lines (a metric against a swept setting such as the rank or λ1, paper Figures 4 and 6)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from balora.plots import save_figure  # noqa: E402

__all__ = ["plot_metric_bars", "plot_sweep", "plot_task_loss"]

Curve = Sequence[Sequence[float]]  # [[step, value], ...]


def _panels(count: int, width: float = 4.6, height: float = 3.6):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    total = max(width * columns, 7.0)  # room for the figure's title
    fig, axes = plt.subplots(rows, columns, figsize=(total, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_task_loss(curves: Mapping[str, Mapping[str, Sequence[Curve]]], path: str | os.PathLike,
                   title: str = "") -> Path:
    """One panel per data set; per method, the mean training task loss over its seeds (line) and
    the range over the seeds (band), against the optimiser step.

    ``curves[data][row]`` is a list of curves, one per seed, each ``[[step, task loss], ...]``.
    """
    fig, axes = _panels(max(len(curves), 1))
    for ax, (data, rows) in zip(axes, curves.items() or [("no data", {})]):
        plotted = False
        for row, runs in rows.items():
            runs = [dict((int(s), float(v)) for s, v in run) for run in runs if run]
            if not runs:
                continue
            steps = sorted(set().union(*runs))
            values = [[run[s] for run in runs if s in run] for s in steps]
            mean = [float(np.mean(v)) for v in values]
            line, = ax.plot(steps, mean, label=f"{row} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                                color=line.get_color(), alpha=0.15, linewidth=0)
            plotted = True
        ax.set_title(f"{data}\n(band: min-max over seeds)" if plotted
                     else f"{data}: no training step was logged", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("task loss, mean over seeds")
        if plotted:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title, title_size=11)


def plot_metric_bars(tables: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                     path: str | os.PathLike, title: str = "") -> Path:
    """One panel per metric: for each data set (x), one bar per method at its mean over seeds,
    with the sample standard deviation as the error bar (none with one seed).

    ``tables[metric label][data][row] = (mean, std)``; a missing or NaN mean draws no bar.
    """
    fig, axes = _panels(max(len(tables), 1), width=max(4.6, 1.2 + 0.9 * _max_bars(tables)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, by_data) in zip(axes, tables.items()):
        data = list(by_data)
        rows = list(dict.fromkeys(r for cells in by_data.values() for r in cells))
        width = 0.8 / max(len(rows), 1)
        tops, lows = [], []
        for i, row in enumerate(rows):
            x = np.arange(len(data)) + (i - (len(rows) - 1) / 2) * width
            means = [by_data[d].get(row, (math.nan, math.nan))[0] for d in data]
            stds = [by_data[d].get(row, (math.nan, math.nan))[1] for d in data]
            errors = [0.0 if math.isnan(s) else s for s in stds]
            bars = ax.bar(x, means, width, yerr=errors, capsize=3, label=row, color=colors[i % len(colors)])
            ax.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.3g}" for m in means], fontsize=7,
                         padding=2)
            tops += [m + e for m, e in zip(means, errors) if not math.isnan(m)]
            lows += [m - e for m, e in zip(means, errors) if not math.isnan(m)]
        ax.set_xticks(np.arange(len(data)), data, fontsize=8)
        ax.set_title(metric, fontsize=10)
        top, low = max(tops + [0.0]), min(lows + [0.0])
        # rates share a 0-1 axis; the space above the bars holds the legend
        ax.set_ylim(low * 1.15 if low < 0 else 0, 1.4 if top <= 1.0 else top * 1.5)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.legend(fontsize=7, loc="upper center", ncol=min(len(rows), 2), frameon=False)
    return save_figure(fig, path, title, title_size=11)


def _max_bars(tables) -> int:
    return max((len(cells) * max(len(by_data), 1) for by_data in tables.values()
                for cells in by_data.values()), default=1)


def plot_sweep(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]], path: str | os.PathLike,
               xlabel: str, title: str = "", log_x: bool = False) -> Path:
    """One panel per (metric, data set): per method, the mean over seeds against the swept value,
    with the sample standard deviation as error bars.

    ``panels[panel title][method] = [(x, mean, std), ...]``; NaN means are left out.
    """
    fig, axes = _panels(max(len(panels), 1))
    for ax, (name, lines) in zip(axes, panels.items() or [("no data", {})]):
        for method, points in lines.items():
            points = sorted((x, m, 0.0 if math.isnan(sd) else sd) for x, m, sd in points if not math.isnan(m))
            if points:
                xs, means, stds = zip(*points)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title, title_size=11)
