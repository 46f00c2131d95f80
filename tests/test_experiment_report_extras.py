"""The experiment report beyond its metric tables: convergence speed (steps to a training-loss
threshold), out-of-distribution metrics, the sweep figure and the t-SNE panels. The pure functions
against naive references, then reports written from stores made here, checked by hand."""

from __future__ import annotations

import csv
import json
import statistics
import time

import numpy as np
import pytest
from test_experiments import BASE, _spec

from balora.experiments import ExperimentStore, SpecError, load_spec, write_report
from balora.experiments.convergence import STEPS_METRIC, common_threshold, smoothed, steps_to_reach
from balora.experiments.report import build_report
from balora.experiments.store import FINISHED, make_record


def _naive_smoothed(values, window):
    return [sum(values[max(0, i + 1 - window):i + 1]) / len(values[max(0, i + 1 - window):i + 1])
            for i in range(len(values))]


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_smoothing_equals_a_naive_trailing_mean(window):
    rng = np.random.default_rng(window)
    values = rng.uniform(0, 3, size=11).tolist()
    curve = [[10 * (i + 1), v] for i, v in enumerate(values)]
    steps, smooth = smoothed(curve, window)
    assert steps.tolist() == [10 * (i + 1) for i in range(11)]
    assert smooth == pytest.approx(_naive_smoothed(values, window))


def test_steps_to_reach_and_the_common_threshold():
    fast = [[10, 2.0], [20, 1.0], [30, 0.6], [40, 0.4], [50, 0.3]]
    slow = [[10, 2.0], [20, 1.8], [30, 1.4], [40, 1.0], [50, 0.8]]
    # smoothed (window 3): fast 2, 1.5, 1.2, 0.6667, 0.4333; slow 2, 1.9, 1.7333, 1.4, 1.0667
    assert common_threshold([fast, slow]) == pytest.approx(1.0667, abs=1e-4)
    assert steps_to_reach(fast, 1.0667) == 40 and steps_to_reach(slow, 1.0667) == 50
    assert steps_to_reach(slow, 0.5) is None
    assert steps_to_reach([[10, float("nan")], [20, 0.1]], 0.2) == 20  # a non-finite point is dropped
    assert common_threshold([[], fast]) == pytest.approx(0.4333, abs=1e-4)
    assert common_threshold([[]]) is None


CURVES = {"lora": [[10, 2.0], [20, 1.0], [30, 0.6], [40, 0.4], [50, 0.3]],
          "balora": [[10, 2.0], [20, 1.8], [30, 1.4], [40, 1.0], [50, 0.8]]}


def _store(tmp_path, report):
    spec = load_spec(_spec(base={k: v for k, v in BASE.items() if k != "data"},
                           grid={"method": ["lora", "balora"], "seed": [42, 7],
                                 "data": {"d1": {"data.task": "sst2"}}}, report=report))
    store = ExperimentStore(tmp_path / "store")
    store.write_plan(spec)
    for cell in spec.cells:
        shift = 0.0 if cell.seed == 42 else 0.05
        outcome = {"status": FINISHED,
                   "run_metrics": {"accuracy": 0.8, "ood/rt/accuracy": 0.6 + shift, "ood/sst2/accuracy": 0.7,
                                   "ood/rt/recall/positive": 0.5, "ood/rt/eval_examples": 9},
                   "task_loss": [[s, v + shift] for s, v in CURVES[cell.method]],
                   "timings": {"wall_seconds": 1.0}}
        store.write_record(make_record(cell, FINISHED, store=store, env={}, attempt=1, started_at=time.time(),
                                       outcome=outcome))
    return spec, store


def test_report_has_a_convergence_table_and_ood_metrics(tmp_path):
    spec, store = _store(tmp_path, {"metrics": ["accuracy", "ood/accuracy", "ood/rt/accuracy"]})
    report = build_report(spec, store)
    # every cell reaches the slowest cell's lowest smoothed loss: balora seed 7 (1.0667 + 0.05)
    threshold = statistics.mean([1.4, 1.0, 0.8]) + 0.05
    assert report.thresholds["d1"] == pytest.approx(threshold)
    steps = next(t for t in report.tables if t.metric == STEPS_METRIC)
    assert steps.entries["lora"]["d1"].values == {42: 40.0, 7: 40.0}
    assert steps.entries["balora"]["d1"].values == {42: 50.0, 7: 50.0}
    assert steps.lower()  # fewer steps is better: lora is in bold
    ood = next(t for t in report.tables if t.metric == "ood/accuracy")
    assert ood.split == "ood"
    assert ood.entries["lora"]["d1"].values == {42: pytest.approx(0.65), 7: pytest.approx(0.675)}
    assert next(t for t in report.tables if t.metric == "ood/rt/accuracy").split == "ood/rt"
    comparison = [c for c in report.comparisons if c.metric == STEPS_METRIC]
    assert comparison and comparison[0].difference.mean == pytest.approx(-10.0)

    path = write_report(spec, store)
    text = path.read_text()
    assert f"## {STEPS_METRIC} (train split)" in text and f"d1: {threshold:.4f}" in text
    assert "| lora | **40.0000 ± 0.0000** |" in text
    assert "**out-of-distribution** split `ood/rt`" in text
    with open(path.parent / f"table_{STEPS_METRIC}.csv") as handle:
        rows = {r["row"]: r for r in csv.DictReader(handle)}
    assert float(rows["balora"]["d1 mean"]) == 50.0
    assert (path.parent / "table_ood_rt_accuracy.csv").is_file()
    with open(path.parent / "cells.csv") as handle:
        splits = {(r["metric"], r["split"]) for r in csv.DictReader(handle)}
    assert ("accuracy", "ood/rt") in splits and ("accuracy", "ood") in splits


