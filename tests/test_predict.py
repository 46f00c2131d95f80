"""``balora predict`` on tiny trained runs: the labels travel with the adapter (a fresh process gets
the run's predicted NAMES and probabilities), stdin/argument/file inputs, CSV output, top-k,
generation through the training chat template, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from balora.cli import main
from balora.config import load_config
from balora.data.sft import render_prompt
from balora.evaluation.generate import SamplingConfig, generate_texts
from balora.models import load_sequence_classifier, load_source, load_tokenizer, resolve_model_source
from balora.predict import classify, read_inputs
from balora.runs import train_run
from conftest import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
#: Label names whose first appearance (zeta, alpha, mid) is not their sorted order (alpha, mid, zeta).
NAMES = dict(zip(WORDS, ("zeta", "alpha", "mid")))


def _write_csv(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            topic = list(WORDS)[i % 3]
            writer.writerow([" ".join(rng.choices(WORDS[topic], k=6)), NAMES[topic]])
    return str(path)


@pytest.fixture(scope="module")
def classification_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-step classification run on the 3-class CSV, and its evaluation file."""
    folder = tmp_path_factory.mktemp("predict-classification")
    train_file, eval_file = _write_csv(folder / "train.csv", 24, 0), _write_csv(folder / "eval.csv", 9, 1)
    config = load_config(None, [
        f"output_dir={folder / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]",
        "train.max_steps=2", "train.save_steps=2", "train.logging_steps=1", "train.batch_size=8",
        "train.report_to=[]", "train.learning_rate=1e-2",
    ])
    return train_run(config, progress=False).run_dir, eval_file


@pytest.fixture(scope="module")
def generation_run(tiny_causal_lm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict-generation")
    config = load_config(None, [
        "family=generation", f"output_dir={folder / 'runs'}", f"model.name={tiny_causal_lm_dir}",
        "model.max_length=96", "data.task=gsm-symbolic", "data.max_train_examples=4", "adapter.method=lora",
        "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=1", "train.save_steps=1",
        "train.batch_size=2", "train.report_to=[]", "train.learning_rate=1e-2", "eval.max_examples=1",
        "eval.max_new_tokens=2",
    ])
    return train_run(config, progress=False).run_dir


def _run_predictions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``balora`` in a FRESH process (nothing of the training process is reused), offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "balora.cli", *args], capture_output=True,
                          text=True, env=env, check=False, timeout=300)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fresh_process_gets_the_runs_label_names(classification_run, tmp_path):
    run, eval_file = classification_run
    expected = _run_predictions(run)
    out = tmp_path / "predictions.jsonl"
    done = _cli("predict", str(run), "--file", eval_file, "--format", "jsonl", "--output", str(out))
    assert done.returncode == 0, done.stderr

    got = _read_jsonl(out)
    assert [row["text"] for row in got] == [row["text"] for row in expected]
    assert [row["prediction"] for row in got] == [row["prediction"] for row in expected]
    assert {row["prediction"] for row in got} <= {"zeta", "alpha", "mid"}
    for row, want in zip(got, expected):
        assert set(row["probabilities"]) == {"zeta", "alpha", "mid"}
        assert list(row["probabilities"])[0] == row["prediction"]  # most likely first
        for name, p in want["probabilities"].items():
            assert row["probabilities"][name] == pytest.approx(p, abs=1e-4)
    assert "predicting" in done.stderr  # the progress bar of a file goes to stderr


def test_the_names_are_the_adapters_id2label(classification_run):
    """The names come from the adapter's config.json (the sorted labels of the training file, not
    their order of first appearance): the model's own argmax, named by id2label."""
    run, eval_file = classification_run
    model, tokenizer = load_source(resolve_model_source(None, run, family=None))
    assert model.config.id2label == {0: "alpha", 1: "mid", 2: "zeta"}
    rows = read_inputs(file=eval_file)
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1).tolist()
    got = classify(model, tokenizer, rows, batch_size=4)
    assert [r["prediction"] for r in got] == [model.config.id2label[i] for i in ids]


