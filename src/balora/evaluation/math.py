"""GSM8K / MATH: greedy answers in training's prompt format, scored by answer extraction.

:func:`evaluate_math` is THE math scorer, used by ``balora evaluate`` and by training runs: the
prompt of each question is :func:`balora.data.sft.render_prompt` (the text training put before
each answer), tokenized as training tokenized it (:func:`balora.evaluation.generate.generate_texts`
applies that rule), decoded greedily, and scored by
:func:`balora.evaluation.math_answers.score_math`. :func:`eval_math` loads the test split
(:mod:`balora.data.math`) and calls it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from balora.data.math import load_gsm8k, load_math
from balora.data.sft.formats import render_prompt
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

from .generate import SamplingConfig, generate_texts
from .math_answers import score_math

__all__ = ["MATH_BENCHMARKS", "eval_math", "evaluate_math"]

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
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_math` on the test split of GSM8K or MATH (the hub, or a local file
    ``path``; the first ``max_examples`` rows when given)."""
    _check_args(benchmark, max_new_tokens, batch_size)
    if max_examples is not None:
        check_int(max_examples, "max_examples")
    loader = load_gsm8k if benchmark == "gsm8k" else load_math
    rows = loader(split="test", path=path, max_examples=max_examples)
    return evaluate_math(model, tokenizer, rows, benchmark, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         progress=progress, records_path=records_path)
