"""The merge stage of a grid (a spec's ``merge:`` section): merged task adapters, scored per task.

After its cells, ``balora experiment run`` plans and runs these jobs (:func:`plan_merges`,
:func:`run_merges`), each recorded as ``<store>/merges/<id>.json`` (written atomically; a finished
record is kept, never re-run):

* ``base``: the pre-trained model's general score (with ``merge.general``);
* ``single__<cell id>``: every finished cell's own adapter, scored again on its task by the same
  code that scores the merged adapters (so the ratios compare like with like; the record keeps the
  run's own test score beside it, they agree) and on the general data;
* ``merge__<method>__<variant>__<merge>__s<seed>``: the adapters of the cells that differ only in
  their data set (the grid's data sets, in order) merged by one ``merge.methods`` entry
  (:func:`balora.merging.merge_adapters`, into ``<store>/runs/<id>/merged``), then each data set
  scored with the merged backbone adapter and its own head, and the general score of the merged
  backbone. With ``merge.incremental`` the reference merge also runs on the first k data sets,
  k = 2 … n−1 (``…__<merge>__k<k>__s<seed>``): the paper's "adding tasks one by one".

Scores: a data set's evaluation split exactly as its cell built it (the cell's config: the same
subsample, max_length and label order), every metric of
:func:`~balora.evaluation.classification.classification_metrics`; ``merge.score`` is the one the
report divides. General: :func:`balora.evaluation.similarity.similarity_auc` on every pair of
``merge.general`` (an encoder's zero-shot skill; the base score is the same function with the
adapter disabled). A job whose inputs are missing (a cell not finished) waits; a failing job is
recorded with its error and the stage goes on.

A record holds ``id``, ``kind``, ``status``, ``method``, ``variant``, ``seed``, ``merge`` (the
name), ``options``, ``data`` (the data sets merged or scored), ``inputs`` (cell id → config
hash), ``scores`` (data set → metrics), ``general`` (``{"task", "similarity_auc"}``),
``cell_scores`` (single jobs: the run's own test metrics), ``merge_record`` (merged ranks and the
refactor error per layer, from ``merge.json``), ``timings``, ``error`` and ``traceback``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from balora.experiments.spec import SEPARATOR, Cell, ExperimentSpec, SpecError
from balora.experiments.store import FAILED, FINISHED, ExperimentStore, write_json_atomic

__all__ = ["MERGES_DIR", "MergeJob", "MergeSummary", "check_merge_records", "merge_records", "plan_merges",
           "run_merges"]

logger = logging.getLogger("balora")

#: Where the merge stage's records go, inside the store.
MERGES_DIR = "merges"
BASE, SINGLE, MERGE = "base", "single", "merge"
#: The folder of a merge job's merged adapters, inside ``<store>/runs/<job id>/``.
MERGED_FOLDER = "merged"
#: Texts per batch when scoring.
EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class MergeJob:
    """One job of the merge stage (module docstring); ``cells``: its input cells, in data order."""

    id: str
    kind: str
    cells: tuple[Cell, ...] = ()
    merge: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def data(self) -> list[str]:
        return [c.data for c in self.cells]

    @property
    def signature(self) -> dict[str, Any]:
        """What the job's result depends on: its options and its inputs' configs."""
        return {"options": dict(self.options), "inputs": {c.id: c.config_hash for c in self.cells}}


@dataclass
class MergeSummary:
    planned: int = 0
    ran: int = 0
    finished: int = 0
    kept: int = 0
    failed: list[str] | None = None
    waiting: list[str] | None = None


# ------------------------------------------------------------------------------ plan


def _groups(spec: ExperimentSpec) -> dict[tuple[str, str | None, int], list[Cell]]:
    """(method, variant, seed) -> its cells, one per data set, in the grid's data order."""
    groups: dict[tuple[str, str | None, int], list[Cell]] = {}
    for cell in spec.cells:
        groups.setdefault((cell.method, cell.variant, cell.seed), []).append(cell)
    order = {d: i for i, d in enumerate(spec.data)}
    return {k: sorted(v, key=lambda c: order[c.data]) for k, v in groups.items()}


