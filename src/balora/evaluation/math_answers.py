"""Final-answer extraction and equality for math benchmarks (GSM8K-style and MATH-style).

GSM8K answers are plain numbers: :func:`extract_gsm8k_answer` finds one in a model's output
and :func:`gsm8k_equal` compares numbers exactly (``1,234 == 1234.00``, ``3/4 == 0.75``).

MATH answers are LaTeX expressions inside ``\\boxed{...}``: :func:`extract_boxed_answer`
reads the last box, :func:`normalize_math_answer` applies the usual Hendrycks et al. (2021)
``strip_string`` normalisation plus the Minerva (Lewkowycz et al., 2022) unit / ``\\text``
clean-ups, and :func:`math_equal` compares normalised strings, then numbers.

:func:`score_math` scores a list of model outputs against gold answers and keeps one record
per example for a JSONL dump.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

__all__ = [
    "MathScore",
    "extract_boxed_answer",
    "extract_gsm8k_answer",
    "extract_math_answer",
    "gsm8k_equal",
    "last_boxed_only_string",
    "math_equal",
    "normalize_math_answer",
    "parse_number",
    "score_math",
]

# --------------------------------------------------------------------------- numbers

#: A number as written in text: optional sign and ``$``, thousands commas, decimals, ``a/b``, ``%``.
_NUMBER_TEXT = (
    r"(?<![\w.])[-−]?\s?\$?\s?[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?%?"
    r"|(?<![\w.])[-−]?\.\d+%?"
)
_NUMBER = re.compile(_NUMBER_TEXT)
_HASHES = re.compile(r"####\s*(" + _NUMBER_TEXT.replace("(?<![\\w.])", "") + r")")
_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:|=)[\s:*]*(?:\\\(|\$)?\s*(" + _NUMBER_TEXT.replace("(?<![\\w.])", "") + r")",
    re.IGNORECASE,
)
_TOLERANCE = Fraction(1, 10**6)


def _clean_number(text: str) -> str:
    """``"$ -1,234.50%"`` -> ``"-1234.50"``: drop ``$ , %`` and spaces, unify the minus sign."""
    cleaned = re.sub(r"[\s$,%]", "", text.replace("−", "-"))
    if cleaned.count("-") > 1 or (cleaned.count("-") == 1 and not cleaned.startswith("-")):
        cleaned = "-" + cleaned.replace("-", "")  # "$-5" and "-$5" alike
    return cleaned.rstrip(".")


def parse_number(text: str | None) -> Fraction | None:
    """A number written as text (``"1,234.50"``, ``"$5"``, ``"-3/4"``, ``"50%"``, ``"7."``) as a Fraction.

    ``%`` is dropped (``"50%"`` -> 50, as in GSM8K, whose gold answers are written without it).
    Returns None when ``text`` is not a single number.
    """
    if text is None:
        return None
    cleaned = _clean_number(text.strip())
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?", cleaned):
        return None
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/")
            return Fraction(numerator) / Fraction(denominator)
        return Fraction(cleaned)
    except ZeroDivisionError:
        return None


def _numbers_equal(a: Fraction | None, b: Fraction | None) -> bool:
    """Exact equality, or within 1e-6 (for rounded repeating decimals: ``0.3333333 == 1/3``)."""
    if a is None or b is None:
        return False
    return a == b or abs(a - b) <= _TOLERANCE


# --------------------------------------------------------------------------- GSM8K


def extract_gsm8k_answer(text: str | None, *, strict: bool = False) -> str | None:
    """The final numeric answer of a GSM8K-style solution, as a clean number string.

    The one GSM8K answer parser: gold solutions, generated problems and model outputs all go
    through it. Priority: the last ``#### N``; unless ``strict``, then the last ``\\boxed{..}``
    holding exactly one number, then the last "the answer is N" / "answer: N"
    (case-insensitive), then the last number in the text. The result has no ``$``, thousands
    commas, ``%`` or trailing period (``"The answer is $1,234.50."`` -> ``"1234.50"``);
    fractions stay ``"3/4"``. Returns None when the text holds no number (``strict``: no
    ``#### N``).
    """
    if not text:
        return None
    text = _plain_numbers(text)
    hashes = _HASHES.findall(text)
    if hashes:
        return _clean_number(hashes[-1])
    if strict:
        return None
    boxed = _boxed_number(text)
    if boxed is not None:
        return boxed
    stated = _ANSWER_IS.findall(text)
    if stated:
        return _clean_number(stated[-1])
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def _boxed_number(text: str) -> str | None:
    """The number in the last box when the box holds exactly one (``\\boxed{\\$1{,}000}`` -> ``"1000"``)."""
    boxed = extract_boxed_answer(text)
    numbers = _NUMBER.findall(boxed) if boxed is not None else []
    return _clean_number(numbers[0]) if len(numbers) == 1 else None


def _plain_numbers(text: str) -> str:
    """Write LaTeX numbers plainly: ``\\frac{3}{4}`` -> ``3/4``, ``1{,}000`` -> ``1,000``, ``\\$`` -> ``$``."""
    text = text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%").replace("\\!", "")
    return re.sub(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}", r"\1/\2", text)


def gsm8k_equal(pred: str | None, gold: str | None) -> bool:
    """Numeric equality of two answers (``"$1,000.00" == "1000"``, ``"3/4" == "0.75"``, ``"50%" == "50"``).

    Both are answer strings (use :func:`extract_gsm8k_answer` on model output first);
    False when either does not parse as a number.
    """
    return _numbers_equal(parse_number(pred), parse_number(gold))


# --------------------------------------------------------------------------- MATH: boxes

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_only_string(text: str | None) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` of ``text`` including the command (nested braces ok).

    The space form ``\\boxed 5`` (no braces) runs to the next ``$`` or line end.
    Returns None without a box or when its braces are not closed.
    """
    if not text:
        return None
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(command):]
    if rest.startswith(" ") and not rest.lstrip(" ").startswith("{"):
        content = re.split(r"[$\n]", rest.lstrip(" "), maxsplit=1)[0].strip()
        return f"{command} {content}" if content else None
    opening = start + len(command) + (len(rest) - len(rest.lstrip(" ")))
    if opening >= len(text) or text[opening] != "{":
        return None
    closing = _matching_brace(text, opening)
    return None if closing is None else text[start:closing + 1]


