"""Experiments without training: specs, cell ids, dry-run, the validation split, statistics, and the
report checked against numbers computed by hand from a store written here."""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from balora.cli import main
from balora.config import ConfigError, load_config
from balora.data.classification import CLASSIFICATION, TaskData
from balora.experiments import ExperimentStore, SpecError, load_spec, paired_bootstrap, write_report
from balora.experiments.report import build_report, open_experiment
from balora.experiments.spec import PAPER_SEEDS, config_hash
from balora.experiments.store import FAILED, FINISHED, make_record, split_metrics
from balora.runs_classification import carve_validation
from balora.runs_generation import carve_validation_templates

BASE = {
    "model": {"name": "tiny-model-dir", "max_length": 16},
    "adapter": {"rank": 4, "target_modules": ["query", "value"]},
    "data": {"task": "files", "train_file": "train.csv", "eval_file": "eval.csv"},
    "train": {"max_steps": 2, "batch_size": 8, "report_to": [], "learning_rate": 1.0e-2},
}


def _spec(**extra):
    spec = {"name": "t", "base": json.loads(json.dumps(BASE)), "grid": {"method": ["lora", "balora"], "seed": [42, 7]}}
    spec.update(extra)
    return spec


# --------------------------------------------------------------------------- specs and cells


def test_cells_ids_order_and_configs():
    spec = load_spec(_spec(grid={"method": ["lora", "lora+reg", "balora"], "task": ["sst2", "rte"],
                                 "overrides": {"kl": {"regularizers.consistency_kind": "kl"},
                                               "cos": ["regularizers.consistency_kind=cosine"]}},
                           base={k: v for k, v in BASE.items() if k != "data"}))
    assert spec.seeds == PAPER_SEEDS  # the paper's seeds by default
    assert len(spec.cells) == 3 * 2 * 2 * 3 == spec.planned_count()
    ids = [c.id for c in spec.cells]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "sst2__lora__kl__s42" and ids[-1] == "rte__balora__cos__s2024"
    assert [c.seed for c in spec.cells[:12]] == [42] * 12  # seed-major: every method at the first seed first
    cell = spec.by_id["rte__lora+reg__cos__s1024"]
    assert (cell.config.data.task, cell.config.adapter.method, cell.config.train.seed) == ("rte", "lora+reg", 1024)
    assert cell.config.regularizers.consistency_kind == "cosine" and cell.row == "lora+reg · cos"
    # the same spec gives the same ids and hashes (resume is by id, change detection by hash)
    again = load_spec(_spec(grid={"method": ["lora", "lora+reg", "balora"], "task": ["sst2", "rte"],
                                  "overrides": {"kl": {"regularizers.consistency_kind": "kl"},
                                                "cos": ["regularizers.consistency_kind=cosine"]}},
                            base={k: v for k, v in BASE.items() if k != "data"}))
    assert [(c.id, c.config_hash) for c in again.cells] == [(c.id, c.config_hash) for c in spec.cells]


def test_base_file_relative_to_spec_and_set(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "configs" / "exp").mkdir()
    spec_file = tmp_path / "configs" / "exp" / "s.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "rel", "base": "../base.yaml", "set": {"train.max_steps": 5},
                                         "grid": {"seed": [1]}}))
    spec = load_spec(spec_file)
    (cell,) = spec.cells
    assert cell.id == "files__balora__s1"  # data label from data.task, method from the base's default
    assert cell.config.train.max_steps == 5 and cell.config.train.seed == 1