def plan_merges(spec: ExperimentSpec) -> list[MergeJob]:
    """Every job of the merge stage of ``spec`` (none without ``merge``), in run order: the base,
    the single adapters, then per seed the merges."""
    settings = spec.merge
    if settings is None:
        return []
    jobs = [MergeJob(BASE, BASE)] if settings.general else []
    jobs += [MergeJob(SEPARATOR.join([SINGLE, c.id]), SINGLE, (c,)) for c in spec.cells]
    groups = _groups(spec)
    for seed in spec.seeds:
        for (method, variant, group_seed), cells in groups.items():
            if group_seed != seed:
                continue
            for entry in settings.methods:
                if entry.variants is not None and variant not in entry.variants:
                    continue
                stem = [MERGE, method, *([variant] if variant else []), entry.name]
                sizes = range(2, len(cells)) if settings.incremental and entry.name == settings.reference else ()
                for k in sizes:
                    jobs.append(MergeJob(SEPARATOR.join([*stem, f"k{k}", f"s{seed}"]), MERGE, tuple(cells[:k]),
                                         entry.name, entry.options))
                jobs.append(MergeJob(SEPARATOR.join([*stem, f"s{seed}"]), MERGE, tuple(cells), entry.name,
                                     entry.options))
    return jobs


# ------------------------------------------------------------------------------ records


def _records_dir(store: ExperimentStore) -> Path:
    return store.root / MERGES_DIR


def merge_records(store: ExperimentStore) -> dict[str, dict[str, Any]]:
    """Every record of the merge stage in ``store``, by id."""
    folder = _records_dir(store)
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def check_merge_records(spec: ExperimentSpec, store: ExperimentStore) -> None:
    """A SpecError when a finished merge record was made with other options or inputs than the spec's
    (finished results are kept, not mixed with a changed spec: the runner's rule for cells)."""
    records = merge_records(store)
    changed = [job.id for job in plan_merges(spec)
               if (r := records.get(job.id)) and r.get("status") == FINISHED and r.get("signature") != job.signature]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise SpecError(f"the spec changes {len(changed)} finished merge(s) of {store.root}: {shown}; use another "
                        f"--store, or delete those records from {_records_dir(store)} to run them again")


# ------------------------------------------------------------------------------ run


class _Scorer:
    """Scores adapters on the data sets of their cells and on the general pairs, caching the data."""

    def __init__(self, spec: ExperimentSpec):
        self.spec = spec
        self._runs: dict[str, Any] = {}
        self._general = None

    def run_of(self, cell: Cell):
        """The cell's ClassificationRun with its data loaded (the cell's evaluation split), shared by
        the cells whose data, model and seed settings are the same (the variants of one data set)."""
        config = cell.config.to_dict()
        key = json.dumps([config["data"], config["model"], cell.seed], sort_keys=True, default=str)
        if key not in self._runs:
            from balora.runs_classification import ClassificationRun

            run = ClassificationRun(cell.config, progress=False)
            run.load_data()
            self._runs[key] = run
        return self._runs[key]

    def task_scores(self, model, cell: Cell) -> dict[str, float]:
        """Every classification metric of ``model`` on ``cell``'s evaluation split."""
        from balora.evaluation.classification import classification_metrics
        from balora.evaluation.features import classifier_logits

        run = self.run_of(cell)
        names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        if names != [str(n) for n in run.task.label_names]:
            raise ValueError(f"{cell.data}: the adapter's classes ({', '.join(names)}) are not its task's "
                             f"({', '.join(map(str, run.task.label_names))})")
        logits = classifier_logits(model, run.eval_set, run.collator, EVAL_BATCH_SIZE)  # (N, D)
        labels = run.eval_set["labels"]
        scores = classification_metrics(labels, logits.argmax(-1), run.task.label_names)
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    def general(self, model, tokenizer, max_length: int) -> dict[str, Any] | None:
        """``{"task", "similarity_auc", "pairs"}`` of ``model`` on ``merge.general`` (None without it)."""
        task = self.spec.merge.general
        if task is None:
            return None
        from balora.evaluation.similarity import general_pairs, similarity_auc

        if self._general is None:
            self._general = general_pairs(task)
        pairs, labels, positive = self._general
        auc = similarity_auc(model, tokenizer, pairs, labels, max_length=max_length, batch_size=EVAL_BATCH_SIZE)
        return {"task": task, "similarity_auc": auc, "pairs": len(pairs), "positive": positive}


def _adapter_of(store: ExperimentStore, record: dict[str, Any]) -> Path:
    run = record.get("run_dir")
    if not run:
        raise ValueError(f"cell {record.get('id')} has no run directory in the store")
    return store.absolute(run)