def _matching_brace(text: str, opening: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``opening`` (escaped ``\\{ \\}`` ignored), or None."""
    depth = 0
    i = opening
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _remove_boxed(boxed: str) -> str:
    """``"\\boxed{x}"`` -> ``"x"``, ``"\\boxed 5"`` -> ``"5"``."""
    command = next(c for c in _BOX_COMMANDS if boxed.startswith(c))
    inner = boxed[len(command):]
    if inner.lstrip(" ").startswith("{"):
        return inner.lstrip(" ")[1:-1]
    return inner.strip()


def extract_boxed_answer(text: str | None) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``, else None."""
    boxed = last_boxed_only_string(text)
    return None if boxed is None else _remove_boxed(boxed).strip()


_FINAL_ANSWER_IS = re.compile(
    r"final answer is[:\s]*\$?(.+?)\$?\s*(?:\.\s*(?:I hope it is correct\.?)?)?\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def extract_math_answer(text: str | None) -> str | None:
    """A MATH-style final answer: the last box, else Minerva's "The final answer is X" line, else None."""
    boxed = extract_boxed_answer(text)
    if boxed is not None or not text:
        return boxed
    matches = _FINAL_ANSWER_IS.findall(text)
    return matches[-1].strip() if matches else None


# --------------------------------------------------------------------------- MATH: normalisation

#: Words dropped after a number (Minerva's unit list, trimmed to unambiguous units).
_UNIT_WORDS = (
    "square", "sq", "units?", "dollars?", "cents?", "mph", "inches", "inch", "feet", "foot", "ft",
    "hours?", "minutes?", "seconds?", "km", "cm", "meters?", "pounds?", "degrees?", "points?",
    "ways", "digits?", "students?", "edges", "integers?", "days?", "years?",
)
_TRAILING_UNITS = re.compile(r"^(.*?\d)\s*(?:(?:" + "|".join(_UNIT_WORDS) + r")\b\s*(?:\^?\{?[23]\}?)?\s*)+$")


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}`` (Hendrycks ``_fix_fracs``)."""
    parts = text.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        numerator, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + numerator + "}" + rest
        else:
            out += "{" + numerator + "}{" + rest[0] + "}" + rest[1:]
    return out


def _fix_sqrt(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (Hendrycks ``_fix_sqrt``)."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)


def _fix_a_slash_b(text: str) -> str:
    """``"3/4"`` -> ``"\\frac{3}{4}"`` when both sides are integers (Hendrycks ``_fix_a_slash_b``)."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else text


def _remove_text_wrappers(text: str) -> str:
    """Drop ``\\text{ units}`` (leading space, Hendrycks) and unwrap other ``\\text{..}`` / ``\\mbox{..}``."""
    if "\\text{ " in text:
        head = text.split("\\text{ ")[0]
        text = head if head.strip() else text
    text = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    return text


def normalize_math_answer(answer: str | None) -> str:
    """Canonical string of a MATH answer, so that equal answers usually compare equal as strings.

    Hendrycks ``strip_string`` steps (line breaks, ``\\!``, ``\\left``/``\\right``, degrees,
    ``\\$``, ``\\%``, ``tfrac``/``dfrac`` -> ``frac``, ``\\frac12`` -> ``\\frac{1}{2}``,
    ``\\sqrt3`` -> ``\\sqrt{3}``, leading-zero fixes ``.5`` -> ``0.5``, a short ``x =`` prefix,
    spaces, ``0.5`` -> ``\\frac{1}{2}``, integer ``a/b`` -> ``\\frac{a}{b}``) plus Minerva-style
    clean-ups (``\\text{..}`` units, trailing unit words, thousands commas, a trailing period,
    ``$`` delimiters).
    """
    if answer is None:
        return ""
    text = answer.replace("\n", "").replace("\\!", "").strip()
    text = text.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text).replace("\\circ", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = _remove_text_wrappers(text).strip()
    text = _TRAILING_UNITS.sub(r"\1", text).strip()
    text = text.rstrip(".").strip()
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _fix_sqrt(text).replace(" ", "")
    text = _fix_fracs(text)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def _latex_number(normalized: str) -> Fraction | None:
    """A normalised answer that is a plain number or ``\\frac{a}{b}`` (optionally negative), else None."""
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", normalized)
    if match:
        sign, numerator, denominator = match.groups()
        if Fraction(denominator) == 0:
            return None
        value = Fraction(numerator) / Fraction(denominator)
        return -value if sign else value
    return parse_number(normalized)


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Whether two MATH answers agree: equal after :func:`normalize_math_answer`, or equal numbers.

    Numbers cover integers, decimals and simple fractions (``"0.75" == "\\frac34" == "3/4"``).
    False when ``pred`` is None.
    """
    if pred is None or gold is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if a == b and a != "":
        return True
    return _numbers_equal(_latex_number(a), _latex_number(b))


# --------------------------------------------------------------------------- scoring


@dataclass
class MathScore:
    """Accuracy of a list of outputs, plus one record per example.

    ``records[i]`` = ``{"index": i, "extracted": str | None, "gold": str, "correct": bool}``;
    ``no_answer`` counts outputs from which no answer could be extracted (they are wrong).
    """

    accuracy: float
    correct: int
    total: int
    no_answer: int
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The counts without the records (for logs and metric files)."""
        return {k: v for k, v in asdict(self).items() if k != "records"}

    def write_jsonl(self, path: str | Path) -> None:
        """One JSON object per line: the per-example records."""
        with Path(path).open("w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _gold_answer(gold: str, kind: str) -> str:
    """A gold given as a full solution (``#### N`` or ``\\boxed{}``) -> its final answer; else unchanged."""
    if kind == "gsm8k":
        return extract_gsm8k_answer(gold, strict=True) or gold.strip()
    boxed = extract_boxed_answer(gold)
    return boxed if boxed is not None else gold.strip()


def score_math(predictions: list[str], golds: list[str], kind: Literal["gsm8k", "math"] = "gsm8k") -> MathScore:
    """Score model outputs against gold answers.

    Args:
        predictions: raw model outputs (full text; the answer is extracted here).
        golds: final answers (``"18"``, ``"\\frac{1}{2}"``) or full solutions ending with
            ``#### N`` (gsm8k) / containing ``\\boxed{..}`` (math).
        kind: ``"gsm8k"`` (numbers: :func:`extract_gsm8k_answer` + :func:`gsm8k_equal`) or
            ``"math"`` (LaTeX: :func:`extract_math_answer` + :func:`math_equal`).
    """
    if kind not in ("gsm8k", "math"):
        raise ValueError(f"unknown answer kind {kind!r}; choose 'gsm8k' or 'math'")
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} gold answers")
    extract, equal = (extract_gsm8k_answer, gsm8k_equal) if kind == "gsm8k" else (extract_math_answer, math_equal)
    records = []
    for index, (prediction, gold) in enumerate(zip(predictions, golds)):
        extracted, gold_answer = extract(prediction), _gold_answer(gold, kind)
        records.append(
            {"index": index, "extracted": extracted, "gold": gold_answer, "correct": equal(extracted, gold_answer)}
        )
    correct = sum(record["correct"] for record in records)
    return MathScore(
        accuracy=correct / len(records) if records else 0.0,
        correct=correct,
        total=len(records),
        no_answer=sum(record["extracted"] is None for record in records),
        records=records,
    )
