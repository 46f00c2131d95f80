"""MT-Bench-style "LLM as a judge" grading (Zheng et al., 2023, single-answer grading).

A judge model reads a question and an assistant's answer, explains its assessment, and ends with
a rating on a 1-10 scale written strictly as ``Rating: [[5]]``. Four prompt variants follow the
published format:

* ``single``          -- first turn, open-ended categories (writing, roleplay, ...);
* ``single-ref``      -- first turn, graded against a reference answer (math, reasoning, coding);
* ``multi-turn``      -- second turn, graded in the context of the whole two-turn conversation;
* ``multi-turn-ref``  -- the same with the reference answers of both turns.

Two chat backends implement :class:`ChatBackend`:

* :class:`OpenAICompatibleBackend` -- any ``/chat/completions`` HTTP server (a hosted API, or a
  local vLLM / llama.cpp / TGI server), using only the standard library;
* :class:`LocalModelBackend` -- a transformers causal LM with a chat template, generating greedily.

Typical use::

    questions = load_mt_bench_questions()                      # 80 questions from the hub
    answers = answer_questions(LocalModelBackend(model, tok), questions)
    judge = OpenAICompatibleBackend("https://api.example.com/v1", "judge-model")
    result = judge_answers(judge, questions, answers)
    result.mean_score, result.per_category, result.write_jsonl("judgments.jsonl")
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

from tqdm.auto import tqdm

__all__ = [
    "JUDGE_PROMPTS",
    "MT_BENCH_HUB_ID",
    "REFERENCE_CATEGORIES",
    "ChatBackend",
    "JudgePrompt",
    "JudgeError",
    "JudgeRecord",
    "JudgeResult",
    "LocalModelBackend",
    "MTBenchQuestion",
    "OpenAICompatibleBackend",
    "answer_questions",
    "build_judge_messages",
    "judge_answers",
    "load_mt_bench_questions",
    "parse_rating",
]

logger = logging.getLogger("balora")

MT_BENCH_HUB_ID = "HuggingFaceH4/mt_bench_prompts"
#: Categories graded against a reference answer (as in the paper's FastChat implementation).
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})

Message = dict[str, str]


class JudgeError(ValueError):
    """A judge backend failed: bad credentials, an HTTP error, an unreadable reply, no server."""


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that turns a chat (``[{"role": ..., "content": ...}, ...]``) into a reply string."""

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> str:
        """Return the assistant's reply to ``messages`` (at most ``max_tokens`` new tokens)."""
        ...


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# --------------------------------------------------------------------------------------------

_MAX_BACKOFF_S = 60.0


