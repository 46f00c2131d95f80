"""Right-padding collator for SFT examples made by :func:`balora.data.sft.encode_sft`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from balora.regularizers.common import IGNORE_INDEX

__all__ = ["SFTCollator"]


class SFTCollator:
    """Pad a list of encoded examples into a batch of tensors, on the RIGHT.

    Each example is a mapping with ``input_ids`` and ``labels`` (equal-length int lists),
    optional ``attention_mask`` (ones when absent) and optional ``example_id`` (int). Other
    keys (``length``, ...) are ignored.

    Returns ``input_ids`` (pad: ``pad_token_id``), ``attention_mask`` (pad: 0) and ``labels``
    (pad: ``label_pad_id``), each a LongTensor of shape ``(batch, L)`` where ``L`` is the
    longest example rounded up to a multiple of ``pad_to_multiple_of``, plus ``example_id``
    of shape ``(batch,)`` when every example has one.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, label_pad_id: int = IGNORE_INDEX):
        if pad_token_id is None:
            raise ValueError(
                "SFTCollator needs a pad token id; a tokenizer without one can use its eos: "
                "SFTCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)"
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, not {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = int(label_pad_id)

    def _padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SFTCollator got an empty batch")
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        masks = [list(f["attention_mask"]) if "attention_mask" in f else [1] * len(r) for f, r in zip(features, ids)]
        if any(len(a) != len(b) or len(a) != len(m) for a, b, m in zip(ids, labels, masks)):
            raise ValueError("each example's input_ids, attention_mask and labels must have the same length")
        length = self._padded_length(max(len(r) for r in ids))
        batch = {
            "input_ids": self._pad(ids, length, self.pad_token_id),
            "attention_mask": self._pad(masks, length, 0),
            "labels": self._pad(labels, length, self.label_pad_id),
        }
        if all("example_id" in f for f in features):
            batch["example_id"] = torch.tensor([int(f["example_id"]) for f in features], dtype=torch.long)
        return batch
