"""The teacher-forced loss of reference solutions against a naive per-row reference (a run reports it:
test_experiments.py::test_generation_run_reports_validation_metrics)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from balora.data.sft import encode_sft
from balora.evaluation.answer_loss import answer_loss

ROWS = datasets.Dataset.from_dict({
    "question": ["What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?", "Double 7."],
    "answer": ["2 + 3 = 5\n#### 5", "4 - 1 = 3 apples are left.\n#### 3", "7 * 2 = 14\n#### 14"],
})


def _naive(model, tokenizer, rows, max_length):
    """One unpadded forward per row; −log p of every response token, summed over all rows."""
    encoded, _ = encode_sft(rows, tokenizer, max_length=max_length, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in encoded:
            ids = torch.tensor([example["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (L, V)
            for t, label in enumerate(example["labels"]):
                if label != -100 and t > 0:
                    total -= float(logp[t - 1, label])
                    count += 1
    return total / count, count


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_answer_loss_equals_a_naive_per_row_sum(tiny_causal_lm_dir, one_thread, batch_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model.train()
    expected, count = _naive(model.eval(), tokenizer, ROWS, 96)
    model.train()
    result = answer_loss(model, tokenizer, ROWS, max_length=96, batch_size=batch_size)
    assert model.training  # restored
    assert result["answer_tokens"] == count and result["answer_rows_dropped"] == 0
    assert result["answer_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["answer_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_rows_beyond_max_length_are_dropped_and_counted(tiny_causal_lm_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    short = answer_loss(model, tokenizer, ROWS, max_length=4)
    assert short["answer_rows_dropped"] == 3 and short["answer_tokens"] == 0 and math.isnan(short["answer_loss"])
