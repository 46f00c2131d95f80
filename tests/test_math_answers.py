"""Answer extraction / equality for GSM8K- and MATH-style outputs, and score_math."""

from __future__ import annotations

import json
import random

import pytest

from balora.evaluation.math_answers import (
    MathScore,
    extract_boxed_answer,
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_equal,
    last_boxed_only_string,
    math_equal,
    normalize_math_answer,
    parse_number,
    score_math,
)

# --------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("first 5 then 6\n####  -7", "-7"),  # '####' beats later / earlier numbers
        ("#### 3\nwait, it is 4", "3"),
        ("So she pays $1,234.50.", "1234.50"),
        ("The answer is -5. Then add 7 more.", "-5"),  # 'the answer is' beats the last number
        ("THE ANSWER IS 12 apples, 3 left", "12"),
        ("Final answer: 3/4 of the cake, from 2 cakes", "3/4"),
        ("The answer is **18** apples. Step 2", "18"),
        ("It went up by 50%.", "50"),
        ("She had 3 apples, then 10 apples.", "10"),  # last number; trailing period dropped
        ("pay -$5 now", "-5"),
        ("the answer is $\\frac{3}{4}$", "3/4"),
        ("so we get \\boxed{\\$1{,}000} from 3 boxes", "1000"),
        ("It costs 2.5 dollars", "2.5"),
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("step\n#### 1,234", "1234"),
        ("a\n#### 3/4\n", "3/4"),
        ("#### 1\nmore\n#### -2.5", "-2.5"),  # the last '####' line
        ("#### $18.", "18"),
        ("no final line", None),
        ("#### twelve", None),
        ("The answer is 5.", None),  # strict: no fallback to stated / last numbers
        ("so \\boxed{7}", None),
        (None, None),
    ],
)
def test_extract_gsm8k_answer_strict_reads_only_the_hashes_line(text, expected):
    assert extract_gsm8k_answer(text, strict=True) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("5.00", "5", True),
        ("3/4", "0.75", True),
        ("$1,000", "1000", True),
        ("50%", "50", True),
        ("-3", "-3.0", True),
        ("0.3333333", "1/3", True),  # within the 1e-6 tolerance
        ("39055.60", "39055.58", False),  # an absolute tolerance: cents still count
        ("0.33", "1/3", False),
        ("5", "6", False),
        ("1/0", "1", False),
        (None, "1", False),
        ("abc", "abc", False),  # not numbers
    ],
)
def test_gsm8k_equal(pred, gold, equal):
    assert gsm8k_equal(pred, gold) is equal


def test_gsm8k_equal_against_a_naive_float_reference():
    rng = random.Random(0)
    for _ in range(200):
        value = rng.randint(-10**7, 10**7) / 100
        pretty = f"${value:,.2f}" if value >= 0 else f"-${-value:,.2f}"
        assert gsm8k_equal(pretty, repr(value))
        assert abs(float(parse_number(pretty)) - value) < 1e-9
        other = value + rng.choice([-1, 1]) * rng.randint(1, 1000) / 100
        assert gsm8k_equal(pretty, repr(other)) is (abs(other - value) < 1e-9)


def test_extract_then_compare_round_trip():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(0, 10**6)
        text = f"We add {rng.randint(1, 99)} and get {n:,} in total.\n#### {n:,}"
        assert gsm8k_equal(extract_gsm8k_answer(text), str(n))


# --------------------------------------------------------------------------- MATH boxes


def _hendrycks_last_boxed_only_string(string):
    """Naive reference: the original MATH repository's implementation."""
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    i, right, depth = idx, None, 0
    while i < len(string):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                right = i
                break
        i += 1
    return None if right is None else string[idx:right + 1]


