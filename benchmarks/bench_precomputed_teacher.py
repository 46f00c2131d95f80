"""The precomputed sparse teacher against the exact snapshot teacher, on SmolLM2-135M and real GSM-Symbolic batches.

1. Stores: ``precompute_teacher`` over the first N training examples of the GSM-Symbolic config for
   every K; their size per million valid tokens.
2. Error: a PiSSA adapter (rank 16, all seven projections) drifts for a few AdamW steps on the task
   loss, so the student differs from the teacher; then, on each real batch, the consistency term
   (eq. 9, T = 2) and its gradient on the adapter are computed with the exact teacher and with each
   store: the relative error of the value, ‖g_K − g‖ / ‖g‖ and the cosine between the gradients.
3. Step time, side by side in one interleaved loop on the same batches (forward, backward, AdamW):
   pissa (cross-entropy only, the same objective code), the consistency term with the exact teacher,
   with the store of K = 64, and the full BA-LoRA objective (all three terms) with each teacher.

    python benchmarks/bench_precomputed_teacher.py [--examples 32] [--batch-size 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gsm-symbolic-smollm2-balora.yaml"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_config(args, *extra):
    from balora.config import load_config

    return load_config(str(CONFIG), [f"data.max_train_examples={args.examples}", f"model.max_length={args.length}",
                                     f"train.batch_size={args.batch_size}", "output_dir=/tmp/unused", *extra])


def load_batches(args):
    from balora.runs_generation import GenerationRun

    family = GenerationRun(run_config(args), progress=False)
    model, _ = family.load()
    rows = family.train_set
    batches = [family.collator([rows[j] for j in range(i, min(i + args.batch_size, len(rows)))])
               for i in range(0, len(rows), args.batch_size)]
    return model, batches


def adapted(model):
    from peft import TaskType

    from balora.adapters import apply_method
    from balora.config import AdapterConfig

    torch.manual_seed(0)
    return apply_method(copy.deepcopy(model), AdapterConfig(method="pissa", rank=16, alpha=16, target_modules=PROJ),
                        TaskType.CAUSAL_LM)


def drift(model, batches, steps: int, lr: float) -> None:
    """A few AdamW steps on the task loss: the student moves off the teacher."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        batch = batches[i % len(batches)]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def consistency_and_gradient(model, batch, *, teacher=None, store=None):
    """(eq. 9 averaged over the M valid tokens, its gradient on the adapter as one flat vector)."""
    from balora.objectives.generation import final_hidden_states, teacher_hidden_states, valid_targets
    from balora.regularizers.tokens import LinearHead, head_objective

    targets = valid_targets(batch)
    valid = targets != -100
    m = int(valid.sum())
    hidden, _ = final_hidden_states(model, batch)
    head = LinearHead.from_module(model.get_output_embeddings())
    kwargs = {}
    if store is not None:
        kwargs["teacher_topk"] = store.rows(batch["example_id"], valid.sum(1))
    else:
        with teacher.active(model) as pretrained:
            kwargs["teacher_hidden"] = teacher_hidden_states(pretrained, batch)[valid]
    loss, sums = head_objective(hidden[valid], targets[valid], head, weights=(0.0, 1.0 / m, 0.0), temperature=2.0,
                                chunk_size=512, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return sums.consistency / m, torch.cat([g.reshape(-1) for g in grads])


class Mode:
    def __init__(self, name, base, regularizers, teacher_kind, store_path=None):
        from balora.config import RegularizerConfig
        from balora.objectives.generation import GenerationObjective
        from balora.teacher import SnapshotTeacher

        self.name = name
        self.model = copy.deepcopy(base)  # the same PiSSA-initialised model for every mode
        self.model.train()
        config = None
        if regularizers is not None:
            extra = {"teacher": "precomputed", "teacher_path": str(store_path)} if teacher_kind == "precomputed" else {}
            config = RegularizerConfig(**regularizers, consistency_schedule="constant", focus_schedule="constant",
                                       **extra)
        self.objective = GenerationObjective(config, chunk_size=512)
        if self.objective.needs_teacher:
            self.objective.teacher = SnapshotTeacher(self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, batch) -> float:
        start = time.perf_counter()
        self.objective(self.model, batch)[0].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ks", default="16,64,256")
    parser.add_argument("--drift-steps", type=int, default=6)
    parser.add_argument("--drift-lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--skip-error", action="store_true", help="stores and step times only")
    args = parser.parse_args()
    import transformers

    from balora.precomputed_teacher import PrecomputedTeacher, precompute_teacher

    transformers.logging.set_verbosity_error()
    logging.getLogger("balora").setLevel(logging.ERROR)
    torch.manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}")
    base, batches = load_batches(args)
    from balora.objectives.generation import GenerationObjective

    tokens = sum(GenerationObjective.count_items(b) for b in batches)
    print(f"# data: {args.examples} GSM-Symbolic training examples, {len(batches)} batches of {args.batch_size}, "
          f"max {args.length} tokens, {tokens} valid tokens")

    with tempfile.TemporaryDirectory() as folder:
        stores = {}
        print("\n## stores\n\n| K | precompute s | MB | bytes per valid token (= MB per million tokens) |\n|---|---|---|---|")
        for k in ks:
            start = time.perf_counter()
            path = precompute_teacher(run_config(args), Path(folder) / f"k{k}", top_k=k, batch_size=args.batch_size,
                                      progress=False)
            seconds = time.perf_counter() - start
            stores[k] = store = PrecomputedTeacher(path)
            per_token = store.nbytes / store.meta["tokens"]
            print(f"| {k} | {seconds:.1f} | {store.nbytes / 1e6:.2f} | {per_token:.0f} |")

        if not args.skip_error:
            error_table(base, batches, stores, ks, args)
        time_table(base, batches, stores, ks, args)