class OpenAICompatibleBackend:
    """A judge (or answerer) behind an OpenAI-compatible ``POST {base_url}/chat/completions``.

    The API key is read once from the environment variable ``api_key_env`` and sent as
    ``Authorization: Bearer <key>``; it never appears in logs, ``repr`` or error messages.
    ``require_key=False`` allows local servers that need no key (the header is then omitted
    when the variable is unset). HTTP 429, 5xx, connection resets and time-outs are retried up to
    ``max_retries`` times, waiting ``backoff_s * 2**attempt`` seconds (or the server's
    ``Retry-After``, at most 60 s); any other failure raises :class:`JudgeError` at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        require_key: bool = True,
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise JudgeError("model must be a non-empty model name (as the server knows it)")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise JudgeError("need max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        key = os.environ.get(api_key_env, "").strip()
        if require_key and not key:
            raise JudgeError(
                f"environment variable {api_key_env} is not set: export it with your API key "
                f"(or pass require_key=False for a local server that needs none)"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._key = key

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> str:
        """POST the chat and return ``choices[0].message.content`` (retrying transient failures)."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        ).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            try:
                return self._parse_reply(self._post(body))
            except _Transient as exc:
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"{self.url}: gave up after {attempt + 1} attempts, last error: {self._clean(str(exc))}"
                    ) from None
                delay = exc.retry_after if exc.retry_after is not None else self.backoff_s * 2**attempt
                delay = min(delay, _MAX_BACKOFF_S)
                logger.warning("judge request failed (%s); retrying in %.1f s", self._clean(str(exc)), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, body: bytes) -> bytes:
        """One HTTP attempt; raise :class:`_Transient` (retry) or :class:`JudgeError` (give up)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            self._raise_http(err)
        except OSError as err:  # URLError wraps socket errors raised while connecting
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)):
                raise _Transient(f"{type(reason).__name__}: {reason}") from None
            raise JudgeError(
                f"{self.url}: cannot connect ({self._clean(str(reason))}); is the server running?"
            ) from None
        except http.client.HTTPException as err:  # e.g. a connection closed mid-reply
            raise _Transient(f"{type(err).__name__}: {err}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_http(self, err: urllib.error.HTTPError) -> NoReturn:
        """Turn an HTTP error status into :class:`_Transient` or :class:`JudgeError`."""
        detail = _error_detail(err)
        if err.code == 429 or 500 <= err.code < 600:
            raise _Transient(f"HTTP {err.code}: {detail}", _retry_after(err)) from None
        hint = " (check the API key in " + self.api_key_env + ")" if err.code in (401, 403) else ""
        raise JudgeError(f"{self.url}: HTTP {err.code}{hint}: {self._clean(detail)}") from None

    def _parse_reply(self, raw: bytes) -> str:
        """Extract the reply text from a chat-completions JSON body."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._clean(raw[:120].decode("utf-8", "replace"))
            raise JudgeError(
                f"{self.url}: reply is not a chat-completions JSON object with choices[0].message.content: {snippet!r}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.url}: choices[0].message.content is {type(content).__name__}, not text")
        return content

    def _clean(self, text: str) -> str:
        """One line, at most 200 characters, with the API key masked (servers may echo it)."""
        if self._key:
            text = text.replace(self._key, "***")
        text = " ".join(text.split())
        return text if len(text) <= 200 else text[:197] + "..."


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, reset, time-out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error message (``{"error": {"message": ...}}`` or raw text), else the reason."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        payload = json.loads(raw)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    except ValueError:
        pass
    return raw.strip() or str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """The ``Retry-After`` header in seconds, when it is a number."""
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Local transformers backend
# --------------------------------------------------------------------------------------------