@pytest.mark.parametrize(
    "text",
    [
        "so $\\boxed{5}$.",
        "first \\boxed{1} then \\boxed{\\frac{1}{2}}",
        "nested \\boxed{\\left(\\frac{\\sqrt{3}}{2}, \\{1\\}\\right)} end",
        "\\fbox{x^{2}+1}",
        "\\boxed{unclosed {",
        "nothing boxed",
    ],
)
def test_last_boxed_only_string_matches_the_reference(text):
    assert last_boxed_only_string(text) == _hendrycks_last_boxed_only_string(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\left(\\frac{\\sqrt{3}}{2}, 1\\right)}", "\\left(\\frac{\\sqrt{3}}{2}, 1\\right)"),
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed {3}", "3"),
        ("\\boxed{unclosed", None),
        ("no box", None),
        (None, None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


def test_extract_math_answer_falls_back_to_minerva_sentence():
    assert extract_math_answer("work...\\boxed{12}") == "12"
    assert extract_math_answer("Final Answer: The final answer is $5$. I hope it is correct.") == "5"
    assert extract_math_answer("The final answer is \\frac{1}{3}.") == "\\frac{1}{3}"
    assert extract_math_answer("I am not sure") is None


# --------------------------------------------------------------------------- MATH normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("10\\text{ cm}", "10"),
        ("5\\text{cm}", "5"),
        ("12 inches", "12"),
        ("5 degrees", "5"),
        ("\\text{(A)}", "(A)"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("3/4", "\\frac{3}{4}"),
        ("x/4", "x/4"),  # only integer a/b become fractions
        (".5", "\\frac{1}{2}"),
        (".25", "0.25"),
        ("{.25}", "{0.25}"),
        ("0.5", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("y=2x+1", "2x+1"),
        ("abc = 5", "abc=5"),  # long left-hand sides are kept
        ("5.", "5"),
        ("1,000", "1000"),
        ("(1,000)", "(1,000)"),  # commas inside tuples stay
        ("50\\%", "50"),
        ("\\!1\\!000", "1000"),
        ("a\n+b", "a+b"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_math_answer(raw, expected):
    assert normalize_math_answer(raw) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("0.75", "\\frac34", True),
        ("\\frac{1}{2}", "0.5", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("\\frac{-3}{4}", "-\\frac{3}{4}", True),
        ("x=3", "3", True),
        ("\\left(1, 2\\right)", "(1,2)", True),
        ("10\\text{ cm}", "10", True),
        ("2.50", "\\frac{5}{2}", True),
        ("\\sqrt{2}", "\\sqrt2", True),
        ("2", "3", False),
        ("(1,2)", "(2,1)", False),
        ("\\frac{1}{3}", "0.33", False),
        (None, "3", False),
        ("", "", False),
    ],
)
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal


# --------------------------------------------------------------------------- scoring


def test_score_gsm8k_counts_and_records(tmp_path):
    predictions = ["blah\n#### 5", "The answer is 6", "I give up", "It is $1,000.", "3/4"]
    golds = ["5", "Sol: 3+4=<<3+4=7>>7\n#### 7", "3", "1000", "0.75"]
    score = score_math(predictions, golds, "gsm8k")
    assert isinstance(score, MathScore)
    assert (score.correct, score.total, score.no_answer) == (3, 5, 1)
    assert score.accuracy == pytest.approx(0.6)
    assert [r["correct"] for r in score.records] == [True, False, False, True, True]
    assert score.records[1] == {"index": 1, "extracted": "6", "gold": "7", "correct": False}
    assert score.records[2]["extracted"] is None
    assert score.summary() == {"accuracy": 0.6, "correct": 3, "total": 5, "no_answer": 1}
    out = tmp_path / "records.jsonl"
    score.write_jsonl(out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == score.records


def test_score_math_uses_boxes_and_normalisation():
    predictions = ["so \\boxed{\\dfrac{1}{2}}", "\\boxed{3}", "no answer here", "\\boxed{90^\\circ}"]
    golds = ["Solution ... $\\boxed{\\frac12}$.", "4", "5", "90"]
    score = score_math(predictions, golds, kind="math")
    assert (score.correct, score.total, score.no_answer) == (2, 4, 1)
    assert score.records[0]["gold"] == "\\frac12" and score.records[0]["extracted"] == "\\dfrac{1}{2}"


def test_score_math_errors_and_empty():
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        score_math(["1", "2"], ["1"], "gsm8k")
    with pytest.raises(ValueError, match="unknown answer kind 'mmlu'"):
        score_math(["1"], ["1"], "mmlu")
    empty = score_math([], [], "math")
    assert (empty.accuracy, empty.total, empty.records) == (0.0, 0, [])
