"""PiSSA vs BA-LoRA training cost on MiniLM-L6 + Reuters R8, measured side by side in one run.

Time: the modes take turns, step by step, on the SAME batches in one process (so machine noise
hits them alike); the median step time of each mode is reported with its ratio to PiSSA.
Memory: each mode runs the same steps in a fresh subprocess; its peak RSS is reported with the
ratio to PiSSA's.

Modes
  pissa          plain PiSSA (BALoRATrainer without regularisers: the same code path)
  balora         PiSSA + the three regularisers, teacher forward every step
  balora-cache   as balora, with the teacher feature cache warm (epoch >= 2: the teacher's
                 pooled features are reused and only the shared head runs)

    python benchmarks/bench_classification.py [--steps 20] [--batch-size 16] [--max-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rss import peak_rss_during

MODES = ("pissa", "balora", "balora-cache")


def build(mode: str, args):
    """(trainer, batches) for one mode; every mode gets identical weights and batches."""
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from balora.adapters import apply_method
    from balora.config import AdapterConfig, RegularizerConfig
    from balora.models import load_sequence_classifier, load_tokenizer
    from balora.objectives import ClassificationObjective
    from balora.data import encode, load_task
    from balora.teacher import SnapshotTeacher
    from balora.trainer import BALoRATrainer

    import datasets
    import logging

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("balora").setLevel(logging.ERROR)
    torch.manual_seed(0)
    task = load_task("reuters-r8", max_train_examples=args.batch_size * args.batches, seed=0)
    tokenizer = load_tokenizer("minilm")
    data = encode(task.train, tokenizer, args.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    batches = [collate([data[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
               for b in range(args.batches)]
    model = load_sequence_classifier("minilm", task.num_labels, task.label_names)
    method = "pissa" if mode == "pissa" else "balora"
    model = apply_method(model, AdapterConfig(method=method, rank=args.rank, alpha=args.rank,
                                              target_modules=["query", "key", "value", "dense"]))
    objective = ClassificationObjective(None if mode == "pissa" else RegularizerConfig(), task.num_labels,
                                        teacher_cache=(mode == "balora-cache"))
    trainer = BALoRATrainer(
        model=model,
        args=TrainingArguments(output_dir=tempfile.mkdtemp(prefix="balora-bench-"), report_to=[], use_cpu=True,
                               learning_rate=1e-3, max_steps=10_000, disable_tqdm=True),
        objective=objective, teacher=SnapshotTeacher(model) if mode != "pissa" else None,
    )
    trainer.create_optimizer()
    trainer.state.max_steps = 10_000
    model.train()
    if mode == "balora-cache":  # epoch 1 fills the cache (not timed)
        for batch in batches:
            trainer.compute_loss(model, dict(batch))
    return trainer, batches


def step(trainer, batch) -> float:
    """One optimiser step through BALoRATrainer.compute_loss; returns seconds."""
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class PartTimer:
    """Replaces ``owner.name`` by a wrapper that adds up the seconds spent in it while ``on``
    (benchmark instrumentation only)."""

    def __init__(self, owner, name):
        self.owner, self.name, self.fn = owner, name, getattr(owner, name)
        self.seconds, self.on = 0.0, False
        setattr(owner, name, self)

    def __call__(self, *a, **k):
        if not self.on:
            return self.fn(*a, **k)
        start = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - start


def time_side_by_side(args) -> dict[str, list[float]]:
    from balora.regularizers import formulas

    built = {mode: build(mode, args) for mode in MODES}
    teacher_timer = PartTimer(built["balora"][0].objective.teacher, "logits")
    formula_timers = [PartTimer(formulas, name) for name in ("consistency_loss", "covariance_diversity_loss", "svd_loss")]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.steps):
        for mode in MODES:
            trainer, batches = built[mode]
            for timer in (teacher_timer, *formula_timers):  # the parts of balora's step only
                timer.on = mode == "balora" and i >= args.warmup
            seconds = step(trainer, batches[i % len(batches)])
            if i >= args.warmup:
                times[mode].append(seconds)
    n = args.steps
    parts = {"teacher forward (inside the step)": teacher_timer.seconds / n,
             "regulariser math (inside the step)": sum(t.seconds for t in formula_timers) / n}
    return times, parts


def memory_child(mode: str, args) -> None:
    """Peak RSS of the whole process, and the peak during training above the RSS before it
    (sampled every millisecond by a thread: loading the model can set the process peak)."""
    trainer, batches = build(mode, args)
    step(trainer, batches[0])  # optimizer state and first-step allocations exist from here on
    def train():
        for i in range(args.steps):
            step(trainer, batches[i % len(batches)])

    before, peak = peak_rss_during(train)
    teacher = trainer.objective.teacher
    snapshot = teacher.nbytes if teacher is not None else 0
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "training_peak_bytes": peak, "training_rise_bytes": peak - before,
                      "teacher_snapshot_bytes": snapshot}))


def measure_memory(args) -> dict[str, dict]:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-child", mode, "--steps", str(args.memory_steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--batches", str(args.batches), "--rank", str(args.rank)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    import peft
    import transformers

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"setup: MiniLM-L6, Reuters R8, batch {args.batch_size} x {args.max_length} tokens, rank {args.rank} on "
          f"query/key/value/dense, {args.steps} timed steps per mode (after {args.warmup} warm-up), interleaved\n")
    times, parts = time_side_by_side(args)
    base = statistics.median(times["pissa"])
    print(f"{'time':<38}{'median step (s)':>16}{'ratio to pissa':>16}")
    for mode, values in times.items():
        med = statistics.median(values)
        print(f"{mode:<38}{med:>16.3f}{med / base:>16.3f}")
    print("balora step, by part (mean s/step):")
    for part, seconds in parts.items():
        print(f"  {part:<36}{seconds:>16.3f}{seconds / base:>16.3f}")
    memory = measure_memory(args)
    mb = 2**20
    b = memory["pissa"]
    print(f"\n{'memory':<16}{'process peak (MB)':>18}{'ratio':>8}{'training peak (MB)':>20}{'ratio':>8}"
          f"{'rise in training (MB)':>23}{'teacher (MB)':>14}")
    for mode, m in memory.items():
        print(f"{mode:<16}{m['maxrss_kb'] / 1024:>18.1f}{m['maxrss_kb'] / b['maxrss_kb']:>8.3f}"
              f"{m['training_peak_bytes'] / mb:>20.1f}{m['training_peak_bytes'] / b['training_peak_bytes']:>8.3f}"
              f"{m['training_rise_bytes'] / mb:>23.1f}{m['teacher_snapshot_bytes'] / mb:>14.2f}")


if __name__ == "__main__":
    main()
