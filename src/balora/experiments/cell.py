"""One cell of a grid, run through the single-run API (:func:`balora.runs.train_run`).

:func:`execute_cell` runs a job (the cell's config and where its run goes) in this process and
returns its outcome, also written atomically to the job's ``outcome`` file: the run's
metrics, task-loss curve, timings, peak RSS, or the error and traceback of a failed run. The
runner calls it directly (``--in-process``) or in a child process, ``python -m
balora.experiments.cell JOB.json``, which exits when its parent dies (a killed runner leaves no
orphan training behind).

A job whose cell directory holds an interrupted run (``config.yaml`` and a complete checkpoint,
no ``metrics.json``) resumes that run from its last checkpoint (``train_run(resume=...)``)
instead of starting again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from balora import run_dir as run_dirs
from balora.config import RunConfig, from_dict
from balora.experiments.cell_process import OUTCOME_FILE
from balora.experiments.rss import PeakRSS
from balora.experiments.spec import config_hash as spec_hash
from balora.experiments.store import FAILED, FINISHED, write_json_atomic

__all__ = ["RUN_NAME", "execute_cell", "main", "make_job", "resumable_run", "task_loss_curve"]

#: A cell's run directories are ``<cell dir>/run-<time>``.
RUN_NAME = "run"


def make_job(cell_id: str, config: RunConfig, config_hash: str, cell_dir: Path) -> dict[str, Any]:
    """The job of a cell: its config (run directories under ``cell_dir``), and an interrupted run to resume."""
    data = config.to_dict()
    data.update(output_dir=str(cell_dir), name=RUN_NAME)
    resume = resumable_run(cell_dir, config_hash)
    return {"id": cell_id, "config": data, "config_hash": config_hash, "cell_dir": str(cell_dir),
            "resume": str(resume) if resume else None, "outcome": str(cell_dir / OUTCOME_FILE)}


def _run_dirs(cell_dir: Path) -> list[Path]:
    """The cell's run directories, newest first."""
    if not cell_dir.is_dir():
        return []
    runs = [p for p in cell_dir.iterdir() if p.is_dir() and p.name.startswith(f"{RUN_NAME}-")]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def resumable_run(cell_dir: Path, config_hash: str) -> Path | None:
    """The newest interrupted run of a cell that was started with the config of ``config_hash`` and
    can continue from a checkpoint, or None."""
    for path in _run_dirs(cell_dir):
        saved = path / run_dirs.CONFIG_FILE
        if not saved.is_file() or (path / run_dirs.METRICS_FILE).exists() or run_dirs.last_checkpoint(path) is None:
            continue
        try:
            same = spec_hash(from_dict(RunConfig, yaml.safe_load(saved.read_text()))) == config_hash
        except (ValueError, yaml.YAMLError):  # ConfigError is a ValueError
            same = False
        if same:
            return path
    return None


def task_loss_curve(history: list[dict]) -> list[list[float]]:
    """``[[step, task loss], ...]`` of a run's log history (``loss`` where no ``task_loss`` was logged)."""
    key = "task_loss" if any("task_loss" in h for h in history) else "loss"
    return [[h["step"], h[key]] for h in history if key in h and "step" in h]


def execute_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one cell; returns the outcome (and writes it to ``job["outcome"]``).

    Any exception of the run is caught and becomes a ``failed`` outcome with its message and
    traceback; KeyboardInterrupt is not caught.
    """
    from balora.runs import train_run  # heavy: imported where a cell runs

    outcome_path = Path(job["outcome"])
    outcome_path.unlink(missing_ok=True)
    config = from_dict(RunConfig, job["config"])
    started = time.perf_counter()
    outcome: dict[str, Any] = {"id": job["id"], "config_hash": job["config_hash"], "resumed_from": job.get("resume")}
    rss = PeakRSS()
    try:
        with rss:
            if job.get("resume"):
                result = train_run(None, resume=job["resume"], progress=False)
            else:
                result = train_run(config, progress=False)
        metrics = result.metrics
        outcome.update(status=FINISHED, run_dir=str(result.run_dir), run_metrics=metrics,
                       task_loss=task_loss_curve(result.log_history))
        train_seconds, eval_seconds = metrics.get("train_seconds"), metrics.get("eval_seconds")
    except Exception as err:  # a failed cell is recorded and the grid goes on
        runs = _run_dirs(Path(job["cell_dir"]))
        outcome.update(status=FAILED, error=f"{type(err).__name__}: {' '.join(str(err).split())}",
                       traceback=traceback.format_exc(), run_dir=str(runs[0]) if runs else None)
        train_seconds = eval_seconds = None
    outcome.update(
        timings={"wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
                 "eval_seconds": eval_seconds},
        peak_rss_bytes=rss.peak, rss_before_bytes=rss.before,
    )
    write_json_atomic(outcome_path, outcome)
    return outcome


def _exit_with_parent(interval_s: float = 1.0) -> None:
    """End this process as soon as the process that started it is gone."""
    parent = os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(interval_s)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """``python -m balora.experiments.cell JOB.json``: run the job; the outcome goes to its file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m balora.experiments.cell JOB.json", file=sys.stderr)
        return 2
    _exit_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("balora").setLevel(logging.INFO)
    job = json.loads(Path(args[0]).read_text())
    outcome = execute_cell(job)
    print(f"cell {job['id']}: {outcome['status']}" + (f" ({outcome['error']})" if outcome.get("error") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
