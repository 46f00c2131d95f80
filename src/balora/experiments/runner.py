"""The grid runner: every cell of a spec without a finished result, one at a time, into the store.

``run_experiment(spec, store)`` (``balora experiment run SPEC``):

* takes the store's lock (one runner per store), refuses a spec that would change the config of
  a finished cell (its hash differs: the results are kept, never mixed with the new grid), and
  writes ``experiment.json``;
* runs every cell without a finished record through an executor, showing one progress bar for
  the grid (cells done / planned, the current cell); a finished cell is never run again, a
  failed one only with ``retry_failed`` (or when the spec changed its config); a cell left
  ``running`` by an interrupted runner runs again (from its last checkpoint when its run
  directory has one; its outcome is taken as it is when the cell had finished just before the
  runner died);
* records each cell before it runs (``running``) and after (``finished`` or ``failed``, with the
  error): a failed cell does not stop the grid;
* with ``select``, runs the candidates on the select seeds first, chooses each group's value
  on the validation split (:mod:`balora.experiments.selection`), then runs that value on the
  other seeds.

Executors (:data:`EXECUTORS`) run one cell's job and return its outcome. ``local`` runs the
cells one after another on this machine, each in a child process by default (a crash or an
out-of-memory kill fails that cell only, and its memory is returned), or in this process
(``in_process=True``, for tests and debugging). A pool or cluster executor only has to provide
``run(job, cell_dir) -> outcome``.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from balora.experiments.cell import JOB_FILE, LOG_FILE, OUTCOME_FILE, execute_cell, make_job
from balora.experiments.provenance import environment
from balora.experiments.selection import choose
from balora.experiments.spec import Cell, ExperimentSpec, SpecError
from balora.experiments.store import (
    FAILED,
    FINISHED,
    RUNNING,
    ExperimentStore,
    default_store,
    make_record,
)

__all__ = ["EXECUTORS", "GridSummary", "LocalExecutor", "describe_plan", "make_executor", "run_experiment"]

logger = logging.getLogger("balora")

#: Lines of a crashed child's log kept in the cell's record.
LOG_TAIL_LINES = 40


class LocalExecutor:
    """Runs one cell at a time on this machine: in a child process (default) or in this process."""

    name = "local"

    def __init__(self, in_process: bool = False):
        self.in_process = in_process

    @property
    def isolation(self) -> str:
        return "in-process" if self.in_process else "process"

    def run(self, job: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
        """The cell's outcome (see :func:`balora.experiments.cell.execute_cell`)."""
        if self.in_process:
            return dict(execute_cell(job), isolation=self.isolation)
        job_path = cell_dir / JOB_FILE
        job_path.write_text(json.dumps(job, indent=2) + "\n")
        started = time.perf_counter()
        with open(cell_dir / LOG_FILE, "a") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {job['id']}\n")
            log.flush()
            child = subprocess.Popen([sys.executable, "-m", "balora.experiments.cell", str(job_path)],
                                     stdout=log, stderr=subprocess.STDOUT)
            try:
                code = child.wait()
            except BaseException:  # Ctrl-C or the runner being stopped: do not leave the child running
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                raise
        outcome_path = cell_dir / OUTCOME_FILE
        elapsed = time.perf_counter() - started  # with the child's start-up (imports)
        if code == 0 and outcome_path.is_file():
            outcome = json.loads(outcome_path.read_text())
            outcome["timings"] = dict(outcome.get("timings") or {}, process_seconds=elapsed)
            return dict(outcome, isolation=self.isolation)
        return {"id": job["id"], "status": FAILED, "error": _exit_message(code), "isolation": self.isolation,
                "traceback": _tail(cell_dir / LOG_FILE), "run_dir": None,
                "timings": {"wall_seconds": elapsed, "process_seconds": elapsed}}


