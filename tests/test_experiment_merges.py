"""The merge stage of experiment grids: the spec's ``merge:`` section, the job plan, one tiny grid
end to end (records, scores against the cells', the base score, resume, a changed spec, a failing
job, the report, the dry-run text), the similarity AUC against a naive reference, the classifier
logits against a per-row forward, and the merge options' defaults and errors."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, write_task_files

from balora.experiments import (
    ExperimentStore,
    SpecError,
    load_spec,
    run_experiment,
    write_report,
)
from balora.experiments.merges import (
    MERGES_DIR,
    check_merge_records,
    merge_records,
    plan_merges,
)
from balora.experiments.runner import describe_plan
from balora.experiments.store import FAILED, FINISHED

#: Two data sets of three classes and one of two (other words, other labels).
TWO_CLASSES = {"x": ["red", "green", "blue", "pink"], "y": ["cat", "dog", "cow", "hen"]}
#: The grid's data sets, in grid order (not alphabetical: the incremental merges take the first k).
DATA = ("one", "two", "three")
#: Every merge of the end-to-end grid: the reference (iterative, with incremental merges) and cat.
E2E_MERGE = {
    "general": "mrpc-validation", "reference": "it", "incremental": True,
    "methods": {"it": {"method": "iterative", "retain": 0.8}, "cat": {"method": "cat"}},
    "sweep": {"name": "retain", "values": {"it": 0.8, "cat": 1.0}},
}


def _data_files(folder: Path) -> dict[str, dict[str, str]]:
    """grid.data: three tiny CSV tasks (24 training, 12 evaluation rows each)."""
    out = {}
    for i, name in enumerate(DATA):
        (folder / name).mkdir(parents=True, exist_ok=True)
        train, test = write_task_files(folder / name, n_train=24, n_eval=12, seed=i,
                                       words=TWO_CLASSES if name == "two" else None)
        out[name] = {"data.train_file": train, "data.eval_file": test}
    return out


def _spec(model_dir: str, folder: Path, merge: dict | None = None, *, data: dict | None = None,
          variants: dict | None = ..., seeds=(42, 7), **extra) -> dict:
    """A grid without a method axis (lora, from the base): data × variants (r4, r2) × seeds."""
    spec = {
        "name": "merges",
        "base": {
            "model": {"name": model_dir, "max_length": 16},
            "adapter": {"method": "lora", "rank": 4, "target_modules": ["query", "value"]},
            "data": {"task": "files"},
            # 3 steps at a constant 0.1: enough for the cells' scores to differ from chance and from each other
            "train": {"max_steps": 3, "batch_size": 8, "logging_steps": 1, "save_steps": 100, "report_to": [],
                      "learning_rate": 0.1, "lr_scheduler": "constant", "warmup_ratio": 0.0},
        },
        "grid": {"data": data if data is not None else _data_files(folder), "seed": list(seeds)},
        "merge": copy.deepcopy(E2E_MERGE) if merge is None else merge,
    }
    if variants is ...:
        variants = {"r4": {"adapter.rank": 4}, "r2": {"adapter.rank": 2}}
    if variants is not None:
        spec["grid"]["overrides"] = variants
    spec.update(extra)
    return spec


def _stamps(folder: Path) -> dict[str, tuple[int, str]]:
    """(mtime, content) of every JSON record in ``folder``."""
    return {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in folder.glob("*.json")}


# ------------------------------------------------------------------------------ 1. the spec


def _merge(**methods) -> dict:
    return {"methods": methods or {"it": {"method": "iterative"}}}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(select={"key": "train.learning_rate", "values": [0.01, 0.02]},
                        set={"data.validation_fraction": 0.25}),
     r"merge does not combine with select"),
    (lambda s: s["grid"].update(data={"one": s["grid"]["data"]["one"]}),
     r"merge needs two or more data sets in the grid .*got 1"),
    (lambda s: s.update(merge=_merge(it={"method": "iterative", "variants": ["r4", "nope"]})),
     r"merge\.methods\.it\.variants names nope, which grid\.overrides does not have \(r4, r2\)"),
    (lambda s: s.update(merge=_merge(t={"method": "ties"})),
     r"merge\.methods\.t: --method ties needs --density"),
    (lambda s: s.update(merge=_merge(it={"method": "iterative", "retain": 1.5})),
     r"merge\.methods\.it: --retain must be in \(0, 1\], got 1\.5"),
    (lambda s: s.update(merge=_merge(it={"method": "iterative", "retian": 0.5})),
     r"unknown key\(s\) merge\.methods\.it\.retian"),
    (lambda s: s.update(merge=_merge(c={"method": "cat", "retain": 0.5})),
     r"merge\.methods\.c: --retain does not apply to --method cat"),
    (lambda s: s.update(merge={**_merge(), "reference": "ties"}),
     r"merge\.reference 'ties' is not one of merge\.methods \(it\)"),
    (lambda s: s.update(merge={**_merge(it={"method": "iterative", "variants": ["r2"]})}),
     r"merge\.reference 'it' must merge every variant"),
    (lambda s: s.update(merge={**_merge(), "normalize_by": "r8"}),
     r"merge\.normalize_by 'r8' is not a variant of grid\.overrides \(r4, r2\)"),
    (lambda s: s.update(merge={**_merge(), "score": "loss"}),
     r"merge\.score 'loss' is lower-is-better"),
    (lambda s: s.update(merge={**_merge(), "incremental": "yes"}),
     r"merge\.incremental must be true or false"),
    (lambda s: s.update(merge={**_merge(), "sweep": {"name": "retain", "values": {"nope": 1}}}),
     r"merge\.sweep\.values names nope, which merge\.methods does not have"),
    (lambda s: s.update(merge={**_merge(), "weights": 1}),
     r"unknown key\(s\) merge\.weights"),
    (lambda s: s.update(merge={"methods": {}}),
     r"merge\.methods must map merge names"),
])
def test_bad_merge_sections_are_one_line_spec_errors(change, message, tmp_path):
    raw = _spec("tiny-model", tmp_path)
    change(raw)
    with pytest.raises(SpecError, match=message) as err:
        load_spec(raw)
    assert "\n" not in str(err.value) and str(err.value).startswith("spec: ")


def test_merge_on_a_generation_grid_is_refused(tmp_path):
    raw = {
        "name": "gen", "base": {"family": "generation", "model": {"name": "smollm2"},
                                "adapter": {"method": "lora", "rank": 4}, "data": {"task": "gsm-symbolic"}},
        "grid": {"data": {"a": {"data.max_train_examples": 8}, "b": {"data.max_train_examples": 16}}, "seed": [42]},
        "merge": _merge(),
    }
    with pytest.raises(SpecError, match=r"merge scores merged classifiers only .*generation cells") as err:
        load_spec(raw)  # the configs are resolved only: no model is loaded
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option", [{"method": "ties", "density": "half"}, {"method": "svd", "rank": "big"},
                                    {"method": "cat", "weight": "one"}])
def test_a_non_numeric_merge_option_is_a_spec_error(option, tmp_path):
    raw = _spec("tiny-model", tmp_path, {"methods": {"m": option}})
    with pytest.raises(SpecError, match=r"merge\.methods\.m: "):
        load_spec(raw)


def test_merge_settings_are_read(tmp_path):
    spec = load_spec(_spec("tiny-model", tmp_path, {
        "score": "macro_f1", "general": "mrpc-validation", "reference": "b", "normalize_by": "r2",
        "methods": {"a": {"method": "ties", "density": "0.5", "variants": ["r2"]}, "b": None}}))
    s = spec.merge
    assert (s.score, s.general, s.reference, s.normalize_by, s.incremental) == \
        ("macro_f1", "mrpc-validation", "b", "r2", False)
    a, b = s.methods
    assert a.options == (("method", "ties"), ("density", 0.5)) and a.variants == ("r2",)  # "0.5" read as a number
    assert b.options == () and b.variants is None and s.by_name["b"] is b
    # defaults: the first merge is the reference, the first variant normalises
    default = load_spec(_spec("tiny-model", tmp_path, _merge(x={}, y={"method": "cat"}))).merge
    assert (default.reference, default.normalize_by, default.score, default.general) == ("x", "r4", "accuracy", None)
    assert load_spec(_spec("tiny-model", tmp_path, variants=None, merge=_merge())).merge.normalize_by is None


# ------------------------------------------------------------------------------ 2. the plan


def test_plan_merges_job_ids_counts_and_inputs(tmp_path):
    spec = load_spec(_spec("tiny-model", tmp_path, {
        "general": "mrpc-validation", "reference": "it", "incremental": True,
        "methods": {"it": {"method": "iterative"}, "cat": {"method": "cat"},
                    "ties": {"method": "ties", "density": 0.5, "variants": ["r2"]}}}))
    jobs = plan_merges(spec)
    assert jobs[0].id == "base" and jobs[0].kind == "base" and jobs[0].cells == ()
    singles = [j for j in jobs if j.kind == "single"]
    assert [j.id for j in singles] == [f"single__{c.id}" for c in spec.cells] and len(singles) == 12
    assert all(j.cells == (c,) for j, c in zip(singles, spec.cells))
    merges = [j for j in jobs if j.kind == "merge"]
    expected = []
    for seed in (42, 7):
        for variant in ("r4", "r2"):
            expected += [f"merge__lora__{variant}__it__k2__s{seed}", f"merge__lora__{variant}__it__s{seed}",
                         f"merge__lora__{variant}__cat__s{seed}"]
            expected += [f"merge__lora__r2__ties__s{seed}"] if variant == "r2" else []
    assert [j.id for j in merges] == expected and len(jobs) == 1 + 12 + 14
    by_id = {j.id: j for j in jobs}
    k2, full = by_id["merge__lora__r2__it__k2__s7"], by_id["merge__lora__r2__it__s7"]
    assert k2.data == ["one", "two"] and full.data == ["one", "two", "three"]  # the grid's order, first k
    assert all(c.variant == "r2" and c.seed == 7 for c in full.cells)
    assert full.signature == {"options": {"method": "iterative"}, "inputs": {c.id: c.config_hash for c in full.cells}}
    assert by_id["merge__lora__r2__ties__s42"].options == (("method", "ties"), ("density", 0.5))
    assert by_id["merge__lora__r2__ties__s42"].merge == "ties"


def test_plan_merges_without_general_or_variants_on_four_data_sets(tmp_path):
    four = _data_files(tmp_path)
    four["four"] = dict(four["one"])
    spec = load_spec(_spec("tiny-model", tmp_path, data=four, variants=None, seeds=(42,), merge={
        "incremental": True, "reference": "b", "methods": {"a": {"method": "cat"}, "b": {"method": "iterative"}}}))
    ids = [j.id for j in plan_merges(spec)]
    assert "base" not in ids  # no merge.general: no base job
    assert ids[4:] == ["merge__lora__a__s42", "merge__lora__b__k2__s42", "merge__lora__b__k3__s42",
                       "merge__lora__b__s42"]  # incremental k = 2 .. n-1 for the reference only
    assert [len(j.cells) for j in plan_merges(spec)[4:]] == [4, 2, 3, 4]
    raw = _spec("tiny-model", tmp_path)
    del raw["merge"]
    assert plan_merges(load_spec(raw)) == []


# ------------------------------------------------------------------------------ 3. one tiny grid


@pytest.fixture(scope="module")
def grid_model_dir(tmp_path_factory):
    """The tiny BERT of ``tiny_model_dir`` (2 layers, hidden 16) with a WordPiece vocabulary of 124
    tokens (characters, punctuation and the task words) instead of MiniLM's 30,522: datasets'
    fingerprinting pickles the tokenizer at every ``encode`` (every cell, every single job); with the
    large vocabulary this grid took 108-123 s on a busy 2-core machine, with this one 24-30 s."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    path = tmp_path_factory.mktemp("small-vocab-bert")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted({w for table in (WORDS, TWO_CLASSES) for ws in table.values() for w in ws})
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
                           *".,;:!?'\"()-$%&/", *words])
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer.tokenize("match cat") == ["match", "cat"]
    # initializer_range 0.5 (BERT's 0.02 gives every text the same [CLS] vector at hidden size 16)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=64, num_labels=3, initializer_range=0.5)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def grid(grid_model_dir, one_thread, tmp_path_factory):
    """2 seeds × 2 variants × 3 data sets, trained once, with the merge stage of E2E_MERGE."""
    folder = tmp_path_factory.mktemp("merge-grid")
    raw = _spec(grid_model_dir, folder)
    spec = load_spec(raw)
    store = ExperimentStore(folder / "store")
    summary = run_experiment(spec, store.root, in_process=True, progress=False)
    return SimpleNamespace(raw=raw, spec=spec, store=store, summary=summary, folder=folder)


