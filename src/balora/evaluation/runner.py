"""``balora evaluate``: load a (base model + adapter) pair, run one benchmark, write a new run dir.

The benchmarks, one module each, return a JSON-ready dict of metrics and, given
``records_path``, write one JSON object per example there:

* ``gsm8k`` / ``math`` -- :func:`balora.evaluation.math.eval_math`;
* ``humaneval`` / ``mbpp`` -- :func:`balora.evaluation.code.eval_code`. Generated code runs only
  with ``allow_code_execution=True`` (the CLI's ``--allow-code-execution``), in a sandboxed
  subprocess; :mod:`balora.evaluation.sandbox` says what is and is not isolated;
* ``perplexity`` -- :func:`balora.evaluation.perplexity.eval_perplexity`;
* ``mt-bench`` -- :func:`balora.evaluation.mt_bench.eval_mt_bench`.

:func:`run_evaluation` checks the options, loads the model (:mod:`balora.models`), dispatches to
the benchmark and writes ``metrics.json`` and ``records.jsonl`` into a NEW directory
``<output_dir>/eval-<benchmark>-<YYYYmmdd-HHMMSS>`` (never overwritten); an unfinished MT-Bench
run can be resumed in its own directory (``resume=``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path
from typing import Any

from balora import run_dir
from balora.models import ModelSource, load_causal_lm, load_source, resolve_model_source

from .chat_backends import make_judge
from .code import CODE_BENCHMARKS, eval_code, refuse_without_opt_in
from .math import MATH_BENCHMARKS, eval_math, trained_on_gsm_symbolic
from .mt_bench import ANSWERS_FILE, JUDGMENTS_FILE, eval_mt_bench
from .perplexity import eval_perplexity
from .sandbox import check_isolation

__all__ = ["BENCHMARKS", "RECORDS_FILE", "run_evaluation"]

BENCHMARKS = (*MATH_BENCHMARKS, *CODE_BENCHMARKS, "perplexity", "mt-bench")
RECORDS_FILE = "records.jsonl"

_FUNCTIONS = {**dict.fromkeys(MATH_BENCHMARKS, eval_math), **dict.fromkeys(CODE_BENCHMARKS, eval_code),
              "perplexity": eval_perplexity, "mt-bench": eval_mt_bench}


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")


def _bind_options(benchmark: str, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the benchmark's function; an option it does not take is a ValueError."""
    fn = _FUNCTIONS[benchmark]
    kwargs = dict(options, records_path=None)
    if fn in (eval_math, eval_code):
        kwargs["benchmark"] = benchmark
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as err:
        raise ValueError(f"option not valid for {benchmark}: {err}") from None
    return kwargs


def _check_resume_dir(benchmark: str, resume: str | os.PathLike) -> Path:
    """The directory of an unfinished MT-Bench run to continue."""
    if benchmark != "mt-bench":
        raise ValueError(f"resume works for mt-bench only, not {benchmark}")
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot resume: {path} is not a directory")
    if (path / run_dir.METRICS_FILE).exists():
        raise ValueError(f"cannot resume: {path} holds a finished run ({run_dir.METRICS_FILE} exists)")
    if not any((path / name).exists() for name in (ANSWERS_FILE, JUDGMENTS_FILE)):
        raise ValueError(f"cannot resume: {path} holds no saved MT-Bench answers or judgments")
    return path


def _dispatch(benchmark: str, lm, tokenizer, source: ModelSource, records_path: Path, kwargs: dict):
    """Call the benchmark's function; a fully fine-tuned model's perplexity is compared with its base."""
    kwargs = dict(kwargs, records_path=records_path)
    if benchmark == "perplexity" and source.full_model_dir is not None and kwargs.get("pretrained") is None:
        kwargs["pretrained"] = load_causal_lm(source.base)[0]
    return _FUNCTIONS[benchmark](lm, tokenizer, **kwargs)


def run_evaluation(
    model: str | None,
    adapter: str | os.PathLike | None,
    benchmark: str,
    output_dir: str | os.PathLike = "runs",
    *,
    resume: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[dict[str, Any], Path]:
    """Evaluate ``model`` (+ ``adapter``) on ``benchmark`` and write a new run directory.

    ``model`` / ``adapter`` are resolved by :func:`balora.models.resolve_model_source`;
    ``options`` go to the benchmark's function (``eval_math`` / ``eval_code`` /
    ``eval_perplexity`` / ``eval_mt_bench``). Code benchmarks refuse before anything is loaded
    unless ``allow_code_execution=True``; an ``openai`` judge is checked (API key) before the
    model is loaded. GSM8K leaves out the problems the GSM-Symbolic templates rewrite when the
    evaluated run or adapter was trained on ``gsm-symbolic`` (unless ``exclude_gsm_symbolic``
    is given). Returns ``(metrics, out_dir)``; ``out_dir`` holds ``metrics.json`` (the
    metrics plus what was evaluated, the options and the time taken) and ``records.jsonl``.

    MT-Bench also saves each answer and judgment as it is made (``answers.jsonl``,
    ``judgments.jsonl``, see :func:`balora.evaluation.mt_bench.eval_mt_bench`), so a failed run
    keeps its directory; ``resume=OUT_DIR`` continues such an unfinished run in ``OUT_DIR``
    (same model and options), answering and judging only what is not saved there yet.
    """
    _check_benchmark(benchmark)
    if benchmark in CODE_BENCHMARKS:
        refuse_without_opt_in(options.get("allow_code_execution", False))
        check_isolation(unsafe_allow_root=options.get("unsafe_allow_root", False))  # before the model loads
    resume_dir = None if resume is None else _check_resume_dir(benchmark, resume)
    kwargs = _bind_options(benchmark, options)
    recorded = {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
                for k, v in options.items()}
    if benchmark == "mt-bench" and isinstance(kwargs.get("judge", "openai"), str):
        kwargs["judge"] = make_judge(kwargs.get("judge", "openai"), kwargs.pop("judge_model", None),
                                     kwargs.pop("base_url", None))
    source = resolve_model_source(model, adapter)
    if benchmark == "gsm8k" and options.get("exclude_gsm_symbolic") is None:  # GSM-Symbolic rewrites GSM8K test
        kwargs["exclude_gsm_symbolic"] = trained_on_gsm_symbolic(source.adapter_dir or source.full_model_dir)
    start = time.perf_counter()
    lm, tokenizer = load_source(source)
    out_dir = resume_dir or run_dir.create_run_dir(output_dir, f"eval-{benchmark}")
    if benchmark == "mt-bench":
        kwargs["save_dir"] = out_dir
    try:
        metrics = _dispatch(benchmark, lm, tokenizer, source, out_dir / RECORDS_FILE, kwargs)
    except BaseException:
        if resume_dir is None:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only removed while empty: nothing written is ever deleted
        raise
    info = {"benchmark": benchmark, "model": source.base, "adapter": None if adapter is None else str(adapter),
            "options": recorded,
            "seconds": round(time.perf_counter() - start, 3)}
    metrics = {**metrics, **{k: v for k, v in info.items() if k not in metrics}}
    run_dir.write_json(out_dir / run_dir.METRICS_FILE, metrics)
    return metrics, out_dir
