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
  other seeds;
* with ``merge`` (:mod:`balora.experiments.merges`), then merges the finished cells' task adapters
  and scores them: the merge stage, its jobs recorded under ``<store>/merges/``, kept and resumed
  like the cells (a finished merge is never run again; a spec that changes one is refused).

Executors (:data:`EXECUTORS`) run one cell's job and return its outcome. ``local`` runs the
cells one after another on this machine, each in a child process by default (a crash or an
out-of-memory kill fails that cell only, and its memory is returned), or in this process
(``in_process=True``, for tests and debugging). A pool or cluster executor only has to provide
``run(job, cell_dir) -> outcome``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from balora.experiments.cell import OUTCOME_FILE, execute_cell, make_job
from balora.experiments.cell_process import run_cell_process
from balora.experiments.merges import MergeSummary, check_merge_records, merge_records, plan_merges, run_merges
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


class LocalExecutor:
    """Runs cells on this machine, each in a child process (default) or in this process.

    ``workers`` cells run at the same time (a pool of threads, each waiting on its cell's child
    process); the default, 1, runs them one after another, as a 2-core machine needs (two
    trainings at once thrash). In-process cells always run one at a time.
    """

    name = "local"

    def __init__(self, in_process: bool = False, workers: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
        self.in_process = in_process
        self.workers = 1 if in_process else workers

    @property
    def isolation(self) -> str:
        return "in-process" if self.in_process else "process"

    def execute(self, items, on_start, on_done) -> None:
        """Run every ``(key, job, cell_dir)`` of ``items``: ``on_start(key)`` just before a cell
        starts, ``on_done(key, outcome)`` when it ends (in this thread, one call at a time)."""
        if self.workers == 1:
            for key, job, cell_dir in items:
                on_start(key)
                on_done(key, self.run(job, cell_dir))
            return
        import concurrent.futures as futures

        items = list(items)
        with futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            running = {}
            for key, job, cell_dir in items:
                on_start(key)
                running[pool.submit(self.run, job, cell_dir)] = key
            for future in futures.as_completed(running):
                on_done(running[future], future.result())

    def run(self, job: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
        """The cell's outcome (see :func:`balora.experiments.cell.execute_cell`)."""
        if self.in_process:
            return dict(execute_cell(job), isolation=self.isolation)
        return run_cell_process(job, cell_dir, self.isolation)


def _ray_executor(**options):
    from balora.experiments.ray_executor import RayExecutor

    return RayExecutor(**options)


#: Executors by name (``--executor``).
EXECUTORS = {"local": LocalExecutor, "ray": _ray_executor}


def make_executor(name: str = "local", **options):
    """The executor ``name`` with its options (local: ``in_process``, ``workers``; ray: ``address``,
    ``cpus_per_cell``, ``gpus_per_cell``); a one-line ValueError for an unknown name or option."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    try:
        return EXECUTORS[name](**{k: v for k, v in options.items() if v is not None})
    except TypeError as err:
        raise ValueError(f"--executor {name}: {err}") from None


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
    merges: MergeSummary | None = None  # the merge stage (a spec with ``merge``)


def run_experiment(
    spec: ExperimentSpec,
    store: str | Path | None = None,
    *,
    retry_failed: bool = False,
    executor: str | Any = "local",
    in_process: bool = False,
    progress: bool = True,
    **executor_options: Any,
) -> GridSummary:
    """Run every cell of ``spec`` that has no finished record in ``store`` (default
    ``runs/experiments/<name>``); see the module docstring. ``executor``: a name of
    :data:`EXECUTORS` (its options in ``executor_options``, e.g. ``workers=2``) or an executor."""
    store = ExperimentStore(store if store is not None else default_store(spec))
    if isinstance(executor, str):
        options = dict(executor_options, in_process=in_process) if executor == "local" else executor_options
        executor = make_executor(executor, **options)
    runner = _Runner(spec, store, executor, retry_failed)
    with store.lock():
        changed = store.changed_cells(spec)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise SpecError(
                f"the spec changes the config of {len(changed)} finished cell(s) of {store.root}: {shown}; "
                "finished results are kept, not mixed with a new grid: use another --store, or delete "
                f"those records from {store.root / 'cells'} to run them again")
        check_merge_records(spec, store)
        store.write_plan(spec)
        with tqdm(total=spec.planned_count(), desc=f"experiment {spec.name}", unit="cell",
                  disable=not progress, dynamic_ncols=True) as bar:
            runner.bar = bar
            runner.stage(spec.selection_cells() if spec.select else spec.cells)
            if spec.select is not None:
                rest = [s for s in spec.seeds if s not in spec.select.seeds]
                chosen = []
                for group in spec.groups():
                    choice = choose(spec, group, store.records())
                    if choice.value is None and spec.candidates(group) != [None]:
                        runner.summary.waiting.append("/".join(g for g in group if g))
                        bar.update(len(rest))
                        continue
                    chosen += spec.cells_of(group, value=choice.value, seeds=rest)
                runner.stage(chosen)
        if spec.merge is not None:
            runner.summary.merges = run_merges(spec, store, retry_failed=retry_failed, progress=progress)
    return runner.summary


class _Runner:
    def __init__(self, spec: ExperimentSpec, store: ExperimentStore, executor, retry_failed: bool):
        self.spec, self.store, self.executor, self.retry_failed = spec, store, executor, retry_failed
        self.summary = GridSummary(store=store.root, planned=spec.planned_count())
        self.env = environment()
        self.bar = None
        self._started: dict[str, tuple[Cell, int, float]] = {}  # cell id -> (cell, attempt, start time)

    def stage(self, cells: list[Cell]) -> None:
        """Run the cells of one stage (cells that do not depend on each other) through the executor:
        a finished cell is kept, a failed one only runs again with ``retry_failed`` (or a changed
        config), an interrupted one that had finished is harvested, every other one runs."""
        items = []
        for cell in cells:
            record = self.store.record(cell.id)
            status = record.get("status") if record else None
            if status == FINISHED:
                self.summary.kept.append(cell.id)
                self.bar.update(1)
                continue
            if status == FAILED and not self.retry_failed and record.get("config_hash") == cell.config_hash:
                self.summary.failed.append(cell.id)  # (a failed cell whose config changed runs with the new one)
                self.bar.update(1)
                continue
            attempt = (record or {}).get("attempt", 0) + 1
            cell_dir = self.store.cell_dir(cell.id)
            cell_dir.mkdir(parents=True, exist_ok=True)
            self._started[cell.id] = (cell, attempt, time.time())
            outcome = self.harvest(cell, cell_dir) if status == RUNNING else None
            if outcome is not None:
                self.finish(cell.id, outcome)
                continue
            items.append((cell.id, make_job(cell.id, cell.config, cell.config_hash, cell_dir), cell_dir))
        if items:
            self.executor.execute(items, self.start, self.finish)

    def start(self, cell_id: str) -> None:
        """Record a cell as running, just before its executor starts it."""
        cell, attempt, _ = self._started[cell_id]
        started = time.time()
        self._started[cell_id] = (cell, attempt, started)
        self.store.write_record(make_record(cell, RUNNING, store=self.store, env=self.env, attempt=attempt,
                                            started_at=started))
        self.bar.set_postfix_str(cell_id, refresh=True)

    def finish(self, cell_id: str, outcome: dict[str, Any]) -> None:
        """Record a cell's outcome (``finished`` or ``failed``, with the error)."""
        cell, attempt, started = self._started.pop(cell_id)
        status = outcome.get("status", FAILED)
        self.store.write_record(make_record(cell, status, store=self.store, env=self.env, attempt=attempt,
                                            started_at=started, outcome=outcome))
        self.summary.ran.append(cell.id)
        (self.summary.finished if status == FINISHED else self.summary.failed).append(cell.id)
        wall = (outcome.get("timings") or {}).get("wall_seconds") or (time.time() - started)
        note = f": {outcome.get('error')}" if status != FINISHED else ""
        self.bar.write(f"{cell.id}: {status} ({wall:.0f} s){note}")
        self.bar.update(1)

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
    jobs = plan_merges(spec)
    if jobs:
        done = merge_records(store)
        lines.append(f"merge stage: {len(jobs)} jobs (score {spec.merge.score}"
                     + (f", general {spec.merge.general}" if spec.merge.general else "") + ")")
        for job in jobs:
            status = (done.get(job.id) or {}).get("status", "pending")
            if status == FINISHED and done[job.id].get("signature") != job.signature:
                status = "changed"
            options = " ".join(f"{k}={v}" for k, v in job.options)
            lines.append(f"  {status:<11} {job.id}  {options}".rstrip())
    return "\n".join(lines)
