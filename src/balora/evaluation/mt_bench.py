"""MT-Bench (Zheng et al., 2023, single-answer grading): the questions, the model's answers,
the judge prompts, the rating parser, and the benchmark.

A judge model (a :class:`balora.evaluation.chat_backends.ChatBackend`) reads a question and an
assistant's answer, explains its assessment, and ends with a rating on a 1-10 scale written
strictly as ``Rating: [[5]]``. Four prompt variants follow the published format:

* ``single``          -- first turn, open-ended categories (writing, roleplay, ...);
* ``single-ref``      -- first turn, graded against a reference answer (math, reasoning, coding);
* ``multi-turn``      -- second turn, graded in the context of the whole two-turn conversation;
* ``multi-turn-ref``  -- the same with the reference answers of both turns.

Typical use::

    questions = load_mt_bench_questions()                      # 80 questions from the hub
    answers = answer_questions(LocalModelBackend(model, tok), questions)
    judge = OpenAICompatibleBackend("https://api.example.com/v1", "judge-model")
    result = judge_answers(judge, questions, answers)
    result.mean_score, result.per_category, result.write_jsonl("judgments.jsonl")

:func:`eval_mt_bench` does all of it for ``balora evaluate mt-bench``: the evaluated model answers
in training's prompt format (:func:`balora.evaluation.generate.chat_reply`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from balora.data.files import read_records
from balora.data.hub import load_hub_dataset
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

from .chat_backends import ChatBackend, Message, backend_name, make_judge
from .generate import chat_reply

__all__ = [
    "JUDGE_PROMPTS",
    "MT_BENCH_HUB_ID",
    "REFERENCE_CATEGORIES",
    "JudgePrompt",
    "JudgeRecord",
    "JudgeResult",
    "MTBenchQuestion",
    "answer_questions",
    "build_judge_messages",
    "eval_mt_bench",
    "judge_answers",
    "load_mt_bench_questions",
    "parse_rating",
]

MT_BENCH_HUB_ID = "HuggingFaceH4/mt_bench_prompts"
#: Categories graded against a reference answer (as in the paper's FastChat implementation).
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})


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
    if max_questions is not None:
        check_int(max_questions, "max_questions")
    if path is None:
        rows = _hub_rows()
    else:
        rows = [(f"{path}: row {i}", row)
                for i, row in enumerate(read_records(path, what="MT-Bench question file"), start=1)]
    questions = [_to_question(row, where) for where, row in rows]
    return questions[:max_questions] if max_questions is not None else questions


def _hub_rows() -> list[tuple[str, dict]]:
    """Hub rows renamed to FastChat's field names, each with a location for error messages."""
    ds = load_hub_dataset(
        MT_BENCH_HUB_ID, split="train", what="MT-Bench",
        offline_hint="Without internet, pass a local FastChat question.jsonl (path=... in Python, "
                     "--data on the command line)",
    )
    missing = {"prompt", "category", "prompt_id"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{MT_BENCH_HUB_ID}: expected columns prompt, category, prompt_id; missing {sorted(missing)}")
    return [
        (f"{MT_BENCH_HUB_ID} row {i}",
         {"question_id": row["prompt_id"], "category": row["category"], "turns": row["prompt"],
          "reference": row.get("reference")})
        for i, row in enumerate(ds)
    ]


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


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def eval_mt_bench(
    model,
    tokenizer,
    judge: str | ChatBackend = "openai",
    judge_model: str | None = None,
    base_url: str | None = None,
    path: str | os.PathLike | None = None,
    max_questions: int | None = None,
    *,
    max_new_tokens: int = 1024,
    progress: bool = True,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """MT-Bench: the model answers every turn (greedy, training's prompt format), the judge
    rates each turn 1-10.

    ``judge`` is ``"openai"`` / ``"local"`` (see :func:`balora.evaluation.chat_backends.make_judge`)
    or a ready backend. Returns the judge summary (``mean_score``, ``per_category``,
    ``per_turn``, ``unparsed``, ``judged_turns``) plus ``n_questions`` and the judge; one record
    per graded turn.
    """
    if max_questions is not None:
        check_int(max_questions, "max_questions")
    check_int(max_new_tokens, "max_new_tokens")
    backend = judge if not isinstance(judge, str) else make_judge(judge, judge_model, base_url)
    questions = load_mt_bench_questions(path, max_questions=max_questions)
    answer = functools.partial(chat_reply, model, tokenizer, max_new_tokens=max_new_tokens)
    answers = answer_questions(answer, questions, progress=progress)
    result = judge_answers(backend, questions, answers, progress=progress)
    turns = {(q.question_id, t + 1): (q.turns[t], a[t]) for q, a in zip(questions, answers) for t in range(len(a))}
    rows = []
    for r in result.records:
        question, reply = turns[(r.question_id, r.turn)]
        rows.append({**r.to_dict(), "question": question, "answer": reply})
    if records_path is not None:
        write_jsonl(records_path, rows)
    return {**result.summary(), "n_questions": len(questions), "judge": backend_name(backend)}
