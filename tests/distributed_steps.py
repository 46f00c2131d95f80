"""One optimiser step of BALoRATrainer per requested run, on 1 or N processes (launched by torchrun).

Used by tests/test_distributed.py: ``python -m torch.distributed.run --nproc_per_node N
tests/distributed_steps.py --out OUT --bert DIR --llama DIR --runs JSON``. Each run of ``--runs``
(``name``, ``family``, ``batch_size``, ``accumulation``, ``terms``: all | token, ``global_batch``)
trains a fresh tiny model (PiSSA init, the adapter moved off its init by a seeded amount so the
consistency term is not zero) for one SGD step on the same 8 examples, read in order: with N
processes and batch B, rank r gets examples [r·B, (r+1)·B). Rank 0 saves each run's logged loss
and adapter update to OUT (torch.save).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from balora.adapters import apply_method  # noqa: E402
from balora.config import AdapterConfig, RegularizerConfig  # noqa: E402
from balora.data.sft import SFTCollator  # noqa: E402
from balora.distributed import is_main_process  # noqa: E402
from balora.objectives import ClassificationObjective, GenerationObjective  # noqa: E402
from balora.teacher import SnapshotTeacher  # noqa: E402
from balora.trainer import BALoRATrainer  # noqa: E402

N_EXAMPLES = 8


def classification_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(N_EXAMPLES):
        length = 5 + (3 * i) % 4
        rows["input_ids"].append(torch.randint(1000, 1100, (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(i % 3)
    return Dataset.from_dict(rows)


def generation_data() -> Dataset:
    """Prompts of 3-5 tokens; responses of 2-3 tokens in the first half, 7-9 in the second, so the
    halves' valid-token counts differ and a per-half mean is not the global mean."""
    g = torch.Generator().manual_seed(1)
    rows = {"input_ids": [], "labels": []}
    for i in range(N_EXAMPLES):
        prompt, response = 3 + i % 3, (2 + i % 2) if i < N_EXAMPLES // 2 else (7 + i % 3)
        ids = torch.randint(100, 4000, (prompt + response,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(rows)


def regularizers(run: dict) -> RegularizerConfig:
    batch_level = 0.5 if run["terms"] == "all" else 0.0
    diversity = 0.5 if run["family"] == "generation" or run["terms"] == "all" else 0.0  # token-level in generation
    return RegularizerConfig(
        lambda_consistency=2.0, lambda_diversity=diversity, lambda_svd=batch_level, svd_k=2,
        consistency_schedule="constant", focus_schedule="constant", global_batch=run["global_batch"],
    )


def one_step(run: dict, bert: str, llama: str, out_dir: str) -> dict:
    torch.manual_seed(0)
    if run["family"] == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        targets, data = ["query", "value"], classification_data()
        objective = ClassificationObjective(regularizers(run), 3)
        collator = DataCollatorWithPadding(AutoTokenizer.from_pretrained(bert))
    else:
        model = AutoModelForCausalLM.from_pretrained(llama)
        targets, data = ["q_proj", "v_proj"], generation_data()
        objective = GenerationObjective(regularizers(run))
        collator = SFTCollator(AutoTokenizer.from_pretrained(llama).pad_token_id)
    model = apply_method(model, AdapterConfig(method="balora", rank=4, target_modules=targets))
    teacher = SnapshotTeacher(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # off the init, the same on every process
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, run["name"]), max_steps=1, per_device_train_batch_size=run["batch_size"],
        gradient_accumulation_steps=run["accumulation"], learning_rate=0.1, optim="sgd", max_grad_norm=0.0,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, use_cpu=True, seed=0,
    )
    trainer = BALoRATrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                            objective=objective, teacher=teacher)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    update = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss, "update": update, "processes": trainer.accelerator.num_processes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--bert", required=True)
    parser.add_argument("--llama", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {run["name"]: one_step(run, args.bert, args.llama, os.path.dirname(args.out))
               for run in json.loads(args.runs)}
    if is_main_process():
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