def test_a_fixed_threshold_and_one_never_reached(tmp_path):
    spec, store = _store(tmp_path, {"metrics": ["accuracy"], "loss_threshold": 0.5})
    steps = next(t for t in build_report(spec, store).tables if t.metric == STEPS_METRIC)
    assert steps.entries["lora"]["d1"].values == {42: 50.0, 7: 50.0}  # smoothed 0.4333 and 0.4833 at step 50
    assert steps.entries["balora"]["d1"].values == {}  # never below 0.5
    text = write_report(spec, store).read_text()
    assert "| balora | — | — |" in text and "report.loss_threshold (d1: 0.5000)" in text


@pytest.mark.parametrize("value", ["low", True, float("inf")])
def test_bad_loss_threshold_is_one_line(value):
    with pytest.raises(SpecError, match="report.loss_threshold must be a number"):
        load_spec(_spec(report={"loss_threshold": value}))


def _sweep_store(tmp_path, sweep, run_dirs=False):
    spec = load_spec(_spec(base={k: v for k, v in BASE.items() if k != "data"},
                           grid={"method": ["lora", "balora"], "seed": [42, 7], "data": {"d1": {"data.task": "sst2"}},
                                 "overrides": {"r2": {"adapter.rank": 2}, "r8": {"adapter.rank": 8}}},
                           report={"metrics": ["accuracy"], "sweep": sweep}))
    store = ExperimentStore(tmp_path / "store")
    store.write_plan(spec)
    for cell in spec.cells:
        accuracy = {"r2": 0.5, "r8": 0.7}[cell.variant] + (0.1 if cell.method == "balora" else 0.0) \
            + (0.02 if cell.seed == 7 else 0.0)
        outcome = {"status": FINISHED, "run_metrics": {"accuracy": accuracy}, "timings": {"wall_seconds": 1.0}}
        if run_dirs:
            folder = store.cell_dir(cell.id) / "run"
            folder.mkdir(parents=True)
            rng = np.random.default_rng(cell.seed)
            np.save(folder / "features.npy", rng.normal(size=(12, 4)))
            (folder / "predictions.jsonl").write_text(
                "".join(json.dumps({"label": ("pos", "neg", "mid")[i % 3]}) + "\n" for i in range(12)))
            outcome["run_dir"] = str(folder)
        store.write_record(make_record(cell, FINISHED, store=store, env={}, attempt=1, started_at=time.time(),
                                       outcome=outcome))
    return spec, store


def test_sweep_figure_plots_each_method_against_the_swept_value(tmp_path, monkeypatch):
    import balora.experiments.report as report_module

    seen = {}
    monkeypatch.setattr(report_module, "plot_sweep",
                        lambda panels, path, xlabel, title="", log_x=False: seen.update(panels=panels, x=xlabel,
                                                                                       log=log_x))
    spec, store = _sweep_store(tmp_path, {"name": "rank", "values": {"r2": 2, "r8": 8}, "log": True})
    text = write_report(spec, store).read_text()
    assert "![metrics against rank](sweep.png)" in text and seen["x"] == "rank" and seen["log"]
    lines = seen["panels"]["accuracy (test), d1"]
    assert [x for x, _, _ in lines["lora"]] == [2.0, 8.0]
    assert lines["balora"][1][1] == pytest.approx(0.81) and lines["balora"][1][2] == pytest.approx(
        statistics.stdev([0.8, 0.82]))
    assert STEPS_METRIC not in {p.split(" ")[0] for p in seen["panels"]}  # no loss curves were logged


def test_sweep_png_is_written(tmp_path):
    spec, store = _sweep_store(tmp_path, {"name": "rank", "values": {"r2": 2, "r8": 8}})
    path = write_report(spec, store)
    assert (path.parent / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sweep, message", [
    ({"name": "rank", "values": {"r4": 4}}, "report.sweep.values names r4, which grid.overrides does not have"),
    ({"name": "rank", "values": {"r2": "two"}}, "report.sweep.values.r2 must be a number"),
    ({"name": "rank", "values": {"r2": 0}, "log": True}, "report.sweep.values.r2 must be a positive number"),
    ({"values": {"r2": 2}}, "report.sweep.name must name the swept setting"),
    ({"name": "rank", "values": {"r2": 2}, "colour": "red"}, "unknown key"),
])
def test_bad_sweep_is_one_line(tmp_path, sweep, message):
    with pytest.raises(SpecError, match=message):
        _sweep_store(tmp_path, sweep)


def test_tsne_panels_use_the_first_seed_of_each_row(tmp_path, monkeypatch):
    import balora.evaluation.features as features_module

    seen = {}
    real = features_module.plot_tsne

    def spy(features, labels, class_names, path, title=""):
        seen.update(features=features, labels=labels, names=class_names, title=title)
        return real(features, labels, class_names, path, title)

    monkeypatch.setattr(features_module, "plot_tsne", spy)
    spec, store = _sweep_store(tmp_path, {"name": "rank", "values": {"r2": 2, "r8": 8}}, run_dirs=True)
    text = write_report(spec, store).read_text()
    assert "![t-SNE of the final-layer features, d1](tsne_d1.png)" in text
    assert set(seen["features"]) == {"lora · r2", "lora · r8", "balora · r2", "balora · r8"}
    expected = np.random.default_rng(42).normal(size=(12, 4))  # seed 42 comes first in the grid
    assert np.array_equal(seen["features"]["lora · r2"], expected)
    assert seen["names"] == ["mid", "neg", "pos"] and seen["labels"]["lora · r2"][:3] == [2, 1, 0]
    assert "seed 42" in seen["title"]
    assert (store.root / "report" / "tsne_d1.png").read_bytes()[:4] == b"\x89PNG"
