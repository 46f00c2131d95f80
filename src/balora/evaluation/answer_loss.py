"""Teacher-forced loss of reference solutions: how likely the trained model finds the right answer text.

A small model answers almost no held-out GSM8K-style problem correctly before or after a short
fine-tune (the math demo: 0-2 of 40), so accuracy alone cannot tell two methods apart. The
negative log-likelihood of the reference solutions of the same held-out problems moves with every
step of learning and is measured on exactly the rows that accuracy is scored on.

:func:`answer_loss` encodes each ``(question, answer)`` row as the training data is encoded
(:func:`balora.data.sft.encode_sft`: the chat template, labels on the response tokens only) and
returns the token-weighted mean cross-entropy (natural log) of the response tokens, next-token
aligned, over all rows together; a row without a response token within ``max_length`` is left out
and counted.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from balora.data.sft import SFTCollator, encode_sft
from balora.regularizers.common import IGNORE_INDEX

__all__ = ["answer_loss"]


@torch.no_grad()
def answer_loss(model, tokenizer, rows: datasets.Dataset, *, max_length: int, batch_size: int = 4,
                progress: bool = False) -> dict[str, Any]:
    """``{"answer_loss", "answer_perplexity", "answer_tokens", "answer_rows_dropped"}`` of ``rows``
    (columns ``question`` and ``answer``, the full reference solution).

    ``answer_loss`` = Σ_tokens −log p(y_t | y_<t, prompt) / number of response tokens, over the
    rows that keep a response token within ``max_length``; NaN when none does.
    """
    was_training = model.training
    model.eval()
    try:
        encoded, dropped = encode_sft(rows.select_columns(["question", "answer"]), tokenizer, max_length=max_length,
                                      progress=False)
    except ValueError:  # no row left
        return {"answer_loss": math.nan, "answer_perplexity": math.nan, "answer_tokens": 0,
                "answer_rows_dropped": len(rows)}
    collate = SFTCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc="answer loss", unit="batch", disable=not progress):
            batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # (B, L, V)
            targets = batch["labels"][:, 1:].to(device)  # (B, L-1): the token each position predicts
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = total / count if count else math.nan
    return {"answer_loss": loss, "answer_perplexity": math.exp(loss) if count else math.nan,
            "answer_tokens": count, "answer_rows_dropped": int(sum(dropped.values()))}
