"""Command line: ``balora train CONFIG.yaml [key=value ...]``, ``balora demo``, ``balora evaluate``,
``balora predict RUN_OR_ADAPTER [TEXT ...]``, ``balora experiment run|report SPEC``,
``balora calibrate CONFIG``, ``balora merge ADAPTER... --out DIR`` and ``balora config [SECTION]``.

A thin layer over balora.runs, balora.demo, balora.evaluation, balora.predict, balora.experiments,
balora.merging and balora.config. User mistakes
(a bad config value, a missing file, an asset that is not installed) end in one clear line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from balora.assets import AssetNotInstalled
from balora.config import SECTIONS, ConfigError, describe_config, load_config
from balora.distributed import is_main_process
from balora.evaluation.cli import add_evaluate_parser, run_evaluate
from balora.experiments.store import StoreError
from balora.models import ModelLoadError
from balora.predict import FORMATS, check_output, predict, write_predictions

USER_ERRORS = (ConfigError, AssetNotInstalled, ModelLoadError, FileNotFoundError, FileExistsError, ValueError,
               ConnectionError, StoreError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning and comparisons.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run into a new run directory")
    train.add_argument("config", nargs="?", help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapter.method=pissa train.epochs=2")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--num-processes", type=int, default=1, metavar="N",
                       help="train on N processes (DDP; one per GPU, or gloo on CPU) through accelerate launch")
    train.add_argument("--accelerate-config", metavar="FILE",
                       help="an accelerate config (e.g. configs/accelerate/deepspeed-zero2.yaml) for the launch")

    demo = sub.add_parser("demo", help="LoRA vs PiSSA vs BA-LoRA, offline: Reuters R8 with MiniLM, or math with SmolLM2")
    demo.add_argument("--task", choices=("reuters", "math"), default="reuters",
                      help="reuters: MiniLM on Reuters R8 (classification); math: SmolLM2-135M on GSM8K-style problems")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument("--methods", default="lora,pissa,balora", help="comma-separated methods")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the shared config, e.g. train.max_steps=400")
    demo.add_argument("--no-progress", action="store_true")

    add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_experiment_parser(sub)
    _add_calibrate_parser(sub)
    _add_merge_parser(sub)
    _add_teacher_parser(sub)

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


def _config_of(args):
    """The run config of a command's ``config`` and ``overrides`` (a first argument with ``=`` is an override)."""
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    return load_config(args.config, args.overrides)


def _add_calibrate_parser(sub) -> None:
    from balora.calibrate import CALIBRATION_MODES, DEFAULT_TARGET_SHARE

    parser = sub.add_parser(
        "calibrate", help="propose λ1-3 from the gradient share of each regulariser (paper D.1)",
        description="Measure, on a few training batches of the run's own model and data, the gradient norm "
                    "of each regulariser relative to the task loss's, and propose λs that give the "
                    "regularisers the chosen share. Nothing is written; use the proposal in the config, or "
                    "set regularizers.lambdas=auto to calibrate at the start of a run.")
    parser.add_argument("config", nargs="?", help="YAML run config of a +reg method (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--mode", choices=CALIBRATION_MODES, default="scale",
                        help="scale: one factor on the configured λs (keeps their ratios); shares: one λ per term")
    parser.add_argument("--target-share", type=float, default=DEFAULT_TARGET_SHARE, metavar="RHO",
                        help=f"regularisers' gradient norm / task loss's (default {DEFAULT_TARGET_SHARE})")
    parser.add_argument("--terms", nargs="+", choices=("consistency", "diversity", "svd"), metavar="TERM",
                        help="calibrate only these terms (consistency, diversity, svd); the others keep their λ "
                             "(default: every term with λ > 0)")
    parser.add_argument("--batches", type=int, default=4, metavar="N", help="measured batches (default 4)")
    parser.add_argument("--drift-steps", type=int, default=10, metavar="N",
                        help="task-only steps first, undone afterwards (default 10; at step 0 the consistency "
                             "term has no gradient)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _calibrate(args) -> int:
    import json

    from balora.calibrate import calibrate_run

    config = _config_of(args)
    result = calibrate_run(config, batches=args.batches, drift_steps=args.drift_steps, mode=args.mode,
                           target_share=args.target_share, terms=args.terms)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"\ngradient shares on {result.batches} batches after {result.drift_steps} task-only steps "
          f"(mode {result.mode}, target share {result.target_share:g}):\n")
    print(result.table())
    print("\nset: " + " ".join(f"regularizers.lambda_{t}={v:.4g}" for t, v in result.proposed.items()))
    return 0


