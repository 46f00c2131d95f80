"""Tokenise chat messages for supervised fine-tuning with response-only labels.

Output of one example (lists of ints, all of the same length ``T <= max_length``):

* ``input_ids``: the rendered conversation's tokens, cut at ``max_length`` (the end is cut);
* ``attention_mask``: all ones (padding is added per batch by :class:`balora.data.sft.SFTCollator`);
* ``labels``: UNSHIFTED, Hugging Face convention: ``labels[t] == input_ids[t]`` for response
  tokens and ``-100`` everywhere else; the model's logits at ``t`` are scored against
  ``labels[t + 1]``.

Response tokens are the trained assistant message's content plus its end-of-turn token
(``<|im_end|>`` for ChatML, ``eos`` for the Alpaca fallback). System, user and template text,
including the assistant header the template writes before the content
(``<|im_start|>assistant\\n``), is masked.

How response tokens are located: the conversation is rendered as text (see
:func:`balora.data.sft.render_messages`), and for each trained assistant message ``i``

* ``start`` = length of ``render(messages[:i], add_generation_prompt=True)``, i.e. exactly the
  evaluation prompt :func:`balora.data.sft.render_prompt` builds for a single turn;
* ``end`` = length of ``render(messages[:i + 1])`` without its trailing whitespace (the
  newline a template writes after its end-of-turn token is not a target).

Each rendered prefix must be a prefix of the next one; a template that breaks this raises
:class:`~balora.data.sft.formats.ChatTemplateError`. The text after the last trained response is
dropped. The text is tokenised once with character offsets, and a token is a target when it
*starts* inside a response span.

Special tokens: text rendered by a chat template is tokenised with ``add_special_tokens=False``
because the template already writes every special token the model expects (a BOS added by the
tokenizer on top would double it). The Alpaca fallback is plain text, so it is tokenised with
``add_special_tokens=True`` (a Llama-style tokenizer prepends its BOS). Evaluation must make the
same choice: :func:`prompt_token_ids` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

import datasets
import numpy as np

from balora.data.sft.formats import (
    ChatTemplateError,
    check_format,
    detect_format,
    has_chat_template,
    render_messages,
    render_prompt,
    to_messages,
)
from balora.regularizers.common import IGNORE_INDEX

__all__ = ["TRAIN_ON", "encode_messages", "encode_sft", "prompt_token_ids", "response_labels"]

logger = logging.getLogger("balora")

TRAIN_ON = ("last", "all_assistant")

DROP_MALFORMED = "malformed record"
DROP_NO_ASSISTANT = "no assistant message"
DROP_EMPTY = "empty response"
DROP_TRUNCATED = "no response token within max_length"

_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "attention_mask": datasets.List(datasets.Value("int8")),
    "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "example_id": datasets.Value("int64"),
    "_drop": datasets.Value("string"),
})


def _check_args(max_length: int, train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {list(TRAIN_ON)}, not {train_on!r}")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")


def _trained_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant messages that carry labels (``[]`` when there is none)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return assistant if train_on == "all_assistant" else assistant[-1:]


def _response_spans(tokenizer, messages: list[dict], turns: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text (cut after the last response) and the ``[start, end)`` character
    span of each trained response; raises ChatTemplateError when prefixes are not stable."""
    full = render_messages(tokenizer, messages)
    spans = []
    for i in turns:
        prompt = render_messages(tokenizer, messages[:i], add_generation_prompt=True)
        turn = full if i == len(messages) - 1 else render_messages(tokenizer, messages[: i + 1])
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable at message {i}: the prompt rendered with "
                "add_generation_prompt=True is not a prefix of the rendered conversation, so the "
                "response tokens cannot be located; use a template that renders earlier turns identically"
            )
        spans.append((len(prompt), len(turn.rstrip())))
    return full[: spans[-1][1]], spans


def _tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, in one batched call (special tokens:
    see the module docstring)."""
    try:
        enc = tokenizer(
            texts, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True
        )
    except NotImplementedError:
        raise ValueError(
            "SFT encoding needs a fast tokenizer (character offsets): load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        ) from None
    return enc["input_ids"], enc["offset_mapping"]


def response_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids[t]`` where token ``t`` starts inside a span (zero-width added tokens never do), else
    :data:`~balora.regularizers.common.IGNORE_INDEX`.

    ``ids`` (length T) and ``offsets`` (T ``(start, end)`` character offsets) come from one
    tokenised text; ``spans`` are the ``[start, end)`` character spans of its responses,
    disjoint and in text order (so each token's candidate span is found by binary search)."""
    if not ids:
        return []
    ids_arr, off = np.asarray(ids), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    span_starts, span_ends = (np.asarray(x, dtype=np.int64) for x in zip(*spans))
    k = np.minimum(np.searchsorted(span_ends, off[:, 0], side="right"), len(spans) - 1)
    inside = (span_starts[k] <= off[:, 0]) & (off[:, 0] < span_ends[k]) & (off[:, 1] > off[:, 0])
    return np.where(inside, ids_arr, IGNORE_INDEX).tolist()


def _finish(ids: list[int], offsets: list, spans: list[tuple[int, int]], max_length: int) -> dict[str, list[int]] | None:
    """Cut at ``max_length`` and label; ``None`` when no target is left."""
    ids = list(ids[:max_length])
    labels = response_labels(ids, offsets[:max_length], spans)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _prepare(tokenizer, messages: list[dict], train_on: str) -> tuple[str, list[tuple[int, int]]]:
    turns = _trained_turns(messages, train_on)
    if not turns:
        raise ValueError("the conversation has no assistant message to train on")
    return _response_spans(tokenizer, messages, turns)


