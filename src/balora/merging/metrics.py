"""The metrics of merged adapters in the I-LoRA ablation plan, as pure functions of scores.

* :func:`remaining_performance` -- per task, the merged model's score ÷ the task's own single
  adapter's score, and their mean;
* :func:`degradation_ratio` -- 1 − remaining performance, per task and mean;
* :func:`generalization_retention` -- a general (non-task) score after adaptation ÷ before (the base
  model's); for a lower-is-better score such as perplexity, before ÷ after (base PPL ÷ adapted PPL);
* :func:`mean_normalized_score` -- per task (score − low) ÷ (reference − low), and their mean (low 0:
  score ÷ reference; for games, the reference is a human score and low a random agent's).

Undefined values are NaN, never an exception, and are not skipped: a ratio whose denominator is 0,
negative or NaN, or whose numerator is NaN, is NaN (a "fraction kept" of a reference that is not
positive means nothing), as is ∞ ÷ ∞; and a mean over tasks is NaN when any of its terms is, so one
degenerate task is visible instead of silently dropped. A numerator may be negative or infinite, a
denominator infinite (perplexity ∞ after adaptation gives a retention of 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "MEAN",
    "degradation_ratio",
    "generalization_retention",
    "mean_normalized_score",
    "ratio",
    "remaining_performance",
]

#: The key of the mean over tasks in the per-task results.
MEAN = "mean"


def ratio(numerator: float, denominator: float) -> float:
    """numerator ÷ denominator; NaN when the denominator is not positive (0, negative, NaN), the
    numerator is NaN, or both are infinite."""
    numerator, denominator = float(numerator), float(denominator)
    if math.isnan(numerator) or not denominator > 0 or (math.isinf(numerator) and math.isinf(denominator)):
        return math.nan
    return numerator / denominator


def _mean(values: Mapping[str, float]) -> float:
    """The plain mean (NaN when any value is NaN, or there is none)."""
    return sum(values.values()) / len(values) if values else math.nan


def _same_tasks(scores: Mapping[str, float], references: Mapping[str, float], what: str) -> None:
    if set(scores) != set(references):
        missing = sorted(set(scores) ^ set(references))
        raise ValueError(f"{what}: the scores and the references name different tasks ({', '.join(missing)})")
    if MEAN in scores:
        raise ValueError(f"{what}: {MEAN!r} is the key of the mean, not a task name")


def remaining_performance(merged: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """Per task, merged score ÷ single-adapter score (:func:`ratio`), and ``"mean"``, their mean.

    Both scores are higher-is-better (accuracy, F1, pass@1) on the same task data.
    """
    _same_tasks(merged, single, "remaining_performance")
    per_task = {task: ratio(merged[task], single[task]) for task in merged}
    return {**per_task, MEAN: _mean(per_task)}


def degradation_ratio(merged: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """Per task and ``"mean"``: 1 − :func:`remaining_performance` (0: nothing lost; NaN stays NaN).

    The mean is 1 − the mean remaining performance, which is also the mean of the per-task values.
    """
    return {task: 1.0 - value for task, value in remaining_performance(merged, single).items()}


def generalization_retention(after: float, before: float, *, lower_is_better: bool = False) -> float:
    """The general ability kept: ``after`` ÷ ``before`` (the adapted and the base model's score on
    general data), or ``before`` ÷ ``after`` when lower is better (perplexity: base PPL ÷ adapted
    PPL). 1: all kept; NaN: undefined (see the module docstring)."""
    return ratio(before, after) if lower_is_better else ratio(after, before)


def mean_normalized_score(scores: Mapping[str, float], references: Mapping[str, float],
                          lows: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per task (score − low) ÷ (reference − low) and ``"mean"``, their mean.

    ``references``: the single-task adapters' scores (or human scores, for games); ``lows``: the
    score that normalizes to 0 (a random agent's; None: 0 for every task). A reference that is not
    above its low gives NaN.
    """
    _same_tasks(scores, references, "mean_normalized_score")
    lows = dict.fromkeys(scores, 0.0) if lows is None else lows
    _same_tasks(scores, lows, "mean_normalized_score (lows)")
    per_task = {task: ratio(float(scores[task]) - float(lows[task]), float(references[task]) - float(lows[task]))
                for task in scores}
    return {**per_task, MEAN: _mean(per_task)}
