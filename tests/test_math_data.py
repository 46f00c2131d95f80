"""GSM8K / MATH loaders: hub calls (monkeypatched datasets.load_dataset) and local files."""

from __future__ import annotations

import json

import datasets
import pytest

from balora.data.files import read_records
from balora.data.hub import HubLoadError
from balora.data.math import MATH_SUBJECTS, load_gsm8k, load_math
from balora.evaluation.math_answers import score_math

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,000 plus $250. Total?", "answer": "1000+250=1250\n#### 1,250"},
    {"question": "Half of 9?", "answer": "9/2 = 4.5\n#### 4.5"},
]


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace datasets.load_dataset: GSM8K -> GSM_ROWS, MATH config c -> two rows of subject c."""
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "openai/gsm8k":
            return datasets.Dataset.from_list(GSM_ROWS)
        rows = [
            {"problem": f"{name} problem {i}", "level": f"Level {i + 1}",
             "type": name.replace("_", " ").title(), "solution": f"so $\\boxed{{{name[:3]}{i}}}$."}
            for i in range(2)
        ]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_from_hub(hub_calls):
    ds = load_gsm8k()
    assert hub_calls == [("openai/gsm8k", "main", "test")]
    assert ds.column_names == ["question", "answer", "final_answer"]
    assert ds["final_answer"] == ["7", "1250", "4.5"]
    assert ds[0]["answer"] == GSM_ROWS[0]["answer"]  # raw solution kept
    load_gsm8k("train", max_examples=2)
    assert hub_calls[-1] == ("openai/gsm8k", "main", "train")
    assert len(load_gsm8k(max_examples=2)) == 2


def test_gsm8k_answers_score_against_their_own_gold(hub_calls):
    ds = load_gsm8k()
    score = score_math(ds["answer"], ds["final_answer"], "gsm8k")
    assert score.correct == score.total == 3


def test_gsm8k_local_files(tmp_path):
    jsonl = tmp_path / "gsm.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in GSM_ROWS) + "\n\n", encoding="utf-8")
    array = tmp_path / "gsm.json"
    array.write_text(json.dumps(GSM_ROWS), encoding="utf-8")
    parquet = tmp_path / "gsm.parquet"
    datasets.Dataset.from_list(GSM_ROWS).to_parquet(str(parquet))
    csv = tmp_path / "gsm.csv"
    datasets.Dataset.from_list(GSM_ROWS).to_csv(str(csv), index=False)
    for path in (jsonl, array, parquet, csv):
        ds = load_gsm8k(path=path)
        assert ds["question"] == [row["question"] for row in GSM_ROWS]
        assert ds["final_answer"] == ["7", "1250", "4.5"]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"question": "q", "answer": "72"}) + "\n", encoding="utf-8")
    assert load_gsm8k(path=bare)["final_answer"] == ["72"]


def test_gsm8k_user_errors(tmp_path, hub_calls):
    with pytest.raises(FileNotFoundError, match="GSM8K data file not found"):
        load_gsm8k(path=tmp_path / "missing.jsonl")
    (tmp_path / "x.xlsx").write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported GSM8K data file 'x.xlsx'"):
        load_gsm8k(path=tmp_path / "x.xlsx")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"problem": "p", "solution": "s"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks column\\(s\\) question, answer; found: problem, solution"):
        load_gsm8k(path=wrong)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_gsm8k(path=broken)
    with pytest.raises(ValueError, match="unknown GSM8K split 'dev'"):
        load_gsm8k("dev")
    with pytest.raises(ValueError, match="max_examples must be >= 1"):
        load_gsm8k(max_examples=0)
    assert hub_calls == []


def test_hub_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nlong trace")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError, match="could not load GSM8K .*openai/gsm8k.*path=") as info:
        load_gsm8k()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- MATH


def test_math_from_hub_concatenates_all_subjects(hub_calls):
    ds = load_math()
    assert hub_calls == [("EleutherAI/hendrycks_math", subject, "test") for subject in MATH_SUBJECTS]
    assert len(MATH_SUBJECTS) == 7 and len(ds) == 14
    assert ds.column_names == ["question", "answer", "final_answer", "subject", "level"]
    assert ds["subject"] == [s for s in MATH_SUBJECTS for _ in range(2)]
    first = ds[0]
    assert first["question"] == "algebra problem 0"
    assert first["answer"] == "so $\\boxed{alg0}$."
    assert first["final_answer"] == "alg0" and first["level"] == 1


def test_math_subjects_levels_and_limits(hub_calls):
    ds = load_math("train", subjects=["Number Theory", "geometry"], level=2)
    assert hub_calls == [("EleutherAI/hendrycks_math", "number_theory", "train"),
                         ("EleutherAI/hendrycks_math", "geometry", "train")]
    assert ds["question"] == ["number_theory problem 1", "geometry problem 1"]
    assert ds["level"] == [2, 2]
    assert len(load_math(subjects="counting_and_probability", max_examples=1)) == 1
    with pytest.raises(ValueError, match="unknown MATH subject.*calculus"):
        load_math(subjects=["calculus"])
    with pytest.raises(ValueError, match="level must be between 1 and 5"):
        load_math(level=6)
    with pytest.raises(ValueError, match="unknown MATH split 'validation'"):
        load_math("validation")


def test_math_local_files(tmp_path):
    math500 = [  # MATH-500 style: problem, solution, answer, subject, integer level
        {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2", "subject": "Prealgebra", "level": 1},
        {"problem": "Half?", "solution": "So $\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
         "subject": "Algebra", "level": 3},
        {"problem": "Count?", "solution": "$\\boxed{6}$", "answer": "6",
         "subject": "Counting & Probability", "level": 3},
    ]
    path = tmp_path / "math500.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in math500), encoding="utf-8")
    ds = load_math(path=path)
    assert ds["final_answer"] == ["2", "\\frac{1}{2}", "6"]
    assert ds["answer"][1] == "So $\\boxed{\\frac12}$"
    assert ds["subject"] == ["prealgebra", "algebra", "counting_and_probability"]
    assert load_math(path=path, level=3)["question"] == ["Half?", "Count?"]
    assert load_math(path=path, subjects=["counting_and_probability"])["question"] == ["Count?"]

    solutions_only = tmp_path / "sol.json"
    solutions_only.write_text(json.dumps([{"problem": "p", "solution": "x \\boxed{\\sqrt{2}} y"}]), encoding="utf-8")
    only = load_math(path=solutions_only)
    assert only["final_answer"] == ["\\sqrt{2}"] and only["level"] == [0]

    answers_only = tmp_path / "ans.parquet"
    datasets.Dataset.from_list([{"problem": "p", "answer": "7"}]).to_parquet(str(answers_only))
    assert load_math(path=answers_only)[0] == {
        "question": "p", "answer": "7", "final_answer": "7", "subject": "", "level": 0,
    }
    with pytest.raises(ValueError, match="no 'level' column"):
        load_math(path=answers_only, level=1)
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text(json.dumps({"problem": "p"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a 'solution' or an 'answer' column"):
        load_math(path=nothing)
    with pytest.raises(ValueError, match="no MATH problems left"):
        load_math(path=path, subjects="geometry")


def test_local_files_must_hold_objects_and_rows(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold JSON objects"):
        read_records(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no rows"):
        load_gsm8k(path=empty)
