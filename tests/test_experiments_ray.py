"""``--executor ray``: a tiny grid as tasks on a local Ray instance gives the records the local
executor gives (same metrics), a failing cell is recorded and the grid goes on, and the options
are checked."""

from __future__ import annotations

import pytest

from balora.cli import main
from balora.experiments import ExperimentStore, load_spec, run_experiment
from balora.experiments.runner import make_executor
from balora.experiments.store import FAILED, FINISHED

ray = pytest.importorskip("ray")


def _spec(tiny_model_dir, task_files):
    train_file, eval_file = task_files
    return {
        "name": "ray-grid",
        "base": {
            "model": {"name": tiny_model_dir, "max_length": 16},
            "adapter": {"method": "lora", "rank": 4, "target_modules": ["query", "value"]},
            "data": {"task": "files", "train_file": train_file, "eval_file": eval_file},
            "train": {"max_steps": 3, "batch_size": 8, "logging_steps": 1, "save_steps": 100, "report_to": [],
                      "learning_rate": 1.0e-2},
        },
        "grid": {"data": {"good": {}, "broken": {"data.eval_file": "missing.csv"}},
                 "method": ["lora", "balora"], "seed": [42]},
    }


@pytest.mark.slow
def test_ray_grid_matches_the_local_executor(tiny_model_dir, task_files, tmp_path):
    spec = load_spec(_spec(tiny_model_dir, task_files))
    summary = run_experiment(spec, tmp_path / "ray", executor="ray", progress=False, init_options={"num_cpus": 2})
    assert sorted(summary.finished) == ["good__balora__s42", "good__lora__s42"]
    assert sorted(summary.failed) == ["broken__balora__s42", "broken__lora__s42"]
    assert not ray.is_initialized()  # the local instance it started is stopped again
    on_ray = ExperimentStore(tmp_path / "ray").records()
    for cell_id in summary.finished:
        assert on_ray[cell_id]["status"] == FINISHED and on_ray[cell_id]["isolation"] == "ray"
        assert on_ray[cell_id]["timings"]["process_seconds"] >= on_ray[cell_id]["timings"]["wall_seconds"]
    for cell_id in summary.failed:
        assert on_ray[cell_id]["status"] == FAILED and on_ray[cell_id]["error"].startswith("FileNotFoundError")

    # the same cells in this process: the same numbers (the seeded run does not depend on where it runs)
    local = run_experiment(spec, tmp_path / "local", in_process=True, progress=False)
    assert sorted(local.finished) == sorted(summary.finished)
    here = ExperimentStore(tmp_path / "local").records()
    for cell_id in summary.finished:
        assert on_ray[cell_id]["config_hash"] == here[cell_id]["config_hash"]
        assert on_ray[cell_id]["metrics"]["test"]["accuracy"] == here[cell_id]["metrics"]["test"]["accuracy"]
        for (step, a), (step_b, b) in zip(on_ray[cell_id]["task_loss"], here[cell_id]["task_loss"]):
            assert step == step_b and a == pytest.approx(b, rel=1e-4, abs=1e-5)

    # a second call runs nothing (no Ray needed for finished cells; failed ones are kept)
    again = run_experiment(spec, tmp_path / "ray", executor="ray", progress=False, init_options={"num_cpus": 2})
    assert again.ran == [] and sorted(again.kept) == sorted(summary.finished)


def test_executor_options_are_checked(tiny_model_dir, task_files, tmp_path, capsys):
    with pytest.raises(ValueError, match="cpus-per-cell must be a number >= 0"):
        make_executor("ray", cpus_per_cell=-1)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        make_executor("local", workers=0)
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("slurm")
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(_spec(tiny_model_dir, task_files)))
    assert main(["experiment", "run", str(spec_file), "--store", str(tmp_path / "s"), "--workers", "2",
                 "--executor", "ray"]) == 2
    assert "--workers do(es) not apply to --executor ray" in capsys.readouterr().err
    assert main(["experiment", "run", str(spec_file), "--store", str(tmp_path / "s"), "--ray-address", "auto"]) == 2
    assert "--ray-address do(es) not apply to --executor local" in capsys.readouterr().err
