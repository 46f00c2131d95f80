"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on top of PEFT and transformers.

The names a script needs to use BA-LoRA, for either family::

    import balora

    model = balora.apply_method(model, balora.AdapterConfig(method="balora", rank=8), task_type)
    objective = balora.GenerationObjective(balora.RegularizerConfig(), teacher=balora.SnapshotTeacher(model))
    loss, logs = objective(model, batch, step=step, total_steps=total)     # a plain torch loop, or
    trainer = balora.BALoRATrainer(model=model, args=args, objective=objective, ...)  # transformers

``balora.ClassificationObjective(balora.RegularizerConfig(), num_labels)`` is the same for
sequence classification; :func:`build_objective` makes either from a :class:`RunConfig`
(:func:`load_config` reads one from YAML). Names are imported on first use, so ``import balora``
stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "balora.config",
    "ConfigError": "balora.config",
    "DataConfig": "balora.config",
    "ModelConfig": "balora.config",
    "RegularizerConfig": "balora.config",
    "RunConfig": "balora.config",
    "TrainConfig": "balora.config",
    "load_config": "balora.config",
    "apply_method": "balora.adapters",
    "save_final": "balora.adapters",
    "save_initial_adapter": "balora.adapters",
    "SnapshotTeacher": "balora.teacher",
    "ClassificationObjective": "balora.objectives",
    "GenerationObjective": "balora.objectives",
    "build_objective": "balora.objectives",
    "LambdaSchedule": "balora.objectives.lambdas",
    "BALoRATrainer": "balora.trainer",
    "ObjectiveMixin": "balora.trainer",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'balora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
