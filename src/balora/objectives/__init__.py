"""Objectives: one protocol, ``objective(model, inputs, *, step, total_steps) -> (loss, logs)``.

``loss`` is the 0-dim training loss of the batch, task loss included; ``logs`` maps names to
floats (``task_loss``, ``reg_*``, ``lambda_*``, ...) for the trainer to average and report.
An objective also has ``teacher`` (a :class:`~balora.teacher.SnapshotTeacher` or None),
``needs_teacher``, ``batch_level_terms``, ``count_items(inputs)`` (the examples or valid tokens
the loss averages over, which the trainer sums over micro-batches and processes to normalise by
the global count) and ``across_processes`` (set by the trainer). The λ weights and schedules are one shared
component (:mod:`balora.objectives.lambdas`).

* :class:`ClassificationObjective` -- eq. 4-7 on (N, D) logits, regression included;
* :class:`GenerationObjective` -- eq. 9-12 over the valid tokens of a causal LM;
* :class:`RoutingObjective` -- I-LoRA's routing tuning around either of them: ε_kl·KL to the
  pre-trained model and ε_l2·‖LoRA outputs‖² on batches of general data (``routing:``).

:func:`build_objective` makes the right one for a run configuration, with its teacher.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from balora.methods import parse_method
from balora.objectives.classification import ClassificationObjective
from balora.objectives.generation import GenerationObjective
from balora.objectives.routing import RoutingObjective
from balora.teacher import SnapshotTeacher

__all__ = ["ClassificationObjective", "GenerationObjective", "Objective", "RoutingObjective", "build_objective"]


class Objective(Protocol):
    teacher: SnapshotTeacher | None

    @property
    def needs_teacher(self) -> bool: ...

    @property
    def batch_level_terms(self) -> tuple[str, ...]: ...

    #: True when the trainer runs on several processes (``regularizers.global_batch`` then gathers)
    across_processes: bool

    def count_items(self, inputs) -> int:
        """What the loss of a batch averages over: examples (classification), valid tokens (generation)."""
        ...

    def __call__(self, model: nn.Module, inputs, *, step: int = 0,
                 total_steps: int = 1) -> tuple[torch.Tensor, dict[str, float]]: ...


def build_objective(config, model: nn.Module, *, num_labels: int | None = None, general=None) -> Objective:
    """The objective of a run (``RunConfig``) for ``model``, with its teacher when one is needed.

    Build it after the adapter is initialised (and, on resume, restored) and before any
    optimiser step: the teacher snapshots the adapter's initial parameters.
    ``num_labels`` is needed for classification. Methods without ``+reg`` get the plain task loss.
    With ``routing.general_data`` set, the task objective is wrapped in a :class:`RoutingObjective`
    that draws its general batches from ``general`` (required then: an iterator of batches, e.g.
    :func:`balora.objectives.routing.general_batches`); a teacher is built when λ1 > 0 or ε_kl > 0.
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
    routing = config.routing
    if routing.general_data is not None:
        if general is None:
            raise ValueError("routing.general_data is set: build_objective needs general=... (the general batches, "
                             "balora.objectives.routing.general_batches(config, tokenizer))")
        objective = RoutingObjective(
            objective, general, family=config.family, epsilon_kl=routing.epsilon_kl, epsilon_l2=routing.epsilon_l2,
            general_ratio=routing.general_ratio, chunk_size=config.train.loss_chunk_size, num_labels=num_labels,
        )
    precomputed = getattr(getattr(objective, "task", objective), "precomputed", None)
    if precomputed is not None:
        precomputed.check(config)  # made for this run's model, data, seed and temperature
    if objective.needs_teacher:
        objective.teacher = SnapshotTeacher(model)
    return objective
