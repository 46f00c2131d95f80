"""The store of an experiment: one directory, one JSON record per cell, written atomically.

Layout of a store directory::

    experiment.json          the spec it runs (base inlined), the cell ids and config hashes
    cells/<cell id>.json     one record per cell (below), replaced atomically (tmp file + rename)
    runs/<cell id>/          the cell's work: job.json, outcome.json, cell.log, run-<time>/ (the run directory)
    report/                  what ``balora experiment report`` writes
    lock                     held by the runner while it runs (one runner per store)

A record holds ``id``, ``status`` (``running`` | ``finished`` | ``failed``), ``axes`` (data,
method, variant, select value, seed), the resolved ``config`` and its ``config_hash``, the
``overrides`` that made it, ``metrics`` per split (``{"test": {...}, "validation": {...}}``),
``per_class`` metrics per split (``{"test": {"recall": {class: value}}}``), ``info`` (task,
method, headline metric, ...), ``facts`` (trainable parameters, steps, example counts),
``timings`` (wall, train and evaluation seconds, start and end times), ``peak_rss_bytes``,
``versions``, ``machine``, ``git`` (commit, dirty), ``error`` and ``traceback`` for a failed
cell, ``run_dir`` (relative to the store), ``task_loss`` (``[[step, value], ...]`` from the run's
log history), ``attempt`` and ``resumed_from``.

A finished record is never replaced: :meth:`ExperimentStore.write_record` refuses to.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from balora.config import OOD_PREFIX, VALIDATION_PREFIX
from balora.experiments.spec import Cell, ExperimentSpec

__all__ = [
    "OOD_MEAN",
    "FAILED",
    "FINISHED",
    "RUNNING",
    "ExperimentStore",
    "StoreError",
    "default_store",
    "make_record",
    "metric_split",
    "record_metric",
    "split_metrics",
    "write_json_atomic",
]

FINISHED, FAILED, RUNNING = "finished", "failed", "running"
PLAN_FILE = "experiment.json"
CELLS_DIR = "cells"
RUNS_DIR = "runs"
LOCK_FILE = "lock"
#: Numeric entries of a run's metrics.json that describe the run, not its quality.
RUN_FACTS = frozenset({"trainable_parameters", "train_seconds", "eval_seconds", "global_steps", "train_examples",
                       "eval_examples", "validation_examples", "train_templates", "test_templates",
                       "validation_templates", "answer_tokens", "answer_rows_dropped"})


class StoreError(RuntimeError):
    """The store is in use by another runner, or an operation would overwrite a finished result."""


def default_store(spec: ExperimentSpec) -> Path:
    """Where a spec's store goes without ``--store``: ``runs/experiments/<name>``."""
    return Path("runs") / "experiments" / spec.name


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> Path:
    """Write JSON to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=sort_keys, default=_json_default)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _split_of(key: str) -> tuple[str, str]:
    """``(split, metric name)`` of a ``metrics.json`` key (see :func:`split_metrics`)."""
    if key.startswith(VALIDATION_PREFIX):
        return "validation", key[len(VALIDATION_PREFIX):]
    if key.startswith(OOD_PREFIX) and key.count("/") >= 2:
        task, name = key[len(OOD_PREFIX):].split("/", 1)
        return OOD_PREFIX + task, name
    return "test", key


def split_metrics(run_metrics: dict[str, Any]) -> dict[str, dict]:
    """A run's ``metrics.json`` sorted into ``metrics`` and ``per_class`` per split, ``info`` and ``facts``.

    ``validation/<name>`` entries belong to the validation split, ``ood/<task>/<name>`` entries
    (``data.ood_tasks``) to the split ``ood/<task>``, every other entry to the test split (the
    run's evaluation split). A name with a ``/`` (``recall/<class>``) is a per-class metric; a
    number is a metric unless it is a run fact (:data:`RUN_FACTS`; an OOD split's facts keep their
    full key); anything else (task, method, headline metric, rarest class, ...) is info.
    """
    out: dict[str, dict] = {"metrics": {}, "per_class": {}, "info": {}, "facts": {}}
    for key, value in run_metrics.items():
        split, name = _split_of(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and split != "validation" and name in RUN_FACTS:
            out["facts"][name if split == "test" else key] = value
        elif "/" in name and number:
            kind, cls = name.split("/", 1)
            out["per_class"].setdefault(split, {}).setdefault(kind, {})[cls] = value
        elif number:
            out["metrics"].setdefault(split, {})[name] = value
        else:
            out["info"][key] = value
    return out


def make_record(cell: Cell, status: str, *, store: "ExperimentStore", env: dict[str, Any], attempt: int,
                started_at: float, outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of ``cell``: ``running`` before its run, ``finished`` / ``failed`` from its outcome."""
    outcome = outcome or {}
    config = cell.config.to_dict()
    config.update(output_dir=store.relative(store.cell_dir(cell.id)), name="run")
    record: dict[str, Any] = {
        "id": cell.id, "status": status, "axes": cell.axes(), "seed": cell.seed, "config": config,
        "config_hash": cell.config_hash, "overrides": list(cell.overrides), "attempt": attempt,
        "metrics": {}, "per_class": {}, "info": {}, "facts": {},
        "timings": {"started_at": _iso(started_at)},
        "versions": env.get("versions"), "machine": env.get("machine"), "git": env.get("git"),
        "error": None, "traceback": None, "run_dir": None, "task_loss": [], "resumed_from": None,
        "peak_rss_bytes": None, "rss_before_bytes": None,
    }
    if status == RUNNING:
        return record
    if outcome.get("run_metrics"):
        record.update(split_metrics(outcome["run_metrics"]))
    record["timings"].update(outcome.get("timings") or {}, finished_at=_iso(time.time()))
    for key in ("error", "traceback", "task_loss", "resumed_from", "peak_rss_bytes", "rss_before_bytes", "isolation"):
        if key in outcome:
            record[key] = outcome[key]
    if outcome.get("run_dir"):
        record["run_dir"] = store.relative(outcome["run_dir"])
    return record


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


class ExperimentStore:
    """One experiment's directory of cell records (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def record_path(self, cell_id: str) -> Path:
        return self.root / CELLS_DIR / f"{cell_id}.json"

    def cell_dir(self, cell_id: str) -> Path:
        """Where a cell's run directories, job, outcome and log go."""
        return self.root / RUNS_DIR / cell_id

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the store when it is inside it (records stay valid if the store moves)."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def absolute(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    # ------------------------------------------------------------------ records
    def exists(self) -> bool:
        return (self.root / PLAN_FILE).is_file() or (self.root / CELLS_DIR).is_dir()

    def record(self, cell_id: str) -> dict[str, Any] | None:
        path = self.record_path(cell_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def records(self) -> dict[str, dict[str, Any]]:
        """Every record in the store, by cell id."""
        folder = self.root / CELLS_DIR
        if not folder.is_dir():
            return {}
        out = {}
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text())
            out[record["id"]] = record
        return out

    def write_record(self, record: dict[str, Any]) -> Path:
        """Write (or replace) a cell's record atomically; a finished record is never replaced."""
        old = self.record(record["id"])
        if old is not None and old.get("status") == FINISHED:
            raise StoreError(f"{self.record_path(record['id'])}: cell {record['id']} is finished; "
                             "a finished result is never overwritten")
        return write_json_atomic(self.record_path(record["id"]), record)

    def changed_cells(self, spec: ExperimentSpec) -> list[str]:
        """The finished cells of ``spec`` whose stored config hash differs from the spec's."""
        records = self.records()
        return [c.id for c in spec.cells
                if (r := records.get(c.id)) and r["status"] == FINISHED and r["config_hash"] != c.config_hash]

    # ------------------------------------------------------------------ plan
    def write_plan(self, spec: ExperimentSpec) -> Path:
        """``experiment.json``: the spec (base inlined) and its cells, enough to rebuild it without files."""
        return write_json_atomic(self.root / PLAN_FILE, {
            "name": spec.name, "source": str(spec.source) if spec.source else None, "spec": spec.raw,
            "cells": {c.id: c.config_hash for c in spec.cells}, "planned_cells": spec.planned_count(),
        }, sort_keys=False)  # the spec's mappings keep their order (the order of the report's rows and columns)

    def read_plan(self) -> dict[str, Any]:
        path = self.root / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not an experiment store (no {PLAN_FILE})")
        return json.loads(path.read_text())

    # ------------------------------------------------------------------ one runner at a time
    @contextlib.contextmanager
    def lock(self):
        """Hold the store's lock (released when the process ends, also on kill -9)."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_FILE, "a+")
        try:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock
                fcntl = None
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    handle.seek(0)
                    holder = handle.read().strip() or "?"
                    raise StoreError(f"{self.root} is in use by another experiment runner (pid {holder})") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield self
        finally:
            handle.close()


def record_metric(record: dict[str, Any], metric: str, split: str = "test") -> tuple[str | None, float | None]:
    """``(name, value)`` of ``metric`` in a record's ``split``; ``headline`` is the task's own headline
    metric (``info.headline_metric``). The value is None when the record does not have it."""
    split, metric = metric_split(metric, split)
    name = record.get("info", {}).get("headline_metric") if metric == "headline" else metric
    if name is None:
        return None, None
    metrics = record.get("metrics", {})
    if split == OOD_MEAN:  # the mean over the record's OOD splits that have the metric
        values = [float(m[name]) for s, m in sorted(metrics.items()) if s.startswith(OOD_PREFIX) and name in m]
        return name, float(sum(values) / len(values)) if values else None
    value = metrics.get(split, {}).get(name)
    return name, None if value is None else float(value)


#: The pseudo-split of ``ood/<metric>``: the mean over a cell's out-of-distribution splits.
OOD_MEAN = "ood"


def metric_split(metric: str, split: str = "test") -> tuple[str, str]:
    """``(split, metric)`` of a report metric: ``ood/<task>/<metric>`` is read from the split
    ``ood/<task>``, ``ood/<metric>`` is the mean over every OOD split (:data:`OOD_MEAN`), any
    other metric from ``split``."""
    if metric.startswith(OOD_PREFIX):
        rest = metric[len(OOD_PREFIX):]
        if "/" in rest:
            task, name = rest.split("/", 1)
            return OOD_PREFIX + task, name
        return OOD_MEAN, rest
    return split, metric
