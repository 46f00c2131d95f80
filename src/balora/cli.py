"""Command line: ``balora train CONFIG.yaml [key=value ...]``, ``balora demo``, ``balora evaluate``
and ``balora config [SECTION]``.

A thin layer over balora.runs, balora.demo, balora.evaluation and balora.config. User mistakes
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("balora").setLevel(logging.INFO)
    try:
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "config":
            print(describe_config(args.section))
            return 0
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