def _add_teacher_parser(sub) -> None:
    parser = sub.add_parser("teacher", help="precompute the sparse teacher of a generation run")
    actions = parser.add_subparsers(dest="teacher_command", required=True)
    precompute = actions.add_parser(
        "precompute", help="run the frozen teacher once over the training set and store its top-K",
        description="Run the pre-trained model of a generation config once over the run's training set and "
                    "store, per response token, the top-K log-probabilities at regularizers.temperature, their "
                    "token ids and the log of the remaining mass. Train with regularizers.teacher=precomputed "
                    "regularizers.teacher_path=DIR (no teacher forward). An interrupted precompute resumes.")
    precompute.add_argument("config", nargs="?", help="YAML run config (family: generation)")
    precompute.add_argument("overrides", nargs="*", help="key=value overrides (the run's own: same data and seed)")
    precompute.add_argument("--output", required=True, metavar="DIR", help="the store's directory (new)")
    precompute.add_argument("--top-k", type=int, default=64, metavar="K", help="teacher tokens kept per position (64)")
    precompute.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per forward (8)")
    precompute.add_argument("--no-progress", action="store_true")


def _teacher(args) -> int:
    from balora.precomputed_teacher import PrecomputedTeacher, precompute_teacher

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    config = _config_of(args)
    out = precompute_teacher(config, args.output, top_k=args.top_k, batch_size=args.batch_size,
                             progress=not args.no_progress)
    store = PrecomputedTeacher(out)
    tokens = store.meta["tokens"]
    print(f"\nprecomputed teacher: {out}\n{tokens} tokens of {store.meta['examples']} examples, top-{store.top_k} at "
          f"T={store.temperature:g}, {store.nbytes / 1e6:.1f} MB ({store.nbytes / max(tokens, 1):.0f} bytes per token)")
    print(f"train with: regularizers.teacher=precomputed regularizers.teacher_path={out}")
    return 0


def _add_merge_parser(sub) -> None:
    from balora.merging import MERGE_FUNCTIONS, METHODS, RETAIN_BY

    parser = sub.add_parser(
        "merge", help="merge task adapters into one (I-LoRA iterative merging, or a PEFT baseline)",
        description="Merge LoRA adapters trained on one base model (run directories of `balora train` or PEFT "
                    "adapter directories). iterative (I-LoRA): every update ΔW = s·B·A keeps a proportion ρ of its "
                    "singular values, the truncated updates are merged pairwise (max: element by element the entry "
                    "of larger magnitude), and the merge is refactored into a LoRA adapter by SVD. Classifiers give "
                    "one adapter per task, DIR/<task> (the merged backbone with that task's own head); a causal LM "
                    "gives DIR. DIR/merge.json records the inputs, the options and the rank of every layer.",
        epilog="Example: `balora merge runs/<run-a> runs/<run-b> --retain 0.8 --out merged`, then "
               "`balora predict merged/<task-a> TEXT`.",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER",
                        help="run directory or PEFT adapter directory (2 or more)")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder; never overwritten")
    parser.add_argument("--method", choices=METHODS, default="iterative",
                        help="iterative (I-LoRA, default) or a PEFT add_weighted_adapter baseline")
    parser.add_argument("--retain", type=float, metavar="RHO",
                        help="iterative: proportion of singular values kept, in (0, 1] (default 0.8)")
    parser.add_argument("--retain-by", choices=RETAIN_BY,
                        help="iterative: rank (keep ceil(RHO x rank) components, default) or energy (the fewest "
                             "components holding RHO of the squared singular values)")
    parser.add_argument("--merge-fn", choices=MERGE_FUNCTIONS,
                        help="iterative: max (entry of larger magnitude, default), mean (over the adapters) or sum")
    parser.add_argument("--rank", type=int, metavar="R",
                        help="iterative: merged rank of every layer (default the sum of the truncated ranks, at "
                             "most min(out, in)); svd: the output rank (default the largest input rank)")
    parser.add_argument("--density", type=float, metavar="D",
                        help="ties, dare_ties (required): fraction of entries kept, in (0, 1]")
    parser.add_argument("--weight", type=float, metavar="W", help="PEFT methods: every adapter's weight (default 1.0)")
    parser.add_argument("--seed", type=int, metavar="N", help="dare_ties: seed of the random drop (default 0)")