def _load_run(folder: Path):
    from balora.models import CLASSIFICATION, load_source, resolve_model_source

    return load_source(resolve_model_source(None, folder, family=CLASSIFICATION))


def test_every_merge_job_finished_and_singles_score_like_their_cells(grid):
    spec, store, summary = grid.spec, grid.store, grid.summary
    assert len(summary.finished) == 12 and not summary.failed
    m = summary.merges
    assert (m.planned, m.ran, m.finished, m.kept, m.failed, m.waiting) == (25, 25, 25, 0, [], [])
    records, cells = merge_records(store), store.records()
    assert sorted(records) == sorted(j.id for j in plan_merges(spec))
    assert all(r["status"] == FINISHED and r["error"] is None for r in records.values())
    for cell in spec.cells:
        single = records[f"single__{cell.id}"]
        own = single["cell_scores"][cell.data]
        assert own and own == cells[cell.id]["metrics"]["test"]
        for key, value in own.items():  # scored again by the merge stage: exactly the run's own test score
            assert single["scores"][cell.data][key] == value, (cell.id, key)
        assert single["data"] == [cell.data] and single["signature"]["inputs"] == {cell.id: cell.config_hash}
    for job in plan_merges(spec):
        r = records[job.id]
        if job.kind != "merge":
            continue
        assert r["data"] == job.data and sorted(r["scores"]) == sorted(job.data) and r["merge"] == job.merge
        assert 0.0 <= r["general"]["similarity_auc"] <= 1.0 and r["general"]["pairs"] == 408
        assert (store.root / r["merged_dir"]).is_dir()
        ranks = set(r["merge_record"]["ranks"].values())
        rank = 4 if job.cells[0].variant == "r4" else 2
        if job.merge == "cat":  # concatenation: the ranks of the inputs add up
            assert ranks == {rank * len(job.cells)}, job.id
        else:
            assert r["merge_record"]["method"] == "iterative" and max(ranks) <= rank * len(job.cells)
    assert records["merge__lora__r2__it__k2__s7"]["data"] == ["one", "two"]


