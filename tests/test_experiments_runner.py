"""The grid runner on a tiny BERT: records, resume without re-running, a failing cell, a changed
spec, an interrupted grid (SIGKILL) resumed, and one end-to-end run in child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from balora.cli import main
from balora.experiments import ExperimentStore, SpecError, load_spec, run_experiment, write_report
from balora.experiments.cell import OUTCOME_FILE, make_job
from balora.experiments.cell_process import exit_message
from balora.experiments.runner import LocalExecutor
from balora.experiments.store import FAILED, FINISHED


def _spec(tiny_model_dir, task_files, name="grid", methods=("lora", "balora"), seeds=(42, 7), steps=2, **extra):
    train_file, eval_file = task_files
    spec = {
        "name": name,
        "base": {
            "model": {"name": tiny_model_dir, "max_length": 16},
            "adapter": {"rank": 4, "target_modules": ["query", "value"]},
            "data": {"task": "files", "train_file": train_file, "eval_file": eval_file, "validation_fraction": 0.25},
            "train": {"max_steps": steps, "batch_size": 8, "logging_steps": 1, "save_steps": 100, "report_to": [],
                      "learning_rate": 1.0e-2},
        },
        "grid": {"method": list(methods), "seed": list(seeds)},
        "report": {"metrics": ["accuracy", "macro_f1"]},
    }
    spec.update(extra)
    return spec


def _stamps(store: ExperimentStore) -> dict[str, tuple[int, str]]:
    """(mtime, content) of every record."""
    folder = store.root / "cells"
    return {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in folder.glob("*.json")}


def test_grid_records_resume_report_and_changed_spec(tiny_model_dir, task_files, tmp_path, one_thread):
    spec = load_spec(_spec(tiny_model_dir, task_files))
    store = ExperimentStore(tmp_path / "store")
    summary = run_experiment(spec, store.root, in_process=True, progress=False)
    assert sorted(summary.finished) == sorted(c.id for c in spec.cells) and not summary.failed
    records = store.records()
    for cell in spec.cells:
        r = records[cell.id]
        assert r["status"] == FINISHED and r["config_hash"] == cell.config_hash and r["seed"] == cell.seed
        run = store.absolute(r["run_dir"])
        saved = json.loads((run / "metrics.json").read_text())
        # the record holds the run's own numbers, named by split
        assert r["metrics"]["test"]["accuracy"] == saved["accuracy"]
        assert r["metrics"]["validation"]["accuracy"] == saved["validation/accuracy"]
        assert set(r["per_class"]["test"]["recall"]) == {"markets", "sports", "weather"}
        assert r["facts"]["validation_examples"] == 12 and r["facts"]["train_examples"] == 36
        assert [step for step, _ in r["task_loss"]] == [1, 2]
        assert r["peak_rss_bytes"] > 0 and r["versions"]["torch"] and r["timings"]["wall_seconds"] > 0
        assert r["config"]["adapter"]["method"] == cell.method and r["config"]["train"]["seed"] == cell.seed

    # a second call runs nothing and leaves every record as it was
    before = _stamps(store)
    again = run_experiment(spec, store.root, in_process=True, progress=False)
    assert again.ran == [] and sorted(again.kept) == sorted(before)
    assert _stamps(store) == before

    report = write_report(spec, store).read_text()
    assert "| method | files | Avg |" in report and "| lora − balora | accuracy | 2 |" in report

    # a spec that changes a finished cell's config is refused, naming the cells
    changed = load_spec(_spec(tiny_model_dir, task_files, set={"train.learning_rate": 0.02}))
    with pytest.raises(SpecError, match=r"changes the config of 4 finished cell\(s\).*files__lora__s42"):
        run_experiment(changed, store.root, in_process=True, progress=False)
    assert _stamps(store) == before


def test_failed_cell_is_recorded_and_the_grid_goes_on(tiny_model_dir, task_files, tmp_path, one_thread):
    spec = load_spec(_spec(tiny_model_dir, task_files, methods=("lora",), seeds=(42,), grid={
        "method": ["lora"], "seed": [42],
        "data": {"broken": {"data.train_file": str(tmp_path / "missing.csv")}, "good": {}}}))
    store = ExperimentStore(tmp_path / "store")
    summary = run_experiment(spec, store.root, in_process=True, progress=False)
    assert summary.failed == ["broken__lora__s42"] and summary.finished == ["good__lora__s42"]
    failed = store.record("broken__lora__s42")
    assert failed["status"] == FAILED and failed["error"].startswith("FileNotFoundError: data file not found")
    assert "Traceback" in failed["traceback"] and failed["attempt"] == 1
    assert run_experiment(spec, store.root, in_process=True, progress=False).ran == []  # not retried by default
    retried = run_experiment(spec, store.root, in_process=True, progress=False, retry_failed=True)
    assert retried.ran == ["broken__lora__s42"] and store.record("broken__lora__s42")["attempt"] == 2
    report = write_report(spec, store).read_text()
    assert "| broken__lora__s42 | failed | FileNotFoundError" in report
    assert "| lora | — | " in report  # the failed data set has no value; it is not averaged in


def test_a_finished_outcome_is_recorded_without_running_again(tiny_model_dir, task_files, tmp_path, one_thread):
    spec = load_spec(_spec(tiny_model_dir, task_files, methods=("lora",), seeds=(42,)))
    store = ExperimentStore(tmp_path / "store")
    run_experiment(spec, store.root, in_process=True, progress=False)
    (cell,) = spec.cells
    # the runner died after the cell wrote its outcome but before its record said finished
    record = store.record(cell.id)
    store.record_path(cell.id).write_text(json.dumps(dict(record, status="running")))
    runs_before = sorted(p.name for p in store.cell_dir(cell.id).glob("run-*"))
    summary = run_experiment(spec, store.root, in_process=True, progress=False)
    assert summary.finished == [cell.id] and store.record(cell.id)["status"] == FINISHED
    assert sorted(p.name for p in store.cell_dir(cell.id).glob("run-*")) == runs_before  # no new run
    assert store.record(cell.id)["metrics"] == record["metrics"]


def test_interrupted_run_with_a_checkpoint_is_resumed(tiny_model_dir, task_files, tmp_path):
    spec = load_spec(_spec(tiny_model_dir, task_files, methods=("lora",), seeds=(42,)))
    (cell,) = spec.cells
    cell_dir = tmp_path / "cell"
    run = cell_dir / "run-20240101-000000"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump(cell.config.to_dict()))
    assert make_job(cell.id, cell.config, cell.config_hash, cell_dir)["resume"] == str(run)
    other = load_spec(_spec(tiny_model_dir, task_files, methods=("lora",), seeds=(42,), steps=3)).cells[0]
    assert make_job(other.id, other.config, other.config_hash, cell_dir)["resume"] is None  # another config
    (run / "metrics.json").write_text("{}")
    assert make_job(cell.id, cell.config, cell.config_hash, cell_dir)["resume"] is None  # already complete


def test_exit_messages():
    assert "SIGKILL" in exit_message(-signal.SIGKILL) and "out of memory" in exit_message(-signal.SIGKILL)
    assert "exit code 1" in exit_message(1)


@pytest.mark.slow
def test_grid_killed_mid_way_resumes_without_rerunning(tiny_model_dir, task_files, tmp_path):
    """SIGKILL a runner (a child process) after its first finished cell, then resume: the finished
    cells are not run again, the grid completes."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(tiny_model_dir, task_files, steps=6)))
    spec = load_spec(spec_file)
    store = ExperimentStore(tmp_path / "store")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    child = subprocess.Popen([sys.executable, "-m", "balora.cli", "experiment", "run", str(spec_file), "--store",
                              str(store.root), "--in-process", "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(r["status"] == FINISHED for r in store.records().values()):
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    finished = {i: s for i, s in _stamps(store).items() if json.loads(s[1])["status"] == FINISHED}
    assert 1 <= len(finished) < len(spec.cells), "the runner must be killed mid-grid"

    summary = run_experiment(spec, store.root, in_process=True, progress=False)
    assert sorted(summary.kept) == sorted(finished) and not set(summary.ran) & set(finished)
    after = _stamps(store)
    assert {i: after[i] for i in finished} == finished  # untouched: same mtime, same content
    assert all(r["status"] == FINISHED for r in store.records().values()) and len(after) == len(spec.cells)


@pytest.mark.slow
def test_cli_end_to_end_in_child_processes(tiny_model_dir, task_files, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(tiny_model_dir, task_files, name="e2e", seeds=(42,), grid={
        "method": ["balora"], "seed": [42], "data": {"good": {}, "broken": {"data.eval_file": "missing.csv"}}})))
    store = tmp_path / "store"
    # two cells at once (the local pool): one finishes, one fails, each recorded on its own
    assert main(["experiment", "run", str(spec_file), "--store", str(store), "--no-progress", "--workers", "2"]) == 1
    records = ExperimentStore(store).records()
    assert records["good__balora__s42"]["status"] == FINISHED
    assert records["good__balora__s42"]["isolation"] == "process"
    assert records["good__balora__s42"]["timings"]["process_seconds"] >= records["good__balora__s42"]["timings"][
        "wall_seconds"]
    assert records["broken__balora__s42"]["error"].startswith("FileNotFoundError")
    assert (store / "runs" / "good__balora__s42" / "cell.log").is_file()
    assert main(["experiment", "report", str(store)]) == 0
    assert "report:" in capsys.readouterr().out
    for name in ("report.md", "table_accuracy.csv", "cost.csv", "task_loss.png", "metrics.png", "cells.csv"):
        assert (store / "report" / name).is_file(), name

    # a child that dies without an outcome is a failed cell with its log's tail
    job = {"id": "x", "config": {"no such key": 1}, "config_hash": "0", "cell_dir": str(tmp_path / "x"),
           "resume": None, "outcome": str(tmp_path / "x" / OUTCOME_FILE)}
    (tmp_path / "x").mkdir()
    outcome = LocalExecutor().run(job, Path(job["cell_dir"]))
    assert outcome["status"] == FAILED and "exit code 1" in outcome["error"] and "unknown key" in outcome["traceback"]
