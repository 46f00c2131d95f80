"""Classification runs end to end on a tiny BERT: run directory, adapter round trip, resume, precision, CLI errors, demo."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from balora.cli import main
from balora.config import ConfigError, load_config
from balora.runs import train_run, training_arguments


def _config(tiny_model_dir, task_files, tmp_path, method="balora", steps=4, **extra):
    train_file, eval_file = task_files
    overrides = [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        f"adapter.method={method}", "adapter.rank=4", "adapter.target_modules=[query,value]",
        f"train.max_steps={steps}", "train.save_steps=2", "train.logging_steps=1", "train.batch_size=8",
        "train.report_to=[]", "train.learning_rate=1e-2",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


def test_run_directory_and_adapter_round_trip(tiny_model_dir, task_files, tmp_path):
    result = train_run(_config(tiny_model_dir, task_files, tmp_path), progress=False)
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "log_history.json", "loss_curve.png", "adapter", "initial_adapter"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "pissa+reg" and metrics["global_steps"] == 4
    assert {"accuracy", "macro_f1", "rarest_class_recall", "trainable_parameters"} <= set(metrics)
    assert any("reg_consistency" in h for h in result.log_history)

    # the saved adapter is plain LoRA (rank 2r) and reproduces the run's predictions on the ORIGINAL model
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["init_lora_weights"] is True
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    import csv
    with open(task_files[1]) as handle:
        rows = list(csv.DictReader(handle))
    batch = tok([r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = model(**batch).logits.argmax(-1)
    labels = sorted({r["label"] for r in rows})
    accuracy = sum(labels[p] == r["label"] for p, r in zip(preds.tolist(), rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["accuracy"])

    # a second run never overwrites the first
    again = train_run(_config(tiny_model_dir, task_files, tmp_path, steps=2), progress=False)
    assert again.run_dir != run and (run / "metrics.json").exists()


def _crash_after_step_2(finished, crashed):
    """A copy of a finished 4-step run as a run killed after its step-2 checkpoint."""
    shutil.copytree(finished, crashed)
    for name in ("metrics.json", "log_history.json", "loss_curve.png", "predictions.jsonl"):
        (crashed / name).unlink()
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-4")
    return crashed


def _assert_same_adapter(run_a, run_b):
    a = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, task_files, tmp_path):
    full = train_run(_config(tiny_model_dir, task_files, tmp_path / "a", steps=4), progress=False)
    crashed = _crash_after_step_2(full.run_dir, tmp_path / "crashed")
    state_file = crashed / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["marker"] = 1.0  # only a run that really resumes carries it on
    state_file.write_text(json.dumps(state))
    resumed = train_run(None, resume=crashed, progress=False)
    assert resumed.metrics["global_steps"] == 4
    assert resumed.log_history[0].get("marker") == 1.0
    assert [h["step"] for h in resumed.log_history if "task_loss" in h] == [1, 2, 3, 4]
    _assert_same_adapter(full.run_dir, crashed)
    with pytest.raises(FileExistsError, match="already complete"):
        train_run(None, resume=crashed, progress=False)


def test_resume_restores_the_saved_initial_adapter(tiny_model_dir, task_files, tmp_path, monkeypatch):
    """pissa_niter_2's init is random: a resume under another random state still continues THE run."""
    import transformers

    import balora.runs as runs

    method = "pissa_niter_2+reg"
    full = train_run(_config(tiny_model_dir, task_files, tmp_path / "a", method=method), progress=False)
    crashed = _crash_after_step_2(full.run_dir, tmp_path / "crashed")
    # the model is rebuilt under another seed, so the randomized SVD of the init differs
    monkeypatch.setattr(runs, "set_seed", lambda seed: transformers.set_seed(seed + 1))
    restored = []
    restore = runs.restore_initial_adapter
    monkeypatch.setattr(runs, "restore_initial_adapter", lambda *a: restored.append(restore(*a)) or restored[-1])
    train_run(None, resume=crashed, progress=False)
    assert restored == [True]
    _assert_same_adapter(full.run_dir, crashed)


def test_bf16_trains_on_cpu_and_fp16_needs_cuda(tiny_model_dir, task_files, tmp_path):
    config = _config(tiny_model_dir, task_files, tmp_path, steps=2, **{"train.precision": "bf16"})
    args = training_arguments(config, tmp_path / "bf16")
    assert args.bf16 and not args.fp16 and not args.activation_checkpointing
    result = train_run(config, progress=False)
    assert result.metrics["global_steps"] == 2 and 0.0 <= result.metrics["accuracy"] <= 1.0
    logged = [h for h in result.log_history if "task_loss" in h]
    assert len(logged) == 2 and all(h["task_loss"] == h["task_loss"] for h in logged)  # finite, not NaN
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]["precision"] == "bf16"
    if not torch.cuda.is_available():
        fp16 = _config(tiny_model_dir, task_files, tmp_path, **{"train.precision": "fp16"})
        with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
            train_run(fp16, progress=False)
        assert list((tmp_path / "runs").iterdir()) == [result.run_dir]  # refused before any run directory


def test_training_arguments_follow_the_config(tiny_model_dir, task_files, tmp_path):
    config = _config(tiny_model_dir, task_files, tmp_path, **{"train.group_by_length": "true"})
    args = training_arguments(config, tmp_path / "run", progress=False)
    assert args.train_sampling_strategy == "group_by_length" and args.output_dir == str(tmp_path / "run" / "checkpoints")
    assert (args.max_steps, args.save_steps, args.logging_steps, args.learning_rate) == (4, 2, 1, 1e-2)
    assert not args.bf16 and not args.fp16 and args.disable_tqdm and args.report_to == []


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.yaml"], "config file not found"),
    (["train", "adapter.rank=0"], "adapter.rank must be >= 1"),
    (["train", "adapter.method=qlora"], "unknown method"),
    (["train", "data.task=nope", "model.name=/nonexistent/model"], "nope"),
    (["train", "--resume", "/nonexistent/run"], "not a run directory"),
])
def test_cli_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_offline_glue_and_bad_yaml_are_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["train", "data.task=cola", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_file" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML (line" in err and len(err.splitlines()) == 1


def test_cli_bad_model_path_is_one_line(task_files, tmp_path, capsys):
    train_file, eval_file = task_files
    code = main(["train", "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
                 "model.name=/nonexistent/model", f"output_dir={tmp_path}"])
    assert code == 2
    assert "could not load model" in capsys.readouterr().err


def test_demo_table_and_figure(tiny_model_dir, task_files, tmp_path, monkeypatch):
    import balora.demo as demo
    from balora.demo import format_table, run_demo

    titles = []
    plot = demo.plot_comparison
    monkeypatch.setattr(demo, "plot_comparison", lambda *a, **k: titles.append(k["title"]) or plot(*a, **k))

    train_file, eval_file = task_files
    overrides = [
        f"model.name={tiny_model_dir}", "model.max_length=16", "adapter.target_modules=[query,value]",
        "adapter.rank=4", "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "train.max_steps=2", "train.report_to=[]", "train.save_steps=2",
    ]
    rows, demo_dir = run_demo(tmp_path, ["lora", "balora"], overrides, progress=False)
    assert "on train.csv" in titles[0] and "files" not in titles[0]  # the data, not the task kind
    assert [r["method"] for r in rows] == ["lora", "balora"]
    assert (demo_dir / "comparison.png").stat().st_size > 10_000
    table = format_table(rows)
    assert "rarest-class recall" in table and "balora" in table
    assert json.loads((demo_dir / "summary.json").read_text())[1]["method"] == "balora"
