"""The scripts of examples/ run end to end (2 steps, tiny local models): every BA-LoRA term is
logged, the loss is finite, and the saved adapter loads on the ORIGINAL model and gives the
trained model's outputs; load_adapter.py gets a run's label names with plain transformers + PEFT."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TERMS = ("task_loss", "reg_consistency", "reg_diversity", "reg_svd")
LAMBDAS = ("lambda_consistency", "lambda_diversity", "lambda_svd")

pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_logs(history):
    """The per-step training logs of a Trainer's log_history (not the final summary)."""
    return [entry for entry in history if "loss" in entry]


def assert_reloads(trained, auto_class, model_dir, adapter_dir, inputs):
    """The saved adapter on a fresh copy of the pre-trained model == the trained model in memory."""
    loaded = PeftModel.from_pretrained(auto_class.from_pretrained(model_dir), str(adapter_dir)).eval()
    trained.eval()
    with torch.no_grad():
        expected, got = trained(**inputs).logits, loaded(**inputs).logits
        pretrained = loaded.get_base_model()  # PEFT injected the layers: compare with the adapter off
        with loaded.disable_adapter():
            before = pretrained(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, expected, atol=1e-6), "training did not change the model"


def test_transformers_trainer_example(tiny_model_dir, tmp_path):
    example = load_example("transformers_trainer")
    trainer = example.main(["--model", tiny_model_dir, "--max-steps", "2", "--output-dir", str(tmp_path)])

    logs = step_logs(trainer.state.log_history)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        assert all(math.isfinite(entry[key]) for key in ("loss", *TERMS, *LAMBDAS))
        assert all(entry[key] > 0 for key in LAMBDAS)
    inputs = AutoTokenizer.from_pretrained(tiny_model_dir)(["the bank raised its rate"], return_tensors="pt")
    assert_reloads(trainer.model, AutoModelForSequenceClassification, tiny_model_dir, tmp_path / "adapter", inputs)


def test_trl_sft_trainer_example(tiny_causal_lm_dir, tmp_path):
    example = load_example("trl_sft_trainer")
    trainer = example.main(["--model", tiny_causal_lm_dir, "--max-steps", "2", "--output-dir", str(tmp_path)])

    logs = step_logs(trainer.state.log_history)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:  # constant schedules: every term is on and logged at both steps
        assert all(math.isfinite(entry[key]) for key in ("loss", *TERMS, *LAMBDAS))
        assert all(entry[key] > 0 for key in LAMBDAS)
        assert entry["reg_diversity"] != 0 and entry["reg_svd"] != 0

    # TRL's completion-only collator gives what the objective reads: unshifted labels, -100 on the prompt
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    completions = {answer for _, answer in example.PAIRS}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept]) and not kept[mask == 0].any()
        assert tokenizer.decode(ids[kept], skip_special_tokens=True).strip() in completions
        assert kept.nonzero().min() > 10  # the chat-formatted prompt is masked

    inputs = tokenizer(["What is 7 + 5?"], return_tensors="pt")
    assert_reloads(trainer.model, AutoModelForCausalLM, tiny_causal_lm_dir, tmp_path / "adapter", inputs)


def test_torch_loop_example(tiny_causal_lm_dir, tmp_path):
    example = load_example("torch_loop")
    model, history = example.main(["--model", tiny_causal_lm_dir, "--max-steps", "2", "--output-dir", str(tmp_path)])

    assert [entry["step"] for entry in history] == [1, 2]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["task_loss"]) for entry in history)
    # the paper's generation schedules: λ2/λ3 are off at the first of 2 steps and on at the second
    assert history[0]["lambda_diversity"] == history[0]["lambda_svd"] == 0
    assert "reg_svd" not in history[0] and "reg_consistency" in history[0]
    assert all(math.isfinite(history[1][key]) for key in (*TERMS, *LAMBDAS))
    assert history[1]["lambda_diversity"] > 0 and history[1]["lambda_svd"] > 0

    batch = example.collate(AutoTokenizer.from_pretrained(tiny_causal_lm_dir), example.PAIRS[:2])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    assert_reloads(model, AutoModelForCausalLM, tiny_causal_lm_dir, tmp_path / "adapter", inputs)


def test_load_adapter_example_gives_the_runs_label_names(tiny_model_dir, task_files, tmp_path, capsys):
    """Plain transformers + PEFT (no balora import) recover the run's label NAMES from its adapter
    directory; the classes sort (markets, sports, weather) unlike their first appearance."""
    from balora.config import load_config
    from balora.runs import train_run

    train_file, eval_file = task_files
    run = train_run(load_config(None, [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]", "train.max_steps=2",
        "train.batch_size=8", "train.report_to=[]", "train.learning_rate=1e-2",
    ]), progress=False).run_dir
    expected = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    texts = [row["text"] for row in expected]
    source = (EXAMPLES / "load_adapter.py").read_text()
    assert "import balora" not in source and "from balora" not in source

    example = load_example("load_adapter")
    capsys.readouterr()
    names = example.main(["--adapter", str(run / "adapter"), *texts])  # base: the adapter's own
    assert names == [row["prediction"] for row in expected]
    assert capsys.readouterr().out.splitlines() == [f"{name}\t{text}" for name, text in zip(names, texts)]
    assert example.main(["--adapter", str(run / "adapter"), "--base", tiny_model_dir, *texts]) == names
