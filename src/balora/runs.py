"""One training run, end to end, for both task families.

:func:`train_run` is what ``balora train`` and ``balora demo`` call. The skeleton is the same for
classification and generation:

    saved config (resume) -> seed -> data (and routing's general texts), model and tokenizer
    (family plug-in) -> method's adapter (LoRA-GA and CorDA first estimate their init on
    ``adapter.init_examples`` training examples; on resume, the saved initial adapter back into the
    model) -> objective (and its frozen teacher; with ``routing.general_data`` the I-LoRA routing
    objective around it, drawing batches of the general texts tokenised with the run's tokenizer)
    -> run directory, config.yaml and initial adapter -> TrainingArguments -> training
    (TensorBoard, resume from the last checkpoint) -> adapter, tokenizer, log history, loss curve
    -> evaluation (family plug-in) -> model card -> metrics.json (the mark of a finished run)

Several processes (``accelerate launch -m balora train``, or ``balora train --num-processes N``):
every process loads, initialises and trains; the main one creates the run directory (its path is
broadcast), saves, evaluates (the others join a collective evaluation) and writes the metrics;
λs calibrated with ``lambdas: auto`` are the main process's. Sharded modes (FSDP, ZeRO-3) are
refused when a teacher is needed (:func:`balora.distributed.check_teacher_supported`).

Everything that can refuse the run runs before the run directory is created, the cheap checks
first: the config (at load), then :func:`check_before_loading` (output folder, TrainingArguments,
perplexity corpus), then the data files (before any model), the model, the objective. A failed
validation leaves no directory behind.

The plug-ins (:data:`FAMILIES`: :class:`balora.runs_classification.ClassificationRun`,
:class:`balora.runs_generation.GenerationRun`) are built as ``Plugin(config, progress)`` and have
``needs_pretrained_view`` (the evaluation measures the pre-trained model too),
``collective_evaluation`` (every process of a multi-process run must take part),
``load() -> (model, tokenizer)`` (which also sets ``train_set``, ``collator``, ``num_labels``,
``task_name`` and ``facts``) and ``evaluate(trainer, tokenizer, out_dir, teacher) -> metrics``;
generation runs evaluate with the very functions ``balora evaluate`` calls.

A run directory holds ``config.yaml``, ``checkpoints/``, ``initial_adapter/`` (methods that
rewrite the base weights), ``adapter/`` (PEFT format, with the tokenizer, a classifier's
``config.json`` with its labels, the model card ``README.md`` and ``balora_config.yaml``, see
:mod:`balora.model_card`), ``metrics.json``, ``log_history.json``, ``loss_curve.png``,
``tensorboard/`` and ``predictions.jsonl`` (each evaluation example's prediction).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from balora import run_dir
from balora.adapters import (
    apply_method,
    restore_initial_adapter,
    save_final,
    save_initial_adapter,
    trainable_parameters,
)
from balora.calibrate import calibrate_for_run
from balora.config import CLASSIFICATION, GENERATION, ConfigError, RunConfig, TrainConfig, load_config
from balora.distributed import broadcast_from_main, check_teacher_supported, init_launched_run, is_main_process
from balora.methods import parse_method
from balora.model_card import write_model_card
from balora.objectives import build_objective
from balora.objectives.classification import EXAMPLE_ID
from balora.objectives.routing import general_batches, run_general_texts
from balora.plots import plot_loss_curve
from balora.runs_classification import ClassificationRun
from balora.runs_generation import GenerationRun
from balora.teacher import SnapshotTeacher
from balora.trainer import BALoRATrainer

__all__ = ["FAMILIES", "RunResult", "check_before_loading", "check_precision", "data_name", "resume_config",
           "train_run", "training_arguments"]

logger = logging.getLogger("balora")

#: The plug-in of each task family: ``load()`` -> (model, tokenizer), then ``evaluate(...)``.
FAMILIES = {CLASSIFICATION: ClassificationRun, GENERATION: GenerationRun}


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    method: str
    metrics: dict[str, Any]
    trainable_parameters: int
    train_seconds: float
    log_history: list[dict]


def check_precision(train: TrainConfig) -> None:
    """fp16 needs a CUDA device (a one-line ConfigError otherwise); bf16 and fp32 run anywhere."""
    if train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")


def training_arguments(config: RunConfig, out_dir: Path, progress: bool = True) -> TrainingArguments:
    """The ``TrainingArguments`` of a run whose directory is ``out_dir`` (checkpoints in ``checkpoints/``)."""
    t = config.train
    check_precision(t)
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
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
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing,  # transformers' name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # TensorBoard is attached in train_run with a writer into the run directory
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def data_name(config: RunConfig) -> str:
    """The run's data as titles name it: the task, or the training file's name when files are the data.

    The file names it for ``data.task: files`` and for a generation run's ``data.train_file`` (which
    replaces the task as the source); a task given as a local file is named by the file's name.
    """
    d = config.data
    if d.train_file and (d.task == "files" or config.family == GENERATION):
        return Path(d.train_file).name
    return Path(d.task).name if Path(d.task).is_file() else d.task


def resume_config(resume: str | os.PathLike) -> tuple[Path, RunConfig]:
    """The directory of an interrupted run and the config it was started with."""
    folder = Path(resume)
    saved = folder / run_dir.CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"{folder} is not a run directory (no {run_dir.CONFIG_FILE})")
    if (folder / run_dir.METRICS_FILE).exists():
        raise FileExistsError(f"{folder} is already complete ({run_dir.METRICS_FILE} exists)")
    return folder, load_config(saved)  # a damaged config.yaml is a one-line ConfigError naming it


def check_before_loading(config: RunConfig, progress: bool = True) -> None:
    """What can refuse a run before its data or model is loaded: the output folder (no file in the
    way, writable), the TrainingArguments, and a generation run's perplexity corpus (read at the
    end of training otherwise). A one-line ConfigError (or the loader's error) for each."""
    root = Path(config.output_dir).expanduser()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir={config.output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={config.output_dir}: {existing} is not writable")
    from transformers.integrations import get_available_reporting_integrations

    missing = [r for r in config.train.report_to if r not in ("all", "none", *get_available_reporting_integrations())]
    if missing:
        raise ConfigError(f"train.report_to: {missing[0]} is not installed (pip install {missing[0]})")
    training_arguments(config, root, progress)  # refuses what transformers refuses, creating nothing
    if config.family == GENERATION and config.eval.perplexity_corpus is not None:
        from balora.evaluation.perplexity import load_perplexity_texts

        load_perplexity_texts(config.eval.perplexity_corpus)


def _tensorboard_callback(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def _train(trainer: BALoRATrainer, config: RunConfig, out_dir: Path, *, resumed: bool) -> float:
    """Train (from the run's last checkpoint when ``resumed``), logging to TensorBoard; returns seconds."""
    if "tensorboard" in config.train.report_to and is_main_process():
        trainer.add_callback(_tensorboard_callback(out_dir / "tensorboard"))
    start = time.perf_counter()
    checkpoint = run_dir.last_checkpoint(out_dir) if resumed else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return time.perf_counter() - start


def _save(trainer: BALoRATrainer, tokenizer, config: RunConfig, out_dir: Path, *, title: str) -> list[dict]:
    """The final adapter (PEFT format) + tokenizer, the log history and the loss curve; returns the history."""
    save_final(trainer.model, config.adapter.method, out_dir / "adapter", out_dir)
    tokenizer.save_pretrained(str(out_dir / "adapter"))
    history = list(trainer.state.log_history)
    run_dir.write_json(out_dir / "log_history.json", history)
    plot_loss_curve(history, out_dir / "loss_curve.png", title=title)
    return history


def _init_batches(config: RunConfig, family) -> list[dict[str, torch.Tensor]]:
    """``adapter.init_examples`` training examples (a seeded draw) collated in batches of
    ``train.batch_size``, for the inits estimated from data (LoRA-GA's gradient, CorDA's covariance)."""
    data = family.train_set
    n = min(config.adapter.init_examples, len(data))
    rows = data.shuffle(seed=config.train.seed).select(range(n))
    size = config.train.batch_size
    batches = [family.collator([rows[j] for j in range(i, min(i + size, n))]) for i in range(0, n, size)]
    return [{k: v for k, v in batch.items() if k != EXAMPLE_ID} for batch in batches]


def _new_run_dir(config: RunConfig, calibration, model) -> Path:
    """A fresh run directory with ``config.yaml``, the calibration (``lambdas: auto``) and the initial adapter."""
    out_dir = run_dir.create_run_dir(config.output_dir, config.run_name)
    run_dir.write_yaml(out_dir / run_dir.CONFIG_FILE, config.to_dict())
    if calibration is not None:
        run_dir.write_json(out_dir / run_dir.CALIBRATION_FILE, calibration.to_dict())
    save_initial_adapter(model, config.adapter.method, out_dir)
    return out_dir


def _other_process_result(trainer, tokenizer, family, teacher, method: str, train_seconds: float,
                          history: list[dict], out_dir: Path) -> RunResult:
    """The end of a run on a process other than the main one, which writes nothing into ``out_dir``.

    A family whose evaluation is collective (classification: ``Trainer.predict`` shards the examples
    over the processes) evaluates along with the main process, into a scratch folder.
    """
    metrics: dict[str, Any] = {}
    if family.collective_evaluation:
        with tempfile.TemporaryDirectory() as scratch:
            metrics = family.evaluate(trainer, tokenizer, Path(scratch), teacher)
    return RunResult(run_dir=out_dir, method=method, metrics=metrics,
                     trainable_parameters=trainable_parameters(trainer.model), train_seconds=train_seconds,
                     log_history=history)


def train_run(
    config: RunConfig | None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> RunResult:
    """Train one run of either family, evaluate it and write its run directory.

    ``resume``: the directory of an interrupted run (then ``config`` is ignored: the saved one is
    used); training continues from its last checkpoint, with the adapter as initialised and the
    teacher rebuilt from the saved ``initial_adapter/`` rather than re-initialised.
    """
    init_launched_run()  # several processes (accelerate launch): join the group before anything is written
    main = is_main_process()
    if resume is not None:
        out_dir, config = resume_config(resume)
    check_before_loading(config, progress)
    spec = parse_method(config.adapter.method)
    set_seed(config.train.seed)

    family = FAMILIES[config.family](config, progress)
    general_texts = run_general_texts(config)  # routing.general_data (None when off): read before any model
    model, tokenizer = family.load()
    init_batches = _init_batches(config, family) if spec.needs_init_data else None  # LoRA-GA, CorDA
    model = apply_method(model, config.adapter, init_batches=init_batches)  # PEFT's task type follows the model
    if resume is not None:
        restore_initial_adapter(model, out_dir)  # logs what it restored
    # the objective checks the model against the config (a head for the teacher cache, ...); it
    # reads the initial adapter without changing it, so a failure leaves no run directory behind
    general = None if general_texts is None else general_batches(config, tokenizer, general_texts)
    objective = build_objective(config, model, num_labels=family.num_labels, general=general)
    calibration = None
    if spec.regularized and config.regularizers.lambdas == "auto":  # a resumed run's saved λs are fixed
        # the λs are weighed against the task loss alone: a routing objective's general terms stay out
        task_objective = getattr(objective, "task", objective)
        config, calibration = calibrate_for_run(config, model, task_objective, family)
        config, calibration = broadcast_from_main((config, calibration))  # the main process's λs everywhere
    teacher = objective.teacher
    if teacher is None and family.needs_pretrained_view:
        teacher = SnapshotTeacher(model)  # the pre-trained model, for evaluation only
    if teacher is not None:
        check_teacher_supported()  # FSDP / ZeRO-3 (from the launcher's environment): before any directory
    if resume is None:
        out_dir = broadcast_from_main(_new_run_dir(config, calibration, model) if main else None)
    logger.info("run directory: %s", out_dir)
    trainer = BALoRATrainer(
        model=model, args=training_arguments(config, out_dir, progress), objective=objective, adapter=config.adapter,
        head_learning_rate=config.train.head_learning_rate,
        train_dataset=family.train_set, data_collator=family.collator, processing_class=tokenizer,
    )
    train_seconds = _train(trainer, config, out_dir, resumed=resume is not None)
    history = list(trainer.state.log_history)
    if not main:  # the main process saves and evaluates; the others join a collective evaluation only
        return _other_process_result(trainer, tokenizer, family, teacher, spec.name, train_seconds, history, out_dir)
    history = _save(trainer, tokenizer, config, out_dir, title=f"{data_name(config)} · {spec.name}")

    eval_start = time.perf_counter()
    evaluation = family.evaluate(trainer, tokenizer, out_dir, teacher)
    metrics = dict(
        evaluation, task=family.task_name, method=spec.name, trainable_parameters=trainable_parameters(model),
        train_seconds=train_seconds, eval_seconds=time.perf_counter() - eval_start,
        global_steps=trainer.state.global_step, **family.facts,
    )
    if calibration is not None:  # the λs this run trained with (also in config.yaml), for the experiment store
        metrics["calibrated_lambdas"] = dict(calibration.proposed)
    write_model_card(out_dir / "adapter", config, metrics, evaluation=evaluation,
                     saved_config=out_dir / run_dir.CONFIG_FILE, data_name=data_name(config))
    run_dir.write_json(out_dir / run_dir.METRICS_FILE, metrics)
    return RunResult(run_dir=out_dir, method=spec.name, metrics=metrics,
                     trainable_parameters=metrics["trainable_parameters"], train_seconds=train_seconds,
                     log_history=history)