def error_table(base, batches, stores, ks, args) -> None:
    from balora.objectives.generation import valid_targets
    from balora.teacher import SnapshotTeacher

    model = adapted(base)
    teacher = SnapshotTeacher(model)
    drift(model, batches, args.drift_steps, args.drift_lr)
    print(f"\n## error against the exact teacher (after {args.drift_steps} AdamW steps at lr {args.drift_lr:g} "
          "on the task loss; per batch, then mean [min, max])\n")
    print("| K | consistency (exact) | relative error of the value | ‖g_K − g‖/‖g‖ | cos(g_K, g) | teacher mass in top-K |")
    print("|---|---|---|---|---|---|")
    exact = [consistency_and_gradient(model, b, teacher=teacher) for b in batches]
    for k in ks:
        value_err, grad_err, cosines, masses = [], [], [], []
        for batch, (value, grad) in zip(batches, exact):
            approx, g = consistency_and_gradient(model, batch, store=stores[k])
            value_err.append(abs(approx - value) / value)
            grad_err.append(float((g - grad).norm() / grad.norm()))
            cosines.append(float(torch.nn.functional.cosine_similarity(g, grad, dim=0)))
            rows = stores[k].rows(batch["example_id"], (valid_targets(batch) != -100).sum(1))
            masses.append(float(rows.logprobs.float().exp().sum(-1).mean()))
        fmt = lambda xs, f=".3g": f"{statistics.mean(xs):{f}} [{min(xs):{f}}, {max(xs):{f}}]"  # noqa: E731
        print(f"| {k} | {fmt([v for v, _ in exact])} | {fmt(value_err)} | {fmt(grad_err)} | {fmt(cosines, '.5f')} | "
              f"{fmt(masses, '.4f')} |")


def time_table(base, batches, stores, ks, args) -> None:
    kl_only = dict(lambda_consistency=0.025, lambda_diversity=0.0, lambda_svd=0.0)
    full = dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005)
    k_time = 64 if 64 in stores else ks[0]
    base = adapted(base)
    modes = [Mode("pissa (cross-entropy only)", base, None, None),
             Mode("consistency, exact teacher", base, kl_only, "exact"),
             Mode(f"consistency, precomputed K={k_time}", base, kl_only, "precomputed", stores[k_time].path),
             Mode("BA-LoRA (3 terms), exact teacher", base, full, "exact"),
             Mode(f"BA-LoRA (3 terms), precomputed K={k_time}", base, full, "precomputed", stores[k_time].path)]
    times = {m.name: [] for m in modes}
    for i in range(1 + args.steps):
        batch = batches[i % len(batches)]
        for mode in modes:
            seconds = mode.step(batch)
            if i > 0:
                times[mode.name].append(seconds)
    pissa = statistics.mean(times[modes[0].name])
    print(f"\n## step time ({args.steps} steps per mode, interleaved, after one warm-up)\n")
    print("| mode | s per step | × pissa | × the same objective with the exact teacher |\n|---|---|---|---|")
    for j, mode in enumerate(modes):
        mean = statistics.mean(times[mode.name])
        vs_exact = "" if j in (0, 1, 3) else f"{mean / statistics.mean(times[modes[j - 1].name]):.2f}"
        print(f"| {mode.name} | {mean:.2f} | {mean / pissa:.2f} | {vs_exact} |")


if __name__ == "__main__":
    main()
