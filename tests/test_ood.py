"""Out-of-distribution evaluation (data.ood_tasks): config checks, label alignment by class name,
a real run scored on two packaged sentiment sets, and the experiment store/report reading it."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import tiny_classifier_overrides, write_task_files

from balora.config import ConfigError, load_config
from balora.data.classification import relabel
from balora.experiments.store import OOD_MEAN, metric_split, record_metric, split_metrics


def test_config_cross_checks():
    ok = load_config(None, ["data.task=imdb", "data.ood_tasks=[rotten-tomatoes, sst2-validation]"])
    assert ok.data.ood_tasks == ["rotten-tomatoes", "sst2-validation"]
    for overrides, message in [
        (["data.ood_tasks=[]"], "data.ood_tasks must be a list of task names"),
        (["data.ood_tasks=[a/b]"], "data.ood_tasks must be a list of task names"),
        (["data.ood_tasks=[a/b.txt]"], "or data files"),
        (["data.ood_tasks=[x/yelp.tsv, y/yelp.csv]"], "names a task twice \\(a file is named by its stem\\)"),
        (["data.task=imdb", "data.ood_tasks=[other/imdb.jsonl]"], "names the training task 'imdb' itself"),
        (["data.ood_tasks=[imdb, imdb]"], "data.ood_tasks names a task twice"),
        (["data.task=imdb", "data.ood_tasks=[imdb]"], "names the training task 'imdb' itself"),
        (["family=generation", "data.task=gsm-symbolic", "data.ood_tasks=[imdb]"], "a classification setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_file_entries_are_named_by_their_stem():
    from balora.config import ood_name
    from balora.data.files import data_file_stem

    ok = load_config(None, ["data.task=sst2", "data.ood_tasks=[imdb, glue-x/yelp.tsv, amazon.jsonl.gz]"])
    assert [ood_name(t) for t in ok.data.ood_tasks] == ["imdb", "yelp", "amazon"]
    assert data_file_stem("a/b/Yelp.Test.TSV") == "Yelp.Test"
    assert data_file_stem("x.parquet") == "x" and data_file_stem("x.parquet.gz") is None
    assert data_file_stem("sst2-validation") is None and data_file_stem("notes.txt") is None
    assert ood_name("a/b") is None and ood_name("rotten-tomatoes") == "rotten-tomatoes"


def test_relabel_maps_ids_by_class_name():
    split = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]},
                                       features=datasets.Features({"text": datasets.Value("string"),
                                                                   "label": datasets.Value("int64")}))
    out = relabel(split, ["x", "y", "z"], ["z", "x", "y"])
    assert out["label"] == [1, 2, 0] and out["text"] == ["a", "b", "c"]
    assert out.features["label"] == split.features["label"]
    assert relabel(split, ["x", "y", "z"], ["x", "y", "z"]) is split
    with pytest.raises(ValueError, match="the classes differ: z only in one, w only in the other"):
        relabel(split, ["x", "y", "z"], ["x", "y", "w"])


#: POSITIVE listed first, so the file task's class order differs from the packaged tasks'
#: (negative, positive) and must be realigned.
SENTIMENT_WORDS = {"positive": ["great", "wonderful", "loved", "superb"],
                   "negative": ["awful", "boring", "hated", "bad"]}


def test_a_run_is_scored_on_every_ood_task(tiny_model_dir, tmp_path, one_thread):
    from balora.data import load_task
    from balora.runs import train_run

    train_file, eval_file = write_task_files(tmp_path, n_train=40, n_eval=12, words=SENTIMENT_WORDS)
    # Two OOD files: GLUE-style class ids (0 = negative, the task's first class) and a file of one class.
    ids_file, positives_file = tmp_path / "ids.tsv", tmp_path / "positives.jsonl"
    id_rows = [("loved superb great", 1), ("awful boring bad", 0), ("hated bad", 0), ("great wonderful", 1)]
    ids_file.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in id_rows))
    positives_file.write_text("".join(json.dumps({"text": t, "label": "positive"}) + "\n"
                                      for t in ("great loved", "superb", "wonderful great")))
    overrides = [
        *tiny_classifier_overrides(tiny_model_dir, tmp_path / "runs", train_file, eval_file, max_length=32),
        "data.max_eval_examples=20",
        f"data.ood_tasks=[rotten-tomatoes, sst2-validation, {ids_file}, {positives_file}]",
        "train.max_steps=2", "train.logging_steps=1", "train.batch_size=8", "train.report_to=[]",
    ]
    result = train_run(load_config(None, overrides), progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    for task in ("rotten-tomatoes", "sst2-validation"):
        assert metrics[f"ood/{task}/eval_examples"] == 20
        assert 0.0 <= metrics[f"ood/{task}/accuracy"] <= 1.0
        assert {f"ood/{task}/recall/positive", f"ood/{task}/recall/negative"} <= set(metrics)

    # The OOD accuracy is the trained model's accuracy on those rows WITH their labels realigned:
    # predicting the files task's class ids on the packaged rows must agree with the stored numbers.
    from balora.predict import predict

    seed = load_config(None, overrides).train.seed
    rows = load_task("sst2-validation", seed=seed, max_eval_examples=20).eval
    predicted = [p["prediction"] for p in predict(result.run_dir, rows["text"])]
    names = ["negative", "positive"]
    truth = [names[i] for i in rows["label"]]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert metrics["ood/sst2-validation/accuracy"] == pytest.approx(accuracy)
    predicted = [p["prediction"] for p in predict(result.run_dir, [t for t, _ in id_rows])]
    truth = [names[y] for _, y in id_rows]
    assert metrics["ood/ids/eval_examples"] == 4
    assert metrics["ood/ids/accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / 4)
    predicted = [p["prediction"] for p in predict(result.run_dir, ["great loved", "superb", "wonderful great"])]
    assert metrics["ood/positives/recall/positive"] == pytest.approx(predicted.count("positive") / 3)

    record = split_metrics(metrics)
    assert record["metrics"]["ood/sst2-validation"]["accuracy"] == metrics["ood/sst2-validation/accuracy"]
    assert record["facts"]["ood/sst2-validation/eval_examples"] == 20
    assert record["per_class"]["ood/rotten-tomatoes"]["recall"]["positive"] == \
        metrics["ood/rotten-tomatoes/recall/positive"]

    bad = [o for o in overrides if not o.startswith("data.ood_tasks=")] + ["data.ood_tasks=[reuters-r8]"]
    with pytest.raises(ConfigError, match="data.ood_tasks: reuters-r8 cannot be scored by a model of files: "
                                          "the classes differ"):
        train_run(load_config(None, bad), progress=False)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text,label\nsomething,neutral\n")
    bad[-1] = f"data.ood_tasks=[{wrong}]"
    with pytest.raises(ConfigError, match="data.ood_tasks: .*wrong.csv: no usable rows left .*'unknown label': 1"):
        train_run(load_config(None, bad), progress=False)
    bad[-1] = f"data.ood_tasks=[{tmp_path / 'missing.csv'}]"
    with pytest.raises(ConfigError, match="data.ood_tasks: data file not found: .*missing.csv"):
        train_run(load_config(None, bad), progress=False)


def test_report_metrics_read_one_ood_split_or_their_mean():
    record = split_metrics({"accuracy": 0.9, "validation/accuracy": 0.8, "ood/a/accuracy": 0.6,
                            "ood/b/accuracy": 0.7, "ood/b/macro_f1": 0.5, "ood/a/eval_examples": 10})
    assert record_metric(record, "accuracy") == ("accuracy", 0.9)
    assert record_metric(record, "ood/a/accuracy") == ("accuracy", 0.6)
    assert record_metric(record, "ood/accuracy") == ("accuracy", pytest.approx(0.65))
    assert record_metric(record, "ood/macro_f1") == ("macro_f1", 0.5)  # the mean over the splits that have it
    assert record_metric(record, "ood/c/accuracy") == ("accuracy", None)
    assert metric_split("ood/accuracy") == (OOD_MEAN, "accuracy")
    assert metric_split("ood/a/f1") == ("ood/a", "f1")
    assert metric_split("accuracy", "validation") == ("validation", "accuracy")
