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
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from balora.data.files import read_records
from balora.data.hub import load_hub_dataset
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

from .chat_backends import ChatBackend, JudgeError, Message, backend_name, make_judge
from .generate import chat_reply

__all__ = [
    "ANSWERS_FILE",
    "JUDGE_PROMPTS",
    "JUDGMENTS_FILE",
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

logger = logging.getLogger("balora")

MT_BENCH_HUB_ID = "HuggingFaceH4/mt_bench_prompts"
#: Files of ``eval_mt_bench(save_dir=...)``: one line per answered question / judged turn.
ANSWERS_FILE = "answers.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
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
#: The two forms the judge prompt asks for: ``[[8]]`` (wherever it stands), else ``Rating: 8``
#: (also ``Rating: [8]``). A bare ``[2]`` is a citation or a list marker, not a verdict.
_RATING_PATTERNS = (
    re.compile(r"\[\[" + _NUMBER + r"\]\]"),
    re.compile(r"\brating\s*:\s*(?:\[" + _NUMBER + r"\]|" + _NUMBER + r")", re.IGNORECASE),
)


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating in ``text``, or None (the judgment is then counted as unparsed).

    Only the judge prompt's format counts: ``[[8]]`` / ``[[8.5]]`` first, else ``Rating: 8``
    (case-insensitive, colon required); within the first form that matches, the LAST occurrence
    wins (the verdict ends the judgment). Anything else -- ``See [1] and [2].``, ``my rating is
    4`` -- is None, and so is a rating outside 1-10 (never rescued by the other form).
    """
    for pattern in _RATING_PATTERNS:
        matches = pattern.findall(text or "")
        if matches:
            last = matches[-1]
            value = float(last if isinstance(last, str) else next(g for g in last if g))
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
                     *, progress: bool = True,
                     on_answer: Callable[[MTBenchQuestion, list[str]], None] | None = None) -> list[list[str]]:
    """Answer every turn of every question in a running conversation.

    ``answer_fn(messages)`` gets the chat so far (user turns and its own earlier answers, ending
    with the current user turn) and returns the reply. Returns one list of answers per question,
    one answer per turn; ``on_answer(question, answers)`` is called as each question is done
    (to save it at once).
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
        if on_answer is not None:
            on_answer(question, replies)
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
    """One graded turn; ``score`` is None when the judgment had no readable rating, or when the
    judge failed (``error`` then holds the one-line reason and ``judgment`` is empty)."""

    question_id: int | str
    category: str
    turn: int
    score: float | None
    judgment: str
    prompt: str
    error: str | None = None

    @property
    def status(self) -> str:
        """``"rated"``, ``"unparsed"`` (no rating in the judge's format) or ``"failed"``."""
        if self.error is not None:
            return "failed"
        return "unparsed" if self.score is None else "rated"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (one JSONL line); ``error`` only for a failed judgment."""
        row = asdict(self)
        if self.error is None:
            del row["error"]
        return row


@dataclass
class JudgeResult:
    """Scores over a judged run: means use rated turns only; ``unparsed`` counts the judgments
    without a readable rating, ``failed`` the turns the judge could not grade."""

    mean_score: float | None
    per_category: dict[str, float]
    per_turn: dict[int, float]
    unparsed: int
    records: list[JudgeRecord] = field(default_factory=list)
    failed: int = 0

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
            unparsed=sum(r.status == "unparsed" for r in records),
            records=records,
            failed=sum(r.status == "failed" for r in records),
        )

    def summary(self) -> dict[str, Any]:
        """The aggregate numbers, without the judgments (JSON-ready)."""
        return {"mean_score": self.mean_score, "per_category": self.per_category,
                "per_turn": {str(k): v for k, v in self.per_turn.items()},
                "unparsed": self.unparsed, "failed": self.failed, "judged_turns": len(self.records)}

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """Write one JSON object per graded turn to ``path``."""
        with open(path, "w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def judge_answers(backend: ChatBackend, questions: Sequence[MTBenchQuestion], answers: Sequence[Sequence[str]],
                  *, progress: bool = True, max_tokens: int = 2048, temperature: float = 0.0,
                  done: Mapping[tuple[int | str, int], JudgeRecord] | None = None,
                  on_record: Callable[[JudgeRecord], None] | None = None) -> JudgeResult:
    """Grade every answered turn with ``backend`` (single-answer grading, 1-10).

    ``answers[i][t]`` is the answer to ``questions[i].turns[t]``. Each turn costs one backend
    call; a judgment without a readable rating is kept with ``score=None`` and counted in
    ``unparsed``. A :class:`JudgeError` on one turn is recorded as a failed record (its one-line
    reason in ``error``) and the run goes on. ``done`` maps ``(question_id, turn)`` to records
    judged before (a resumed run): those are reused unless they failed, which are judged again.
    ``on_record(record)`` is called with each new record as it is made (to save it at once).
    """
    if len(answers) != len(questions):
        raise ValueError(f"got {len(answers)} answer lists for {len(questions)} questions")
    for question, replies in zip(questions, answers):
        if len(replies) != len(question.turns):
            raise ValueError(f"question {question.question_id}: {len(replies)} answer(s) "
                             f"for {len(question.turns)} turn(s)")
    done = done or {}
    records = []
    bar = tqdm(total=sum(len(q.turns) for q in questions), desc="judging", unit="turn", disable=not progress)
    with bar:
        for question, replies in zip(questions, answers):
            for turn in range(1, len(question.turns) + 1):
                saved = done.get((question.question_id, turn))
                if saved is not None and saved.status != "failed":
                    records.append(saved)
                    bar.update(1)
                    continue
                name, messages = build_judge_messages(question, replies, turn)
                try:
                    judgment = backend.complete(messages, max_tokens=max_tokens, temperature=temperature)
                    record = JudgeRecord(question.question_id, question.category, turn,
                                         parse_rating(judgment), judgment, name)
                except JudgeError as err:
                    logger.warning("judging question %s turn %d failed: %s", question.question_id, turn, err)
                    record = JudgeRecord(question.question_id, question.category, turn, None, "", name,
                                         error=str(err))
                records.append(record)
                if on_record is not None:
                    on_record(record)
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
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """MT-Bench: the model answers every turn (greedy, training's prompt format), the judge
    rates each turn 1-10.

    ``judge`` is ``"openai"`` / ``"local"`` (see :func:`balora.evaluation.chat_backends.make_judge`)
    or a ready backend. Returns the judge summary (``mean_score``, ``per_category``,
    ``per_turn``, ``unparsed``, ``failed``, ``judged_turns``) plus ``n_questions`` and the judge;
    one record per graded turn.

    With ``save_dir``, every answered question is appended to ``save_dir/answers.jsonl`` and
    every judged turn (``status`` rated / unparsed / failed, with ``error`` for a failure) to
    ``save_dir/judgments.jsonl`` as it is produced, and what those files already hold is reused:
    a run stopped part-way resumes where it stopped, and turns whose judging failed are judged
    again.
    """
    if max_questions is not None:
        check_int(max_questions, "max_questions")
    check_int(max_new_tokens, "max_new_tokens")
    backend = judge if not isinstance(judge, str) else make_judge(judge, judge_model, base_url)
    questions = load_mt_bench_questions(path, max_questions=max_questions)
    answer = functools.partial(chat_reply, model, tokenizer, max_new_tokens=max_new_tokens)
    saved_answers: dict[int | str, list[str]] = {}
    done: dict[tuple[int | str, int], JudgeRecord] = {}
    on_answer = on_record = None
    if save_dir is not None:
        answers_path, judgments_path = Path(save_dir) / ANSWERS_FILE, Path(save_dir) / JUDGMENTS_FILE
        saved_answers = _saved_answers(answers_path, questions)
        done = _saved_judgments(judgments_path)

        def on_answer(question: MTBenchQuestion, replies: list[str]) -> None:
            _append_jsonl(answers_path, {"question_id": question.question_id, "turns": question.turns,
                                         "answers": replies})

        def on_record(record: JudgeRecord) -> None:
            _append_jsonl(judgments_path, {**record.to_dict(), "status": record.status})

    todo = [q for q in questions if q.question_id not in saved_answers]
    new_answers = iter(answer_questions(answer, todo, progress=progress, on_answer=on_answer))
    answers = [saved_answers[q.question_id] if q.question_id in saved_answers else next(new_answers)
               for q in questions]
    result = judge_answers(backend, questions, answers, progress=progress, done=done, on_record=on_record)
    turns = {(q.question_id, t + 1): (q.turns[t], a[t]) for q, a in zip(questions, answers) for t in range(len(a))}
    rows = []
    for r in result.records:
        question, reply = turns[(r.question_id, r.turn)]
        rows.append({**r.to_dict(), "status": r.status, "question": question, "answer": reply})
    if records_path is not None:
        write_jsonl(records_path, rows)
    return {**result.summary(), "n_questions": len(questions), "judge": backend_name(backend),
            "resumed_answers": len(saved_answers),
            "resumed_judgments": sum(r.status != "failed" for r in done.values())}


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk at once (a crash loses at most this line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _saved_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines saved in ``path`` (none when it does not exist). A last line cut short by
    a crash is dropped from the file, so that the next append starts on a fresh line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        logger.warning("%s: dropping an unfinished last line", path)
        path.write_text(text, encoding="utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}: line {number} is not valid JSON; cannot resume from it") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object; cannot resume from it")
        rows.append(row)
    return rows


def _saved_answers(path: Path, questions: Sequence[MTBenchQuestion]) -> dict[int | str, list[str]]:
    """Saved answers by question id, checked against ``questions`` (same questions, same turns)."""
    by_id = {q.question_id: q for q in questions}
    saved = {}
    for row in _saved_rows(path):
        question = by_id.get(row.get("question_id"))
        if question is None or row.get("turns") != question.turns or not (
                isinstance(row.get("answers"), list) and len(row["answers"]) == len(question.turns)):
            raise ValueError(f"{path}: the saved answer to question {row.get('question_id')!r} does not match "
                             f"the questions of this run; resume with the same questions (--data, --max-examples)")
        saved[question.question_id] = [str(a) for a in row["answers"]]
    return saved


def _saved_judgments(path: Path) -> dict[tuple[int | str, int], JudgeRecord]:
    """Saved judgments by ``(question_id, turn)``; a later line (a retried turn) replaces an earlier one."""
    names = ("question_id", "category", "turn", "score", "judgment", "prompt")
    done = {}
    for number, row in enumerate(_saved_rows(path), start=1):
        if any(name not in row for name in names):
            raise ValueError(f"{path}: line {number} lacks one of {', '.join(names)}; cannot resume from it")
        record = JudgeRecord(*(row[name] for name in names), error=row.get("error"))
        done[(record.question_id, record.turn)] = record
    return done
