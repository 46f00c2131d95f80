"""Supervised fine-tuning (SFT) data for causal language models.

``load_sft_dataset`` -> ``encode_sft`` -> ``SFTCollator``: rows of any supported instruction
format become ``input_ids`` / ``attention_mask`` / ``labels`` where only response tokens (the
assistant's content and its end-of-turn token) are targets; labels are unshifted (Hugging Face
convention). ``render_prompt`` gives evaluation the exact prompt text training used.
"""

from __future__ import annotations

from .collator import SFTCollator
from .encode import TRAIN_ON, encode_messages, encode_sft, prompt_token_ids
from .formats import (
    ALPACA_PREAMBLE,
    FORMATS,
    ChatTemplateError,
    detect_format,
    has_chat_template,
    render_messages,
    render_prompt,
    to_messages,
)
from .sources import SFT_DATASETS, load_sft_dataset

__all__ = [
    "ALPACA_PREAMBLE",
    "FORMATS",
    "SFT_DATASETS",
    "TRAIN_ON",
    "ChatTemplateError",
    "SFTCollator",
    "detect_format",
    "encode_messages",
    "encode_sft",
    "has_chat_template",
    "load_sft_dataset",
    "prompt_token_ids",
    "render_messages",
    "render_prompt",
    "to_messages",
]
