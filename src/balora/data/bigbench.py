"""VitaminC and MultiEmo from the BIG-bench source archive (``bigbench`` 1.0.0, a large opt-in asset).

``bigbench`` has no wheel, and its source archive declares dependencies that current pip
refuses, so it is neither installed nor imported: ``make assets-large`` downloads
``bigbench-1.0.0.tar.gz`` (358 MB) into ``balora.assets.downloads_dir()``, and the first use
reads the ``task.json`` files below straight out of the archive (one pass, ~10 s) into
``cache_dir()/"data"/"bigbench-1.0.0"/`` (about 25 MB), which every later use reads.

* ``vitaminc`` -- ``vitaminc_fact_verification/task.json``: 54,668 claim / Wikipedia-evidence
  pairs from VitaminC (Schuster et al., 2021; the "real" revisions, without the synthetic ones),
  labelled ``True`` (the evidence supports the claim, 27,242), ``False`` (refutes it, 20,169)
  or ``Neither`` (not enough information, 7,257). Each ``input`` is
  ``"<page>: <evidence>\\nClaim: <claim>"``: ``text`` is ``"<page>: <evidence>"``,
  ``text_pair`` the claim. VitaminC pairs one claim with contrasting revisions of the same
  page, so the split keeps each page (the ``input`` up to its first ``": "``) on one side.
* ``multiemo-<domain>`` -- ``multiemo/<domain>_text_en/task.json``: whole consumer reviews of
  MultiEmo (Kocoń et al., 2021, CC BY 4.0; Polish originals machine-translated to English) in
  one of four domains -- ``hotels`` (3,955), ``medicine`` (3,272), ``products`` (484) and
  ``reviews`` (504, of university teachers) -- labelled ``ambivalent``, ``negative``,
  ``neutral`` or ``positive``. The domains share their classes, so transfer pairs work, e.g.
  ``multiemo-hotels-to-multiemo-medicine``.

A label is the one class whose ``target_scores`` entry is 1; an example with none or several
is dropped (``"ambiguous label"``).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from balora.assets import BIGBENCH_SDIST, cache_dir
from balora.data.classification import RawSplit

__all__ = [
    "MULTIEMO_DOMAINS",
    "MULTIEMO_LABELS",
    "TASK_FILES",
    "VITAMINC_LABELS",
    "extracted_dir",
    "read_multiemo",
    "read_task_examples",
    "read_vitaminc",
    "vitaminc_page",
]

logger = logging.getLogger("balora")

MULTIEMO_DOMAINS = ("hotels", "medicine", "products", "reviews")
MULTIEMO_LABELS = ("ambivalent", "negative", "neutral", "positive")
VITAMINC_LABELS = ("True", "False", "Neither")
_CLAIM = "\nClaim: "

#: The task files balora reads, relative to ``bigbench/benchmark_tasks/`` in the archive.
TASK_FILES = (
    "vitaminc_fact_verification/task.json",
    *(f"multiemo/{domain}_text_en/task.json" for domain in MULTIEMO_DOMAINS),
)
_PREFIX = "bigbench/benchmark_tasks/"


def extracted_dir() -> Path:
    """``cache_dir()/"data"/"bigbench-<version>"``, holding :data:`TASK_FILES` once extracted."""
    return cache_dir() / "data" / f"bigbench-{BIGBENCH_SDIST.version}"


def _extract(archive: Path, target: Path) -> None:
    """Copy every :data:`TASK_FILES` member of the archive into ``target`` (one pass over the
    archive; written to a temporary sibling and renamed into place when all were found)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        found = set()
        logger.info("one-time extraction of %d BIG-bench tasks from %s", len(TASK_FILES), archive)
        try:
            with tarfile.open(archive) as tar:
                for member in tar:
                    _, _, inside = member.name.partition("/")  # drop the "bigbench-1.0.0/" folder
                    relative = inside[len(_PREFIX):] if inside.startswith(_PREFIX) else None
                    if relative in TASK_FILES and member.isfile():
                        out = tmp / relative
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        found.add(relative)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"cannot read the BIG-bench archive {archive}: {type(err).__name__}: {err}; "
                             "delete it and run `make assets-large` again") from None
        missing = sorted(set(TASK_FILES) - found)
        if missing:
            raise ValueError(f"the BIG-bench archive {archive} lacks {', '.join(missing)}")
        try:
            os.replace(tmp, target)
        except OSError:
            if not all((target / f).is_file() for f in TASK_FILES):  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_task_examples(task_file: str) -> list[dict]:
    """The ``examples`` of one of :data:`TASK_FILES`, extracting them from the archive on first use."""
    if task_file not in TASK_FILES:
        raise ValueError(f"unknown BIG-bench task file {task_file!r}; known: {', '.join(TASK_FILES)}")
    target = extracted_dir()
    if not all((target / f).is_file() for f in TASK_FILES):
        shutil.rmtree(target, ignore_errors=True)
        _extract(BIGBENCH_SDIST.path("the BIG-bench tasks (vitaminc, multiemo-*)"), target)
    path = target / task_file
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the BIG-bench task {path}: {type(err).__name__}: {err}") from None
    return list(examples)


def _label(example: dict, names: tuple[str, ...]) -> str | None:
    """The one class of ``names`` whose target score is 1 (scores are a dict, or its repr); else None."""
    scores = example.get("target_scores")
    if isinstance(scores, str):
        try:
            scores = ast.literal_eval(scores)
        except (ValueError, SyntaxError):
            return None
    if not isinstance(scores, dict):
        return None
    chosen = [name for name in names if scores.get(name) == 1]
    return chosen[0] if len(chosen) == 1 else None


def _rows(examples: list[dict], names: tuple[str, ...], pairs: bool) -> RawSplit:
    cols: dict[str, list[str]] = {"text": [], "label": []}
    if pairs:
        cols["text_pair"] = []
    dropped: Counter = Counter()
    for example in examples:
        label, text = _label(example, names), str(example.get("input", ""))
        if label is None:
            dropped["ambiguous label"] += 1
            continue
        if pairs:
            evidence, sep, claim = text.partition(_CLAIM)
            if not sep:
                dropped["no claim"] += 1
                continue
            cols["text_pair"].append(claim)
            text = evidence
        cols["text"].append(text)
        cols["label"].append(label)
    return RawSplit(cols, dropped)


def vitaminc_page(text: str) -> str:
    """The Wikipedia page of a VitaminC ``text`` (``"<page>: <evidence>"``): the part before the
    first ``": "`` (a page whose title holds ``": "`` shares a group with its prefix)."""
    return text.partition(": ")[0].strip()


def read_vitaminc() -> RawSplit:
    """Every VitaminC example as ``text`` (page: evidence), ``text_pair`` (claim), ``label``."""
    return _rows(read_task_examples(TASK_FILES[0]), VITAMINC_LABELS, pairs=True)


def read_multiemo(domain: str) -> RawSplit:
    """Every English MultiEmo review of ``domain`` as ``text`` and ``label``."""
    if domain not in MULTIEMO_DOMAINS:
        raise ValueError(f"unknown MultiEmo domain {domain!r}; choose one of {', '.join(MULTIEMO_DOMAINS)}")
    return _rows(read_task_examples(f"multiemo/{domain}_text_en/task.json"), MULTIEMO_LABELS, pairs=False)
