"""BA-LoRA in a plain PyTorch training loop (causal LM): call the objective, step the optimiser.

``loss, logs = objective(model, batch, step=step, total_steps=n)`` is the whole interface: the
batch holds ``input_ids``, ``attention_mask`` and UNSHIFTED ``labels`` with -100 on the prompt
and the padding (the objective shifts them itself)::

    python examples/torch_loop.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import balora

PAIRS = [  # your own (prompt, completion) data goes here
    ("Question: What is 7 + 5?\nAnswer:", " 7 + 5 = 12. The answer is 12."),
    ("Question: What is 9 - 4?\nAnswer:", " 9 - 4 = 5. The answer is 5."),
    ("Question: What is 6 * 3?\nAnswer:", " 6 * 3 = 18. The answer is 18."),
    ("Question: What is 20 / 4?\nAnswer:", " 20 / 4 = 5. The answer is 5."),
]


def collate(tokenizer, pairs) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (B, T) and ``labels`` (B, T): -100 except on completions."""
    rows = []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="BA-LoRA in a plain PyTorch loop")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local directory")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="balora-loop")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    method = "balora"  # PiSSA init; target_modules=None is PEFT's default for the architecture
    model = balora.apply_method(model, balora.AdapterConfig(method=method, rank=8))
    balora.save_initial_adapter(model, method, args.output_dir)  # lets the final adapter load on the original model
    # The paper's generation defaults: λ1 on a cosine schedule, λ2/λ3 off for the first 20% of the steps.
    objective = balora.GenerationObjective(balora.RegularizerConfig(), teacher=balora.SnapshotTeacher(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    history = []
    model.train()
    for step in range(args.max_steps):
        start = 2 * step % len(PAIRS)
        batch = collate(tokenizer, PAIRS[start:start + 2])  # batches of 2, cycling over the data
        loss, logs = objective(model, batch, step=step, total_steps=args.max_steps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"step": step + 1, "loss": loss.detach().item(), **logs})
        print(history[-1])
    balora.save_final(model, method, Path(args.output_dir) / "adapter", args.output_dir)
    return model, history


if __name__ == "__main__":
    main()
