"""One classification run, end to end: config → model + adapter → trainer → evaluation → run dir.

``train_classification(config)`` is what ``balora train`` calls; the demo and experiment grids
call it too. A run can be resumed from its last checkpoint with ``resume=run_dir``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import DataCollatorWithPadding, TrainingArguments, set_seed

from balora import run_dir as runs
from balora.adapters import apply_method, save_final, save_initial_adapter, trainable_parameters
from balora.config import RunConfig, from_dict
from balora.methods import parse_method
from balora.models import load_sequence_classifier, load_tokenizer
from balora.objectives.classification import ClassificationRegularizers
from balora.plots import plot_loss_curve
from balora.data import classification_metrics, encode, load_task, regression_metrics
from balora.teacher import SnapshotTeacher
from balora.trainer import BALoRATrainer

logger = logging.getLogger("balora")


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    method: str
    metrics: dict[str, Any]
    trainable_parameters: int
    train_seconds: float
    log_history: list[dict]


def evaluate(trainer: BALoRATrainer, dataset, task) -> dict[str, Any]:
    """Task metrics of the trained model on ``dataset`` (classification or regression)."""
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    labels = np.asarray(output.label_ids)
    if task.problem_type == "regression":
        return regression_metrics(labels.reshape(-1), np.asarray(logits).reshape(-1))
    return classification_metrics(labels, np.asarray(logits).argmax(-1), task.label_names)


def _training_arguments(config: RunConfig, run_dir: Path, progress: bool) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        seed=t.seed,
        # TensorBoard is attached below with a writer into the run directory
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def _tensorboard_callback(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def run_training(trainer, config: RunConfig, run_dir: Path, *, resumed: bool) -> float:
    """Train (from the run's last checkpoint when ``resumed``), logging to TensorBoard; returns seconds."""
    if "tensorboard" in config.train.report_to:
        trainer.add_callback(_tensorboard_callback(run_dir / "tensorboard"))
    start = time.perf_counter()
    checkpoint = runs.last_checkpoint(run_dir) if resumed else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return time.perf_counter() - start


def save_run_outputs(trainer, tokenizer, config: RunConfig, run_dir: Path, *, title: str) -> list[dict]:
    """The final adapter (PEFT format) + tokenizer, the log history and the loss curve; returns the history."""
    save_final(trainer.model, config.adapter.method, run_dir / "adapter", run_dir)
    tokenizer.save_pretrained(str(run_dir / "adapter"))
    history = list(trainer.state.log_history)
    runs.write_json(run_dir / "log_history.json", history)
    plot_loss_curve(history, run_dir / "loss_curve.png", title=title)
    return history


def resume_config(resume: str | os.PathLike) -> tuple[Path, RunConfig]:
    """The run directory of an interrupted run and the config it was started with."""
    run_dir = Path(resume)
    saved = run_dir / runs.CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {runs.CONFIG_FILE})")
    if (run_dir / runs.METRICS_FILE).exists():
        raise FileExistsError(f"{run_dir} is already complete ({runs.METRICS_FILE} exists)")
    return run_dir, from_dict(RunConfig, yaml.safe_load(saved.read_text()))


def train_classification(
    config: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> RunResult:
    """Train one classification run and write its run directory.

    ``resume``: an existing run directory; its saved config is used and training continues
    from its last checkpoint (the model and the teacher are rebuilt from the same seed).
    """
    if resume is not None:
        run_dir, config = resume_config(resume)
    spec = parse_method(config.adapter.method)
    set_seed(config.train.seed)

    d = config.data
    task = load_task(
        d.task, train_file=d.train_file, eval_file=d.eval_file, text_column=d.text_column,
        text_pair_column=d.text_pair_column, label_column=d.label_column, seed=config.train.seed,
        max_train_examples=d.max_train_examples, max_eval_examples=d.max_eval_examples,
    )
    tokenizer = load_tokenizer(config.model.name)
    train_set = encode(task.train, tokenizer, config.model.max_length)
    eval_set = encode(task.eval, tokenizer, config.model.max_length)

    model = load_sequence_classifier(config.model.name, task.num_labels, task.label_names, task.problem_type)
    model = apply_method(model, config.adapter)

    if resume is None:
        run_dir = runs.create_run_dir(config.output_dir, config.run_name)
        runs.write_yaml(run_dir / runs.CONFIG_FILE, config.to_dict())
        save_initial_adapter(model, config.adapter.method, run_dir)
    logger.info("run directory: %s", run_dir)

    regularizers = teacher = None
    if spec.regularized:
        regularizers = ClassificationRegularizers(config.regularizers, task.num_labels)
        if regularizers.needs_teacher:
            teacher = SnapshotTeacher(model)
            logger.info("teacher snapshot: %.2f MB", teacher.nbytes / 2**20)

    trainer = BALoRATrainer(
        model=model,
        args=_training_arguments(config, run_dir, progress),
        train_dataset=train_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        regularizers=regularizers,
        teacher=teacher,
        teacher_cache=bool(regularizers and config.regularizers.teacher_cache),
    )
    train_seconds = run_training(trainer, config, run_dir, resumed=resume is not None)

    metrics = evaluate(trainer, eval_set, task)
    metrics.update(
        task=task.name,
        method=spec.name,
        headline_metric=task.headline_metric,
        trainable_parameters=trainable_parameters(model),
        train_seconds=train_seconds,
        train_examples=len(task.train),
        eval_examples=len(task.eval),
        skipped_rows=dict(task.skipped),
        global_steps=trainer.state.global_step,
    )
    history = save_run_outputs(trainer, tokenizer, config, run_dir, title=f"{task.name} · {spec.name}")
    runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    return RunResult(
        run_dir=run_dir,
        method=spec.name,
        metrics=metrics,
        trainable_parameters=metrics["trainable_parameters"],
        train_seconds=train_seconds,
        log_history=history,
    )

