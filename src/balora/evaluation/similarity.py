"""The general (non-task) ability of a sentence encoder, scored zero-shot: embedding similarity.

A sentence-embedding model such as MiniLM-L6 (all-MiniLM-L6-v2) was pre-trained so that the cosine
similarity of two sentences' mean-pooled token embeddings says whether they mean the same. Task
adapters change the encoder; how much of that skill survives is the encoder's "general ability"
in the I-LoRA sense (:func:`balora.merging.metrics.generalization_retention` = adapted ÷ base).

:func:`similarity_auc`: for N text pairs with binary labels (1 = same meaning, e.g. GLUE MRPC's
``equivalent``), the ROC AUC (``sklearn.metrics.roc_auc_score``) of the cosine similarity of the
two texts' embeddings, where a text's embedding is the mean of the encoder's last hidden states
over its non-pad tokens (sentence-transformers' mean pooling). No training, no head: 0.5 is
chance, 1.0 a perfect ranking. :func:`encoder_of` finds the encoder inside a (PEFT-wrapped)
sequence classifier, adapters included; :func:`general_pairs` reads a pair task's examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["encoder_of", "general_pairs", "mean_pooled_embeddings", "similarity_auc"]


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a (PEFT-wrapped) sequence classifier: the module that returns
    ``last_hidden_state`` (B, T, d) (e.g. ``BertModel``), with any LoRA layers injected into it; a
    model without such a body (a ``BertModel`` itself) is returned as it is."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", None)
    body = getattr(inner, prefix, None) if prefix else None
    return body if isinstance(body, nn.Module) else inner


@torch.no_grad()
def mean_pooled_embeddings(encoder: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int,
                           batch_size: int = 64) -> torch.Tensor:
    """(N, d) float32: per text, the mean of ``encoder``'s last hidden states (B, T, d) over its
    non-pad tokens (attention mask 1), each text truncated to ``max_length`` tokens."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt").to(device)
            hidden = encoder(**batch).last_hidden_state.float()  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))  # (B, d)
    finally:
        encoder.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)


def similarity_auc(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], labels: Sequence[int], *,
                   max_length: int, batch_size: int = 64) -> float:
    """ROC AUC of cos(embedding(a), embedding(b)) for the N ``pairs`` against the binary ``labels``
    (N,), 1 = same meaning; ``model``: a sequence classifier or its encoder (see the module
    docstring). Both classes must be present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(np.int64).ravel()
    if len(pairs) != y.size or set(np.unique(y)) != {0, 1}:
        raise ValueError(f"similarity_auc needs one binary label per pair with both classes present, got "
                         f"{len(pairs)} pairs and labels {sorted(set(y.tolist()))}")
    encoder = encoder_of(model)
    first = mean_pooled_embeddings(encoder, tokenizer, [a for a, _ in pairs], max_length=max_length,
                                   batch_size=batch_size)  # (N, d)
    second = mean_pooled_embeddings(encoder, tokenizer, [b for _, b in pairs], max_length=max_length,
                                    batch_size=batch_size)  # (N, d)
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)  # (N,)
    return float(roc_auc_score(y, cosine.numpy()))


def general_pairs(task: str, *, seed: int = 0) -> tuple[list[tuple[str, str]], list[int], str]:
    """Every example of a binary pair classification task (``balora.data.load_task``: its training
    and evaluation splits, since nothing is trained on them): ``(pairs, labels, positive)``, where
    label 1 is the task's second class (``positive`` names it: MRPC's ``equivalent``)."""
    from balora.data import load_task

    data = load_task(task, seed=seed)
    if not data.is_pair or data.num_labels != 2 or data.problem_type == "regression":
        raise ValueError(f"{task}: the general-ability score needs a binary classification task of text pairs "
                         f"(e.g. mrpc-validation), got {data.num_labels} label(s)"
                         f"{', pairs' if data.is_pair else ', single texts'}")
    pairs, labels = [], []
    for split in (data.train, data.eval):
        pairs += list(zip(split["text"], split["text_pair"]))
        labels += [int(v) for v in split["label"]]
    return pairs, labels, str(data.label_names[1])