def _exit_message(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"the cell's process was ended by {name}{hint}"
    return f"the cell's process ended with exit code {code} without an outcome (see its cell.log)"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


#: Executors by name (``--executor``).
EXECUTORS = {"local": LocalExecutor}


def make_executor(name: str = "local", *, in_process: bool = False):
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    return EXECUTORS[name](in_process=in_process)


@dataclass
class GridSummary:
    """What a call of :func:`run_experiment` did."""

    store: Path
    planned: int
    ran: list[str] = field(default_factory=list)  # cells run now
    finished: list[str] = field(default_factory=list)  # cells finished now
    failed: list[str] = field(default_factory=list)  # cells that failed now, or earlier and not retried
    kept: list[str] = field(default_factory=list)  # cells finished before this call
    waiting: list[str] = field(default_factory=list)  # groups left without a chosen value


def run_experiment(
    spec: ExperimentSpec,
    store: str | Path | None = None,
    *,
    retry_failed: bool = False,
    executor: str = "local",
    in_process: bool = False,
    progress: bool = True,
) -> GridSummary:
    """Run every cell of ``spec`` that has no finished record in ``store`` (default
    ``runs/experiments/<name>``); see the module docstring."""
    store = ExperimentStore(store if store is not None else default_store(spec))
    runner = _Runner(spec, store, make_executor(executor, in_process=in_process), retry_failed)
    with store.lock():
        changed = store.changed_cells(spec)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise SpecError(
                f"the spec changes the config of {len(changed)} finished cell(s) of {store.root}: {shown}; "
                "finished results are kept, not mixed with a new grid: use another --store, or delete "
                f"those records from {store.root / 'cells'} to run them again")
        store.write_plan(spec)
        with tqdm(total=spec.planned_count(), desc=f"experiment {spec.name}", unit="cell",
                  disable=not progress, dynamic_ncols=True) as bar:
            runner.bar = bar
            for cell in spec.selection_cells() if spec.select else spec.cells:
                runner.visit(cell)
            if spec.select is not None:
                rest = [s for s in spec.seeds if s not in spec.select.seeds]
                for group in spec.groups():
                    choice = choose(spec, group, store.records())
                    if choice.value is None and spec.candidates(group) != [None]:
                        runner.summary.waiting.append("/".join(g for g in group if g))
                        bar.update(len(rest))
                        continue
                    for cell in spec.cells_of(group, value=choice.value, seeds=rest):
                        runner.visit(cell)
    return runner.summary


class _Runner:
    def __init__(self, spec: ExperimentSpec, store: ExperimentStore, executor, retry_failed: bool):
        self.spec, self.store, self.executor, self.retry_failed = spec, store, executor, retry_failed
        self.summary = GridSummary(store=store.root, planned=spec.planned_count())
        self.env = environment()
        self.bar = None

    def visit(self, cell: Cell) -> None:
        record = self.store.record(cell.id)
        status = record.get("status") if record else None
        if status == FINISHED:
            self.summary.kept.append(cell.id)
        elif status == FAILED and not self.retry_failed and record.get("config_hash") == cell.config_hash:
            self.summary.failed.append(cell.id)  # (a failed cell whose config changed runs with the new one)
        else:
            self.run(cell, record)
        self.bar.update(1)

    def run(self, cell: Cell, record: dict | None) -> None:
        self.bar.set_postfix_str(cell.id, refresh=True)
        attempt = (record or {}).get("attempt", 0) + 1
        cell_dir = self.store.cell_dir(cell.id)
        cell_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        outcome = self.harvest(cell, cell_dir) if record and record.get("status") == RUNNING else None
        if outcome is None:
            self.store.write_record(make_record(cell, RUNNING, store=self.store, env=self.env, attempt=attempt,
                                                started_at=started))
            job = make_job(cell.id, cell.config, cell.config_hash, cell_dir)
            outcome = self.executor.run(job, cell_dir)
        status = outcome.get("status", FAILED)
        self.store.write_record(make_record(cell, status, store=self.store, env=self.env, attempt=attempt,
                                            started_at=started, outcome=outcome))
        self.summary.ran.append(cell.id)
        (self.summary.finished if status == FINISHED else self.summary.failed).append(cell.id)
        wall = (outcome.get("timings") or {}).get("wall_seconds") or (time.time() - started)
        note = f": {outcome.get('error')}" if status != FINISHED else ""
        self.bar.write(f"{cell.id}: {status} ({wall:.0f} s){note}")

    @staticmethod
    def harvest(cell: Cell, cell_dir: Path) -> dict | None:
        """The outcome a cell wrote before its runner was killed, when it finished with this config."""
        path = cell_dir / OUTCOME_FILE
        if not path.is_file():
            return None
        outcome = json.loads(path.read_text())
        if outcome.get("status") == FINISHED and outcome.get("config_hash") == cell.config_hash:
            logger.info("cell %s had finished before the runner stopped: its outcome is recorded", cell.id)
            return outcome
        return None


def describe_plan(spec: ExperimentSpec, store: str | Path | None = None) -> str:
    """The cells of a spec as a table (status from the store when it exists), for ``--dry-run``."""
    store = ExperimentStore(store if store is not None else default_store(spec))
    records = store.records()
    common = [o for o in spec.cells[0].overrides if all(o in c.overrides for c in spec.cells)] if spec.cells else []
    axes = [f"{len(spec.data)} data", f"{len(spec.methods)} method(s)",
            *([f"{len(spec.variants)} variant(s)"] if spec.variants else []), f"{len(spec.seeds)} seed(s)"]
    lines = [f"experiment {spec.name}: {spec.planned_count()} cells planned ({' × '.join(axes)}); "
             f"store {store.root}"]
    if common:
        lines.append("every cell: " + " ".join(common))
    if spec.select is not None:
        s = spec.select
        rest = [x for x in spec.seeds if x not in s.seeds]
        lines.append(f"select: {s.key} in {list(s.values)} per data × method{' × variant' if spec.variants else ''}, "
                     f"on validation {s.metric} ({s.goal}), seeds {list(s.seeds)}; the chosen value then runs on "
                     f"seeds {rest}")
    width = max(len(c.id) for c in spec.cells)
    chosen = {g: choose(spec, g, records).value for g in spec.groups()} if spec.select is not None else {}
    for cell in spec.cells:
        record = records.get(cell.id)
        status = record["status"] if record else "pending"
        if record and status == FINISHED and record.get("config_hash") != cell.config_hash:
            status = "changed"
        elif status == RUNNING:
            status = "interrupted"
        if spec.select is not None and cell.seed not in spec.select.seeds and status == "pending" \
                and spec.candidates(cell.group) != [None]:
            choice = chosen[cell.group]
            status = "if chosen" if choice is None else ("pending" if choice == cell.value else "not chosen")
        own = " ".join(o for o in cell.overrides if o not in common)
        lines.append(f"  {status:<11} {cell.id:<{width}}  {own}")
    return "\n".join(lines)
