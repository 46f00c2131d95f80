"""The imbalance study: the class-count builder, silhouette / minority metrics, the t-SNE figure, a run."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from balora.config import ConfigError, load_config
from balora.data.classification import CLASSIFICATION, REGRESSION, TaskData
from balora.data.imbalance import default_classes, make_imbalanced, minority_class
from balora.evaluation.classification import classification_metrics
from balora.evaluation.features import FEATURES_FILE, imbalance_metrics, plot_tsne, silhouette_metrics

NAMES = ["a", "b", "c", "d"]


def _task(train_counts=(60, 40, 30, 20), eval_per_class=5, seed=0) -> TaskData:
    """A 4-class task; train class i has train_counts[i] rows, eval is balanced."""
    rng = np.random.default_rng(seed)

    def split(counts, prefix):
        labels = [c for c, n in enumerate(counts) for _ in range(n)]
        labels = rng.permutation(labels).tolist()
        texts = [f"{prefix}{i} {NAMES[c]}" for i, c in enumerate(labels)]
        return datasets.Dataset.from_dict({"text": texts, "label": labels},
                                          features=datasets.Features(text=datasets.Value("string"),
                                                                     label=datasets.Value("int64")))

    return TaskData("toy", split(train_counts, "train"), split([eval_per_class] * 4, "eval"),
                    list(NAMES), CLASSIFICATION, "accuracy")


# ------------------------------------------------------------------------------------------ builder


def _names(ds, label_names):
    return Counter(label_names[i] for i in ds["label"])


def test_counts_are_exact_and_the_most_frequent_classes_are_the_default():
    task = _task()
    out = make_imbalanced(task, [30, 6, 1], seed=3)
    assert default_classes(task, 3) == ["a", "b", "c"]
    assert out.label_names == ["a", "b", "c"] and out.num_labels == 3
    assert _names(out.train, out.label_names) == {"a": 30, "b": 6, "c": 1}
    # every kept row is a real row of its class (the label still matches the text)
    assert all(t.endswith(out.label_names[label]) for t, label in zip(out.train["text"], out.train["label"]))
    assert len(set(out.train["text"])) == 37


def test_chosen_classes_in_any_order_and_the_minority():
    task = _task()
    out = make_imbalanced(task, [20, 2], classes=["d", "b"], seed=0)
    assert out.label_names == ["b", "d"]  # the task's own label order
    assert _names(out.train, out.label_names) == {"d": 20, "b": 2}
    assert minority_class(["d", "b"], [20, 2]) == "b"
    assert minority_class(["x", "y", "z"], [5, 1, 1]) == "z"  # ties: the last one named


def test_deterministic_per_seed_and_different_across_seeds():
    task = _task()
    one, again, other = (make_imbalanced(task, [30, 10, 3], seed=s) for s in (7, 7, 8))
    assert one.train["text"] == again.train["text"]
    assert set(one.train["text"]) != set(other.train["text"])
    assert task.train.num_rows == 150  # the input task is not modified


def test_eval_split_is_not_subsampled():
    task = _task()
    everything = make_imbalanced(task, [50, 10, 5, 1], classes=NAMES, seed=0)
    assert everything.eval["text"] == task.eval["text"] and everything.eval["label"] == task.eval["label"]
    three = make_imbalanced(task, [50, 10, 1], seed=0)  # a, b, c: the rows of d leave, the others stay
    kept = [(t, NAMES[label]) for t, label in zip(task.eval["text"], task.eval["label"]) if label != 3]
    assert list(zip(three.eval["text"], (three.label_names[i] for i in three.eval["label"]))) == kept
    assert _names(three.eval, three.label_names) == {"a": 5, "b": 5, "c": 5}


@pytest.mark.parametrize("counts, classes, message", [
    ([61, 1], None, "class 'a' of toy has 60 training examples, 61 asked"),
    ([10, 5], ["a", "zz"], "toy has no class 'zz'; its classes are: a, b, c, d"),
    ([10, 5], ["a", "a"], "class 'a' is named twice"),
    ([10, 5, 1], ["a", "b"], "2 classes (a, b) for 3 counts"),
    ([10], None, "at least 2 class counts"),
    ([10, 0], None, "must be >= 1"),
    ([1, 1, 1, 1, 1], None, "5 classes asked, but toy has only 4"),
])
def test_one_line_errors(counts, classes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        make_imbalanced(_task(), counts, classes)
    assert "\n" not in str(err.value)


def test_regression_task_is_refused():
    task = _task()
    task = TaskData("reg", task.train, task.eval, None, REGRESSION, "pearson")
    with pytest.raises(ValueError, match="reg is a regression task"):
        make_imbalanced(task, [2, 1])


# ------------------------------------------------------------------------------------------ metrics


def _naive_silhouettes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rousseeuw's silhouette per point with cosine distance 1 - <u, v> / (|u| |v|), by hand."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    s = np.zeros(len(x))
    for i in range(len(x)):
        same = (y == y[i]) & (np.arange(len(x)) != i)
        if not same.any():
            continue  # a singleton cluster has silhouette 0
        a = dist[i, same].mean()
        b = min(dist[i, y == c].mean() for c in np.unique(y) if c != y[i])
        s[i] = (b - a) / max(a, b)
    return s


def test_silhouette_equals_a_naive_reference():
    rng = np.random.default_rng(0)
    y = np.array([0] * 9 + [1] * 6 + [2] * 3 + [3])  # class 3 is a singleton
    x = rng.normal(size=(y.size, 4)) + 1.5 * np.eye(4)[y]  # (N, D) logits near their class axis
    ref = _naive_silhouettes(x, y)
    got = silhouette_metrics(x, y, minority=2)
    assert got["silhouette"] == pytest.approx(ref.mean(), abs=1e-12)
    assert got["minority_silhouette"] == pytest.approx(ref[y == 2].mean(), abs=1e-12)
    assert silhouette_metrics(x, y, minority=3)["minority_silhouette"] == 0.0
    # cosine ignores each logit vector's length
    assert silhouette_metrics(x * rng.uniform(0.5, 3, size=(y.size, 1)), y)["silhouette"] == \
        pytest.approx(ref.mean(), abs=1e-12)


def test_silhouette_is_nan_when_undefined():
    x = np.eye(3)
    assert np.isnan(silhouette_metrics(x, [0, 0, 0], minority=0)["silhouette"])  # one class
    assert np.isnan(silhouette_metrics(x, [0, 1, 2])["silhouette"])  # as many classes as points
    assert np.isnan(silhouette_metrics(np.eye(4), [0, 0, 1, 1], minority=2)["minority_silhouette"])
    with pytest.raises(ValueError, match=r"logits must be \(N, D\)"):
        silhouette_metrics(np.eye(3), [0, 1])


def test_minority_recall_and_per_class_f1_by_hand():
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    preds = [0, 0, 0, 1, 1, 1, 0, 2, 0]
    scores = classification_metrics(labels, preds, ["big", "mid", "small"])
    # big: tp 3, fp 2, fn 1 -> P 3/5, R 3/4, F1 = 2*3/(2*3+2+1) = 6/9
    # mid: tp 2, fp 1, fn 1 -> F1 = 4/6; small: tp 1, fp 0, fn 1 -> F1 = 2/3, R = 1/2
    assert scores["f1/big"] == pytest.approx(6 / 9)
    assert scores["f1/mid"] == pytest.approx(4 / 6)
    assert scores["f1/small"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(np.mean([6 / 9, 4 / 6, 2 / 3]))
    logits = np.eye(3)[preds] + 0.1
    out = imbalance_metrics(logits, labels, ["big", "mid", "small"], "small", scores)
    assert out["minority_recall"] == 0.5 and out["minority_class"] == "small"
    assert out["minority_silhouette"] == pytest.approx(_naive_silhouettes(logits, np.array(labels))[7:].mean())
    with pytest.raises(ValueError, match="minority class 'tiny' is not one of the classes: big, mid, small"):
        imbalance_metrics(logits, labels, ["big", "mid", "small"], "tiny", scores)


# ------------------------------------------------------------------------------------------ figure


def test_tsne_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 8 + [2] * 3)
    features = {"lora": rng.normal(size=(31, 8)), "balora": rng.normal(size=(31, 8)) + 3 * np.eye(8)[y]}
    path = plot_tsne(features, y, ["big", "mid", "small"], tmp_path / "tsne.png", title="t-SNE")
    assert path.stat().st_size > 5000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # two panels side by side
    with pytest.raises(ValueError, match="lora: 31 feature rows but 3 labels"):
        plot_tsne({"lora": features["lora"]}, [0, 1, 2], ["a", "b", "c"], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------ config and run


def test_config_cross_checks():
    ok = load_config(None, ["data.class_counts=[100, 10, 1]", "data.classes=[a, b, c]"])
    assert ok.data.class_counts == [100, 10, 1]
    for overrides, message in [
        (["data.classes=[a, b]"], "data.classes is read only with data.class_counts"),
        (["data.class_counts=[10, 1]", "data.classes=[a]"], "data.classes has 1 names for the 2"),
        (["data.class_counts=[10, 1]", "data.classes=[a, a]"], "data.classes names a class twice"),
        (["data.class_counts=[10]"], "data.class_counts must be 2 or more counts >= 1"),
        (["data.class_counts=[10, 0]"], "data.class_counts must be 2 or more counts >= 1"),
        (["data.class_counts=[10, 1]", "data.max_train_examples=5"], "cannot be combined with data.class_counts"),
        (["family=generation", "data.task=gsm-symbolic", "data.class_counts=[10, 1]"], "a classification setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_two_step_run_reports_the_imbalance_metrics(tiny_model_dir, tmp_path, one_thread):
    from conftest import write_task_files

    from balora.runs import train_run

    train_file, eval_file = write_task_files(tmp_path, n_train=60, n_eval=15)
    overrides = [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]",
        "train.max_steps=2", "train.logging_steps=1", "train.batch_size=8", "train.report_to=[]",
        "data.validation_fraction=0.25", "data.class_counts=[12, 4, 2]", "data.classes=[sports, markets, weather]",
    ]
    result = train_run(load_config(None, overrides), progress=False)
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_examples"] == 18 and metrics["eval_examples"] == 15
    for prefix in ("", "validation/"):
        assert metrics[prefix + "minority_class"] == "weather"
        assert -1.0 <= metrics[prefix + "silhouette"] <= 1.0
        assert -1.0 <= metrics[prefix + "minority_silhouette"] <= 1.0
        assert metrics[prefix + "minority_recall"] == metrics[prefix + "recall/weather"]
        assert {prefix + f"f1/{c}" for c in ("sports", "markets", "weather")} <= set(metrics)
    features = np.load(run / FEATURES_FILE)
    assert features.shape == (15, 16) and np.isfinite(features).all()

    bad = overrides[:-1] + ["data.classes=[sports, markets, snow]"]
    with pytest.raises(ConfigError, match=r"data.class_counts=\[12, 4, 2\]: files has no class 'snow'"):
        train_run(load_config(None, bad), progress=False)


def test_final_layer_features_are_the_first_token_of_the_last_layer(tiny_model_dir, one_thread):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from balora.data.classification import encode
    from balora.evaluation.features import final_layer_features

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model.train()
    texts = ["goal", "stock price bank rate trade", "rain storm wind", "team score"]
    ds = encode(datasets.Dataset.from_dict({"text": texts, "label": [0, 1, 2, 0]}), tokenizer, 16)
    got = final_layer_features(model, ds, DataCollatorWithPadding(tokenizer), batch_size=3)  # padded batches
    assert got.shape == (4, 16) and model.training  # its mode is restored
    model.eval()
    with torch.no_grad():
        for i, text in enumerate(texts):  # one unpadded example at a time
            enc = tokenizer(text, return_tensors="pt")
            want = model(**enc, output_hidden_states=True).hidden_states[-1][0, 0].numpy()
            np.testing.assert_allclose(got[i], want, atol=1e-5)