def test_base_score_is_the_pretrained_encoders(grid, grid_model_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from balora.evaluation.similarity import general_pairs, similarity_auc

    records, cells = merge_records(grid.store), grid.store.records()
    pairs, labels, positive = general_pairs("mrpc-validation")
    assert positive == "equivalent"
    cell = grid.spec.cells[0]
    model, tokenizer = _load_run(grid.store.absolute(cells[cell.id]["run_dir"]))
    adapted = similarity_auc(model, tokenizer, pairs, labels, max_length=16)
    assert adapted == records[f"single__{cell.id}"]["general"]["similarity_auc"]
    with model.disable_adapter():  # PEFT: the LoRA layers bypassed, the pre-trained encoder
        disabled = similarity_auc(model, tokenizer, pairs, labels, max_length=16)
    fresh = similarity_auc(BertForSequenceClassification.from_pretrained(grid_model_dir).eval(),
                           AutoTokenizer.from_pretrained(grid_model_dir), pairs, labels, max_length=16)
    base = records["base"]["general"]
    assert base["task"] == "mrpc-validation" and base["pairs"] == 408
    assert base["similarity_auc"] == disabled == fresh
    assert adapted != disabled  # the adapter changed the encoder, so disabling it is what gives the base score


def test_a_second_run_runs_nothing(grid):
    merges_dir, cells_dir = grid.store.root / MERGES_DIR, grid.store.root / "cells"
    before, cells_before = _stamps(merges_dir), _stamps(cells_dir)
    again = run_experiment(grid.spec, grid.store.root, in_process=True, progress=False)
    assert again.ran == [] and len(again.kept) == 12
    assert (again.merges.ran, again.merges.kept, again.merges.failed) == (0, 25, [])
    assert _stamps(merges_dir) == before and _stamps(cells_dir) == cells_before


def test_a_spec_that_changes_a_merge_is_refused(grid):
    raw = copy.deepcopy(grid.raw)
    raw["merge"]["methods"]["it"]["retain"] = 0.5
    changed = load_spec(raw)
    merges_dir, cells_dir = grid.store.root / MERGES_DIR, grid.store.root / "cells"
    before, cells_before = _stamps(merges_dir), _stamps(cells_dir)
    message = r"changes 8 finished merge\(s\) .*merge__lora__r4__it__k2__s42, .* and 4 more"
    with pytest.raises(SpecError, match=message):
        run_experiment(changed, grid.store.root, in_process=True, progress=False)
    with pytest.raises(SpecError, match=message):
        check_merge_records(changed, grid.store)
    assert _stamps(merges_dir) == before and _stamps(cells_dir) == cells_before
    plan = describe_plan(changed, grid.store.root)
    assert re.search(r"^\s+changed\s+merge__lora__r2__it__s7 .*retain=0\.5", plan, re.MULTILINE)
    assert re.search(r"^\s+finished\s+merge__lora__r2__cat__s7", plan, re.MULTILINE)  # cat is not changed


def test_a_failing_job_is_recorded_and_the_stage_goes_on(grid, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(grid.store.root, root)
    store = ExperimentStore(root)
    cell = grid.spec.cells[1]
    job = f"single__{cell.id}"
    shutil.rmtree(store.absolute(store.records()[cell.id]["run_dir"]) / "adapter")
    (root / MERGES_DIR / f"{job}.json").unlink()
    others = _stamps(root / MERGES_DIR)

    summary = run_experiment(grid.spec, root, in_process=True, progress=False)
    assert summary.ran == [] and (summary.merges.ran, summary.merges.failed, summary.merges.kept) == (1, [job], 24)
    record = merge_records(store)[job]
    assert record["status"] == FAILED and record["error"].startswith("ValueError: ") and "adapter" in record["error"]
    assert "Traceback" in record["traceback"] and record["scores"] == {}
    after = _stamps(root / MERGES_DIR)
    assert {k: v for k, v in after.items() if k != job} == others  # every other record untouched

    again = run_experiment(grid.spec, root, in_process=True, progress=False)  # failed jobs are not retried
    assert (again.merges.ran, again.merges.failed) == (0, [job]) and _stamps(root / MERGES_DIR) == after
    retried = run_experiment(grid.spec, root, in_process=True, progress=False, retry_failed=True)
    assert (retried.merges.ran, retried.merges.failed) == (1, [job])
    assert _stamps(root / MERGES_DIR)[job] != after[job]  # written again, still failed
    assert merge_records(store)[job]["status"] == FAILED

    report = write_report(grid.spec, store).read_text()
    assert f"| {job} | failed | ValueError: " in report  # the merge section lists it as not counted


def test_report_merge_sections_and_remaining_performance(grid):
    report = write_report(grid.spec, grid.store).read_text()
    for heading in ("## Merging: single adapters and the reference merge `it`",
                    "## Merging: every merge method (remaining performance)",
                    "## Merging: adding tasks one by one (`it`)", "## Merging: paired comparison with `r4`",
                    "None: every planned merge job finished and is counted."):
        assert heading in report
    out = grid.store.root / "report"

    def record(job_id):
        return json.loads((grid.store.root / MERGES_DIR / f"{job_id}.json").read_text())

    with open(out / "merge_methods.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 * (3 + 2)  # rows × merges × seeds × (data sets, mean, general retention)
    checked = 0
    for row in rows:
        if row["data"] not in DATA:
            continue
        seed, data = row["seed"], row["data"]
        merged = record(f"merge__lora__{row['row']}__{row['merge']}__s{seed}")["scores"][data]["accuracy"]
        single = record(f"single__{data}__lora__{row['row']}__s{seed}")["scores"][data]["accuracy"]
        if single > 0:
            assert float(row["remaining_performance"]) == pytest.approx(merged / single, rel=1e-12), row
            checked += 1
        else:
            assert row["remaining_performance"] == ""
    assert checked > 0
    for row in rows:  # the mean of a merge: over the data sets of the same (row, merge, seed)
        if row["data"] == "mean":
            parts = [float(r["remaining_performance"]) for r in rows if r["data"] in DATA
                     and (r["row"], r["merge"], r["seed"]) == (row["row"], row["merge"], row["seed"])]
            assert float(row["remaining_performance"]) == pytest.approx(sum(parts) / 3, rel=1e-12), row
    base = record("base")["general"]["similarity_auc"]
    retention = next(r for r in rows if r["row"] == "r2" and r["merge"] == "cat" and r["seed"] == "7"
                     and r["data"] == "general_retention")
    assert float(retention["remaining_performance"]) == pytest.approx(
        record("merge__lora__r2__cat__s7")["general"]["similarity_auc"] / base, rel=1e-12)
    with open(out / "merge_single.csv") as handle:
        singles = list(csv.DictReader(handle))
    score = next(r for r in singles if r["row"] == "r4" and r["seed"] == "42" and r["data"] == "three"
                 and r["metric"] == "single_score")
    assert float(score["value"]) == record("single__three__lora__r4__s42")["scores"]["three"]["accuracy"]
    # the normalized score of r2 divides by the single adapters of r4 (merge.normalize_by, the first variant)
    normalized = next(r for r in singles if r["row"] == "r2" and r["seed"] == "7"
                      and r["metric"] == "merged_normalized_score")
    expected = [record("merge__lora__r2__it__s7")["scores"][d]["accuracy"]
                / record(f"single__{d}__lora__r4__s7")["scores"][d]["accuracy"] for d in DATA]
    assert float(normalized["value"]) == pytest.approx(sum(expected) / 3, rel=1e-12)
    for name in ("merge_incremental.csv", "merge_comparison.csv", "merge_methods.png", "merge_sweep.png",
                 "merge_incremental.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_dry_run_lists_the_merge_jobs(grid):
    plan = describe_plan(grid.spec, grid.store.root)
    assert "merge stage: 25 jobs (score accuracy, general mrpc-validation)" in plan
    for job in plan_merges(grid.spec):
        assert re.search(rf"^\s+finished\s+{re.escape(job.id)}(\s|$)", plan, re.MULTILINE), job.id
    assert re.search(r"^\s+finished\s+merge__lora__r4__it__s42\s+method=iterative retain=0\.8$", plan, re.MULTILINE)


# ------------------------------------------------------------------------------ 4. similarity AUC


TEXTS = [
    ("the match ended with a late goal", "a late goal decided the match"),
    ("stock prices fell", "the bank raised its rate after a long and difficult meeting of the board"),
    ("rain", "heavy rain and a cold wind came in from the north"),
    ("the coach praised the team", "the team was praised by its coach"),
    ("snow", "sun"),
    ("profit share of the market trade went up again this year", "market share up"),
    ("cloud storm wind", "storm wind cloud"),
    ("a player left the league", "the price of bread"),
    ("cold heat", "winter and summer weather in the mountains"),
    ("win", "the team will win the league this season if the coach stays"),
]
LABELS = [1, 0, 1, 1, 0, 1, 1, 0, 0, 1]


def _naive_auc(pairs, labels, model, tokenizer, max_length: int) -> float:
    """Per text, the encoder on that text alone (no padding), the mean of its tokens' last hidden
    states; cosine per pair; AUC = P(score_pos > score_neg) + 0.5 P(tie) over every (pos, neg)."""
    def embed(text):
        batch = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        return model.bert(**batch).last_hidden_state[0].mean(0)  # (d,)

    with torch.no_grad():
        scores = [float(torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=0)) for a, b in pairs]
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir, one_thread):
    from transformers import AutoTokenizer, BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(tiny_model_dir).eval(), \
        AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_similarity_auc_matches_a_naive_reference(tiny_bert, batch_size):
    from balora.evaluation.similarity import (
        encoder_of,
        mean_pooled_embeddings,
        similarity_auc,
    )

    model, tokenizer = tiny_bert
    expected = _naive_auc(TEXTS, LABELS, model, tokenizer, max_length=12)
    assert 0.0 < expected < 1.0
    assert similarity_auc(model, tokenizer, TEXTS, LABELS, max_length=12, batch_size=batch_size) == \
        pytest.approx(expected, abs=1e-6)
    texts = [a for a, _ in TEXTS]
    pooled = mean_pooled_embeddings(encoder_of(model), tokenizer, texts, max_length=12, batch_size=batch_size)
    with torch.no_grad():
        alone = torch.stack([model.bert(**tokenizer(t, truncation=True, max_length=12, return_tensors="pt"))
                             .last_hidden_state[0].mean(0) for t in texts])
    assert pooled.shape == (10, 16) and torch.allclose(pooled, alone, atol=1e-5)


def test_similarity_auc_errors_and_encoder_of(tiny_bert):
    from peft import LoraConfig, get_peft_model

    from balora.evaluation.similarity import encoder_of, similarity_auc

    model, tokenizer = tiny_bert
    with pytest.raises(ValueError, match="both classes present"):
        similarity_auc(model, tokenizer, TEXTS, [1] * 10, max_length=12)
    with pytest.raises(ValueError, match="9 pairs"):
        similarity_auc(model, tokenizer, TEXTS[:9], LABELS, max_length=12)
    assert encoder_of(model) is model.bert and encoder_of(model.bert) is model.bert
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["query", "value"]))
    body = encoder_of(wrapped)
    assert body is wrapped.get_base_model().bert and any("lora_A" in n for n, _ in body.named_parameters())


