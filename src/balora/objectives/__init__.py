"""Objectives: one protocol, ``objective(model, inputs, *, step, total_steps) -> (loss, logs)``.

``loss`` is the 0-dim training loss of the batch, task loss included; ``logs`` maps names to
floats (``task_loss``, ``reg_*``, ``lambda_*``, ...) for the trainer to average and report.
An objective also has ``teacher`` (a :class:`~balora.teacher.SnapshotTeacher` or None),
``needs_teacher`` and ``batch_level_terms``. The λ weights and schedules are one shared
component (:mod:`balora.objectives.lambdas`).

* :class:`ClassificationObjective` -- eq. 4-7 on (N, D) logits, regression included;
* :class:`GenerationObjective` -- eq. 9-12 over the valid tokens of a causal LM.

:func:`build_objective` makes the right one for a run configuration, with its teacher.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from balora.methods import parse_method
from balora.objectives.classification import ClassificationObjective
from balora.objectives.generation import GenerationObjective
from balora.teacher import SnapshotTeacher

__all__ = ["ClassificationObjective", "GenerationObjective", "Objective", "build_objective"]


class Objective(Protocol):
    teacher: SnapshotTeacher | None

    @property
    def needs_teacher(self) -> bool: ...

    @property
    def batch_level_terms(self) -> tuple[str, ...]: ...

    def __call__(self, model: nn.Module, inputs, *, step: int = 0,
                 total_steps: int = 1) -> tuple[torch.Tensor, dict[str, float]]: ...


def build_objective(config, model: nn.Module, *, num_labels: int | None = None) -> Objective:
    """The objective of a run (``RunConfig``) for ``model``, with its teacher when λ1 > 0.

    Build it after the adapter is initialised (and, on resume, restored) and before any
    optimiser step: the teacher snapshots the adapter's initial parameters.
    ``num_labels`` is needed for classification. Methods without ``+reg`` get the plain task loss.
    """
    regularizers = config.regularizers if parse_method(config.adapter.method).regularized else None
    if config.family == "generation":
        objective = GenerationObjective(regularizers, chunk_size=config.train.loss_chunk_size)
    else:
        if num_labels is None:
            raise ValueError("build_objective needs num_labels for a classification run")
        objective = ClassificationObjective(
            regularizers, num_labels, teacher_cache=bool(regularizers and regularizers.teacher_cache)
        )
    if objective.needs_teacher:
        objective.teacher = SnapshotTeacher(model)
    return objective
