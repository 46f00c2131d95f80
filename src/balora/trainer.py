"""One transformers ``Trainer`` for every balora objective.

``BALoRATrainer(model=..., args=..., objective=objective, teacher=teacher, ...)`` trains with
``loss, logs = objective(model, batch, step=global_step, total_steps=max_steps)`` on every
training batch -- the task loss plus, for ``+reg`` methods, λ1·L_CR + λ2·L_DR + λ3·L_SVD
(eq. 8) -- for classification and generation alike (:mod:`balora.objectives`). It logs every
value of ``logs`` (the task loss, each regulariser and each λ) at every logging step, averaged
over the steps since the last log, so they reach TensorBoard or any other ``report_to``
integration.

Normalisation: the objective returns its mean over one micro-batch's items (examples, or the
valid tokens of eq. 9-11); the trainer weights it by that micro-batch's share of the items of
the whole optimiser step, counted over every micro-batch of gradient accumulation and every
process (:meth:`ObjectiveMixin.get_batch_samples`). The step's loss and gradient are then the
mean over the global batch's items, whatever the split; the batch-level terms (covariance,
SVD) are weighted the same way, each computed on its micro-batch -- or, across processes, on
the rows of all processes with ``regularizers.global_batch`` (:mod:`balora.distributed`).
Logged values are averaged over the processes.

Mixed precision (``bf16``/``fp16`` in the arguments): the whole objective -- student forward,
teacher forward and head computations -- runs inside the accelerator's autocast, so the teacher
runs in the student's precision (the snapshot swap clears the autocast weight cache, see
:mod:`balora.teacher`). Evaluation uses the model's own loss and never adds regularisers.
Datasets may carry an ``example_id`` column (needed by the teacher feature cache); it never
reaches the model.

Methods that are more than an adapter (``adapter=`` the run's :class:`~balora.config.AdapterConfig`):

* ``loraplus`` / ``lorafa``: the optimiser is PEFT's ``create_loraplus_optimizer`` (AdamW with
  B's learning rate ``adapter.loraplus_lr_ratio`` × A's) or ``create_lorafa_optimizer`` (A
  frozen, B's gradient projected as in LoRA-FA), at ``learning_rate`` and ``weight_decay``;
* ``adalora`` (found from the model): the budget schedule gets the run's real number of steps
  when training starts (:func:`balora.adapters.set_adalora_schedule`), PEFT's
  ``update_and_allocate(global_step)`` runs after every optimiser step (gradients still there),
  and the orthogonality penalty ``adapter.adalora_orth_reg_weight`` × R(P, Q) is added to every
  objective's loss and logged as ``reg_orthogonal`` (PEFT would add it only to a loss the model
  computes from labels, which the generation objective does not).

``head_learning_rate=`` (``train.head_learning_rate``) trains a classifier's head -- the
parameters of PEFT's ``modules_to_save`` copies -- at its own peak learning rate, on the same
schedule as the adapter (the transformers schedulers scale every parameter group).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from balora.adapters import adalora_orthogonal_loss, is_adalora, peft_orthogonal_penalty_off, set_adalora_schedule
from balora.config import AdapterConfig
from balora.distributed import check_teacher_supported, mean_logs_across_processes, sum_across_processes
from balora.methods import parse_method
from balora.objectives import Objective
from balora.objectives.classification import EXAMPLE_ID
from balora.teacher import SnapshotTeacher, in_modules, shared_head_modules, unwrap_model

logger = logging.getLogger("balora")


class ObjectiveMixin:
    """Makes any ``transformers.Trainer`` subclass train with a balora objective.

    ``class MySFTTrainer(ObjectiveMixin, trl.SFTTrainer): pass`` gives TRL's trainer (its data
    handling, chat templates and padding-free packing) the BA-LoRA loss and logging; :class:`BALoRATrainer` is
    ``ObjectiveMixin`` on the plain ``Trainer``. ``adapter``: the method's :class:`~balora.config.AdapterConfig`,
    read for the LoRA+ / LoRA-FA optimisers and AdaLoRA's schedule (required for an AdaLoRA model).
    ``head_learning_rate``: the head's peak learning rate (None: ``args.learning_rate``).
    """

    # compute_loss weights each micro-batch's mean by its share of the optimiser step's items
    # (counted over all micro-batches and processes): the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective: Objective, teacher: SnapshotTeacher | None = None,
                 adapter: AdapterConfig | None = None, head_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.head_learning_rate = head_learning_rate
        if head_learning_rate is not None and adapter is not None and parse_method(adapter.method).optimizer:
            raise ValueError(f"head_learning_rate cannot be combined with {adapter.method}'s own optimizer")
        self._adalora = is_adalora(unwrap_model(self.model))
        if self._adalora:
            if adapter is None or not parse_method(adapter.method).adalora:
                raise ValueError("an AdaLoRA model needs adapter=AdapterConfig(method='adalora', ...) "
                                 "for its budget schedule")
            self.add_callback(AdaLoraBudgetCallback(adapter))
        if teacher is not None:
            objective.teacher = teacher
        if objective.needs_teacher and objective.teacher is None:
            raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
        self.objective = objective
        self._processes = self.accelerator.num_processes
        objective.across_processes = self._processes > 1
        if objective.needs_teacher:
            check_teacher_supported(self.accelerator)
        self._warn_batch_level_terms()
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def _warn_batch_level_terms(self) -> None:
        terms = ", ".join(self.objective.batch_level_terms)
        if not terms:
            return
        size = self.args.per_device_train_batch_size
        if self.args.gradient_accumulation_steps > 1:
            logger.warning(
                "gradient accumulation (%d steps): the batch-level terms (%s) are computed on each "
                "micro-batch of %d, not on the accumulated batch",
                self.args.gradient_accumulation_steps, terms, size,
            )
        if self._processes > 1 and not _global_batch(self.objective):
            logger.warning(
                "%d processes: the batch-level terms (%s) are computed on each process's micro-batch of %d "
                "(regularizers.global_batch: true computes them on all %d rows)",
                self._processes, terms, size, size * self._processes,
            )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimiser step and their number of items (examples or valid
        tokens, :meth:`Objective.count_items`) summed over the micro-batches and the processes."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = sum(self.objective.count_items(batch) for batch in batch_samples)
        return batch_samples, sum_across_processes(local)

    def _share(self, inputs, num_items_in_batch) -> float:
        """The weight of a micro-batch's mean loss: its items × processes ÷ the step's global items.

        Summed over the micro-batches of all processes (after DDP's average over processes) the
        shares make the step's loss the mean over the global items -- every example, or every
        valid token, weighs the same however the global batch is split. Without a count (a direct
        call outside the training loop): 1, the micro-batch's own mean.
        """
        if num_items_in_batch is None:
            return 1.0
        total = float(num_items_in_batch)
        return self.objective.count_items(inputs) * self._processes / total if total > 0 else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        peft_model = unwrap_model(model)
        penalty_off = peft_orthogonal_penalty_off(peft_model) if self._adalora else contextlib.nullcontext()
        with self.accelerator.autocast(), penalty_off as orth_weight:
            loss, logs = self.objective(model, inputs, step=self.state.global_step,
                                        total_steps=max(self.state.max_steps, 1))
        if self._adalora and orth_weight > 0:
            orthogonal = adalora_orthogonal_loss(peft_model)
            loss = loss + orth_weight * orthogonal.to(loss.dtype)
            logs["reg_orthogonal"] = orthogonal.item()
        for key, value in logs.items():  # each key is averaged over the steps that reported it
            self._sums[key] += value
            self._counts[key] += 1
        loss = loss * self._share(inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """PEFT's optimiser of the method (LoRA+, LoRA-FA), the head at its own learning rate, else
        the ``Trainer``'s."""
        if self.optimizer is None and self.adapter is not None:
            self.optimizer = method_optimizer(unwrap_model(self.model), self.adapter, self.args)
        if self.optimizer is None and self.head_learning_rate is not None:
            self.optimizer = head_lr_optimizer(self, unwrap_model(self.model), self.head_learning_rate)
        return self.optimizer if self.optimizer is not None else super().create_optimizer(model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the objective's values since the last log to a training log."""
        if "loss" in logs and self._counts:
            averages = {key: total / self._counts[key] for key, total in self._sums.items()}
            hits = getattr(self.objective, "cache_hits", None)
            if hits is not None:
                averages["teacher_cache_hits"] = float(hits)
            if self._processes > 1:  # every process logs: the mean over the processes
                averages = mean_logs_across_processes(averages)
            logs.update(averages)
            self._sums.clear()
            self._counts.clear()
        super().log(logs, start_time)


def _global_batch(objective) -> bool:
    config = getattr(getattr(objective, "task", objective), "config", None)
    return bool(config is not None and config.global_batch)


class BALoRATrainer(ObjectiveMixin, Trainer):
    """Trainer whose training loss is a balora objective (task loss + regularisers)."""


def method_optimizer(model: torch.nn.Module, adapter: AdapterConfig,
                     args: TrainingArguments) -> torch.optim.Optimizer | None:
    """The optimiser a method prescribes, from PEFT, or None for the ``Trainer``'s default.

    ``loraplus``: ``create_loraplus_optimizer`` with the optimiser class and settings of ``args``
    (AdamW by default), A (and the head's weight) at ``learning_rate``, B and every 1-D parameter
    at ``loraplus_lr_ratio`` × ``learning_rate`` (PEFT's grouping). ``lorafa``:
    ``create_lorafa_optimizer`` (AdamW on B with LoRA-FA's projected gradient, A frozen).
    """
    spec = parse_method(adapter.method)
    if spec.optimizer == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate,
                                         loraplus_lr_ratio=adapter.loraplus_lr_ratio,
                                         loraplus_weight_decay=args.weight_decay, **kwargs)
    if spec.optimizer == "lorafa":
        from peft.optimizers import create_lorafa_optimizer

        alpha = adapter.alpha if adapter.alpha is not None else adapter.rank
        return create_lorafa_optimizer(model, r=adapter.rank, lora_alpha=alpha, lr=args.learning_rate,
                                       weight_decay=args.weight_decay)
    return None


def head_lr_optimizer(trainer: Trainer, model: torch.nn.Module, head_lr: float) -> torch.optim.Optimizer:
    """The ``Trainer``'s optimiser (class and settings of ``trainer.args``, its weight-decay rule)
    with the head's parameters -- those of PEFT's ``modules_to_save`` copies -- at ``head_lr`` and
    every other trainable parameter at ``args.learning_rate``."""
    args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    heads = shared_head_modules(model)  # the head, as the teacher shares it
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((in_modules(name, heads), name in decay), []).append(param)
    if not any(head for head, _ in groups):
        raise ValueError("head_learning_rate: the model has no trained head (no PEFT modules_to_save "
                         "parameter requires a gradient)")
    param_groups = [{"params": params, "lr": head_lr if head else args.learning_rate,
                     "weight_decay": args.weight_decay if decayed else 0.0}
                    for (head, decayed), params in groups.items()]
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return optimizer_cls(param_groups, lr=args.learning_rate, **kwargs)


class AdaLoraBudgetCallback(TrainerCallback):
    """AdaLoRA's budget schedule in a ``Trainer``: set for the run's steps at the start, then
    ``update_and_allocate(global_step)`` after each optimiser step, before the gradients are zeroed."""

    def __init__(self, adapter: AdapterConfig):
        self.adapter = adapter

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tinit, tfinal = set_adalora_schedule(unwrap_model(model), self.adapter, state.max_steps)
        logger.info("adalora: %d steps at rank %d, pruning to an average rank %d until step %d",
                    tinit, *self.adapter.adalora_ranks(), state.max_steps - tfinal)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        unwrap_model(model).base_model.update_and_allocate(state.global_step)
