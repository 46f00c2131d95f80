"""A transformers ``Trainer`` that adds the BA-LoRA regularisers to the task loss.

``BALoRATrainer(..., regularizers=ClassificationRegularizers(...), teacher=SnapshotTeacher(...))``
computes, on every training batch, L = L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD (eq. 8) and logs the
task loss, each regulariser and each λ at every logging step (averaged over the steps since the
last log), so they reach TensorBoard or any other ``report_to`` integration.

Without ``regularizers`` it is a plain Trainer (methods without ``+reg``), so every method runs
through the same code path and budgets stay comparable. Evaluation never adds regularisers.
Datasets may carry an ``example_id`` column (needed by the teacher feature cache); it is removed
before the model is called.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from balora.objectives.generation import GenerationObjective
from balora.objectives.classification import ClassificationRegularizers
from balora.teacher import SnapshotTeacher, TeacherFeatureCache

EXAMPLE_ID = "example_id"


class BALoRATrainer(Trainer):
    """Trainer with BA-LoRA's output-space regularisers and a frozen pre-trained teacher."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the number of
    # gradient accumulation steps (it would not for models that take loss kwargs otherwise).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        regularizers: ClassificationRegularizers | None = None,
        teacher: SnapshotTeacher | None = None,
        teacher_cache: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.regularizers = regularizers
        self.teacher = teacher
        if regularizers is not None and regularizers.needs_teacher and teacher is None:
            raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
        self.teacher_cache = TeacherFeatureCache(teacher, self.model) if (teacher and teacher_cache) else None
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._count = 0

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_ids = inputs.pop(EXAMPLE_ID, None)
        outputs = model(**inputs)
        task_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        loss = task_loss
        if model.training:
            logs = {"task_loss": task_loss.item()}
            if self.regularizers is not None:
                step, total = self.state.global_step, max(self.state.max_steps, 1)
                teacher_logits = None
                if self.regularizers.lambdas(step, total)[0] > 0:
                    teacher_logits = self._teacher_logits(model, inputs, example_ids)
                terms = self.regularizers(outputs.logits, teacher_logits, step, total)
                loss = task_loss + terms.total.to(task_loss.dtype)
                logs.update(terms.logs)
            self._accumulate(logs)
        return (loss, outputs) if return_outputs else loss

    def _teacher_logits(self, model, inputs, example_ids) -> torch.Tensor:
        if self.teacher_cache is not None:
            if example_ids is None:
                raise ValueError("the teacher feature cache needs an 'example_id' column in the training data")
            return self.teacher_cache.logits(self.model, inputs, example_ids)
        # The snapshot is keyed by the unwrapped model's parameter names (no DDP "module." prefix).
        return self.teacher.logits(self.accelerator.unwrap_model(model), inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------ logging

    def _accumulate(self, logs: dict[str, float]) -> None:
        # each key is averaged over the steps that reported it (a term with λ = 0 is not computed)
        for key, value in logs.items():
            self._sums[key] += value
            self._counts[key] += 1
        self._count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the task loss, regularisers and λs since the last log."""
        if "loss" in logs and self._count:
            for key, total in self._sums.items():
                logs[key] = total / self._counts[key]
            self._sums.clear()
            self._counts.clear()
            self._count = 0
        if self.teacher_cache is not None and "loss" in logs:
            logs["teacher_cache_hits"] = float(self.teacher_cache.hits)
        super().log(logs, start_time)


class GenerationTrainer(BALoRATrainer):
    """Trainer for causal LMs: the loss is a :class:`~balora.objectives.generation.GenerationObjective`.

    The objective computes the cross-entropy over the response tokens and, for ``+reg`` methods,
    the three generation regularisers, from hidden states and the output head restricted to the
    valid tokens (the full B×T×|V| logits are never formed). The teacher forward runs on the
    unwrapped model (snapshot parameter names carry no DDP prefix).
    """

    def __init__(self, *args, objective: GenerationObjective, teacher: SnapshotTeacher | None = None, **kwargs):
        super().__init__(*args, regularizers=None, teacher=teacher, teacher_cache=False, **kwargs)
        if objective.needs_teacher and teacher is None:
            raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
        self.objective = objective
        self._plain_objective = GenerationObjective(chunk_size=objective.chunk_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(EXAMPLE_ID, None)
        if not model.training:  # evaluation loss: the plain cross-entropy over response tokens
            loss, _ = self._plain_objective(model, inputs)
            return (loss, None) if return_outputs else loss
        loss, logs = self.objective(
            model, inputs, step=self.state.global_step, total_steps=max(self.state.max_steps, 1),
            teacher=self.teacher, teacher_model=self.accelerator.unwrap_model(model),
        )
        self._accumulate(logs)
        return (loss, None) if return_outputs else loss
