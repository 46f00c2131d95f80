"""One transformers ``Trainer`` for every balora objective.

``BALoRATrainer(model=..., args=..., objective=objective, teacher=teacher, ...)`` trains with
``loss, logs = objective(model, batch, step=global_step, total_steps=max_steps)`` on every
training batch -- the task loss plus, for ``+reg`` methods, λ1·L_CR + λ2·L_DR + λ3·L_SVD
(eq. 8) -- for classification and generation alike (:mod:`balora.objectives`). It logs every
value of ``logs`` (the task loss, each regulariser and each λ) at every logging step, averaged
over the steps since the last log, so they reach TensorBoard or any other ``report_to``
integration.

Mixed precision (``bf16``/``fp16`` in the arguments): the whole objective -- student forward,
teacher forward and head computations -- runs inside the accelerator's autocast, so the teacher
runs in the student's precision (the snapshot swap clears the autocast weight cache, see
:mod:`balora.teacher`). Evaluation uses the model's own loss and never adds regularisers.
Datasets may carry an ``example_id`` column (needed by the teacher feature cache); it never
reaches the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from transformers import Trainer

from balora.objectives import Objective
from balora.objectives.classification import EXAMPLE_ID
from balora.teacher import SnapshotTeacher

logger = logging.getLogger("balora")


class ObjectiveMixin:
    """Makes any ``transformers.Trainer`` subclass train with a balora objective.

    ``class MySFTTrainer(ObjectiveMixin, trl.SFTTrainer): pass`` gives TRL's trainer (its data
    handling, chat templates and padding-free packing) the BA-LoRA loss and logging; :class:`BALoRATrainer` is
    ``ObjectiveMixin`` on the plain ``Trainer``.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the number of
    # gradient accumulation steps (it would not for models that take loss kwargs otherwise).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: Objective, teacher: SnapshotTeacher | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is not None:
            objective.teacher = teacher
        if objective.needs_teacher and objective.teacher is None:
            raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
        self.objective = objective
        if self.args.gradient_accumulation_steps > 1 and objective.batch_level_terms:
            logger.warning(
                "gradient accumulation (%d steps): the batch-level terms (%s) are computed on each "
                "micro-batch of %d, not on the accumulated batch",
                self.args.gradient_accumulation_steps, ", ".join(objective.batch_level_terms),
                self.args.per_device_train_batch_size,
            )
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        with self.accelerator.autocast():
            loss, logs = self.objective(model, inputs, step=self.state.global_step,
                                        total_steps=max(self.state.max_steps, 1))
        for key, value in logs.items():  # each key is averaged over the steps that reported it
            self._sums[key] += value
            self._counts[key] += 1
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the objective's values since the last log to a training log."""
        if "loss" in logs and self._counts:
            for key, total in self._sums.items():
                logs[key] = total / self._counts[key]
            self._sums.clear()
            self._counts.clear()
            hits = getattr(self.objective, "cache_hits", None)
            if hits is not None:
                logs["teacher_cache_hits"] = float(hits)
        super().log(logs, start_time)


class BALoRATrainer(ObjectiveMixin, Trainer):
    """Trainer whose training loss is a balora objective (task loss + regularisers)."""
