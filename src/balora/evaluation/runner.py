"""``balora evaluate``: load a (base model + adapter) pair, run one benchmark, write a new run dir.

Benchmarks, each a function that returns a JSON-ready dict of metrics and, given
``records_path``, writes one JSON object per example there:

* :func:`eval_math` -- GSM8K / MATH: greedy answers to ``render_prompt(tokenizer, question)``
  (the prompt format of training), scored by answer extraction (``score_math``);
* :func:`eval_code` -- HumanEval / MBPP: pass@k of completions run against the tests. Generated
  code runs only with ``allow_code_execution=True`` (the CLI's ``--allow-code-execution``), in a
  sandboxed subprocess; :mod:`balora.evaluation.sandbox` says what is and is not isolated;
* :func:`eval_perplexity` -- sliding-window perplexity of the adapted AND of the pre-trained
  model (adapter disabled) on a plain-text corpus (paper Table 13);
* :func:`eval_mt_bench` -- MT-Bench answers of the model, graded 1-10 by a judge model behind an
  OpenAI-compatible server or loaded locally.

:func:`run_evaluation` ties them together and writes ``metrics.json`` and ``records.jsonl`` into
a NEW directory ``<output_dir>/eval-<benchmark>-<YYYYmmdd-HHMMSS>`` (never overwritten).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from balora import run_dir as runs
from balora.models import load_causal_lm, load_tokenizer
from balora.data.sft.formats import has_chat_template, render_messages, render_prompt

from .code import CodeExecutionNotAllowed, CodeProblem, evaluate_completions, extract_code, load_humaneval, load_mbpp
from .generate import SamplingConfig, generate_texts
from .judge import (
    ChatBackend,
    LocalModelBackend,
    OpenAICompatibleBackend,
    answer_questions,
    judge_answers,
    load_mt_bench_questions,
)
from .perplexity import load_perplexity_texts, sliding_window_perplexity

__all__ = [
    "BENCHMARKS",
    "DEFAULT_MODEL",
    "RECORDS_FILE",
    "ModelSource",
    "code_prompt",
    "eval_code",
    "eval_math",
    "eval_mt_bench",
    "eval_perplexity",
    "load_model_for_eval",
    "load_source",
    "make_judge",
    "pretrained_view",
    "refuse_without_opt_in",
    "resolve_model_source",
    "run_evaluation",
]

logger = logging.getLogger("balora")

BENCHMARKS = ("gsm8k", "math", "humaneval", "mbpp", "perplexity", "mt-bench")
MATH_BENCHMARKS = ("gsm8k", "math")
CODE_BENCHMARKS = ("humaneval", "mbpp")
DEFAULT_MODEL = "smollm2"
RECORDS_FILE = "records.jsonl"
OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_JUDGE = "gpt-4"

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


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to load: ``base`` (asset name, hub id or path), a PEFT ``adapter_dir`` (or None), a
    fully fine-tuned model folder ``full_model_dir`` (or None; then ``base`` is the pre-trained
    model it started from) and ``tokenizer_dir``, a folder with the training tokenizer, or None."""

    base: str
    adapter_dir: Path | None = None
    full_model_dir: Path | None = None
    tokenizer_dir: Path | None = None