def _merge(args) -> int:
    from balora.merging import MERGE_FILE, merge_adapters

    result = merge_adapters(args.adapters, args.out, method=args.method, retain=args.retain, retain_by=args.retain_by,
                            merge_fn=args.merge_fn, rank=args.rank, density=args.density, weight=args.weight,
                            seed=args.seed)
    print(f"merged {len(args.adapters)} adapters ({args.method}) into {result.out_dir}")
    if any(folder != result.out_dir for folder in result.adapters.values()):
        for task, folder in result.adapters.items():
            print(f"  {task}: {folder}")
    print(f"record: {result.out_dir / MERGE_FILE}")
    return 0


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


def _add_experiment_parser(sub) -> None:
    parser = sub.add_parser(
        "experiment", help="run a grid of runs (methods × data × seeds × variants) and report it",
        description="An experiment is a YAML spec: a base run config and the axes that vary around it. `run` "
                    "trains every cell without a finished result into the experiment's store and resumes an "
                    "interrupted grid; `report` writes Markdown and CSV tables and figures from the store.",
        epilog="Example: `balora experiment run configs/experiments/tiny.yaml --dry-run`.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run every cell of a spec without a finished result")
    run.add_argument("spec", metavar="SPEC", help="experiment spec (YAML)")
    run.add_argument("--store", metavar="DIR", help="the experiment's store (default runs/experiments/<name>)")
    run.add_argument("--dry-run", action="store_true", help="print the cells (and their status in the store) and exit")
    run.add_argument("--retry-failed", action="store_true", help="run the failed cells again")
    run.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="how cells run: local (child processes on this machine, --workers at a time) or ray "
                          "(tasks on a Ray cluster; pip install 'balora[ray]')")
    run.add_argument("--workers", type=int, metavar="N",
                     help="local: cells at the same time (default 1: two trainings on 2 cores thrash)")
    run.add_argument("--in-process", action="store_true",
                     help="local: run the cells in this process instead of one child process per cell")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="ray: the cluster (auto, or ray://<head>:10001); default RAY_ADDRESS, else a local Ray")
    run.add_argument("--cpus-per-cell", type=float, metavar="N", help="ray: CPUs each cell's task takes (default 1)")
    run.add_argument("--gpus-per-cell", type=float, metavar="N", help="ray: GPUs each cell's task takes (default 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    report = actions.add_parser("report", help="write the tables, comparisons and figures of an experiment")
    report.add_argument("source", metavar="SPEC_OR_STORE", help="experiment spec (YAML) or store directory")
    report.add_argument("--store", metavar="DIR", help="with a spec: its store (default runs/experiments/<name>)")
    report.add_argument("--output", metavar="DIR", help="where the report goes (default <store>/report)")


def _experiment(args) -> int:
    from balora import experiments

    if args.action == "report":
        path = experiments.write_report(*experiments.open_experiment(args.source, args.store), out_dir=args.output)
        print(f"report: {path}")
        return 0
    spec = experiments.load_spec(args.spec)
    if args.dry_run:
        print(experiments.describe_plan(spec, args.store))
        return 0
    if args.executor == "local":
        wrong = [flag for flag, value in (("--ray-address", args.ray_address), ("--cpus-per-cell", args.cpus_per_cell),
                                          ("--gpus-per-cell", args.gpus_per_cell)) if value is not None]
        options = {"workers": args.workers}
    else:
        wrong = [flag for flag, value in (("--workers", args.workers), ("--in-process", args.in_process or None))
                 if value is not None]
        options = {"address": args.ray_address, "cpus_per_cell": args.cpus_per_cell,
                   "gpus_per_cell": args.gpus_per_cell}
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to --executor {args.executor}")
    summary = experiments.run_experiment(spec, args.store, retry_failed=args.retry_failed, executor=args.executor,
                                         in_process=args.in_process, progress=not args.no_progress, **options)
    print(f"\n{len(summary.finished)} cell(s) finished now, {len(summary.kept)} finished before, "
          f"{len(summary.failed)} failed; store: {summary.store}")
    if summary.waiting:
        print(f"no candidate of the selection finished for: {', '.join(summary.waiting)}")
    if summary.failed:
        print(f"failed: {', '.join(summary.failed)} (errors in {summary.store / 'cells'}; "
              "run again with --retry-failed)")
    merges = summary.merges
    if merges is not None:
        print(f"merge stage: {merges.finished} job(s) finished now, {merges.kept} finished before, "
              f"{len(merges.failed)} failed, {len(merges.waiting)} waiting for unfinished cells")
        if merges.failed:
            print(f"failed merges: {', '.join(merges.failed)} (errors in {summary.store / 'merges'}; "
                  "run again with --retry-failed)")
    print(f"report: balora experiment report {summary.store}")
    merge_trouble = merges is not None and bool(merges.failed or merges.waiting)
    return 1 if summary.failed or summary.waiting or merge_trouble else 0


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

    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 or args.accelerate_config:
        return _launch_train(args)
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's saved config; do not pass a config or overrides")
        result = train_run(None, resume=args.resume, progress=not args.no_progress)
    else:
        config = _config_of(args)
        result = train_run(config, progress=not args.no_progress)
    if not is_main_process():  # the other processes of a launched run print nothing
        return 0
    m = result.metrics
    print(f"\nrun directory: {result.run_dir}")
    headline = m.get("headline_metric")
    shown = [k for k in (headline, "accuracy", "macro_f1", "pearson", "spearman") if k and k in m]
    print("  ".join(f"{k}={m[k]:.4f}" for k in dict.fromkeys(shown)))
    return 0


def _launch_train(args) -> int:
    """``balora train --num-processes N``: the same command on N processes through ``accelerate launch``.

    The config is checked here first (a one-line error, before any process starts). Without
    ``--accelerate-config`` the launch is DDP on this machine (``--multi_gpu``, which is gloo
    without GPUs) on a free port; with it, the file decides and ``--num-processes`` overrides it.
    """
    from balora.distributed import launched_world_size
    from balora.runs import check_before_loading

    if launched_world_size() > 1:
        raise ConfigError("--num-processes/--accelerate-config: this process was started by a launcher already "
                          "(WORLD_SIZE is set); run `balora train` without them")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise ConfigError(f"--accelerate-config: no such file: {args.accelerate_config}")
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's saved config; do not pass a config or overrides")
        from balora.runs import resume_config

        resume_config(args.resume)
    else:
        check_before_loading(_config_of(args), progress=False)
    launch = ["--num_processes", str(args.num_processes)]
    if args.accelerate_config:
        launch += ["--config_file", args.accelerate_config]
    else:
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port())]
    command = [*launch, "-m", "balora", *(["--debug"] if args.debug else []), "train",
               *([args.config] if args.config else []), *args.overrides,
               *(["--resume", args.resume] if args.resume else []), *(["--no-progress"] if args.no_progress else [])]
    os.environ.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // args.num_processes, 1)))
    return _accelerate_launch(command)


def _accelerate_launch(argv: list[str]) -> int:
    """``accelerate launch ARGV`` in this process; a failed process gives its exit code, not the
    launcher's traceback (the processes have printed their own one-line errors)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its SIGTERM / failure lines
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as err:
        return max((f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0), default=1)
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        if args.command == "experiment":
            return _experiment(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "teacher":
            return _teacher(args)
        if args.command == "merge":
            return _merge(args)
        return _train(args) if args.command == "train" else _demo(args)
    except BrokenPipeError:  # the reader of stdout went away (`balora ... | head`): stop quietly
        try:  # Python would report the failed flush of stdout at exit otherwise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor
            pass
        return 1
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"balora: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("run the same command again to resume the grid" if args.command == "experiment"
                else "resume a run with `balora train --resume RUN_DIR`")
        print(f"balora: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
