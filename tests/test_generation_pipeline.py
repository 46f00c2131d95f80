"""Generation runs end to end on a tiny Llama: run directory, PEFT adapter round trip, resume, demo."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from balora.cli import main
from balora.config import load_config
from balora.generation_pipeline import train_generation


def _config(model_dir, tmp_path, method="balora", steps=4, **extra):
    overrides = [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={model_dir}", "model.max_length=96",
        "data.task=gsm-symbolic", "data.max_train_examples=16",
        f"adapter.method={method}", "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj,up_proj]",
        f"train.max_steps={steps}", "train.save_steps=2", "train.logging_steps=1", "train.batch_size=2",
        "train.report_to=[]", "train.learning_rate=1e-2", "train.loss_chunk_size=16",
        "eval.max_examples=3", "eval.max_new_tokens=6", "eval.batch_size=3",
        # every term active from step 0, so a 4-step run exercises all of them
        "regularizers.consistency_schedule=constant", "regularizers.focus_schedule=constant",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


def test_generation_run_directory_predictions_and_adapter_round_trip(tiny_causal_lm_dir, tmp_path, monkeypatch):
    import balora.pipeline as pipeline

    trained, probe = {}, torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])

    def keep_logits(model, *args):  # the trained model's outputs, before conversion to LoRA
        with torch.no_grad():
            trained["logits"] = model(input_ids=probe).logits
        return save_final(model, *args)

    save_final = pipeline.save_final
    monkeypatch.setattr(pipeline, "save_final", keep_logits)
    result = train_generation(_config(tiny_causal_lm_dir, tmp_path), progress=False)
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "log_history.json", "loss_curve.png", "adapter",
                 "initial_adapter", "predictions.jsonl"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "pissa+reg" and metrics["global_steps"] == 4
    assert metrics["benchmark"] == "gsm8k" and metrics["total"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["split"].startswith("by template")
    logged = [h for h in result.log_history if "task_loss" in h]
    assert logged and all(k in logged[0] for k in ("reg_consistency", "reg_diversity", "reg_svd", "lambda_svd"))
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and {"question", "generated"} <= set(predictions[0])

    # the PiSSA adapter was converted to plain LoRA: it loads on the ORIGINAL model with PeftModel
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # ... and reproduces the trained model exactly (which differs from the pre-trained one)
    with torch.no_grad():
        reloaded = model(input_ids=probe).logits
        pretrained = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)(input_ids=probe).logits
    torch.testing.assert_close(reloaded, trained["logits"], atol=1e-4, rtol=1e-4)
    assert (reloaded - pretrained).abs().max() > 1e-3


def test_generation_resume_continues_from_the_last_checkpoint(tiny_causal_lm_dir, tmp_path):
    full = train_generation(_config(tiny_causal_lm_dir, tmp_path / "a", method="lora+reg"), progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(full.run_dir, crashed)
    for name in ("metrics.json", "log_history.json", "loss_curve.png", "predictions.jsonl"):
        (crashed / name).unlink()
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-4")
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert json.loads((crashed / "metrics.json").read_text())["global_steps"] == 4
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_math_demo_table(tiny_causal_lm_dir, tmp_path, capsys):
    argv = ["demo", "--task", "math", "--methods", "lora,balora", "--output-dir", str(tmp_path), "--no-progress",
            f"model.name={tiny_causal_lm_dir}", "model.max_length=96", "data.max_train_examples=8",
            "train.max_steps=2", "train.batch_size=2", "train.report_to=[]", "adapter.rank=2",
            "eval.max_examples=2", "eval.max_new_tokens=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for method in ("pre-trained", "lora", "balora"):
        assert method in out
    demo_dir = next(tmp_path.glob("demo-gsm-symbolic*"))
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["pre-trained", "lora", "balora"]
    assert all(r["total"] == 2 for r in summary)
    assert (demo_dir / "comparison.png").exists()


def test_generation_user_errors_are_one_line(tiny_causal_lm_dir, tmp_path, capsys):
    argv = ["train", "family=generation", f"model.name={tiny_causal_lm_dir}", "data.task=/nonexistent/data.jsonl",
            f"output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "nonexistent" in err