def _run_config_model(run_dir: Path) -> tuple[str, str]:
    """``(model.name, family)`` from a ``balora train`` run's ``config.yaml``."""
    try:
        config = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text(encoding="utf-8")) or {}
        name = config["model"]["name"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise ValueError(f"{run_dir / runs.CONFIG_FILE}: cannot read model.name from it") from None
    return str(name), str(config.get("family", "generation"))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def resolve_model_source(model: str | None, adapter: str | os.PathLike | None) -> ModelSource:
    """Work out the base model and the adapter from ``--model`` / ``--adapter``.

    ``adapter`` is a PEFT adapter directory (``adapter_config.json``) or a ``balora train`` run
    directory (``adapter/`` + ``config.yaml``; its ``model.name`` is the base model when
    ``model`` is None, and a run that trained all weights is loaded as a whole model).
    ``model=None`` without a run directory means the adapter's ``base_model_name_or_path``, or
    ``smollm2`` when there is no adapter.
    """
    if adapter is None:
        return ModelSource(model or DEFAULT_MODEL)
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise ValueError(f"adapter directory not found: {folder}")
    if (folder / runs.CONFIG_FILE).is_file() and (folder / "adapter").is_dir():
        base, family = _run_config_model(folder)
        if family == "classification":
            raise ValueError(f"{folder} is a classification run; balora evaluate needs a generation run")
        if model is not None and model != base:
            logger.warning("the run was trained on %s; evaluating it on --model %s as asked", base, model)
        run_dir, folder = folder, folder / "adapter"
        tokenizer_dir = folder if _has_tokenizer(folder) else None
        if not (folder / "adapter_config.json").is_file():
            if (folder / "config.json").is_file():  # method "full": the whole fine-tuned model
                return ModelSource(model or base, full_model_dir=folder, tokenizer_dir=tokenizer_dir)
            raise ValueError(f"{run_dir} has no finished adapter ({folder} holds no adapter_config.json)")
        return ModelSource(model or base, adapter_dir=folder, tokenizer_dir=tokenizer_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{folder} is neither a PEFT adapter directory (no adapter_config.json) nor a balora "
            "run directory (no adapter/ and config.yaml)"
        )
    if model is None:
        model = _adapter_base(folder)
    return ModelSource(model, adapter_dir=folder, tokenizer_dir=folder if _has_tokenizer(folder) else None)


def _adapter_base(folder: Path) -> str:
    """The ``base_model_name_or_path`` of a PEFT adapter (for ``--model`` left out)."""
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not base:
        raise ValueError(f"{folder}: the adapter does not name its base model; pass --model")
    return base


def _with_pad(tokenizer):
    """``tokenizer`` with the eos token as pad token when it has none (as ``load_causal_lm`` does)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer(folder: Path):
    """The tokenizer saved next to an adapter (the one training used)."""
    from transformers import AutoTokenizer

    return _with_pad(AutoTokenizer.from_pretrained(str(folder)))


def _load_full_model(folder: Path):
    """A fully fine-tuned causal LM saved with ``save_pretrained`` (float32)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load the fine-tuned model in {folder}: {first}") from None


def _attach_adapter(model, folder: Path):
    """``PeftModel.from_pretrained`` (inference mode) with a one-line error on mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, KeyError, OSError) as err:  # shape mismatch, unreadable weights
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load the adapter {folder} on this base model: {first}") from None


def load_model_for_eval(model: str | None, adapter: str | os.PathLike | None = None):
    """``(model, tokenizer)`` to evaluate: the base model (:func:`balora.models.load_causal_lm`)
    with the PEFT adapter of ``adapter`` on top (a ``PeftModel``), or the base model alone.

    See :func:`resolve_model_source` for what ``model`` / ``adapter`` accept. The tokenizer saved
    with the adapter (the one training used) is preferred over the base model's.
    """
    return load_source(resolve_model_source(model, adapter))


def load_source(source: ModelSource):
    """``(model, tokenizer)`` of a resolved :class:`ModelSource` (see :func:`load_model_for_eval`)."""
    if source.full_model_dir is not None:
        lm = _load_full_model(source.full_model_dir)
        tokenizer = None if source.tokenizer_dir is not None else _with_pad(load_tokenizer(source.base))
    else:
        lm, tokenizer = load_causal_lm(source.base)
        if source.adapter_dir is not None:
            lm = _attach_adapter(lm, source.adapter_dir)
    if source.tokenizer_dir is not None:
        tokenizer = _load_tokenizer(source.tokenizer_dir)
    lm.eval()
    return lm, tokenizer


# ----------------------------------------------------------------------------- helpers


def _as_dict(record: Any) -> dict[str, Any]:
    """A scoring record (dict or dataclass) as a plain dict."""
    if isinstance(record, dict):
        return dict(record)
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    return dict(vars(record))


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _write_records(records_path: str | os.PathLike | None, rows: list[dict[str, Any]]) -> None:
    if records_path is not None:
        runs.write_jsonl(records_path, rows)


def _add_special_tokens(tokenizer) -> bool:
    """Training's choice: no extra special tokens after a chat template, the BOS for plain text."""
    return not has_chat_template(tokenizer)


# ----------------------------------------------------------------------------- math


def _load_math_data(benchmark: str, path, max_examples: int | None):
    """The test rows (``question``, ``answer``, ``final_answer``) of GSM8K or MATH."""
    from balora.data import math as math_data

    loader = math_data.load_gsm8k if benchmark == "gsm8k" else math_data.load_math
    return loader(split="test", path=path, max_examples=max_examples)


def eval_math(
    model,
    tokenizer,
    benchmark: str = "gsm8k",
    path: str | os.PathLike | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    *,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Greedy answers to GSM8K / MATH test problems, scored with ``score_math``.

    Returns ``{"benchmark", "accuracy", "correct", "total", "no_answer"}``; each record is the
    question, the generated text and the scorer's record for it.
    """
    if benchmark not in MATH_BENCHMARKS:
        raise ValueError(f"unknown math benchmark {benchmark!r}; choose one of {', '.join(MATH_BENCHMARKS)}")
    _check_positive(max_examples=max_examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    from .math_answers import score_math

    data = _load_math_data(benchmark, path, max_examples)
    questions = list(data["question"])
    prompts = [render_prompt(tokenizer, q) for q in questions]
    outputs = generate_texts(model, tokenizer, prompts, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                             batch_size=batch_size, add_special_tokens=_add_special_tokens(tokenizer),
                             progress=progress, desc=f"answering {benchmark}")
    answers = [o[0] for o in outputs]
    score = score_math(answers, list(data["final_answer"]), kind=benchmark)
    _write_records(records_path, [
        {"question": q, "generated": a, **_as_dict(r)} for q, a, r in zip(questions, answers, score.records)
    ])
    return {"benchmark": benchmark, "accuracy": score.accuracy, "correct": score.correct,
            "total": score.total, "no_answer": score.no_answer}


# ----------------------------------------------------------------------------- code


def refuse_without_opt_in(allow_code_execution: bool) -> None:
    """Raise :class:`CodeExecutionNotAllowed` unless the user opted in to running generated code."""
    if allow_code_execution is not True:
        raise CodeExecutionNotAllowed(
            "code benchmarks run the generated code: pass --allow-code-execution "
            "(allow_code_execution=True in Python) to allow it; it runs in a sandboxed subprocess "
            "that is not a full isolation (see balora.evaluation.sandbox)"
        )


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
    return load_mbpp("test", path, max_examples=max_examples)


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
) -> dict[str, Any]:
    """pass@k on HumanEval / MBPP: ``samples`` completions per problem (greedy when 1), each run
    against the problem's tests in the sandbox.

    Refuses (:class:`CodeExecutionNotAllowed`) before loading or generating anything unless
    ``allow_code_execution=True``. Every k must be <= ``samples``. Returns
    ``{"benchmark", "pass@k"..., "n_problems", "n_samples", "statuses"}``; one record per sample
    (task id, sample index, raw completion, extracted code, status, error).
    """
    refuse_without_opt_in(allow_code_execution)
    if benchmark not in CODE_BENCHMARKS:
        raise ValueError(f"unknown code benchmark {benchmark!r}; choose one of {', '.join(CODE_BENCHMARKS)}")
    _check_positive(max_examples=max_examples, samples=samples, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    ks = sorted(set(ks))
    if not ks or any(not isinstance(k, int) or not 1 <= k <= samples for k in ks):
        raise ValueError(f"every k of pass@k must be between 1 and samples={samples}, got {ks}")
    problems = _load_code_problems(benchmark, path, max_examples)
    sampling = _code_sampling(tokenizer, benchmark, samples, temperature, max_new_tokens, seed)
    outputs = generate_texts(model, tokenizer, [code_prompt(tokenizer, p) for p in problems], sampling=sampling,
                             batch_size=batch_size, add_special_tokens=_add_special_tokens(tokenizer),
                             progress=progress, desc=f"writing {benchmark} code")
    completions = {p.task_id: texts for p, texts in zip(problems, outputs)}
    result = evaluate_completions(problems, completions, allow_code_execution=True, ks=ks, timeout_s=timeout_s,
                                  memory_mb=memory_mb, workers=workers, progress=progress)
    by_id = {p.task_id: p for p in problems}
    index: Counter = Counter()
    rows = []
    for s in result.samples:
        rows.append({"task_id": s.task_id, "sample": index[s.task_id], "completion": s.completion,
                     "code": extract_code(s.completion, by_id[s.task_id]), "status": s.status, "error": s.error})
        index[s.task_id] += 1
    _write_records(records_path, rows)
    return {"benchmark": benchmark, **{f"pass@{k}": v for k, v in result.pass_at.items()},
            "n_problems": result.n_problems, "n_samples": len(result.samples),
            "statuses": dict(Counter(s.status for s in result.samples))}


# ----------------------------------------------------------------------------- perplexity


@contextlib.contextmanager
def pretrained_view(model) -> Iterator[Any]:
    """The pre-trained model inside the block: a ``PeftModel`` with its adapter disabled, or the
    model itself. PiSSA adapters saved in LoRA format sit on the original weights, so disabling
    them gives the pre-trained model too."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


def eval_perplexity(
    model,
    tokenizer,
    corpus: str = "grimm-tales",
    stride: int = 512,
    max_length: int | None = None,
    *,
    batch_size: int = 1,
    pretrained=None,
    progress: bool = True,
    records_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Sliding-window perplexity of the model and of the pre-trained model (paper Table 13).

    The pre-trained model is ``pretrained`` when given (e.g. the base of a fully fine-tuned
    model), else ``model`` with its adapter disabled (a model without adapter is its own
    pre-trained model and is measured once). Returns ``{"corpus", "perplexity", "nll", "tokens",
    "windows", "pretrained_perplexity", "pretrained_nll", "stride", "max_length"}``; the records
    are one row per model.
    """
    from peft import PeftModel

    texts = load_perplexity_texts(corpus)
    kwargs = dict(max_length=max_length, stride=stride, batch_size=batch_size, progress=progress)
    adapted = sliding_window_perplexity(model, tokenizer, texts, **kwargs)
    if pretrained is not None:
        base = sliding_window_perplexity(pretrained, tokenizer, texts, **kwargs)
    elif isinstance(model, PeftModel):
        with pretrained_view(model) as plain:
            base = sliding_window_perplexity(plain, tokenizer, texts, **kwargs)
    else:
        base = adapted
    rows = [{"model": name, **dataclasses.asdict(r)} for name, r in (("evaluated", adapted), ("pre-trained", base))]
    _write_records(records_path, rows)
    return {"corpus": str(corpus), "perplexity": adapted.perplexity, "nll": adapted.nll, "tokens": adapted.tokens,
            "windows": adapted.windows, "pretrained_perplexity": base.perplexity, "pretrained_nll": base.nll,
            "stride": stride, "max_length": max_length}


# ----------------------------------------------------------------------------- MT-Bench


def _is_local_url(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def make_judge(judge: str = "openai", judge_model: str | None = None, base_url: str | None = None,
               *, max_new_tokens: int = 2048) -> ChatBackend:
    """The MT-Bench judge: ``"openai"`` = an OpenAI-compatible server at ``base_url`` (default the
    OpenAI API, key in ``OPENAI_API_KEY``; a localhost server needs no key) serving
    ``judge_model`` (default gpt-4); ``"local"`` = the causal LM ``judge_model`` loaded here."""
    if judge == "openai":
        url = base_url or OPENAI_URL
        return OpenAICompatibleBackend(url, judge_model or DEFAULT_OPENAI_JUDGE, require_key=not _is_local_url(url))
    if judge == "local":
        if not judge_model:
            raise ValueError("a local judge needs a model: pass --judge-model NAME_OR_PATH")
        lm, tokenizer = load_causal_lm(judge_model)
        return LocalModelBackend(lm, tokenizer, max_new_tokens=max_new_tokens)
    raise ValueError(f"unknown judge {judge!r}; choose openai or local")


class _ChatAnswerer:
    """Answers a chat with the evaluated model: ``render_messages`` (training's format) + greedy."""

    def __init__(self, model, tokenizer, max_new_tokens: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        prompt = render_messages(self.tokenizer, messages, add_generation_prompt=True)
        return generate_texts(self.model, self.tokenizer, [prompt], sampling=self.sampling, progress=False,
                              add_special_tokens=_add_special_tokens(self.tokenizer))[0][0].strip()


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
    """MT-Bench: the model answers every turn (greedy), the judge rates each turn 1-10.

    ``judge`` is ``"openai"`` / ``"local"`` (see :func:`make_judge`) or a ready backend. Returns
    the judge summary (``mean_score``, ``per_category``, ``per_turn``, ``unparsed``,
    ``judged_turns``) plus ``n_questions`` and the judge; one record per graded turn.
    """
    _check_positive(max_questions=max_questions, max_new_tokens=max_new_tokens)
    backend = judge if not isinstance(judge, str) else make_judge(judge, judge_model, base_url)
    questions = load_mt_bench_questions(path, max_questions=max_questions)
    answers = answer_questions(_ChatAnswerer(model, tokenizer, max_new_tokens), questions, progress=progress)
    result = judge_answers(backend, questions, answers, progress=progress)
    turns = {(q.question_id, t + 1): (q.turns[t], a[t]) for q, a in zip(questions, answers) for t in range(len(a))}
    rows = []
    for r in result.records:
        question, answer = turns[(r.question_id, r.turn)]
        rows.append({**r.to_dict(), "question": question, "answer": answer})
    _write_records(records_path, rows)
    return {**result.summary(), "n_questions": len(questions), "judge": _judge_name(backend)}


def _judge_name(backend: ChatBackend) -> str:
    """A short description of the judge for the metrics (never the API key)."""
    if isinstance(backend, OpenAICompatibleBackend):
        return f"{backend.model} at {backend.url}"
    if isinstance(backend, LocalModelBackend):
        return f"local {getattr(backend.model, 'name_or_path', '') or type(backend.model).__name__}"
    return type(backend).__name__


# ----------------------------------------------------------------------------- runner


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")


_FUNCTIONS = {"gsm8k": eval_math, "math": eval_math, "humaneval": eval_code, "mbpp": eval_code,
              "perplexity": eval_perplexity, "mt-bench": eval_mt_bench}


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
    **options: Any,
) -> tuple[dict[str, Any], Path]:
    """Evaluate ``model`` (+ ``adapter``) on ``benchmark`` and write a new run directory.

    ``options`` go to the benchmark's function (``eval_math`` / ``eval_code`` /
    ``eval_perplexity`` / ``eval_mt_bench``). Code benchmarks refuse before anything is loaded
    unless ``allow_code_execution=True``; an ``openai`` judge is checked (API key) before the
    model is loaded. Returns ``(metrics, out_dir)``; ``out_dir`` holds ``metrics.json`` (the
    metrics plus what was evaluated, the options and the time taken) and ``records.jsonl``.
    """
    _check_benchmark(benchmark)
    if benchmark in CODE_BENCHMARKS:
        refuse_without_opt_in(options.get("allow_code_execution", False))
    kwargs = _bind_options(benchmark, options)
    recorded = {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
                for k, v in options.items()}
    if benchmark == "mt-bench" and isinstance(kwargs.get("judge", "openai"), str):
        kwargs["judge"] = make_judge(kwargs.get("judge", "openai"), kwargs.pop("judge_model", None),
                                     kwargs.pop("base_url", None))
    source = resolve_model_source(model, adapter)
    start = time.perf_counter()
    lm, tokenizer = load_source(source)
    out_dir = runs.create_run_dir(output_dir, f"eval-{benchmark}")
    try:
        metrics = _dispatch(benchmark, lm, tokenizer, source, out_dir / RECORDS_FILE, kwargs)
    except BaseException:
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only removed while empty: nothing written is ever deleted
        raise
    info = {"benchmark": benchmark, "model": source.base, "adapter": None if adapter is None else str(adapter),
            "options": recorded,
            "seconds": round(time.perf_counter() - start, 3)}
    metrics = {**metrics, **{k: v for k, v in info.items() if k not in metrics}}
    runs.write_json(out_dir / runs.METRICS_FILE, metrics)
    return metrics, out_dir
