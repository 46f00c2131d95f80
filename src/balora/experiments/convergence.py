"""Convergence speed: the training step at which a run's (smoothed) task loss first reaches a threshold.

The requested initialisation ablation asks for convergence speed next to the scores. A cell's
record holds its training task loss as logged (``task_loss``: ``[[step, value], ...]``, every
``train.logging_steps``). One logged value is one micro-batch's loss and noisy, so the curve is
first smoothed by a trailing moving mean over :data:`SMOOTHING_WINDOW` logged points; the
cell's convergence step is the first logged step whose smoothed loss is at or below the
threshold (None when it never gets there).

The threshold of a data set is ``report.loss_threshold`` when the spec sets it; otherwise the
loss level that EVERY counted cell of that data set reaches: the largest of the cells' lowest
smoothed losses (:func:`common_threshold`). Every cell then has a step, and the steps compare
how fast each method gets to the same place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SMOOTHING_WINDOW", "STEPS_METRIC", "common_threshold", "smoothed", "steps_to_reach"]

#: Logged points in the trailing moving mean of a loss curve.
SMOOTHING_WINDOW = 3
#: The name of the convergence table's metric (lower is better).
STEPS_METRIC = "steps_to_task_loss"

Curve = Sequence[Sequence[float]]  # [[step, loss], ...]


def smoothed(curve: Curve, window: int = SMOOTHING_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """``(steps (n,), trailing moving mean of the losses (n,))`` of ``curve``; the first points
    average what there is so far. Non-finite losses are dropped first."""
    points = [(float(s), float(v)) for s, v in curve if math.isfinite(float(v))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = (np.asarray(x) for x in zip(*points))
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return steps, (cumulative[idx] - cumulative[start]) / (idx - start)


def steps_to_reach(curve: Curve, threshold: float, window: int = SMOOTHING_WINDOW) -> float | None:
    """The first logged step whose smoothed loss is <= ``threshold``, or None."""
    steps, values = smoothed(curve, window)
    hit = np.nonzero(values <= threshold)[0]
    return float(steps[hit[0]]) if hit.size else None


def common_threshold(curves: Sequence[Curve], window: int = SMOOTHING_WINDOW) -> float | None:
    """The loss level every curve reaches: the largest of their lowest smoothed losses (None
    when no curve has a point)."""
    lows = [float(v.min()) for _, v in (smoothed(c, window) for c in curves) if v.size]
    return max(lows) if lows else None