def encode_messages(
    tokenizer, messages: list[dict], *, max_length: int = 512, train_on: str = "last"
) -> dict[str, list[int]] | None:
    """Encode one conversation for SFT (see the module docstring for the exact masking).

    Args:
        tokenizer: a fast Hugging Face tokenizer; its chat template is used when it has one,
            else the Alpaca template with ``eos`` after each response.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        max_length: sequences longer than this are cut at the end.
        train_on: ``"last"`` (only the last assistant message is a target) or
            ``"all_assistant"`` (every assistant message is).

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` (lists of ``T <= max_length`` ints), or
        ``None`` when no response token survives truncation. Raises ``ValueError`` when
        ``messages`` has no assistant message.
    """
    _check_args(max_length, train_on)
    text, spans = _prepare(tokenizer, messages, train_on)
    (ids,), (offsets,) = _tokenize(tokenizer, [text])
    return _finish(ids, offsets, spans, max_length)


def prompt_token_ids(tokenizer, user_text: str, *, system: str | None = None) -> list[int]:
    """Token ids of :func:`balora.data.sft.render_prompt`, tokenised as training does (no extra
    special tokens after a chat template; the tokenizer's own BOS for the Alpaca fallback)."""
    text = render_prompt(tokenizer, user_text, system=system)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def _drop_reason(messages: list[dict], train_on: str) -> str | None:
    """Why a converted conversation cannot be trained on, checked before tokenising."""
    turns = _trained_turns(messages, train_on)
    if not turns:
        return DROP_NO_ASSISTANT
    if any(not messages[i]["content"].strip() for i in turns):
        return DROP_EMPTY
    return None


def _prepare_row(tokenizer, record: dict, fmt: str, train_on: str) -> tuple[str, list] | str:
    """``(text, spans)`` for a usable row, else the drop reason."""
    try:
        messages = to_messages(record, fmt)
    except ValueError:
        return DROP_MALFORMED
    return _drop_reason(messages, train_on) or _prepare(tokenizer, messages, train_on)


def _encode_rows(tokenizer, rows: list[dict], fmt: str, max_length: int, train_on: str) -> list[tuple[dict | None, str]]:
    """``(encoding, "")`` for each usable row, ``(None, reason)`` for each dropped one;
    the texts of the usable rows are tokenised in one batched call."""
    prepared = [_prepare_row(tokenizer, row, fmt, train_on) for row in rows]
    usable = [p for p in prepared if not isinstance(p, str)]
    all_ids, all_offsets = _tokenize(tokenizer, [text for text, _ in usable]) if usable else ([], [])
    encoded = iter(
        _finish(ids, offsets, spans, max_length)
        for ids, offsets, (_, spans) in zip(all_ids, all_offsets, usable)
    )
    results = []
    for p in prepared:
        if isinstance(p, str):
            results.append((None, p))
        else:
            enc = next(encoded)
            results.append((enc, "") if enc is not None else (None, DROP_TRUNCATED))
    return results


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Temporarily turn ``datasets``' progress bars off when ``enabled`` is False."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def encode_sft(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int = 512,
    format: str = "auto",
    train_on: str = "last",
    progress: bool = True,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Encode every row of an instruction dataset for SFT.

    Rows are converted with :func:`balora.data.sft.to_messages` (``format="auto"`` detects the
    format from the column names) and encoded with :func:`encode_messages`.

    Returns:
        ``(encoded, dropped)``: ``encoded`` has exactly the columns ``input_ids``,
        ``attention_mask``, ``labels`` (variable-length int lists), ``length`` (number of
        tokens, for ``TrainingArguments(group_by_length=True, length_column_name="length")``)
        and ``example_id`` (the row index in ``dataset``); ``dropped`` counts the removed rows
        by reason (``"malformed record"``, ``"no assistant message"``, ``"empty response"``,
        ``"no response token within max_length"``). One warning on the ``"balora"`` logger
        summarises the drops; a ``ValueError`` is raised when no row is left.
    """
    _check_args(max_length, train_on)
    fmt = detect_format(dataset.column_names) if check_format(format) == "auto" else format

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [] for name in _FEATURES}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for index, (enc, reason) in zip(indices, _encode_rows(tokenizer, rows, fmt, max_length, train_on)):
            enc = enc or {"input_ids": [], "attention_mask": [], "labels": []}
            for key, value in enc.items():
                out[key].append(value)
            out["length"].append(len(enc["input_ids"]))
            out["example_id"].append(index)
            out["_drop"].append(reason)
        return out

    with _progress_bars(progress):
        encoded = dataset.map(
            encode_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
            features=_FEATURES, desc="encoding SFT examples",
        )
    reasons = encoded["_drop"]
    dropped = dict(Counter(r for r in reasons if r))
    keep = [i for i, reason in enumerate(reasons) if not reason]
    if not keep:
        raise ValueError(f"no usable SFT examples among {len(dataset)} rows (dropped: {dropped})")
    if dropped:
        logger.warning(
            "SFT encoding dropped %d of %d rows: %s",
            sum(dropped.values()), len(dataset), ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())),
        )
    encoded = encoded.remove_columns("_drop")
    return (encoded.select(keep) if dropped else encoded), dropped
