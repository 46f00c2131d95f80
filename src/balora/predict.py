"""``balora predict``: the label names a trained classifier gives, or the completions a trained causal LM writes.

:func:`predict` loads a run directory, a PEFT adapter directory or a saved fine-tuned model of
either family (:func:`balora.models.resolve_model_source`, :func:`balora.models.load_source`: a
classifier gets the labels saved beside its adapter) and runs it on input rows
``{"text": ..., ("text_pair": ...)}`` that :func:`read_inputs` gathers from arguments, stdin
lines or a CSV/TSV/JSON(L)/Parquet file (:func:`balora.data.files.read_table`):

* a classifier (:func:`classify`): each row with ``prediction``, the label NAME, and
  ``probabilities``, ``{name: p}`` of the ``top_k`` most likely classes (all by default), most
  likely first; a regression head (one output) gives its value as ``prediction``;
* a causal LM (:func:`complete`): ``{"prompt": ..., "completion": ...}``, the prompt rendered
  with :func:`balora.data.sft.render_prompt` (the chat template training used) and completed
  greedily by :func:`balora.evaluation.generate.generate_texts`.

:func:`write_predictions` writes the rows as JSON lines or CSV to stdout or to a NEW file (an
existing file is never overwritten). User mistakes (a missing or mismatched adapter, no input,
a column that is not in the file, an option the model's family does not take) raise one-line
``ValueError`` / ``FileNotFoundError`` / ``FileExistsError``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from balora.config import CLASSIFICATION
from balora.data.files import cell_text, read_table
from balora.data.sft import render_prompt
from balora.evaluation.generate import SamplingConfig, generate_texts
from balora.models import load_source, resolve_model_source
from balora.regularizers.common import check_int

__all__ = ["FORMATS", "check_output", "classify", "complete", "predict", "read_inputs", "write_predictions"]

#: Output formats of :func:`write_predictions`.
FORMATS = ("jsonl", "csv")

_CLASSIFICATION_BATCH_SIZE = 32  # texts per forward
_GENERATION_BATCH_SIZE = 8  # prompts per generate call
_MAX_NEW_TOKENS = 256


# ----------------------------------------------------------------------------- inputs


def _check_texts(rows: list[dict], where: str) -> list[dict]:
    """``rows`` when there is at least one and no text is empty; else a one-line ValueError."""
    if not rows:
        raise ValueError(f"no input texts in {where}")
    for key in ("text", "text_pair"):
        empty = [i for i, row in enumerate(rows, start=1) if key in row and not row[key]]
        if empty:
            raise ValueError(f"{where}: {len(empty)} input{'s' * (len(empty) != 1)} with an empty {key} "
                             f"(the first is input {empty[0]})")
    return rows


def _file_rows(path: str | os.PathLike, text_column: str, text_pair_column: str | None) -> list[dict]:
    table = read_table(path, what="input file")
    wanted = {"text": text_column, "text_pair": text_pair_column} if text_pair_column else {"text": text_column}
    missing = [column for column in wanted.values() if column not in table.columns]
    if missing:
        raise ValueError(f"input file {path}: no column {', '.join(map(repr, missing))}; "
                         f"the columns are: {', '.join(table.columns) or '(none)'}")
    rows = [{ours: cell_text(row.get(theirs)).strip() for ours, theirs in wanted.items()} for row in table.rows]
    return _check_texts(rows, f"input file {path}")


def read_inputs(
    texts: Sequence[str] = (),
    *,
    file: str | os.PathLike | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    stdin: Iterable[str] | None = None,
) -> list[dict]:
    """The input rows ``{"text": ..., ("text_pair": ...)}``, in input order, texts stripped.

    From ``file`` (its ``text_column`` and ``text_pair_column``), else from ``texts``, else (no
    texts, or the single text ``"-"``) from the non-blank lines of ``stdin`` (default
    ``sys.stdin``). Raises a one-line ValueError for no input, an empty text, a column the file
    does not have, texts and a file together, or a text-pair column without a file.
    """
    if file is not None:
        if texts:
            raise ValueError("give the texts as arguments or in --file, not both")
        return _file_rows(file, text_column, text_pair_column)
    if text_pair_column is not None:
        raise ValueError("--text-pair-column reads a column of --file; give --file too")
    if not texts or list(texts) == ["-"]:
        lines = (line.strip() for line in (sys.stdin if stdin is None else stdin))
        return _check_texts([{"text": line} for line in lines if line], "stdin")
    return _check_texts([{"text": text.strip()} for text in texts], "the arguments")


# ----------------------------------------------------------------------------- models


def _input_limit(model, tokenizer) -> int:
    """The longest input the model takes: the tokenizer's limit, within the model's positions."""
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits, default=512)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def classify(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    top_k: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Each row of ``rows`` (``text``, optional ``text_pair``) with the classifier's ``prediction``.

    ``model`` (in eval mode) maps the tokenized ``(batch, seq)`` inputs to ``logits`` of shape
    ``(batch, num_labels)``; its ``config.id2label`` names the classes. A row gets
    ``prediction`` (the most likely label name) and ``probabilities`` (softmax, ``{name: p}`` of
    the ``top_k`` most likely classes, most likely first; None: all); with a regression head
    (``problem_type == "regression"``) ``prediction`` is the predicted value. Texts are
    truncated to ``max_length`` tokens (None: what the tokenizer and the model take).
    """
    check_int(batch_size, "batch_size")
    regression = model.config.problem_type == "regression"
    if top_k is not None:
        check_int(top_k, "top_k")
        if regression:
            raise ValueError("--top-k is for class probabilities; this model has a regression head")
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    k = len(names) if top_k is None else min(top_k, len(names))
    max_length = max_length or _input_limit(model, tokenizer)
    out = []
    with torch.no_grad(), tqdm(total=len(rows), desc="predicting", unit="text", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = list(rows[start:start + batch_size])
            pairs = [row["text_pair"] for row in batch] if "text_pair" in batch[0] else None
            inputs = tokenizer([row["text"] for row in batch], pairs, truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt").to(_device(model))
            logits = model(**inputs).logits.float()  # (batch, num_labels)
            if regression:
                out += [{**row, "prediction": value} for row, value in zip(batch, logits[:, 0].tolist())]
            else:
                probs, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # (batch, k), most likely first
                for row, p, i in zip(batch, probs.tolist(), ids.tolist()):
                    out.append({**row, "prediction": names[i[0]],
                                "probabilities": {names[c]: q for c, q in zip(i, p)}})
            bar.update(len(batch))
    return out


def complete(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    batch_size: int = _GENERATION_BATCH_SIZE,
    progress: bool = False,
) -> list[str]:
    """The greedy completion of each user prompt, rendered as training rendered it
    (:func:`balora.data.sft.render_prompt`); only the new text, special tokens skipped."""
    rendered = [render_prompt(tokenizer, prompt) for prompt in prompts]
    completions = generate_texts(model, tokenizer, rendered, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                                 batch_size=batch_size, progress=progress, desc="predicting")
    return [texts[0] for texts in completions]


def _check_options(source, path, *, text_pair_column, top_k, batch_size, max_length, max_new_tokens) -> None:
    """A one-line ValueError for an option the model's family does not take, or a bad value."""
    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size), ("--max-length", max_length),
                        ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if source.family == CLASSIFICATION:
        given = {"--max-new-tokens": max_new_tokens}
    else:
        given = {"--top-k": top_k, "--max-length": max_length, "--text-pair-column": text_pair_column}
    for flag, value in given.items():
        if value is not None:
            raise ValueError(f"{flag} does not apply to {path}: it is a {source.family} model")


def predict(
    path: str | os.PathLike,
    texts: Sequence[str] = (),
    *,
    file: str | os.PathLike | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    stdin: Iterable[str] | None = None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool | None = None,
) -> list[dict]:
    """What ``balora predict PATH [TEXT ...]`` writes: one row per input, in input order.

    ``path``: a ``balora train`` run directory, a PEFT adapter directory or a saved fine-tuned
    model, of either family. The inputs are :func:`read_inputs` of ``texts``, ``file``,
    ``text_column``, ``text_pair_column`` and ``stdin``. A classifier gives :func:`classify`'s
    rows (inputs truncated to ``max_length`` tokens; None: the run's ``model.max_length``, else
    the model's limit); a causal LM gives ``{"prompt", "completion"}`` rows (:func:`complete`,
    at most ``max_new_tokens`` new tokens, 256 by default). ``batch_size`` defaults to 32 texts
    or 8 prompts; ``progress`` (None: when reading a file) shows a progress bar on stderr. The
    path is resolved and the options are checked before stdin is read, and the inputs before
    the model is loaded.
    """
    source = resolve_model_source(None, path, family=None)
    _check_options(source, path, text_pair_column=text_pair_column, top_k=top_k, batch_size=batch_size,
                   max_length=max_length, max_new_tokens=max_new_tokens)
    rows = read_inputs(texts, file=file, text_column=text_column, text_pair_column=text_pair_column, stdin=stdin)
    progress = file is not None if progress is None else progress
    model, tokenizer = load_source(source)
    if source.family == CLASSIFICATION:
        return classify(model, tokenizer, rows, top_k=top_k, batch_size=batch_size or _CLASSIFICATION_BATCH_SIZE,
                        max_length=max_length or source.max_length, progress=progress)
    prompts = [row["text"] for row in rows]
    completions = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens or _MAX_NEW_TOKENS,
                           batch_size=batch_size or _GENERATION_BATCH_SIZE, progress=progress)
    return [{"prompt": prompt, "completion": text} for prompt, text in zip(prompts, completions)]


