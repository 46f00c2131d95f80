"""Experiments: resumable multi-seed grids of runs, their store, and their reports.

A spec (:mod:`~balora.experiments.spec`) is a YAML grid of methods × data × seeds × override
variants around a base run config, optionally with a hyper-parameter chosen on the validation
split (:mod:`~balora.experiments.selection`). The runner (:mod:`~balora.experiments.runner`)
runs every cell without a finished result through :func:`balora.runs.train_run`
(:mod:`~balora.experiments.cell`), one at a time, each in its own process by default, and keeps
one JSON record per cell in the experiment's store (:mod:`~balora.experiments.store`). The report
(:mod:`~balora.experiments.report`) turns the store into the paper's tables (mean ± std over
seeds, best in bold, Avg), paired comparisons with a bootstrap interval
(:mod:`~balora.experiments.stats`), the cost table and figures (:mod:`~balora.experiments.figures`).

    spec = load_spec("configs/experiments/tiny.yaml")
    run_experiment(spec)                       # the store: runs/experiments/<name>
    write_report(*open_experiment("configs/experiments/tiny.yaml"))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_report": "balora.experiments.report",
    "open_experiment": "balora.experiments.report",
    "write_report": "balora.experiments.report",
    "EXECUTORS": "balora.experiments.runner",
    "GridSummary": "balora.experiments.runner",
    "describe_plan": "balora.experiments.runner",
    "run_experiment": "balora.experiments.runner",
    "PAPER_SEEDS": "balora.experiments.spec",
    "Cell": "balora.experiments.spec",
    "ExperimentSpec": "balora.experiments.spec",
    "SpecError": "balora.experiments.spec",
    "load_spec": "balora.experiments.spec",
    "mean_std": "balora.experiments.stats",
    "paired_bootstrap": "balora.experiments.stats",
    "ExperimentStore": "balora.experiments.store",
    "StoreError": "balora.experiments.store",
    "default_store": "balora.experiments.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # names are imported on first use: the CLI stays light
    if name not in _EXPORTS:
        raise AttributeError(f"module 'balora.experiments' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
