"""Figures: a run's loss curves, and the comparison of several runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("task_loss", "reg_consistency", "reg_diversity", "reg_svd")
LAMBDA_KEYS = ("lambda_consistency", "lambda_diversity", "lambda_svd")


def save_figure(fig, path: str | os.PathLike, title: str = "", title_size: float | None = None) -> Path:
    """Give ``fig`` its title, lay it out, write it to ``path`` (PNG, 110 dpi), close it; returns the path."""
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(history: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curve(history: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Task loss and each regulariser (left), each λ (right) against the optimiser step."""
    fig, (ax_loss, ax_lambda) = plt.subplots(1, 2, figsize=(11, 4))
    losses = _plot_lines(ax_loss, [(key, history, key) for key in LOSS_KEYS])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("value (averaged over logging interval)")
    ax_loss.set_title("task loss and regularisers" if losses else "no training step was logged")
    lambdas = _plot_lines(ax_lambda, [(key, history, key) for key in LAMBDA_KEYS])
    ax_lambda.set_xlabel("step")
    ax_lambda.set_title("λ schedule" if lambdas else "no regularisers in this run")
    return save_figure(fig, path, title)


def _plot_lines(ax, lines: Sequence[tuple[str, Sequence[Mapping], str]]) -> bool:
    """Plot each ``(label, history, key)`` that has logged values; add a legend if any was plotted."""
    plotted = False
    for label, history, key in lines:
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, label=label)
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    return plotted


def plot_comparison(
    rows: Sequence[Mapping],
    metrics: Sequence[tuple[str, str]],
    path: str | os.PathLike,
    histories: Mapping[str, Sequence[Mapping]] | None = None,
    title: str = "",
) -> Path:
    """Bar charts of ``metrics`` ((key, label) pairs) for each row's ``method``, plus task-loss curves."""
    panels = len(metrics) + (1 if histories else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.8))
    axes = list(axes) if panels > 1 else [axes]
    methods = [str(r["method"]) for r in rows]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, metrics):
        values = [float(r.get(key, float("nan"))) for r in rows]
        bars = ax.bar(methods, values, color=colors[: len(methods)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(label, fontsize=10)
        finite = [v for v in values if v == v]
        top = max(finite + [0.0])
        ax.set_ylim(0, 1.1 if top <= 1.0 else top * 1.2)  # rates share a 0-1 axis, even when all 0
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if histories:
        ax = axes[-1]
        logged = _plot_lines(ax, [(method, history, "task_loss") for method, history in histories.items()])
        ax.set_title("training task loss" if logged else "no training step was logged", fontsize=10)
        ax.set_xlabel("step")
    return save_figure(fig, path, title)
