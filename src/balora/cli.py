"""Command line: ``balora train CONFIG.yaml [key=value ...]``, ``balora demo``, ``balora evaluate``,
``balora predict RUN_OR_ADAPTER [TEXT ...]`` and ``balora config [SECTION]``.

A thin layer over balora.runs, balora.demo, balora.evaluation, balora.predict and balora.config. User mistakes
(a bad config value, a missing file, an asset that is not installed) end in one clear line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from balora.assets import AssetNotInstalled
from balora.config import SECTIONS, ConfigError, describe_config, load_config
from balora.evaluation.cli import add_evaluate_parser, run_evaluate
from balora.models import ModelLoadError
from balora.predict import FORMATS, check_output, predict, write_predictions

USER_ERRORS = (ConfigError, AssetNotInstalled, ModelLoadError, FileNotFoundError, FileExistsError, ValueError,
               ConnectionError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning and comparisons.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run into a new run directory")
    train.add_argument("config", nargs="?", help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapter.method=pissa train.epochs=2")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="LoRA vs PiSSA vs BA-LoRA, offline: Reuters R8 with MiniLM, or math with SmolLM2")
    demo.add_argument("--task", choices=("reuters", "math"), default="reuters",
                      help="reuters: MiniLM on Reuters R8 (classification); math: SmolLM2-135M on GSM8K-style problems")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument("--methods", default="lora,pissa,balora", help="comma-separated methods")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the shared config, e.g. train.max_steps=400")
    demo.add_argument("--no-progress", action="store_true")

    add_evaluate_parser(sub)
    _add_predict_parser(sub)

    config = sub.add_parser(
        "config", help="list every run-config key with its type, default and help",
        description="Print every key of a run config (type, default, help), grouped by section. A key "
                    "marked [classification only] or [generation only] must keep its default in a run of "
                    "the other family; inconsistent combinations are refused when the config is loaded.",
        epilog="Set keys in a YAML file (section: {key: value}) or on the command line, e.g. "
               "`balora train configs/reuters-r8-balora.yaml train.learning_rate=1e-4 adapter.rank=16`.",
    )
    config.add_argument("section", nargs="?", metavar="SECTION",
                        help=f"list only this section: {', '.join(('run', *SECTIONS))}")
    return parser


def _add_predict_parser(sub) -> None:
    parser = sub.add_parser(
        "predict", help="label names (classifier) or completions (causal LM) of a trained run or adapter",
        description="Predict with a run directory of `balora train`, a PEFT adapter directory or a saved "
                    "fine-tuned model. A classifier gives each text's label name and class probabilities; a "
                    "causal LM completes each prompt, rendered with the chat template training used. The "
                    "texts come from the arguments, from --file, or from stdin (one per line; no texts or '-').",
        epilog="Example: `balora predict runs/<run> --file test.csv --format csv --output predictions.csv`.",
    )
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", help="run directory, adapter directory or saved model")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts or prompts ('-' or none: read stdin)")
    parser.add_argument("--file", metavar="PATH", help="read the inputs from a CSV, TSV or JSONL file")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="the column of the texts (prompts) in --file (default text)")
    parser.add_argument("--text-pair-column", metavar="NAME", help="classifier: the column of the second texts")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="output format (default jsonl)")
    parser.add_argument("--output", metavar="PATH", help="write to this new file (default stdout; never overwritten)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="classifier: the probabilities of the K most likely classes (default all)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="texts per forward (default 32) or prompts per generation batch (default 8)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="classifier: truncate inputs to N tokens (default the run's model.max_length)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="causal LM: tokens per completion (default 256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown for --file)")


def _predict(args) -> int:
    check_output(args.output)
    predictions = predict(args.path, args.texts, file=args.file, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, top_k=args.top_k, batch_size=args.batch_size,
                          max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                          progress=False if args.no_progress else None)
    write_predictions(predictions, args.output, args.format)
    return 0


def _train(args) -> int:
    from balora.runs import train_run

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's saved config; do not pass a config or overrides")
        result = train_run(None, resume=args.resume, progress=not args.no_progress)
    else:
        if args.config and "=" in args.config:  # only overrides were given
            args.overrides.insert(0, args.config)
            args.config = None
        config = load_config(args.config, args.overrides)
        result = train_run(config, progress=not args.no_progress)
    m = result.metrics
    print(f"\nrun directory: {result.run_dir}")
    headline = m.get("headline_metric")
    shown = [k for k in (headline, "accuracy", "macro_f1", "pearson", "spearman") if k and k in m]
    print("  ".join(f"{k}={m[k]:.4f}" for k in dict.fromkeys(shown)))
    return 0


def _demo(args) -> int:
    from balora.demo import format_math_table, format_table, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows, demo_dir = run_demo(args.output_dir, methods, args.overrides, progress=not args.no_progress, task=args.task)
    print("\n" + (format_math_table(rows) if args.task == "math" else format_table(rows)))
    print(f"\nfigure: {demo_dir / 'comparison.png'}\nresults: {demo_dir / 'summary.json'}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; ``balora predict``'s texts may also follow its options."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "predict" and not any(e.startswith("-") and e != "-" for e in extra):
        args.texts += extra  # argparse stops filling TEXT ... at the first option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("balora").setLevel(logging.INFO)
    try:
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "config":
            print(describe_config(args.section))
            return 0
        if args.command == "predict":
            return _predict(args)
        return _train(args) if args.command == "train" else _demo(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"balora: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("balora: interrupted; resume a run with `balora train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
