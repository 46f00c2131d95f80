"""Imbalanced training sets: subsample a classification task's TRAINING split to fixed class counts.

The paper's imbalance study (3.2.3, Appendix B "Data Preprocessing for Visualization", Table 12)
keeps the MNLI training classes at a 100:10:1 ratio and evaluates on the original, balanced
validation set. :func:`make_imbalanced` does the same for any classification task: it keeps
exactly ``counts[i]`` seeded random training examples of ``classes[i]`` (e.g. three Reuters R8
classes at 1000:100:10) and drops the other classes.

The evaluation split is NOT subsampled: it keeps every one of its rows of the chosen classes,
in their order and with their own distribution (balanced when it was balanced). Only rows of
classes that are not chosen are removed from it, since the model has no output for them.
Label ids are renumbered ``0..k-1`` over the chosen classes, in the task's own label order, so
choosing every class leaves the evaluation split exactly as it was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import datasets
import numpy as np

from balora.data.classification import REGRESSION, TaskData

__all__ = ["default_classes", "make_imbalanced", "minority_class", "restrict_classes"]


def default_classes(task: TaskData, k: int) -> list[str]:
    """The ``k`` most frequent classes of ``task.train``, most frequent first (ties: label order)."""
    counts = task.class_counts("train")  # largest first; a stable sort keeps label order on ties
    if k > len(counts):
        raise ValueError(f"{k} classes asked, but {task.name} has only {len(counts)}: {', '.join(counts)}")
    return list(counts)[:k]


def minority_class(classes: Sequence[str], counts: Sequence[int]) -> str:
    """The chosen class with the fewest training examples (ties: the last one named)."""
    smallest = min(counts)
    return [c for c, n in zip(classes, counts) if n == smallest][-1]


def restrict_classes(split: datasets.Dataset, label_names: Sequence[str], keep: Sequence[str]) -> datasets.Dataset:
    """The rows of ``split`` whose class is in ``keep``, in order, with labels renumbered to the
    positions of their names in ``[n for n in label_names if n in keep]``."""
    kept_names = [n for n in label_names if n in set(keep)]
    new_id = {label_names.index(n): i for i, n in enumerate(kept_names)}
    rows = [i for i, label in enumerate(split["label"]) if int(label) in new_id]
    out = split.select(rows).flatten_indices()
    remapped = [new_id[int(label)] for label in out["label"]]
    return out.remove_columns("label").add_column("label", remapped).cast_column("label", split.features["label"])


def make_imbalanced(
    task: TaskData, counts: Sequence[int], classes: Sequence[str] | None = None, seed: int = 0
) -> TaskData:
    """A copy of ``task`` whose train split holds exactly ``counts[i]`` examples of ``classes[i]``.

    ``counts``: examples kept per class, e.g. ``[1000, 100, 10]`` (the paper's 100:10:1).
    ``classes``: class names, one per count; None = the ``len(counts)`` most frequent training
    classes, most frequent first (:func:`default_classes`). The examples of each class are a
    seeded random choice (``numpy.random.default_rng(seed)``, one draw per class in the order
    given), and the kept rows are shuffled with the same generator, so the result depends only
    on the data, ``counts``, ``classes`` and ``seed``. The eval split keeps all its rows of the
    chosen classes (see the module docstring). One-line ValueErrors: a regression task, fewer
    than two classes, a count below 1, an unknown or repeated class, a class with fewer training
    examples than asked.
    """
    if task.problem_type == REGRESSION or task.label_names is None:
        raise ValueError(f"{task.name} is a regression task: it has no classes to subsample")
    counts = [int(n) for n in counts]
    if len(counts) < 2:
        raise ValueError(f"an imbalanced task needs at least 2 class counts, got {counts}")
    if min(counts) < 1:
        raise ValueError(f"every class count must be >= 1, got {counts}")
    classes = default_classes(task, len(counts)) if classes is None else [str(c) for c in classes]
    if len(classes) != len(counts):
        raise ValueError(f"{len(classes)} classes ({', '.join(classes)}) for {len(counts)} counts {counts}")
    repeated = [c for c, n in Counter(classes).items() if n > 1]
    if repeated:
        raise ValueError(f"class {repeated[0]!r} is named twice")
    unknown = [c for c in classes if c not in task.label_names]
    if unknown:
        raise ValueError(f"{task.name} has no class {unknown[0]!r}; its classes are: {', '.join(task.label_names)}")

    labels = np.asarray(task.train["label"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for name, n in zip(classes, counts):
        rows = np.flatnonzero(labels == task.label_names.index(name))
        if rows.size < n:
            raise ValueError(f"class {name!r} of {task.name} has {rows.size} training examples, {n} asked")
        chosen.append(rng.choice(rows, size=n, replace=False))
    order = rng.permutation(np.concatenate(chosen))
    train = task.train.select(order.tolist()).flatten_indices()
    kept_names = [n for n in task.label_names if n in set(classes)]
    return replace(
        task,
        train=restrict_classes(train, task.label_names, classes),
        eval=restrict_classes(task.eval, task.label_names, classes),
        label_names=kept_names,
    )
