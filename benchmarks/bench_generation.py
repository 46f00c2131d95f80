"""PiSSA vs BA-LoRA vs the authors' recipe on SmolLM2-135M, measured side by side in one run.

Every mode trains the same PiSSA adapter (rank 16 on all seven projections) on the SAME batches
(B rows of L tokens, the first half of each row a masked prompt).

Modes
  pissa      plain PEFT PiSSA: ``model(**batch).loss`` (transformers' cross-entropy on all logits)
  balora     balora's GenerationObjective: CE + eq. 9 + eq. 10-11 + eq. 12, teacher = snapshot swap,
             output head on valid tokens only (chunked, fused gradient), exact SVD via QR of the head
  authors    the authors' recipe: a full second model as teacher, full B×T×|V| logits for student
             and teacher, exact SVD of the M×|V| valid-token logits (kept in this benchmark only)

Parts (timed in the same interleaved loop)
  teacher forward   one plain forward of the frozen model (no grad, all logits): the unavoidable
                    extra of any method with a consistency term; target: balora <= 1.1 x (pissa + this)
  balora, by part   student forward / teacher forward / head objective / SVD term / backward+step

Memory: each mode runs a few steps in a fresh subprocess; the peak RSS during training is reported
(sampled every millisecond), at L tokens and at 2L tokens per row, so the growth of each method's
extra memory is visible.

    python benchmarks/bench_generation.py [--steps 4] [--batch-size 4] [--length 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rss import peak_rss_during

MODES = ("pissa", "balora", "authors")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAMBDAS = dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005,
               consistency_schedule="constant", focus_schedule="constant")  # every term active


def batches(args, vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (args.batch_size, args.length), generator=g)
        labels = ids.clone()
        labels[:, : args.length // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class Mode:
    """A model + optimiser + the step function of one mode."""

    def __init__(self, name: str, args):
        import logging

        import transformers
        from peft import TaskType

        from balora.adapters import apply_method
        from balora.config import AdapterConfig, RegularizerConfig
        from balora.objectives.generation import GenerationObjective
        from balora.models import load_causal_lm
        from balora.teacher import SnapshotTeacher

        transformers.logging.set_verbosity_error()
        logging.getLogger("balora").setLevel(logging.ERROR)
        torch.manual_seed(0)
        self.name = name
        base, _ = load_causal_lm("smollm2")
        self.original = copy.deepcopy(base).eval() if name == "authors" else None
        for p in (self.original.parameters() if self.original is not None else ()):
            p.requires_grad_(False)
        self.model = apply_method(base, AdapterConfig(method="pissa", rank=args.rank, alpha=args.rank,
                                                      target_modules=PROJ), TaskType.CAUSAL_LM)
        self.model.train()
        self.teacher = SnapshotTeacher(self.model) if name != "pissa" else None
        self.objective = GenerationObjective(RegularizerConfig(**LAMBDAS), teacher=self.teacher,
                                             chunk_size=args.chunk_size)
        self.reg = RegularizerConfig(**LAMBDAS).resolved("generation")
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)

    def loss(self, batch) -> torch.Tensor:
        if self.name == "pissa":
            return self.model(**batch).loss
        if self.name == "balora":
            return self.objective(self.model, batch)[0]
        return self.authors_loss(batch)

    def authors_loss(self, batch) -> torch.Tensor:
        """Full logits for student and teacher; every term from the M×|V| valid-token logits."""
        c = self.reg
        out = self.model(**batch)
        with torch.no_grad():
            t_logits = self.original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = batch["labels"][:, 1:] != -100
        z = out.logits[:, :-1][valid].float()
        zt = t_logits[:, :-1][valid].float()
        kl = F.kl_div(F.log_softmax(z / c.temperature, -1), F.log_softmax(zt / c.temperature, -1),
                      reduction="batchmean", log_target=True) * c.temperature**2
        pk = torch.softmax(z.topk(c.top_k, -1).values, -1)
        neg_ent = (pk * pk.log()).sum(-1).mean()
        sigma = torch.linalg.svdvals(z)
        svd = -sigma[: c.svd_k].sum() / torch.linalg.vector_norm(z)
        return out.loss + c.lambda_consistency * kl + c.lambda_diversity * neg_ent + c.lambda_svd * svd

    def step(self, batch) -> float:
        start = time.perf_counter()
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def teacher_forward(self, batch) -> float:
        """One plain forward of the frozen pre-trained model (all logits), for the target."""
        start = time.perf_counter()
        with self.teacher.active(self.model):
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return time.perf_counter() - start


class PartTimer:
    """Wrap a module-level function and add up the seconds spent in it, split by grad mode."""

    def __init__(self, module, name):
        self.module, self.name, self.fn = module, name, getattr(module, name)
        self.seconds = {True: 0.0, False: 0.0}
        setattr(module, name, self)

    def __call__(self, *a, **k):
        grad = torch.is_grad_enabled()
        start = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds[grad] += time.perf_counter() - start

    def reset(self):
        self.seconds = {True: 0.0, False: 0.0}


def time_side_by_side(args):
    import balora.objectives.generation as go

    modes = {name: Mode(name, args) for name in MODES}
    data = batches(args, modes["pissa"].model.config.vocab_size)
    forward = PartTimer(go, "final_hidden_states")
    teacher_forward = PartTimer(go, "teacher_hidden_states")
    head = PartTimer(go, "head_objective")
    svd = PartTimer(go, "exact_head_svd_loss")
    times = {name: [] for name in (*MODES, "teacher forward")}
    for i in range(args.warmup + args.steps):
        batch = data[i % len(data)]
        for name, mode in modes.items():
            seconds = mode.step(batch)
            if i >= args.warmup:
                times[name].append(seconds)
        seconds = modes["balora"].teacher_forward(batch)
        if i >= args.warmup:
            times["teacher forward"].append(seconds)
        if i == args.warmup - 1:
            for timer in (forward, teacher_forward, head, svd):
                timer.reset()
    n = args.steps
    parts = {
        "student forward (hidden states)": forward.seconds[True] / n,
        "teacher forward (decoder only, hidden states)": teacher_forward.seconds[False] / n,
        "head objective: CE + KL + top-K entropy (fwd, fused grad)": head.seconds[True] / n,
        "SVD term, exact via QR (forward)": svd.seconds[True] / n,
    }
    parts["backward + optimiser step (rest)"] = statistics.mean(times["balora"]) - sum(parts.values())
    return times, parts


def memory_child(name: str, args) -> None:
    mode = Mode(name, args)
    data = batches(args, mode.model.config.vocab_size)
    mode.step(data[0])  # optimiser state exists from here on
    def train():
        for i in range(args.memory_steps):
            mode.step(data[i % len(data)])

    before, peak = peak_rss_during(train)
    print(json.dumps({"training_peak_bytes": peak, "before_bytes": before}))


def measure_memory(args, length: int) -> dict[str, dict]:
    out = {}
    for name in MODES:
        cmd = [sys.executable, __file__, "--memory-child", name, "--memory-steps", str(args.memory_steps),
               "--batch-size", str(args.batch_size), "--length", str(length), "--rank", str(args.rank),
               "--chunk-size", str(args.chunk_size)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"memory child {name} failed:\n{result.stderr[-2000:]}")
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    import peft
    import transformers

    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    print(f"setup: SmolLM2-135M-Instruct, batch {args.batch_size} x {args.length} tokens (half prompt), PiSSA r={args.rank} "
          f"on {len(PROJ)} projections, head chunk {args.chunk_size}, {args.steps} timed steps per mode "
          f"(after {args.warmup} warm-up), interleaved\n")
    if not args.skip_time:
        report_time(args)
    if not args.skip_memory:
        report_memory(args)


def report_time(args) -> None:
    times, parts = time_side_by_side(args)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["pissa"]
    print(f"{'time':<58}{'median (s)':>12}{'/ pissa':>10}")
    for name in (*MODES, "teacher forward"):
        print(f"{name:<58}{med[name]:>12.3f}{med[name] / base:>10.3f}")
    budget = med["pissa"] + med["teacher forward"]
    print(f"\nbalora / (pissa step + teacher forward) = {med['balora'] / budget:.3f}   (target <= 1.1)")
    print(f"balora / authors' recipe                = {med['balora'] / med['authors']:.3f}   (target <= 0.8)")
    print("\nbalora step, by part (mean s/step):")
    for part, seconds in parts.items():
        print(f"  {part:<56}{seconds:>12.3f}{seconds / base:>10.3f}")


def report_memory(args) -> None:
    mb = 2**20
    rows = {}
    for length in (args.length, 2 * args.length):
        rows[length] = measure_memory(args, length)
    print(f"\n{'memory: training peak RSS (MB)':<34}" + "".join(f"{f'{args.batch_size}x{L}':>14}{'/ pissa':>9}" for L in rows))
    for name in MODES:
        line = f"{name:<34}"
        for length, mem in rows.items():
            peak = mem[name]["training_peak_bytes"]
            line += f"{peak / mb:>14.0f}{peak / mem['pissa']['training_peak_bytes']:>9.3f}"
        print(line)
    for name in ("balora", "authors"):
        extra = [(rows[L][name]["training_peak_bytes"] - rows[L]["pissa"]["training_peak_bytes"]) / mb for L in rows]
        print(f"{name} minus pissa (MB): " + " -> ".join(f"{e:.0f}" for e in extra) + "  when tokens per batch double")
    print(f"\nbalora peak / authors peak at {args.batch_size}x{args.length}: "
          f"{rows[args.length]['balora']['training_peak_bytes'] / rows[args.length]['authors']['training_peak_bytes']:.3f}"
          "   (target <= 0.9)")


if __name__ == "__main__":
    main()