class LocalModelBackend:
    """A transformers causal LM as judge or answerer.

    The chat is rendered with the tokenizer's chat template (``add_generation_prompt=True``),
    ``model.generate`` decodes greedily with the KV cache, and only the new tokens are returned,
    special tokens removed. ``max_new_tokens`` caps every reply, whatever ``max_tokens`` a caller
    asks for. Being callable (``backend(messages)``), it can be the ``answer_fn`` of
    :func:`answer_questions`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 512) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: use an instruction-tuned model's tokenizer, "
                "or set tokenizer.chat_template"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def __call__(self, messages: list[Message]) -> str:
        """Answer ``messages`` greedily with up to ``max_new_tokens`` tokens."""
        return self.complete(messages, max_tokens=self.max_new_tokens, temperature=0.0)

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> str:
        """Greedy reply of at most ``min(max_tokens, max_new_tokens)`` tokens.

        ``temperature`` is accepted for the :class:`ChatBackend` protocol and ignored: decoding
        is always greedy, so judgments are reproducible.
        """
        import torch

        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = inputs["input_ids"].to(self.model.device)  # (1, prompt_len)
        attention_mask = inputs["attention_mask"].to(self.model.device)  # (1, prompt_len)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    max_new_tokens=max(1, min(max_tokens, self.max_new_tokens)),
                    do_sample=False, use_cache=True, pad_token_id=pad_id,
                )  # (1, prompt_len + new_len)
        finally:
            self.model.train(was_training)
        new_tokens = output[0, input_ids.shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# Judge prompts and rating parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    """One judge prompt: a system message and a user-message template (``str.format`` fields)."""

    name: str
    system: str
    template: str
    multi_turn: bool
    uses_reference: bool


_RATING_RULE = (
    "Begin with a short explanation of your assessment, as objective as you can make it. "
    "After the explanation you must give a rating on a scale of 1 to 10, written strictly in "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_OPEN_CRITERIA = (
    "Take into account helpfulness, relevance, accuracy, depth, creativity and level of detail."
)
_REF_CRITERIA = (
    "Judge correctness and helpfulness. A reference answer is given: compare the assistant's "
    "answer with it, and point out and correct any mistakes."
)

JUDGE_PROMPTS: dict[str, JudgePrompt] = {
    "single": JudgePrompt(
        "single",
        "You are a helpful assistant.",
        "[Instruction]\nAct as an impartial judge and evaluate the quality of the response that an "
        "AI assistant gave to the user question shown below. " + _OPEN_CRITERIA + " " + _RATING_RULE
        + "\n\n[Question]\n{question}\n\n"
        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        multi_turn=False, uses_reference=False,
    ),
    "single-ref": JudgePrompt(
        "single-ref",
        "You are a helpful assistant.",
        "[Instruction]\nAct as an impartial judge and evaluate the quality of the response that an "
        "AI assistant gave to the user question shown below. " + _REF_CRITERIA + " " + _RATING_RULE
        + "\n\n[Question]\n{question}\n\n"
        "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        multi_turn=False, uses_reference=True,
    ),
    "multi-turn": JudgePrompt(
        "multi-turn",
        "Act as an impartial judge and evaluate the quality of the responses that an AI assistant "
        "gave in the conversation shown below. " + _OPEN_CRITERIA + " Grade only the assistant's "
        "answer to the second user question. " + _RATING_RULE,
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
        "<|The End of Assistant A's Conversation with User|>",
        multi_turn=True, uses_reference=False,
    ),
    "multi-turn-ref": JudgePrompt(
        "multi-turn-ref",
        "Act as an impartial judge and evaluate the quality of the responses that an AI assistant "
        "gave in the conversation shown below. " + _REF_CRITERIA + " Grade only the assistant's "
        "answer to the second user question. " + _RATING_RULE,
        "<|The Start of Reference Answer|>\n\n"
        "### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
        "<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
        "<|The End of Assistant A's Conversation with User|>",
        multi_turn=True, uses_reference=True,
    ),
}

_NUMBER = r"\s*(\d+(?:\.\d+)?)\s*"
_RATING_PATTERNS = (
    re.compile(r"\[\[" + _NUMBER + r"\]\]"),
    re.compile(r"\[" + _NUMBER + r"\]"),
    re.compile(r"rating\s*(?:[:=]|is)?" + _NUMBER, re.IGNORECASE),
)


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating in ``text``, or None.

    Looks for ``[[8]]`` / ``[[8.5]]`` first, then ``[8]``, then ``Rating: 8``; within the first
    pattern that matches, the LAST occurrence wins (the verdict ends the judgment). A rating
    outside 1-10 gives None rather than falling back to a weaker pattern.
    """
    for pattern in _RATING_PATTERNS:
        matches = pattern.findall(text or "")
        if matches:
            value = float(matches[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


@dataclass
class MTBenchQuestion:
    """One MT-Bench question: 1 or 2 user turns, and reference answers (one per turn) or None."""

    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None

    def uses_reference(self, turn: int) -> bool:
        """True when turn ``turn`` (1-based) is graded against reference answers: the category is
        a reference category and a reference exists for every turn up to ``turn``."""
        return self.category in REFERENCE_CATEGORIES and len(self.reference or []) >= turn


def load_mt_bench_questions(path: str | os.PathLike | None = None,
                            max_questions: int | None = None) -> list[MTBenchQuestion]:
    """MT-Bench questions from the hub (``HuggingFaceH4/mt_bench_prompts``, split ``train``) or,
    when ``path`` is given, from a FastChat ``question.jsonl`` (one JSON object a line with
    ``question_id``, ``category``, ``turns`` and optional ``reference``). ``max_questions`` keeps
    the first N."""
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be >= 1, got {max_questions}")
    rows = _hub_rows() if path is None else _jsonl_rows(Path(path))
    questions = [_to_question(row, where) for where, row in rows]
    return questions[:max_questions] if max_questions is not None else questions


def _hub_rows() -> list[tuple[str, dict]]:
    """Hub rows renamed to FastChat's field names, each with a location for error messages."""
    import datasets

    try:
        ds = datasets.load_dataset(MT_BENCH_HUB_ID, split="train")
    except Exception as exc:  # noqa: BLE001 -- any failure here means "no hub data"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"could not load MT-Bench from the hub ({MT_BENCH_HUB_ID}): {type(exc).__name__}: {first} "
            f"-- without internet, pass a local FastChat question.jsonl as path=..."
        ) from None
    missing = {"prompt", "category", "prompt_id"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{MT_BENCH_HUB_ID}: expected columns prompt, category, prompt_id; missing {sorted(missing)}")
    return [
        (f"{MT_BENCH_HUB_ID} row {i}",
         {"question_id": row["prompt_id"], "category": row["category"], "turns": row["prompt"],
          "reference": row.get("reference")})
        for i, row in enumerate(ds)
    ]


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """Parsed JSONL lines (blank lines skipped), each with ``path:line`` for error messages."""
    if not path.is_file():
        raise ValueError(f"MT-Bench question file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            rows.append((f"{path}: line {lineno}", row))
    if not rows:
        raise ValueError(f"{path}: no questions (expected one JSON object a line)")
    return rows


def _to_question(row: dict, where: str) -> MTBenchQuestion:
    """Validate one FastChat-style row into an :class:`MTBenchQuestion`."""
    missing = [key for key in ("question_id", "category", "turns") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; need question_id, category, turns")
    turns = row["turns"]
    if not (isinstance(turns, list) and 1 <= len(turns) <= 2 and all(isinstance(t, str) and t.strip() for t in turns)):
        raise ValueError(f"{where}: turns must be a list of 1 or 2 non-empty strings")
    reference = row.get("reference") or None
    if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
        raise ValueError(f"{where}: reference must be a list of strings (one per turn)")
    return MTBenchQuestion(row["question_id"], str(row["category"]), list(turns),
                           list(reference) if reference else None)


# --------------------------------------------------------------------------------------------
# Answering and judging
# --------------------------------------------------------------------------------------------


def answer_questions(answer_fn: Callable[[list[Message]], str], questions: Sequence[MTBenchQuestion],
                     *, progress: bool = True) -> list[list[str]]:
    """Answer every turn of every question in a running conversation.

    ``answer_fn(messages)`` gets the chat so far (user turns and its own earlier answers, ending
    with the current user turn) and returns the reply. Returns one list of answers per question,
    one answer per turn.
    """
    answers = []
    for question in tqdm(questions, desc="answering", unit="question", disable=not progress):
        messages: list[Message] = []
        replies = []
        for turn in question.turns:
            messages.append({"role": "user", "content": turn})
            reply = answer_fn([dict(m) for m in messages])
            if not isinstance(reply, str):
                raise ValueError(f"answer_fn must return a string, got {type(reply).__name__} "
                                 f"(question {question.question_id})")
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        answers.append(replies)
    return answers


def build_judge_messages(question: MTBenchQuestion, answers: Sequence[str], turn: int) -> tuple[str, list[Message]]:
    """The judge chat grading ``answers[turn - 1]`` (``turn`` is 1 or 2): (prompt name, messages).

    Turn 2 is graded in the context of the whole conversation. Questions of the reference
    categories (math, reasoning, coding) that carry reference answers up to ``turn`` use the
    ``-ref`` variants; all others (and reference categories without one) the open-ended ones.
    """
    if turn not in (1, 2) or turn > len(question.turns) or len(answers) < turn:
        raise ValueError(f"question {question.question_id}: cannot grade turn {turn} "
                         f"({len(question.turns)} turn(s), {len(answers)} answer(s))")
    name = ("multi-turn" if turn == 2 else "single") + ("-ref" if question.uses_reference(turn) else "")
    prompt = JUDGE_PROMPTS[name]
    refs = list(question.reference or [])
    refs += [""] * (2 - len(refs))
    fields = {"question": question.turns[0], "answer": answers[0], "ref_answer_1": refs[0], "ref_answer_2": refs[1]}
    if turn == 2:
        fields.update(question_1=question.turns[0], question_2=question.turns[1],
                      answer_1=answers[0], answer_2=answers[1])
    messages = [{"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.template.format(**fields)}]
    return name, messages


@dataclass
class JudgeRecord:
    """One graded turn; ``score`` is None when the judgment had no readable rating."""

    question_id: int | str
    category: str
    turn: int
    score: float | None
    judgment: str
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (one JSONL line)."""
        return asdict(self)


@dataclass
class JudgeResult:
    """Scores over a judged run: means use rated turns only; ``unparsed`` counts the others."""

    mean_score: float | None
    per_category: dict[str, float]
    per_turn: dict[int, float]
    unparsed: int
    records: list[JudgeRecord] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: list[JudgeRecord]) -> JudgeResult:
        """Aggregate per-turn records into means (categories / turns with no rated turn are left out)."""
        rated = [r for r in records if r.score is not None]
        by_category: dict[str, list[float]] = defaultdict(list)
        by_turn: dict[int, list[float]] = defaultdict(list)
        for record in rated:
            by_category[record.category].append(record.score)
            by_turn[record.turn].append(record.score)
        return cls(
            mean_score=_mean([r.score for r in rated]),
            per_category={k: _mean(v) for k, v in sorted(by_category.items())},
            per_turn={k: _mean(v) for k, v in sorted(by_turn.items())},
            unparsed=len(records) - len(rated),
            records=records,
        )

    def summary(self) -> dict[str, Any]:
        """The aggregate numbers, without the judgments (JSON-ready)."""
        return {"mean_score": self.mean_score, "per_category": self.per_category,
                "per_turn": {str(k): v for k, v in self.per_turn.items()},
                "unparsed": self.unparsed, "judged_turns": len(self.records)}

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """Write one JSON object per graded turn to ``path``."""
        with open(path, "w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def judge_answers(backend: ChatBackend, questions: Sequence[MTBenchQuestion], answers: Sequence[Sequence[str]],
                  *, progress: bool = True, max_tokens: int = 2048, temperature: float = 0.0) -> JudgeResult:
    """Grade every answered turn with ``backend`` (single-answer grading, 1-10).

    ``answers[i][t]`` is the answer to ``questions[i].turns[t]``. Each turn costs one backend
    call; a judgment without a readable rating is kept with ``score=None`` and counted in
    ``unparsed``. Backend errors (:class:`JudgeError`) stop the run.
    """
    if len(answers) != len(questions):
        raise ValueError(f"got {len(answers)} answer lists for {len(questions)} questions")
    for question, replies in zip(questions, answers):
        if len(replies) != len(question.turns):
            raise ValueError(f"question {question.question_id}: {len(replies)} answer(s) "
                             f"for {len(question.turns)} turn(s)")
    records = []
    bar = tqdm(total=sum(len(q.turns) for q in questions), desc="judging", unit="turn", disable=not progress)
    with bar:
        for question, replies in zip(questions, answers):
            for turn in range(1, len(question.turns) + 1):
                name, messages = build_judge_messages(question, replies, turn)
                judgment = backend.complete(messages, max_tokens=max_tokens, temperature=temperature)
                records.append(JudgeRecord(question.question_id, question.category, turn,
                                           parse_rating(judgment), judgment, name))
                bar.update(1)
    return JudgeResult.from_records(records)
