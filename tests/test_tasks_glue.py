"""GLUE from local fixture files and from a monkeypatched hub (no network)."""

import json
import logging

import datasets
import pytest

from balora.data.glue import GLUE_HUB_ID, GLUE_TASKS, load_glue_task
from balora.data.hub import HubLoadError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


COLA = (
    "sentence\tlabel\n"
    "The cat sat.\t1\nCat the sat.\t0\nShe runs fast.\t1\n"
    "Him runs.\t0\n\t1\nWe left early.\t1\n"
)


def test_cola_from_tsv(tmp_path, caplog):
    tr = _write(tmp_path / "train.tsv", COLA)
    ev = _write(tmp_path / "dev.tsv", "sentence\tlabel\nGood one.\t1\nOne good the.\t0\n")
    with caplog.at_level(logging.WARNING, logger="balora"):
        task = load_glue_task("cola", tr, ev)
    assert task.name == "cola"
    assert task.label_names == ["unacceptable", "acceptable"]
    assert task.headline_metric == "matthews_corrcoef"
    assert task.train["label"] == [1, 0, 1, 0, 1]
    assert task.train["text"][0] == "The cat sat."
    assert task.skipped == {"empty text": 1}
    assert len([r for r in caplog.records if r.name == "balora"]) == 1
    assert not task.is_pair


def test_mrpc_pairs_from_csv(tmp_path):
    rows = (
        'sentence1,sentence2,label\n'
        '"He said, ""yes.""",He agreed.,1\n'
        'It rained.,The sun shone.,0\n'
        'A b c.,A b c!,1\n'
    )
    tr = _write(tmp_path / "train.csv", rows)
    task = load_glue_task("mrpc", tr, tr)
    assert task.is_pair and task.num_labels == 2
    assert task.train[0] == {"text": 'He said, "yes."', "text_pair": "He agreed.", "label": 1}
    assert task.label_names == ["not_equivalent", "equivalent"]
    assert task.headline_metric == "f1"


def test_stsb_regression_from_jsonl(tmp_path):
    rows = [("a man plays", "a man is playing", 4.8), ("a dog", "a cat", 1.2), ("x", "y", 0.0),
            ("p", "q", 5.0), ("r", "s", 2.5), ("t", "u", "n/a")]
    tr = _write(tmp_path / "stsb.jsonl",
                "\n".join(json.dumps({"sentence1": a, "sentence2": b, "label": y}) for a, b, y in rows))
    task = load_glue_task("stsb", tr, tr)
    assert task.problem_type == "regression" and task.num_labels == 1 and task.label_names is None
    assert task.train["label"] == pytest.approx([4.8, 1.2, 0.0, 5.0, 2.5])
    assert task.train.features["label"].dtype == "float32"
    assert task.headline_metric == "pearson"
    assert task.skipped == {"bad label": 2}


def test_mnli_label_names_or_ids_and_column_override(tmp_path):
    tr = _write(tmp_path / "m.tsv",
                "p\th\tgold\nA.\tB.\tentailment\nC.\tD.\t2\nE.\tF.\tmaybe\nG.\tH.\t7\n")
    task = load_glue_task("mnli", tr, tr, text_column="p", text_pair_column="h", label_column="gold")
    assert task.train["label"] == [0, 2]
    assert task.skipped == {"unknown label": 4}


def test_files_missing_columns_name_the_task_columns(tmp_path):
    tr = _write(tmp_path / "q.csv", "text,label\na,1\n")
    with pytest.raises(ValueError, match="no column 'question', 'sentence'; the columns are: text, label"):
        load_glue_task("qnli", tr, tr)


def _fake_glue(name):
    task = GLUE_TASKS[name]
    names = list(task.label_names)

    def split(n):
        cols = {task.text_column: [f"t{i}" for i in range(n)]}
        if task.text_pair_column:
            cols[task.text_pair_column] = [f"p{i}" for i in range(n)]
        cols["label"] = [i % len(names) for i in range(n)]
        cols["idx"] = list(range(n))
        feats = datasets.Features({
            **{c: datasets.Value("string") for c in cols if c not in ("label", "idx")},
            "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32"),
        })
        return datasets.Dataset.from_dict(cols, features=feats)

    return datasets.DatasetDict({"train": split(6), "validation_matched": split(3),
                                 "validation_mismatched": split(2), "validation": split(4),
                                 "test": split(2)})


def test_hub_path_with_monkeypatched_load_dataset(monkeypatch):
    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name))
        return _fake_glue(name)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = load_glue_task("mnli")
    assert calls == [(GLUE_HUB_ID, "mnli")] and GLUE_HUB_ID == "nyu-mll/glue"
    assert len(task.train) == 6 and len(task.eval) == 3  # validation_matched
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    assert task.train[1] == {"text": "t1", "text_pair": "p1", "label": 1}
    assert task.skipped == {}
    sst = load_glue_task("sst2")
    assert len(sst.eval) == 4 and sst.train.column_names == ["text", "label"]


def test_one_local_file_other_split_from_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: _fake_glue(name))
    tr = _write(tmp_path / "rte.csv", "sentence1,sentence2,label\nA.,B.,not_entailment\n")
    task = load_glue_task("rte", train_file=tr)
    assert task.train["label"] == [1] and len(task.eval) == 4


def test_hub_unreachable_is_one_clear_line(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError) as err:
        load_glue_task("qqp")
    msg = str(err.value)
    assert "\n" not in msg and "nyu-mll/glue" in msg
    assert "train_file" in msg and "eval_file" in msg and "question1, question2, label" in msg


def test_unknown_glue_task():
    with pytest.raises(ValueError, match="cola, sst2, mrpc"):
        load_glue_task("squad")
