"""Metrics against small cases computed by hand."""

import math
import warnings

import pytest

from balora.evaluation.classification import GLUE_METRICS, classification_metrics, regression_metrics


def test_three_class_by_hand():
    # true counts [3, 2, 1]; class 2 is never predicted
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 0, 1]
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    # per-class F1: a 2/3, b 2/5, c 0 -> macro 16/45
    assert m["macro_f1"] == pytest.approx(16 / 45)
    # multiclass MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = 3 / sqrt(18 * 22)
    assert m["matthews_corrcoef"] == pytest.approx(3 / math.sqrt(18 * 22))
    assert m["recall/a"] == pytest.approx(2 / 3)
    assert m["recall/b"] == pytest.approx(1 / 2)
    assert m["recall/c"] == 0.0
    assert m["min_class_recall"] == 0.0
    assert m["rarest_class"] == "c"
    assert m["rarest_class_recall"] == 0.0
    assert "f1" not in m  # only for binary tasks


def test_recall_covers_classes_absent_from_predictions_and_labels():
    labels = [0, 0, 0, 1, 1]
    preds = [0, 0, 0, 1, 0]
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    assert set(k for k in m if k.startswith("recall/")) == {"recall/a", "recall/b", "recall/c"}
    assert m["recall/c"] == 0.0  # no true and no predicted example: reported, as 0
    # min / rarest only consider classes with true examples
    assert m["min_class_recall"] == pytest.approx(0.5)
    assert m["rarest_class"] == "b"
    assert m["rarest_class_recall"] == pytest.approx(0.5)


def test_binary_f1_of_positive_class():
    labels = [0, 1, 1, 0, 1]
    preds = [0, 1, 0, 0, 1]  # TP 2, FP 0, FN 1
    m = classification_metrics(labels, preds, ["neg", "pos"])
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(0.8)
    # without names, classes are the values seen
    m2 = classification_metrics(labels, preds)
    assert m2["f1"] == pytest.approx(0.8)
    assert m2["recall/1"] == pytest.approx(2 / 3)


def test_classification_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics([0, 1], [0])


def test_regression_by_hand():
    m = regression_metrics([1, 2, 3, 4], [2, 4, 6, 8])
    assert m["pearson"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx((1 + 4 + 9 + 16) / 4)
    m = regression_metrics([1, 2, 3], [3, 2, 1])
    assert m["pearson"] == pytest.approx(-1.0)


def test_regression_constant_predictions_give_nan_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes either
        m = regression_metrics([0.5, 1.0, 4.0], [2.0, 2.0, 2.0])
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    assert m["mse"] == pytest.approx((1.5**2 + 1.0**2 + 2.0**2) / 3)
    assert all(isinstance(v, float) for v in m.values())


def test_glue_headline_metrics():
    assert GLUE_METRICS["cola"] == ("matthews_corrcoef",)
    assert GLUE_METRICS["mrpc"] == ("f1", "accuracy")
    assert GLUE_METRICS["qqp"] == ("f1", "accuracy")
    assert GLUE_METRICS["stsb"] == ("pearson", "spearman")
    for t in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert GLUE_METRICS[t] == ("accuracy",)