def test_arguments_stdin_csv_and_top_k(classification_run, tmp_path, capsys, monkeypatch):
    run, _ = classification_run
    texts = ["goal match team score", "stock price bank rate"]
    assert main(["predict", str(run), "--top-k", "2", *texts]) == 0  # texts after the options, too
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert all(len(r["probabilities"]) == 2 and list(r["probabilities"])[0] == r["prediction"] for r in rows)
    probabilities = [list(r["probabilities"].values()) for r in rows]
    assert all(p[0] >= p[1] for p in probabilities)

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{texts[0]}\n\n{texts[1]}\n"))
    assert main(["predict", str(run), "-", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["text"] for r in table] == texts and [r["prediction"] for r in table] == [r["prediction"] for r in rows]
    assert list(table[0]) == ["text", "prediction", "label_1", "probability_1", "label_2", "probability_2",
                              "label_3", "probability_3"]
    assert all(r["label_1"] == r["prediction"] for r in table)
    assert sum(float(table[0][f"probability_{i}"]) for i in (1, 2, 3)) == pytest.approx(1.0, abs=1e-5)
    assert float(table[0]["probability_1"]) == pytest.approx(probabilities[0][0], abs=1e-5)


def test_generation_predict_uses_the_training_chat_template(generation_run, tmp_path):
    questions = ["What is 2 + 3?", "Name a colour."]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "completions.jsonl"
    done = _cli("predict", str(generation_run), "--file", str(prompts), "--text-column", "question",
                "--max-new-tokens", "5", "--output", str(out))
    assert done.returncode == 0, done.stderr

    model, tokenizer = load_source(resolve_model_source(None, generation_run))
    rendered = [render_prompt(tokenizer, q) for q in questions]
    assert rendered[0].startswith("<|im_start|>")  # SmolLM2's ChatML template
    expected = generate_texts(model, tokenizer, rendered, sampling=SamplingConfig(max_new_tokens=5), progress=False)
    assert _read_jsonl(out) == [{"prompt": q, "completion": c[0]} for q, c in zip(questions, expected)]


def test_full_fine_tuning_run_and_a_regression_head(tiny_model_dir, classification_run, tmp_path, capsys):
    """A run of method ``full`` (a whole saved classifier) predicts its run's names; a one-output
    regression head gives its value."""
    _, eval_file = classification_run
    config = load_config(None, [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16", "data.task=files",
        f"data.train_file={Path(eval_file).with_name('train.csv')}", f"data.eval_file={eval_file}",
        "adapter.method=full", "train.max_steps=1", "train.batch_size=8", "train.report_to=[]",
    ])
    run = train_run(config, progress=False).run_dir
    source = resolve_model_source(None, run, family=None)
    assert source.full_model_dir == run / "adapter" and source.family == "classification"
    capsys.readouterr()  # the training logs
    assert main(["predict", str(run), "--file", eval_file, "--no-progress"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in _run_predictions(run)]

    model = load_sequence_classifier(tiny_model_dir, 1, problem_type="regression").eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = [{"text": "rain storm wind"}, {"text": "goal match"}]
    rows = classify(model, tokenizer, texts)
    with torch.no_grad():
        values = model(**tokenizer([t["text"] for t in texts], padding=True, return_tensors="pt")).logits[:, 0]
    assert [r["prediction"] for r in rows] == pytest.approx(values.tolist(), abs=1e-6)
    assert "probabilities" not in rows[0]
    with pytest.raises(ValueError, match="regression head"):
        classify(model, tokenizer, texts, top_k=1)


def test_packaged_models_are_named_by_their_hub_id(tiny_model_dir):
    """PEFT records ``model.name_or_path`` as the adapter's base: the hub id of a packaged model,
    a local path unchanged."""
    from peft import LoraConfig, get_peft_model

    packaged = load_sequence_classifier("minilm", 3)
    assert packaged.name_or_path == packaged.config.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    peft = get_peft_model(packaged, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    assert peft.peft_config["default"].base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert load_sequence_classifier(tiny_model_dir, 3).name_or_path == tiny_model_dir


def _copy_adapter(run: Path, folder: Path) -> Path:
    folder.mkdir()
    for file in (run / "adapter").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def _mismatched_adapter(run: Path, tmp_path: Path) -> Path:
    """The run's adapter pointed at a base model of another hidden size."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    base = tmp_path / "other-bert"
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(base)
    adapter = _copy_adapter(run, tmp_path / "mismatched")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(adapter_config, base_model_name_or_path=str(base))))
    return adapter


def _messages(stderr: str) -> list[str]:
    """The lines of ``stderr`` without the progress bars of transformers' weight loading."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not re.search(r"\d+%\|", line)]


def test_user_errors_are_one_line(classification_run, generation_run, tmp_path, capsys, monkeypatch):
    run, eval_file = classification_run
    empty_run = tmp_path / "unfinished"
    (empty_run / "adapter").mkdir(parents=True)
    (empty_run / "config.yaml").write_text((run / "config.yaml").read_text())
    unlabelled = _copy_adapter(run, tmp_path / "unlabelled")
    (unlabelled / "config.json").unlink()
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("sentence,label\nhello,zeta\n")
    cases = [
        (["predict", str(tmp_path / "missing"), "a text"], "adapter directory not found"),
        (["predict", str(tmp_path), "a text"], "neither a PEFT adapter directory"),
        (["predict", str(empty_run), "a text"], "has no finished adapter"),
        (["predict", str(_mismatched_adapter(run, tmp_path)), "a text"], "size mismatch"),
        (["predict", str(unlabelled), "a text"], "has no config.json with the adapter's labels"),
        (["predict", str(run), "--file", str(no_text)], "no column 'text'; the columns are: sentence, label"),
        (["predict", str(run), "--file", str(tmp_path / "absent.csv")], "input file not found"),
        (["predict", str(run), "a text", "--top-k", "0"], "--top-k must be at least 1"),
        (["predict", str(run), "a text", "--file", eval_file], "not both"),
        (["predict", str(run), "a text", "--max-new-tokens", "4"], "--max-new-tokens does not apply"),
        (["predict", str(generation_run), "a prompt", "--top-k", "2"], "--top-k does not apply"),
        (["predict", str(run), "a text", "--output", eval_file], "never overwrite"),
    ]
    capsys.readouterr()  # what building the cases printed
    kept = Path(eval_file).read_text()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = _messages(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0] and err[0].startswith("balora: error:"), (argv, err)
    assert Path(eval_file).read_text() == kept  # --output never overwrites

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert main(["predict", str(run)]) == 2
    assert _messages(capsys.readouterr().err) == ["balora: error: no input texts in stdin"]
