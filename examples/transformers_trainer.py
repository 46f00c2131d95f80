"""BA-LoRA in an existing transformers ``Trainer`` script (sequence classification).

The lines marked ``# BA-LoRA`` are the whole change to a plain fine-tuning script: wrap the
model with the method, build the frozen teacher and the objective, and use
``balora.BALoRATrainer`` where the script had ``transformers.Trainer``::

    python examples/transformers_trainer.py --model google-bert/bert-base-uncased --max-steps 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import balora

LABELS = ["sports", "markets", "weather"]
EXAMPLES = [  # your own labelled data goes here
    ("the team scored a late goal to win the match", "sports"),
    ("the coach praised every player after the league game", "sports"),
    ("a record crowd saw the final whistle of the cup", "sports"),
    ("the bank raised its interest rate by half a point", "markets"),
    ("shares fell as the stock price missed the forecast", "markets"),
    ("traders sold bonds after the profit warning", "markets"),
    ("heavy rain and strong wind are expected tonight", "weather"),
    ("snow and cold air will cover the north tomorrow", "weather"),
    ("a sunny week ends with a thunder storm", "weather"),
]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="BA-LoRA with a transformers Trainer (classification)")
    parser.add_argument("--model", default="google-bert/bert-base-uncased", help="hub id or local directory")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="balora-classifier")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(LABELS))
    data = Dataset.from_list([{"text": text, "label": LABELS.index(label)} for text, label in EXAMPLES])
    data = data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64),
                    batched=True, remove_columns=["text"])

    # BA-LoRA: a PiSSA adapter (target_modules=None: PEFT's default for the architecture; the
    # classification head is trained too), then the teacher, built before any optimiser step.
    method = "balora"
    model = balora.apply_method(model, balora.AdapterConfig(method=method, rank=8))
    balora.save_initial_adapter(model, method, args.output_dir)  # BA-LoRA: lets the final adapter load on the original model
    teacher = balora.SnapshotTeacher(model)
    objective = balora.ClassificationObjective(balora.RegularizerConfig(), len(LABELS), teacher=teacher)  # BA-LoRA

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
    )
    trainer = balora.BALoRATrainer(  # BA-LoRA: was transformers.Trainer(...)
        model=model, args=training_args, train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer), objective=objective,
    )
    trainer.train()  # logs task_loss, reg_consistency, reg_diversity, reg_svd and each lambda_*
    # BA-LoRA: a plain LoRA adapter (rank 2r) that loads with PeftModel.from_pretrained on the original model
    balora.save_final(model, method, Path(args.output_dir) / "adapter", args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
