"""BA-LoRA with TRL's ``SFTTrainer`` (causal LM, prompt/completion data, completion-only loss).

``balora.ObjectiveMixin`` gives any ``transformers.Trainer`` subclass the BA-LoRA loss and its
logs; TRL keeps its data handling (chat template, tokenisation, completion-only labels)::

    python examples/trl_sft_trainer.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import balora

PAIRS = [  # your own prompt/completion data goes here (any format SFTTrainer reads)
    ("What is 7 + 5?", "7 + 5 = 12. The answer is 12."),
    ("What is 9 - 4?", "9 - 4 = 5. The answer is 5."),
    ("What is 6 * 3?", "6 * 3 = 18. The answer is 18."),
    ("What is 20 / 4?", "20 / 4 = 5. The answer is 5."),
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7. The answer is 7."),
    ("A box holds 8 pens. How many pens are in 2 boxes?", "8 * 2 = 16. The answer is 16."),
]


class BALoRASFTTrainer(balora.ObjectiveMixin, SFTTrainer):
    """TRL's SFTTrainer trained with a balora objective (task loss + the three regularisers)."""


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="BA-LoRA with TRL's SFTTrainer")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local directory")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="balora-sft")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": answer}]}
        for question, answer in PAIRS
    ])

    method = "balora"  # PiSSA init; target_modules=None is PEFT's default for the architecture
    model = balora.apply_method(model, balora.AdapterConfig(method=method, rank=8))
    balora.save_initial_adapter(model, method, args.output_dir)  # lets the final adapter load on the original model
    # Constant schedules: λ2 and λ3 are on from the first step (the paper's generation defaults
    # are a cosine λ1 and a two-phase λ2/λ3 that stays off for the first 20% of the steps).
    regularizers = balora.RegularizerConfig(consistency_schedule="constant", focus_schedule="constant")
    objective = balora.GenerationObjective(regularizers, teacher=balora.SnapshotTeacher(model))

    sft_args = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
        learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none",
        completion_only_loss=True,  # labels are -100 on the prompt: the objective's valid tokens
        max_length=256,  # packing/padding_free stay off: the objective reads input_ids + attention_mask
        bf16=torch.cuda.is_available(),  # TRL's default is bf16, which a CPU-only machine refuses
    )
    trainer = BALoRASFTTrainer(model=model, args=sft_args, train_dataset=data,
                               processing_class=tokenizer, objective=objective)
    trainer.train()  # logs task_loss, reg_consistency, reg_diversity, reg_svd and each lambda_*
    balora.save_final(model, method, Path(args.output_dir) / "adapter", args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