# ----------------------------------------------------------------------------- outputs


def _exists(output: str | os.PathLike) -> FileExistsError:
    return FileExistsError(f"{output} exists; predictions never overwrite a file: choose another --output")


def check_output(output: str | os.PathLike | None) -> None:
    """A one-line FileExistsError when ``output`` exists (predictions never overwrite a file)."""
    if output is not None and Path(output).exists():
        raise _exists(output)


def _flat(row: dict) -> dict:
    """A row as CSV cells (see :func:`write_predictions`)."""
    flat = {key: value for key, value in row.items() if key != "probabilities"}
    for rank, (name, p) in enumerate(row.get("probabilities", {}).items(), start=1):
        flat[f"label_{rank}"], flat[f"probability_{rank}"] = name, p
    return flat


def _write(rows: Sequence[dict], handle, fmt: str) -> None:
    if fmt == "jsonl":
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)


def write_predictions(rows: Sequence[dict], output: str | os.PathLike | None = None, fmt: str = "jsonl") -> None:
    """Write ``rows`` as JSON lines or CSV to stdout (``output=None``) or to the NEW file
    ``output`` (an existing file: a one-line FileExistsError).

    CSV has a column per key, and ``probabilities`` becomes the columns ``label_1,
    probability_1, label_2, ...``, most likely first.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    if output is None:
        _write(rows, sys.stdout, fmt)
        return
    try:
        handle = open(output, "x", encoding="utf-8", newline="")  # never overwrites, even in a race
    except FileExistsError:
        raise _exists(output) from None
    with handle:
        _write(rows, handle, fmt)
