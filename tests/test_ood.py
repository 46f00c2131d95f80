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
        (["data.ood_tasks=[imdb, imdb]"], "data.ood_tasks names a task twice"),
        (["data.task=imdb", "data.ood_tasks=[imdb]"], "names the training task 'imdb' itself"),
        (["family=generation", "data.task=gsm-symbolic", "data.ood_tasks=[imdb]"], "a classification setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


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
    overrides = [
        *tiny_classifier_overrides(tiny_model_dir, tmp_path / "runs", train_file, eval_file, max_length=32),
        "data.max_eval_examples=20", "data.ood_tasks=[rotten-tomatoes, sst2-validation]",
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

    record = split_metrics(metrics)
    assert record["metrics"]["ood/sst2-validation"]["accuracy"] == metrics["ood/sst2-validation/accuracy"]
    assert record["facts"]["ood/sst2-validation/eval_examples"] == 20
    assert record["per_class"]["ood/rotten-tomatoes"]["recall"]["positive"] == \
        metrics["ood/rotten-tomatoes/recall/positive"]

    bad = [o for o in overrides if not o.startswith("data.ood_tasks=")] + ["data.ood_tasks=[reuters-r8]"]
    with pytest.raises(ConfigError, match="data.ood_tasks: reuters-r8 cannot be scored by a model of files: "
                                          "the classes differ"):
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
