"""Instruction-data formats -> chat messages, and the prompt text a model sees.

The canonical form of one training example is a list of chat messages::

    [{"role": "system" | "user" | "assistant", "content": str}, ...]

:func:`to_messages` converts the usual dataset layouts to it (:data:`FORMATS` lists them and
:func:`detect_format` picks one from the column names). :func:`render_messages` turns messages
into text with the tokenizer's chat template, or with the Alpaca template when the tokenizer has
none, and :func:`render_prompt` is the text a model sees right before its answer. Training
(:mod:`balora.data.sft.encode`) and evaluation both go through these functions, so their prompts
are identical by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jinja2

__all__ = [
    "ALPACA_PREAMBLE",
    "FORMATS",
    "ChatTemplateError",
    "detect_format",
    "has_chat_template",
    "render_messages",
    "render_prompt",
    "to_messages",
]

ROLES = ("system", "user", "assistant")

#: Format name -> the column sets that identify it (any one of them), in detection order.
FORMATS: dict[str, tuple[tuple[str, ...], ...]] = {
    "chat": (("messages",),),
    "sharegpt": (("conversations",),),
    "alpaca": (("instruction", "output"),),
    "metamath": (("query", "response"),),
    "codefeedback": (("query", "answer"),),
    "prompt_response": (("prompt", "response"), ("question", "answer")),
}

#: ShareGPT speaker names (``from``) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
    "system": "system",
}

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_USER = "### Instruction:\n{content}\n\n### Response:\n"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render these messages, or renders them in a way
    that breaks the prefix property SFT masking relies on."""


# ------------------------------------------------------------------ record -> messages


def _column_sets_hint() -> str:
    sets = [
        f"{' + '.join(cols)} ({name})" for name, options in FORMATS.items() for cols in options
    ]
    return "; ".join(sets)


def detect_format(column_names: Iterable[str]) -> str:
    """The name of the first format in :data:`FORMATS` whose columns are all present.

    Raises a one-line ``ValueError`` listing the supported column sets when none matches.
    """
    names = set(column_names)
    for name, options in FORMATS.items():
        if any(set(cols) <= names for cols in options):
            return name
    raise ValueError(
        f"cannot detect the SFT data format from columns {sorted(names)}; "
        f"supported column sets: {_column_sets_hint()}"
    )


def _text(record: Mapping, key: str) -> str:
    """``record[key]`` as a string; a missing key raises, ``None`` becomes ``""``."""
    if key not in record:
        raise ValueError(f"record has no field {key!r}; fields: {sorted(record)}")
    value = record[key]
    return "" if value is None else str(value)


def _single_turn(record: Mapping, user: str, assistant: str) -> list[dict]:
    """``[system?, user, assistant]``; an optional non-empty ``system`` field comes first."""
    messages = []
    system = record.get("system")
    if system:
        messages.append({"role": "system", "content": str(system)})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": assistant})
    return messages


def _alpaca(record: Mapping) -> list[dict]:
    instruction, extra = _text(record, "instruction"), record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    return _single_turn(record, user, _text(record, "output"))


def _prompt_response(record: Mapping) -> list[dict]:
    if "prompt" in record and "response" in record:
        return _single_turn(record, _text(record, "prompt"), _text(record, "response"))
    return _single_turn(record, _text(record, "question"), _text(record, "answer"))


def _turns(record: Mapping, key: str) -> list:
    """The list of turn dicts in ``record[key]``; a dict of lists (how ``datasets`` returns a
    legacy ``Sequence`` of structs) is zipped back into a list of dicts."""
    if key not in record:
        raise ValueError(f"record has no field {key!r}; fields: {sorted(record)}")
    turns = record[key]
    if isinstance(turns, Mapping) and all(isinstance(v, list) for v in turns.values()):
        turns = [dict(zip(turns, values)) for values in zip(*turns.values())]
    if not isinstance(turns, list | tuple) or not turns:
        raise ValueError(f"{key!r} must be a non-empty list of turns, got {type(turns).__name__}")
    return list(turns)


def _chat(record: Mapping) -> list[dict]:
    messages = []
    for turn in _turns(record, "messages"):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        if role not in ROLES:
            raise ValueError(f"chat message role must be one of {list(ROLES)}, got {role!r}")
        content = turn.get("content")
        messages.append({"role": role, "content": "" if content is None else str(content)})
    return messages