def test_general_pairs_of_mrpc():
    from balora.evaluation.similarity import general_pairs

    pairs, labels, positive = general_pairs("mrpc-validation")
    assert len(pairs) == len(labels) == 408 and positive == "equivalent" and set(labels) == {0, 1}
    assert all(isinstance(a, str) and isinstance(b, str) and a and b for a, b in pairs)
    with pytest.raises(ValueError, match="binary classification task of text pairs"):
        general_pairs("sst2-validation")


# ------------------------------------------------------------------------------ 5. classifier logits


@pytest.mark.parametrize("batch_size", [1, 5])
def test_classifier_logits_equal_a_per_row_forward(tiny_bert, batch_size):
    import datasets
    from transformers import DataCollatorWithPadding

    from balora.data import encode
    from balora.evaluation.features import classifier_logits

    model, tokenizer = tiny_bert
    rows = TEXTS[:7]  # 7 rows: batches of 5 leave a partial one
    dataset = encode(datasets.Dataset.from_dict({"text": [a for a, _ in rows], "text_pair": [b for _, b in rows],
                                                 "label": [0, 1, 2, 0, 1, 2, 0]}), tokenizer, 24)
    model.train()  # left as it was found
    logits = classifier_logits(model, dataset, DataCollatorWithPadding(tokenizer), batch_size)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = [model(**{k: torch.tensor([dataset[i][k]]) for k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")}).logits[0].numpy()
                    for i in range(len(dataset))]
    assert logits.shape == (7, 3) and logits.dtype.name == "float32"
    assert max(abs(float(x - y)) for row, want in zip(logits, expected) for x, y in zip(row, want)) < 1e-5


# ------------------------------------------------------------------------------ 6. merge options


def test_check_merge_options_defaults_and_errors():
    from balora.merging import check_merge_options

    assert check_merge_options() == {"retain": 0.8, "retain_by": "rank", "merge_fn": "max", "rank": None}
    assert check_merge_options("iterative", retain=1, merge_fn="mean", rank=3) == \
        {"retain": 1.0, "retain_by": "rank", "merge_fn": "mean", "rank": 3}
    assert check_merge_options("cat") == {"weight": 1.0}
    assert check_merge_options("ties", density=0.5) == {"weight": 1.0, "density": 0.5}
    assert check_merge_options("dare_ties", density=0.3) == {"weight": 1.0, "density": 0.3, "seed": 0}
    assert check_merge_options("svd", rank=2, weight=0.5) == {"weight": 0.5, "rank": 2}
    for kwargs, message in [
        ({"method": "average"}, r"unknown merge method 'average'; use one of iterative"),
        ({"method": "ties", "retain": 0.5, "density": 0.5}, r"--retain does not apply to --method ties"),
        ({"method": "iterative", "weight": 1.0}, r"--weight does not apply to --method iterative"),
        ({"method": "cat", "density": 0.5}, r"--density does not apply to --method cat"),
        ({"method": "ties"}, r"--method ties needs --density"),
        ({"retain": 1.5}, r"--retain must be in \(0, 1\], got 1\.5"),
        ({"retain": 0}, r"--retain must be in \(0, 1\], got 0"),
        ({"retain_by": "size"}, r"--retain-by must be one of rank, energy"),
        ({"merge_fn": "min"}, r"--merge-fn must be one of max, mean, sum"),
        ({"rank": 0}, r"--rank must be at least 1"),
        ({"method": "ties", "density": 1.5}, r"--density must be in \(0, 1\]"),
        ({"method": "cat", "weight": math.inf}, r"--weight must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            check_merge_options(**kwargs)
        assert "\n" not in str(err.value)