def _load(folder: Path):
    """``(classifier with its adapter, tokenizer)`` of a run or merged-adapter folder, in eval mode."""
    from balora.models import CLASSIFICATION, load_source, resolve_model_source, transformers_quiet

    with transformers_quiet():
        return load_source(resolve_model_source(None, folder, family=CLASSIFICATION))


def _execute(job: MergeJob, spec: ExperimentSpec, store: ExperimentStore, scorer: _Scorer,
             cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The result fields of one job (raises on failure)."""
    max_length = spec.cells[0].config.model.max_length
    if job.kind == BASE:
        from balora.models import load_sequence_classifier, load_tokenizer, transformers_quiet

        name = spec.cells[0].config.model.name
        with transformers_quiet():
            model, tokenizer = load_sequence_classifier(name, 2), load_tokenizer(name)
        model.eval()
        return {"general": scorer.general(model, tokenizer, max_length)}
    if job.kind == SINGLE:
        cell = job.cells[0]
        model, tokenizer = _load(_adapter_of(store, cells[cell.id]))
        return {"scores": {cell.data: scorer.task_scores(model, cell)},
                "cell_scores": {cell.data: cells[cell.id].get("metrics", {}).get("test", {})},
                "general": scorer.general(model, tokenizer, max_length)}
    from balora.merging import MERGE_FILE, merge_adapters

    out = store.cell_dir(job.id) / MERGED_FOLDER
    if out.exists():  # what an interrupted job left: it had no record, so nothing of it was used
        shutil.rmtree(out)
    result = merge_adapters([_adapter_of(store, cells[c.id]) for c in job.cells], out, **dict(job.options))
    folders = list(result.adapters.values())  # one per input adapter, in input order
    scores, general = {}, None
    for cell, folder in zip(job.cells, folders):
        model, tokenizer = _load(folder)
        scores[cell.data] = scorer.task_scores(model, cell)
        if general is None:  # the backbone is the same in every folder
            general = scorer.general(model, tokenizer, max_length)
    merged = result.record
    return {"scores": scores, "general": general, "merged_dir": store.relative(out),
            "merge_record": {"method": merged["method"], "ranks": merged["ranks"],
                             "layers": merged.get("layers"), "file": store.relative(out / MERGE_FILE)}}


def run_merges(spec: ExperimentSpec, store: ExperimentStore, *, retry_failed: bool = False,
               progress: bool = True) -> MergeSummary:
    """Run every job of :func:`plan_merges` without a finished record (module docstring). Call it
    with the store's lock held (``balora experiment run`` does, after the cells)."""
    jobs = plan_merges(spec)
    summary = MergeSummary(planned=len(jobs), failed=[], waiting=[])
    if not jobs:
        return summary
    check_merge_records(spec, store)
    cells = store.records()
    records = merge_records(store)
    scorer = _Scorer(spec)
    with tqdm(total=len(jobs), desc=f"merges {spec.name}", unit="job", disable=not progress,
              dynamic_ncols=True) as bar:
        for job in jobs:
            record = records.get(job.id)
            status = (record or {}).get("status")
            if status == FINISHED:
                summary.kept += 1
            elif not all((cells.get(c.id) or {}).get("status") == FINISHED for c in job.cells):
                summary.waiting.append(job.id)
            elif status == FAILED and not retry_failed and record.get("signature") == job.signature:
                summary.failed.append(job.id)
            else:
                bar.set_postfix_str(job.id, refresh=True)
                _run_one(job, spec, store, scorer, cells, bar, summary)
            bar.update(1)
    return summary


def _run_one(job, spec, store, scorer, cells, bar, summary) -> None:
    started = time.time()
    variant = job.cells[0].variant if job.cells else None
    record: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "merge": job.merge, "options": dict(job.options),
        "method": job.cells[0].method if job.cells else None, "variant": variant,
        "seed": job.cells[0].seed if job.cells else None, "data": job.data, "signature": job.signature,
        "scores": {}, "general": None, "error": None, "traceback": None,
    }
    try:
        record.update(_execute(job, spec, store, scorer, cells))
        record["status"] = FINISHED
    except Exception as err:  # recorded; the stage goes on
        record.update(status=FAILED, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["timings"] = {"wall_seconds": time.time() - started}
    write_json_atomic(_records_dir(store) / f"{job.id}.json", record)
    summary.ran += 1
    if record["status"] == FINISHED:
        summary.finished += 1
    else:
        summary.failed.append(job.id)
    note = f": {record['error']}" if record["status"] != FINISHED else ""
    bar.write(f"{job.id}: {record['status']} ({record['timings']['wall_seconds']:.0f} s){note}")