def _sharegpt(record: Mapping) -> list[dict]:
    messages = []
    for turn in _turns(record, "conversations"):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise ValueError(
                f"sharegpt speaker ('from') must be one of {sorted(SHAREGPT_ROLES)}, got {speaker!r}"
            )
        value = turn.get("value")
        messages.append({"role": role, "content": "" if value is None else str(value)})
    return messages


_CONVERTERS = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "metamath": lambda r: _single_turn(r, _text(r, "query"), _text(r, "response")),
    "codefeedback": lambda r: _single_turn(r, _text(r, "query"), _text(r, "answer")),
    "prompt_response": _prompt_response,
}


def check_format(format: str) -> str:
    """``format`` itself when it is ``"auto"`` or a name in :data:`FORMATS`, else a ValueError."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown SFT format {format!r}; use 'auto' or one of {list(FORMATS)}")
    return format


def to_messages(record: Mapping, format: str = "auto") -> list[dict]:
    """Convert one dataset row to chat messages ``[{"role": ..., "content": str}, ...]``.

    Formats (``"auto"`` detects from the record's keys, see :func:`detect_format`):

    * ``alpaca``: ``instruction``, optional ``input`` (appended after a blank line), ``output``;
    * ``metamath``: ``query``, ``response``;  ``codefeedback``: ``query``, ``answer``;
    * ``prompt_response``: ``prompt``/``response`` or ``question``/``answer``;
    * ``chat``: ``messages`` = list of ``{"role", "content"}``;
    * ``sharegpt``: ``conversations`` = list of ``{"from": human|gpt|system, "value"}``.

    The single-turn formats put an optional non-empty ``system`` field first. ``None`` values
    become ``""`` (an empty response is then dropped by :func:`balora.data.sft.encode_sft`).
    Malformed records raise a one-line ``ValueError``.
    """
    name = detect_format(record.keys()) if check_format(format) == "auto" else format
    return _CONVERTERS[name](record)


# ------------------------------------------------------------------ messages -> text


def has_chat_template(tokenizer) -> bool:
    """True when ``tokenizer`` has a chat template (else the Alpaca template is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _alpaca_render(messages: list[dict], eos_token: str | None) -> str:
    """Alpaca text for (multi-turn) messages: a preamble (the first system message replaces
    the default one), each user turn as ``### Instruction:\\n...\\n\\n### Response:\\n`` and
    each assistant turn as ``content + eos`` followed by a blank line."""
    if eos_token is None and any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            "the tokenizer has neither a chat template nor an eos token: set tokenizer.chat_template "
            "or tokenizer.eos_token"
        )
    first_is_system = bool(messages) and messages[0]["role"] == "system"
    parts = [(messages[0]["content"] if first_is_system else ALPACA_PREAMBLE) + "\n\n"]
    for message in messages[1:] if first_is_system else messages:
        if message["role"] == "user":
            parts.append(_ALPACA_USER.format(content=message["content"]))
        elif message["role"] == "assistant":
            parts.append(f"{message['content']}{eos_token}\n\n")
        else:
            parts.append(f"{message['content']}\n\n")
    return "".join(parts)


def render_messages(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """Messages as the text the model reads: the tokenizer's chat template
    (``apply_chat_template(..., tokenize=False)``) or, without one, the Alpaca template.

    Template failures (e.g. a template that rejects system messages) raise a one-line
    :class:`ChatTemplateError`.
    """
    if not has_chat_template(tokenizer):
        return _alpaca_render(messages, tokenizer.eos_token)
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the tokenizer's chat template failed on these messages: {exc}") from None


def render_prompt(tokenizer, user_text: str, *, system: str | None = None) -> str:
    """The exact text the model sees before its answer to ``user_text``.

    With a chat template: ``[system?, user]`` rendered with ``add_generation_prompt=True``.
    Without: the Alpaca prompt ``"Below is an instruction ...\\n\\n### Instruction:\\n{user_text}
    \\n\\n### Response:\\n"`` (``system`` replaces the "Below is ..." sentence). Tokenize it the
    way training did: see :func:`balora.data.sft.prompt_token_ids`.
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user_text})
    return render_messages(tokenizer, messages, add_generation_prompt=True)
