"""Evaluation metrics for classification and regression tasks.

Every number comes from scikit-learn or scipy; nothing is hand-computed here.
All values are plain Python ``float`` (``rarest_class`` is a ``str``), so the
dicts can be logged or written to JSON as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    mean_squared_error,
    recall_score,
)

__all__ = ["GLUE_METRICS", "classification_metrics", "regression_metrics"]

#: The headline metric(s) of each GLUE task, as reported on the GLUE leaderboard.
#: The first name is the one a task's ``TaskData.headline_metric`` uses.
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_corrcoef",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def classification_metrics(
    labels: Sequence[int],
    predictions: Sequence[int],
    label_names: Sequence[str] | None = None,
) -> dict:
    """Classification metrics of integer ``predictions`` against integer ``labels``.

    Classes are ``0 .. len(label_names)-1`` when ``label_names`` is given, otherwise
    the sorted union of the values in ``labels`` and ``predictions`` (named by
    ``str(value)``).

    Returns a dict with:

    * ``accuracy``, ``macro_f1`` (sklearn's macro average over the classes that occur
      in labels or predictions), ``matthews_corrcoef``;
    * ``f1``: binary F1 of the positive class (class 1, i.e. the second class), only
      when there are exactly 2 classes;
    * ``recall/<name>`` and ``f1/<name>`` for EVERY class, also those absent from the
      predictions or the labels (``zero_division=0``, so a class with no true example
      reports 0.0);
    * ``min_class_recall``: the lowest recall over the classes that have at least one
      true example in ``labels`` (classes with none have no defined recall);
    * ``rarest_class`` (name) and ``rarest_class_recall``: the class with the fewest
      true examples in ``labels`` among those with at least one (ties: lowest id).
    """
    y_true = np.asarray(labels).astype(np.int64).ravel()
    y_pred = np.asarray(predictions).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"labels and predictions differ in length: {y_true.size} vs {y_pred.size}"
        )
    if y_true.size == 0:
        raise ValueError("classification_metrics needs at least one example")
    if label_names is not None:
        classes = list(range(len(label_names)))
        names = [str(n) for n in label_names]
    else:
        classes = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
        names = [str(c) for c in classes]

    out: dict = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "matthews_corrcoef": float(matthews_corrcoef(y_true, y_pred)),
    }
    if len(classes) == 2:
        out["f1"] = float(
            f1_score(
                y_true, y_pred, labels=classes, pos_label=classes[1],
                average="binary", zero_division=0,
            )
        )
    recalls = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    f1s = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    for name, rec, f1 in zip(names, recalls, f1s):
        out[f"recall/{name}"] = float(rec)
        out[f"f1/{name}"] = float(f1)

    support = np.array([(y_true == c).sum() for c in classes])
    present = [i for i, n in enumerate(support) if n > 0]
    out["min_class_recall"] = float(min(recalls[i] for i in present))
    rarest = min(present, key=lambda i: (support[i], i))
    out["rarest_class"] = names[rarest]
    out["rarest_class_recall"] = float(recalls[rarest])
    return out


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """``fn(x, y).statistic`` or ``nan`` when undefined (constant input, < 2 points)."""
    if x.size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(fn(x, y).statistic)


def regression_metrics(labels: Sequence[float], predictions: Sequence[float]) -> dict:
    """``pearson``, ``spearman`` (scipy.stats) and ``mse`` (sklearn).

    A correlation that is undefined -- constant predictions or labels, or fewer
    than 2 examples -- is reported as ``float('nan')`` rather than raising, so an
    early, collapsed model can still be evaluated. Check with ``math.isnan``.
    """
    y_true = np.asarray(labels, dtype=np.float64).ravel()
    y_pred = np.asarray(predictions, dtype=np.float64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"labels and predictions differ in length: {y_true.size} vs {y_pred.size}"
        )
    if y_true.size == 0:
        raise ValueError("regression_metrics needs at least one example")
    return {
        "pearson": _correlation(stats.pearsonr, y_true, y_pred),
        "spearman": _correlation(stats.spearmanr, y_true, y_pred),
        "mse": float(mean_squared_error(y_true, y_pred)),
    }
