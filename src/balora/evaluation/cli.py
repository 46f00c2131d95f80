"""The ``balora evaluate BENCHMARK`` sub-command (a thin layer over :mod:`balora.evaluation.runner`).

``add_evaluate_parser(subparsers)`` registers it; ``run_evaluate(args)`` checks every flag
(:func:`validate_args`) and, for a code benchmark, the sandbox's isolation BEFORE a model is
loaded or a directory created, runs it, prints a short result table (for code benchmarks also
one line of what the sandbox had in force) and the output directory, and returns the exit
code. User errors propagate as
``ValueError`` / ``FileNotFoundError`` / ``AssetNotInstalled`` / ``ConnectionError`` (a hub data
set out of reach: ``balora.data.hub.HubLoadError``) for ``balora.cli.main`` to report in one line.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from .code import CODE_BENCHMARKS
from .math import MATH_BENCHMARKS
from .runner import BENCHMARKS, run_evaluation
from .sandbox import check_isolation, format_isolation

__all__ = ["add_evaluate_parser", "evaluate_options", "format_metrics", "run_evaluate", "validate_args"]

CODE_EXECUTION_HELP = (
    "allow running the model-generated code (humaneval, mbpp). Without it the code benchmarks "
    "refuse before generating anything. On Linux each program runs in its own PID, mount and "
    "network namespaces, with every file system read-only but its temporary directory, as an "
    "unprivileged user, with a seccomp filter against sockets and resource limits; it can still "
    "read world-readable files, and a hostile program can fake its own pass. See the docstring "
    "of balora.evaluation.sandbox; the summary prints what was in force"
)
UNSAFE_ROOT_HELP = (
    "code: as root, run the generated code even where the sandbox cannot isolate it (no "
    "namespaces or no privilege drop); without it such a run is refused. The results record it"
)

EPILOG = (
    "Generated code (humaneval, mbpp) runs only with --allow-code-execution, in a sandboxed "
    "subprocess; see balora.evaluation.sandbox for what is and is not isolated. Results go to a "
    "new directory OUTPUT_DIR/eval-BENCHMARK-<timestamp> (metrics.json, records.jsonl); mt-bench also "
    "saves answers.jsonl and judgments.jsonl as it goes, and --resume OUT_DIR continues a stopped run."
)


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to ``subparsers`` (the object ``add_subparsers`` returned) and return it."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a model (+ adapter or run directory) on a benchmark",
        description="Evaluate a causal LM, optionally with a LoRA/BA-LoRA adapter, on one benchmark.",
        epilog=EPILOG,
    )
    p.add_argument("benchmark", choices=BENCHMARKS, help="what to measure")
    p.add_argument("--model", default=None,
                   help="base model: short asset name, hub id or local path (default: the run's or "
                        "adapter's base model, else smollm2)")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory, or a run directory of `balora train`")
    p.add_argument("--data", metavar="PATH",
                   help="local benchmark file instead of the default source (JSONL; for perplexity a "
                        ".txt file or folder, same as --corpus)")
    p.add_argument("--max-examples", type=int, metavar="N", help="evaluate only the first N examples/questions")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="generated tokens per answer (default 512; 1024 for mt-bench)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts generated at once (default 8)")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="code: completions per problem; 1 = greedy, more = sampling and pass@k for "
                        "k in 1, 10, 100 up to N (default 1)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="code: sampling temperature when --samples > 1 (default 0.8)")
    p.add_argument("--allow-code-execution", action="store_true", help=CODE_EXECUTION_HELP)
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="code: seconds each generated program may run (default 10)")
    p.add_argument("--unsafe-allow-root", action="store_true", help=UNSAFE_ROOT_HELP)
    p.add_argument("--judge", choices=("openai", "local"), default="openai",
                   help="mt-bench judge: an OpenAI-compatible server (key in OPENAI_API_KEY) or a "
                        "local model (default openai)")
    p.add_argument("--judge-model", metavar="NAME",
                   help="mt-bench judge model: the server's model name (default gpt-4), or for "
                        "--judge local an asset name, hub id or path")
    p.add_argument("--judge-url", metavar="URL",
                   help="base URL of the OpenAI-compatible server, e.g. http://localhost:8000/v1 "
                        "(default the OpenAI API)")
    p.add_argument("--corpus", default="grimm-tales", metavar="NAME",
                   help="perplexity corpus: grimm-tales (offline), wikitext-2, or a .txt file/folder")
    p.add_argument("--stride", type=int, default=512, metavar="N", help="perplexity window stride (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="perplexity: score only the first N tokens of the corpus (default: all)")
    p.add_argument("--output-dir", default="runs", help="where the new result directory goes (default runs)")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="mt-bench: continue the unfinished run in OUT_DIR (its saved answers.jsonl and "
                        "judgments.jsonl), answering and judging only what is missing; failed "
                        "judgments are judged again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _pass_at_ks(samples: int) -> tuple[int, ...]:
    return tuple(k for k in (1, 10, 100) if k <= samples)


def evaluate_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of the benchmark's ``eval_*`` function from the parsed arguments."""
    b = args.benchmark
    progress = not args.no_progress
    tokens = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    if b in MATH_BENCHMARKS:
        return dict(path=args.data, max_examples=args.max_examples, batch_size=args.batch_size,
                    progress=progress, **tokens)
    if b in CODE_BENCHMARKS:
        return dict(path=args.data, max_examples=args.max_examples, samples=args.samples,
                    temperature=args.temperature, ks=_pass_at_ks(args.samples),
                    allow_code_execution=args.allow_code_execution, timeout_s=args.timeout,
                    unsafe_allow_root=args.unsafe_allow_root, batch_size=args.batch_size,
                    progress=progress, **tokens)
    if b == "perplexity":
        corpus = args.corpus
        if args.data is not None:
            if args.corpus not in (None, "grimm-tales") and args.corpus != args.data:
                raise ValueError("give the perplexity corpus once: --corpus or --data, not both")
            corpus = args.data
        return dict(corpus=corpus, stride=args.stride, max_tokens=args.max_tokens, progress=progress)
    return dict(judge=args.judge, judge_model=args.judge_model, base_url=args.judge_url, path=args.data,
                max_questions=args.max_examples, progress=progress, **tokens)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column table of the scalar metrics (nested dicts flattened as ``key.sub``; the
    sandbox's isolation is left to its own line, see :func:`run_evaluate`)."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if key in ("options", "seconds", "sandbox"):
            continue
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", _fmt(v)) for k, v in value.items() if not isinstance(v, (dict, list))]
        elif not isinstance(value, (list, tuple)):
            rows.append((key, _fmt(value)))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_args(args: argparse.Namespace) -> None:
    """Check the flags before anything is loaded or created: a one-line ``ValueError`` (or
    ``FileNotFoundError`` for ``--data``) naming the flag."""
    for name in ("max_examples", "max_new_tokens", "batch_size", "samples", "stride", "max_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < (2 if name == "max_tokens" else 1):
            raise ValueError(f"{_flag(name)} must be an integer >= {2 if name == 'max_tokens' else 1}, got {value}")
    for name in ("timeout", "temperature"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flag(name)} must be a finite number > 0, got {value}")
    if getattr(args, "data", None) is not None:
        path = Path(args.data)
        if not path.exists():
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        try:
            if path.is_dir():
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
        except OSError as err:
            raise ValueError(f"--data {path} cannot be read: {err.strerror}") from None


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``balora evaluate`` from parsed arguments; print the metrics and the output directory."""
    validate_args(args)
    if args.benchmark in CODE_BENCHMARKS and args.allow_code_execution:  # refuse before the model loads
        check_isolation(unsafe_allow_root=args.unsafe_allow_root)
    metrics, out_dir = run_evaluation(args.model, args.adapter, args.benchmark, args.output_dir,
                                      resume=args.resume, **evaluate_options(args))
    print("\n" + format_metrics(metrics))
    if metrics.get("sandbox"):
        print(f"sandbox: {format_isolation(metrics['sandbox'])}")
    print(f"\nresults: {Path(out_dir)}")
    return 0
