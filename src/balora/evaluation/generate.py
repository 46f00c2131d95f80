"""Batched text generation with a causal language model (plain or PEFT-wrapped).

``generate_texts`` takes prompts that are already rendered strings (the caller applies the
chat template, e.g. with :func:`balora.data.sft.render_prompt`) and returns, per prompt,
``num_return_sequences`` completions holding only the newly generated text. The prompts are
tokenized as training tokenizes them: no extra special tokens after a chat template (it holds
them already), the tokenizer's own BOS for the plain-text (Alpaca) fallback. ``chat_reply`` is
the greedy reply to a chat, through the same loop; every local answer of the evaluation
(math, code, MT-Bench answers, a local judge) is generated here. Prompts are sorted by token length (longest first, so an out-of-memory
error shows up on the first batch), left-padded per batch so that every prompt ends in the
same column, and the results are put back in input order. Everything else is
``model.generate`` with the KV cache on.

The tokenizer and the model are left as they were found: the padding side is passed per
call (the tokenizer's ``padding_side`` is never touched), a missing pad token is borrowed
from the eos token only for the duration of the call, and the model's training mode is
restored afterwards. Sampling is reproducible from ``SamplingConfig.seed`` and does not
disturb the global random state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from balora.data.sft.formats import has_chat_template, render_messages
from balora.regularizers.common import check_int

__all__ = ["SamplingConfig", "chat_reply", "generate_texts", "truncate_at_stop"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode.

    ``do_sample=False`` is greedy decoding (``temperature``, ``top_p`` and ``top_k`` are then
    ignored); ``top_k=0`` disables top-k filtering and ``top_p=1.0`` disables nucleus
    filtering. ``stop_strings`` end a completion early; the completion is cut just before the
    first stop string (which is not included). ``seed`` makes sampling reproducible.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):  # a bare string would be read char by char
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        else:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        check_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        check_int(self.top_k, "top_k", minimum=0)
        check_int(self.num_return_sequences, "num_return_sequences", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs do_sample=True "
                "(greedy decoding would return the same text every time)"
            )
        bad = [s for s in self.stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop_strings must be non-empty strings, got {bad!r}")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``model.generate`` for these settings.

        Greedy decoding only sets ``do_sample=False`` so that sampling flags inherited from the
        model's ``generation_config`` are ignored without warnings.
        """
        kwargs: dict = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, use_cache=True)
        if self.do_sample:
            kwargs.update(
                temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k,
                num_return_sequences=self.num_return_sequences,
            )
        if self.stop_strings:
            kwargs["stop_strings"] = list(self.stop_strings)
        return kwargs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` cut just before the earliest occurrence of any stop string (unchanged if none)."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)] if cuts else text


@contextlib.contextmanager
def _pad_token_available(tokenizer) -> Iterator[int]:
    """Yield the pad token id, borrowing the eos token while the tokenizer has no pad token.

    The borrowed pad token is removed again on exit, so the tokenizer is left unchanged.
    """
    if tokenizer.pad_token is not None:
        yield tokenizer.pad_token_id
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token first"
        )
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.pad_token = None


@contextlib.contextmanager
def _inference_mode(model) -> Iterator[None]:
    """``model.eval()`` and no gradients inside; the previous training mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators inside a fork, so the caller's random state is left untouched."""
    on_accelerator = device.type not in ("cpu", "meta")
    fork = dict(devices=[device.index or 0], device_type=device.type) if on_accelerator else dict(devices=[])
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        yield


def _length_order(tokenizer, prompts: list[str], add_special_tokens: bool) -> list[int]:
    """Prompt indices sorted by token length, longest first (ties keep input order)."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def _generate_batch(model, tokenizer, prompts: list[str], sampling: SamplingConfig,
                    add_special_tokens: bool, pad_token_id: int) -> list[list[str]]:
    """Completions for one batch: ``len(prompts)`` lists of ``num_return_sequences`` strings.

    The batch is left-padded to ``[batch, prompt_len]``; ``generate`` returns
    ``[batch * num_return_sequences, prompt_len + new]`` with the copies of one prompt adjacent,
    and only the ``new`` columns are decoded.
    """
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=add_special_tokens).to(_model_device(model))
    extra = {"tokenizer": tokenizer} if sampling.stop_strings else {}
    output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pad_token_id=pad_token_id, **sampling.generate_kwargs(), **extra)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    texts = [truncate_at_stop(t, sampling.stop_strings) for t in texts]
    n = sampling.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    sampling: SamplingConfig = SamplingConfig(),
    batch_size: int = 8,
    add_special_tokens: bool | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[str]]:
    """Generate completions for already-rendered prompts.

    Returns one entry per prompt, in input order, each a list of
    ``sampling.num_return_sequences`` completions (only the new text, special tokens skipped,
    cut before the first stop string). Works for any causal LM with ``generate`` (PEFT models
    included). ``add_special_tokens=None`` is training's rule, ``not has_chat_template(tokenizer)``:
    a chat template already holds the special tokens, a plain-text prompt gets the BOS. Pass a
    bool only for prompts that training did not render.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings (apply the chat template first)")
    check_int(batch_size, "batch_size")
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not prompts:
        return []
    if add_special_tokens is None:
        add_special_tokens = not has_chat_template(tokenizer)
    results: list[list[str] | None] = [None] * len(prompts)
    order = _length_order(tokenizer, prompts, add_special_tokens)
    with (
        _pad_token_available(tokenizer) as pad_id,
        _inference_mode(model),
        _seeded(sampling.seed, _model_device(model)),
        tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            outputs = _generate_batch(model, tokenizer, [prompts[i] for i in batch], sampling,
                                      add_special_tokens, pad_id)
            for i, completions in zip(batch, outputs):
                results[i] = completions
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def chat_reply(model, tokenizer, messages: list[dict[str, str]], *, max_new_tokens: int = 256) -> str:
    """The greedy reply (stripped) to a chat ``[{"role": ..., "content": ...}, ...]``, rendered as
    training renders it (:func:`balora.data.sft.render_messages` with the generation prompt)."""
    prompt = render_messages(tokenizer, messages, add_generation_prompt=True)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    return generate_texts(model, tokenizer, [prompt], sampling=sampling, progress=False)[0][0].strip()