def test_config_hash_ignores_location_and_defaults():
    a = load_config(None, ["train.max_steps=3"])
    b = load_config(None, ["train.max_steps=3", "output_dir=elsewhere", "name=x", "train.epochs=1.0"])
    assert config_hash(a) == config_hash(b)  # where a run goes, and settings at their default, do not count
    assert config_hash(a) != config_hash(load_config(None, ["train.max_steps=4"]))


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key(s) colour"),
    ({"name": None}, "name is missing"),
    ({"base": None}, "base is missing"),
    ({"grid": {"methd": ["lora"]}}, "unknown key(s) grid.methd"),
    ({"grid": {"method": ["lora", "lora"]}}, "grid.method lists 'lora' twice"),
    ({"grid": {"method": ["lora"], "task": ["sst2"], "data": {"a": {}}}}, "grid.task and grid.data"),
    ({"grid": {"seed": [1, "two"]}}, "grid.seed must be a list of integers"),
    ({"grid": {"overrides": {"bad name": {}}}}, "cannot be part of a cell id"),
    ({"set": {"train.seed": 3}}, "set sets train.seed, which grid.seed sets"),
    ({"set": ["output_dir=x"]}, "set sets output_dir, which the store sets"),
    ({"grid": {"method": ["lora"], "overrides": {"r0": {"adapter.rank": 0}}}},
     "cell files__lora__r0__s42: adapter.rank must be >= 1, got 0"),
    ({"grid": {"method": ["lora", "bogus"]}}, "cell files__bogus__s42: adapter.method"),
    ({"select": {"key": "train.learning_rate", "values": [1e-3, 2e-3]}}, "select needs data.validation_fraction"),
    ({"select": {"key": "train.learning_rate", "values": [1e-3]}}, "at least two candidates"),
    ({"report": {"split": "train"}}, "report.split must be test or validation"),
])
def test_spec_errors_are_one_line(change, message):
    spec = _spec()
    for key, value in change.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_and_missing_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML \(line"):
        load_spec(bad)
    with pytest.raises(SpecError, match="base config not found"):
        load_spec(dict(_spec(), base="missing.yaml"))


def test_select_candidates_and_lambda_scale():
    base = json.loads(json.dumps(BASE))
    base["data"]["validation_fraction"] = 0.25
    spec = load_spec(_spec(base=base, grid={"method": ["lora", "balora"], "seed": [42, 7, 9]},
                           select={"key": "lambda_scale", "values": [0.5, 2], "metric": "accuracy"}))
    lora = [c for c in spec.cells if c.method == "lora"]
    assert [c.value for c in lora] == [None] * 3  # no λ without +reg: one candidate
    scaled = spec.by_id["files__balora__lambda_scale=2__s7"].config.regularizers
    assert (scaled.lambda_consistency, scaled.lambda_diversity, scaled.lambda_svd) == pytest.approx((0.3, 0.06, 0.06))
    assert spec.select.seeds == (42,) and spec.select.goal == "max"
    # lora: 3 seeds; balora: 2 candidates at seed 42, then the chosen one at 7 and 9
    assert spec.planned_count() == 3 + 2 + 2
    assert {c.id for c in spec.selection_cells()} == {"files__lora__s42", "files__balora__lambda_scale=0.5__s42",
                                                      "files__balora__lambda_scale=2__s42"}
    lr = load_spec(_spec(base=base, select={"key": "train.learning_rate", "values": ["1e-3", 2e-3],
                                            "metric": "macro_f1", "seeds": [7]}))
    cell = lr.by_id["files__lora__learning_rate=0.001__s42"]
    assert cell.config.train.learning_rate == pytest.approx(1e-3) and lr.select.seeds == (7,)
    with pytest.raises(SpecError, match="sets train.learning_rate, which select.key sets"):
        load_spec(_spec(base=base, set={"train.learning_rate": 1}, select={"key": "train.learning_rate",
                                                                            "values": [1, 2]}))


SHIPPED_SPECS = sorted((Path(__file__).parents[1] / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=[p.stem for p in SHIPPED_SPECS])
def test_shipped_specs_resolve_every_cell(path):
    spec = load_spec(path)
    assert spec.cells and spec.planned_count() <= len(spec.cells)
    assert all(c.config_hash for c in spec.cells)


def test_dry_run_lists_cells_and_bad_spec_is_one_line(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(_spec()))
    assert main(["experiment", "run", str(spec_file), "--dry-run", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "4 cells planned" in out
    for cell_id in ("files__lora__s42", "files__balora__s42", "files__lora__s7", "files__balora__s7"):
        assert f"pending     {cell_id}" in out
    assert not (tmp_path / "store").exists()  # a dry run writes nothing
    spec_file.write_text(yaml.safe_dump(_spec(grid={"method": ["lora"], "overrides": {"x": {"adapter.rank": -1}}})))
    assert main(["experiment", "run", str(spec_file), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cell files__lora__x__s42: adapter.rank must be >= 1" in err


# --------------------------------------------------------------------------- the validation split


def _task(n_per_class=(30, 12, 6)):
    texts, labels = [], []
    for label, n in enumerate(n_per_class):
        texts += [f"row {label}-{i}" for i in range(n)]
        labels += [label] * n
    train = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return TaskData("t", train, train.select(range(3)), ["a", "b", "c"], CLASSIFICATION, "accuracy")


def test_validation_split_is_disjoint_stratified_and_deterministic():
    task = _task()
    original = list(task.train["text"])
    validation = carve_validation(task, 0.25, seed=3)
    train_texts, val_texts = set(task.train["text"]), set(validation["text"])
    assert not train_texts & val_texts and sorted(train_texts | val_texts) == sorted(original)
    counts = np.bincount(validation["label"], minlength=3)
    assert counts.sum() == 12 and np.abs(counts - np.array([7.5, 3, 1.5])).max() <= 1  # stratified: 1/4 of each
    again = _task()
    assert carve_validation(again, 0.25, seed=3)["text"] == validation["text"]
    other = _task()
    assert carve_validation(other, 0.25, seed=4)["text"] != validation["text"]


def test_validation_split_errors_and_config():
    with pytest.raises(ConfigError, match="data.validation_fraction=0.01: no validation split"):
        carve_validation(_task(), 0.01, seed=0)  # fewer held-out rows than classes
    with pytest.raises(ConfigError, match=r"data.validation_fraction must be in \(0, 1\)"):
        load_config(None, ["data.validation_fraction=1.0"])
    with pytest.raises(ConfigError, match="only with data.task=gsm-symbolic"):
        load_config(None, ["family=generation", "data.task=metamathqa", "data.validation_fraction=0.1"])
    assert load_config(None, []).data.validation_fraction is None  # off by default


def test_generation_validation_is_by_template():
    rows = datasets.Dataset.from_dict({"template_id": [t for t in range(10) for _ in range(3)],
                                       "question": [f"q{i}" for i in range(30)]})
    train, validation = carve_validation_templates(rows, 0.2, seed=1)
    assert len(set(validation["template_id"])) == 2 and len(validation) == 6
    assert not set(train["template_id"]) & set(validation["template_id"]) and len(train) == 24
    assert carve_validation_templates(rows, 0.2, seed=1)[1]["question"] == validation["question"]
    with pytest.raises(ConfigError, match="leaves no training template"):
        carve_validation_templates(rows.select(range(3)), 0.9, seed=1)


def test_split_metrics_names_the_split():
    sorted_ = split_metrics({"accuracy": 0.9, "recall/a": 0.5, "validation/accuracy": 0.8,
                             "validation/recall/a": 0.4, "trainable_parameters": 10, "task": "t",
                             "headline_metric": "accuracy"})
    assert sorted_["metrics"] == {"test": {"accuracy": 0.9}, "validation": {"accuracy": 0.8}}
    assert sorted_["per_class"] == {"test": {"recall": {"a": 0.5}}, "validation": {"recall": {"a": 0.4}}}
    assert sorted_["facts"] == {"trainable_parameters": 10} and sorted_["info"]["task"] == "t"


# --------------------------------------------------------------------------- statistics


def _naive_percentile_bootstrap(d, resamples, rng):
    means = [rng.choice(d, size=len(d), replace=True).mean() for _ in range(resamples)]
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_bootstrap_matches_a_naive_reference():
    d = np.random.default_rng(5).normal(0.02, 0.05, size=12)
    result = paired_bootstrap(d, seed=1)
    low, high = _naive_percentile_bootstrap(d, 20000, np.random.default_rng(2))
    half_width = (high - low) / 2
    assert result.mean == pytest.approx(d.mean())
    assert result.low == pytest.approx(low, abs=0.05 * half_width)  # Monte-Carlo error of the percentiles
    assert result.high == pytest.approx(high, abs=0.05 * half_width)
    assert paired_bootstrap(d, seed=1) == result  # seeded


def test_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(0)
    true = 0.03
    one = paired_bootstrap(true + rng.normal(0, 0.02, size=40), seed=0)
    assert one.low < true < one.high and one.includes_zero is False
    hits = 0
    for i in range(150):  # a 95% interval covers the true mean difference about 95% of the time
        r = paired_bootstrap(true + rng.normal(0, 0.02, size=30), n_resamples=2000, seed=i)
        hits += r.low <= true <= r.high
    assert 0.85 <= hits / 150 <= 0.99
    assert paired_bootstrap([0.1], seed=0).includes_zero is None  # one pair: no interval
    assert paired_bootstrap([0.1, 0.1, 0.1], seed=0).low == pytest.approx(0.1)  # no spread: a point


def test_comparison_reading_is_plain():
    from balora.experiments.report import Comparison

    def reading(diffs, lower=False):
        return Comparison("lora", "balora", "accuracy", paired_bootstrap(diffs, seed=0), lower).reading()

    assert reading([-0.1, -0.12, -0.09, -0.11, -0.1, -0.13]) == "lora is worse than balora (the interval excludes 0)"
    assert reading([-0.1, -0.12, -0.09, -0.11, -0.1, -0.13], lower=True).startswith("lora is better")
    assert reading([-0.1, 0.1, -0.05, 0.06, 0.0, 0.02]) == "the interval includes 0: no difference shown"
    assert reading([-0.1, -0.12, -0.09]).startswith("only 3 pairs: too few")  # even though it excludes 0
    assert reading([0.1]) == "1 pair(s): too few for an interval"


# --------------------------------------------------------------------------- report from a hand-made store

#: accuracy per (data, method, seed); None = the cell failed, missing = not run
VALUES = {
    ("d1", "lora", 42): 0.70, ("d1", "lora", 7): 0.74, ("d1", "lora", 9): 0.72,
    ("d1", "balora", 42): 0.80, ("d1", "balora", 7): 0.78, ("d1", "balora", 9): 0.79,
    ("d2", "lora", 42): 0.60, ("d2", "lora", 7): 0.66, ("d2", "lora", 9): None,
    ("d2", "balora", 42): 0.50, ("d2", "balora", 7): 0.55,
}


def _hand_made_store(tmp_path):
    spec = load_spec(_spec(base={k: v for k, v in BASE.items() if k != "data"},
                           grid={"method": ["lora", "balora"], "seed": [42, 7, 9],
                                 "data": {"d1": {"data.task": "sst2"}, "d2": {"data.task": "rte"}}},
                           report={"metrics": ["accuracy", "headline"]}))
    store = ExperimentStore(tmp_path / "store")
    store.write_plan(spec)
    for cell in spec.cells:
        key = (cell.data, cell.method, cell.seed)
        if key not in VALUES:
            continue
        value = VALUES[key]
        outcome = {"status": FAILED, "error": "RuntimeError: boom"} if value is None else {
            "status": FINISHED, "run_metrics": {"accuracy": value, "macro_f1": value / 2, "headline_metric": "accuracy",
                                                "trainable_parameters": 100},
            "task_loss": [[1, 1.0 + value], [2, 0.5 + value]], "peak_rss_bytes": 2**20 * (100 + cell.seed),
            "timings": {"wall_seconds": 10.0 + cell.seed, "train_seconds": 5.0}}
        store.write_record(make_record(cell, outcome["status"], store=store, env={}, attempt=1,
                                       started_at=time.time(), outcome=outcome))
    return spec, store


def test_report_tables_match_hand_computation(tmp_path):
    spec, store = _hand_made_store(tmp_path)
    path = write_report(spec, store)
    text = path.read_text()
    out = path.parent
    with open(out / "table_accuracy.csv") as handle:
        table = {row["row"]: row for row in csv.DictReader(handle)}
    d1_lora = [0.70, 0.74, 0.72]
    assert float(table["lora"]["d1 mean"]) == pytest.approx(statistics.mean(d1_lora))
    assert float(table["lora"]["d1 std"]) == pytest.approx(statistics.stdev(d1_lora))
    assert int(table["lora"]["d2 n"]) == 2 and int(table["balora"]["d2 n"]) == 2
    avg_balora = (statistics.mean([0.80, 0.78, 0.79]) + statistics.mean([0.50, 0.55])) / 2
    assert float(table["balora"]["Avg"]) == pytest.approx(avg_balora)
    # markdown: bold best per column (balora on d1, lora on d2), incomplete entries marked, Avg column
    assert "| method | d1 | d2 | Avg |" in text
    assert f"**{statistics.mean([0.80, 0.78, 0.79]):.4f} ± {statistics.stdev([0.80, 0.78, 0.79]):.4f}**" in text
    assert f"**{statistics.mean([0.60, 0.66]):.4f} ± {statistics.stdev([0.60, 0.66]):.4f} (2/3)**" in text
    avg_lora = (statistics.mean(d1_lora) + statistics.mean([0.60, 0.66])) / 2
    assert f"| **{avg_lora:.4f}** |" in text if avg_lora > avg_balora else f"| **{avg_balora:.4f}** |" in text
    assert "## accuracy (test split)" in text and "**test** split" in text
    assert "| d1 (accuracy) | d2 (accuracy) |" in text  # headline: the task's own metric named
    # failed and not-run cells are listed, never averaged in
    assert "| d2__lora__s9 | failed | RuntimeError: boom |" in text
    assert "| d2__balora__s9 | not run |" in text
    # paired comparison: lora - balora over the (data, seed) pairs both finished
    diffs = [0.70 - 0.80, 0.74 - 0.78, 0.72 - 0.79, 0.60 - 0.50, 0.66 - 0.55]
    with open(out / "comparison.csv") as handle:
        comparison = [r for r in csv.DictReader(handle) if r["metric"] == "accuracy"][0]
    assert comparison["row"] == "lora" and comparison["baseline"] == "balora"
    assert int(comparison["pairs"]) == 5 and float(comparison["mean_difference"]) == pytest.approx(np.mean(diffs))
    expected = paired_bootstrap(diffs, seed=0)
    assert float(comparison["low"]) == pytest.approx(expected.low)
    assert comparison["includes_zero"] == str(expected.includes_zero)
    assert ("the interval includes 0" in text) == bool(expected.includes_zero)
    # cost table from the records
    with open(out / "cost.csv") as handle:
        cost = {(r["row"], r["data"]): r for r in csv.DictReader(handle)}
    assert float(cost[("lora", "d1")]["peak_rss_mib_mean"]) == pytest.approx(np.mean([142, 107, 109]))
    assert float(cost[("lora", "d1")]["wall_seconds_mean"]) == pytest.approx(np.mean([52, 17, 19]))
    # figures are PNG files
    for name in ("task_loss.png", "metrics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the store alone (its saved spec) gives the same report
    spec2, store2 = open_experiment(store.root)
    assert [t.entries["lora"]["d1"].values for t in build_report(spec2, store2).tables] == \
        [t.entries["lora"]["d1"].values for t in build_report(spec, store).tables]


def test_report_lists_the_calibrated_lambdas_of_each_cell(tmp_path):
    """From the record's metrics (calibrated_lambdas) or, for older records, the run's calibration.json."""
    base = json.loads(json.dumps(BASE))
    base["regularizers"] = {"lambdas": "auto", "calibration_terms": ["consistency"]}
    spec = load_spec(_spec(base=base, grid={"method": ["lora+reg"], "seed": [42, 7, 9]},
                           report={"metrics": ["accuracy"]}))
    store = ExperimentStore(tmp_path / "store")
    store.write_plan(spec)
    by_seed = {42: 0.9, 7: 0.003}
    for cell in spec.cells:
        metrics = {"accuracy": 0.5}
        if cell.seed == 42:
            metrics["calibrated_lambdas"] = {"consistency": 0.9, "diversity": 0.03, "svd": 0.03}
        outcome = {"status": FINISHED, "run_metrics": metrics, "timings": {}}
        if cell.seed == 7:  # an older record: the λs only in its run directory
            run = tmp_path / "store" / "runs" / cell.id / "run-1"
            run.mkdir(parents=True)
            (run / "calibration.json").write_text(json.dumps({"proposed": {"consistency": 0.003, "svd": 0.03}}))
            outcome["run_dir"] = str(run)
        store.write_record(make_record(cell, FINISHED, store=store, env={}, attempt=1, started_at=time.time(),
                                       outcome=outcome))
    path = write_report(spec, store)
    text = path.read_text()
    assert "## λs calibrated per cell (regularizers.lambdas: auto)" in text
    assert "| lora+reg | files | λ (consistency) | 0.9 | 0.003 | — |" in text  # seed 9: no λs found
    assert "λ (svd)" not in text and "λ (diversity)" not in text  # not calibrated: the spec's
    with open(path.parent / "calibrated_lambdas.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["seed"]), r["term"], float(r["lambda"])) for r in rows] == \
        [(s, "consistency", v) for s, v in by_seed.items()]
    # no calibration, no section
    spec2, store2 = _hand_made_store(tmp_path / "other")
    assert "λs calibrated" not in write_report(spec2, store2).read_text()


def test_report_excludes_cells_run_with_another_config(tmp_path):
    spec, store = _hand_made_store(tmp_path)
    changed = load_spec(dict(json.loads(json.dumps(spec.raw)), set={"train.max_steps": 3}))
    report = build_report(changed, store)
    assert not report.counted and all(status in ("config changed", "failed", "not run")
                                      for _, status, _ in report.not_counted)
    assert ExperimentStore(store.root).changed_cells(changed)  # the runner refuses such a spec


def test_report_selection_uses_validation_only(tmp_path):
    base = json.loads(json.dumps(BASE))
    base["data"]["validation_fraction"] = 0.2
    spec = load_spec(_spec(base=base, grid={"method": ["balora"], "seed": [42, 7]},
                           select={"key": "train.learning_rate", "values": [1e-3, 2e-3], "metric": "accuracy"}))
    store = ExperimentStore(tmp_path / "s")
    store.write_plan(spec)
    # lr 1e-3 is better on validation, 2e-3 on test: the choice must follow validation
    scores = {1e-3: (0.9, 0.1), 2e-3: (0.1, 0.9)}
    for cell in spec.cells:
        val, test = scores[cell.value]
        store.write_record(make_record(cell, FINISHED, store=store, env={}, attempt=1, started_at=time.time(),
                                       outcome={"status": FINISHED, "run_metrics": {
                                           "accuracy": test, "validation/accuracy": val,
                                           "headline_metric": "accuracy"}}))
    report = build_report(spec, store)
    assert {c.value for c in report.cells} == {1e-3}
    assert report.tables[0].entries["balora"]["files"].values == {42: 0.1, 7: 0.1}
    text = write_report(spec, store).read_text()
    assert "## Choice of train.learning_rate (validation split)" in text and "**0.001: 0.9000 (1/1)**" in text


def test_generation_run_reports_validation_metrics(tiny_causal_lm_dir, tmp_path, one_thread):
    from balora.runs import train_run
    from balora.runs_generation import VALIDATION_PREDICTIONS_FILE

    config = load_config(None, [
        "family=generation", f"output_dir={tmp_path}", f"model.name={tiny_causal_lm_dir}", "model.max_length=320",
        "data.task=gsm-symbolic", "data.max_train_examples=8", "data.validation_fraction=0.1",
        "adapter.method=lora", "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=1",
        "train.batch_size=2", "train.report_to=[]", "eval.max_examples=2", "eval.max_new_tokens=4",
        "eval.batch_size=2"])
    result = train_run(config, progress=False)
    m = result.metrics
    assert m["total"] == 2 and m["validation/total"] == 2 and 0.0 <= m["validation/accuracy"] <= 1.0
    held, kept = m["validation_templates"], m["train_templates"]
    assert held >= 1 and held == round(0.1 * (held + kept))  # 10% of the training templates
    assert (result.run_dir / VALIDATION_PREDICTIONS_FILE).is_file()
    for prefix in ("", "validation/"):  # the loss of the reference solutions of the same problems
        assert m[prefix + "answer_loss"] > 0 and math.isfinite(m[prefix + "answer_loss"])
        assert m[prefix + "answer_perplexity"] == pytest.approx(math.exp(m[prefix + "answer_loss"]))
    assert m["answer_tokens"] > 0


def test_rows_without_a_method_axis_are_the_variants_and_the_baseline_must_exist():
    grid = {"seed": [42], "overrides": {"plain": {"adapter.method": "pissa"},
                                        "full": {"adapter.method": "balora"}}}
    spec = load_spec(_spec(grid=grid, report={"baseline": "full"}))
    assert [c.row for c in spec.cells] == ["plain", "full"]
    assert [c.method for c in spec.cells] == ["pissa", "balora"]  # each cell's own method
    assert [c.id for c in spec.cells][0].endswith("__plain__s42")
    build_report(spec, ExperimentStore(Path("unused")))  # no record: nothing is read
    from balora.experiments.report import _baseline_pairs

    assert _baseline_pairs(spec, spec.cells) == [("plain", "full")]
    with pytest.raises(SpecError, match="report.baseline 'pissa · full' is neither a row of the grid "
                                        r"\(plain, full\) nor one of its methods"):
        load_spec(_spec(grid=grid, report={"baseline": "pissa · full"}))
    # with a method axis, rows keep the method, and a method name is a valid baseline
    spec = load_spec(_spec(grid={"method": ["lora", "pissa+reg"], "seed": [42],
                                 "overrides": {"r2": {"adapter.rank": 2}}}, report={"baseline": "balora"}))
    assert [c.row for c in spec.cells] == ["lora · r2", "pissa+reg · r2"]
