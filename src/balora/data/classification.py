"""The common task container, the reading of a local split, row cleaning and tokenisation.

Every loader in :mod:`balora.data` ends in :func:`build_task`, which turns raw
columns (strings or numbers) into a :class:`TaskData`:

* rows with an empty label, an empty text (or text pair), a label that is not a
  number (regression) or a label that is not known (classification), CSV/TSV
  rows with more fields than the header (``"more fields than the header"``; the
  file reader's own warning names their lines) and JSON rows whose text or label
  is a list or an object (``"not a text or number"``) are skipped, counted in
  ``TaskData.skipped`` by reason, and reported in ONE warning per load on the
  ``"balora"`` logger;
* a classification task needs at least two classes in its train split, else a
  one-line ValueError (one class would give a 1-output regression head);
* a label set that looks like free text — more than :data:`FREE_TEXT_MIN_LABELS`
  (50) distinct labels AND more distinct labels than :data:`FREE_TEXT_LABEL_SHARE`
  (half) of the usable train rows — is a one-line ValueError naming the file and
  column (local files) or the task (the usual cause: text with unquoted
  delimiters, or the wrong ``label_column``); Reuters R52's 52 classes over 6,532
  rows pass;
* string labels are mapped to ids ``0..K-1`` through a sorted label list taken from
  the train split (numeric order when every label is an integer, else string
  order); eval rows whose label never occurs in train are skipped as
  ``"unknown label"`` (a class the model cannot have learnt);
* regression labels become ``float32``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np

from balora.data.files import cell_text, read_table

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "RawSplit",
    "TaskData",
    "build_task",
    "encode",
    "load_classification_files",
    "load_table",
    "read_split",
    "relabel",
    "stratified_split",
    "subsample",
]

logger = logging.getLogger("balora")

CLASSIFICATION = "single_label_classification"
REGRESSION = "regression"

#: A file's label set looks like free text with more distinct labels than this ...
FREE_TEXT_MIN_LABELS = 50
#: ... AND more distinct labels than this share of its usable train rows.
FREE_TEXT_LABEL_SHARE = 0.5

#: An integer label as text: ASCII digits only (``str.isdigit`` also accepts "²", which int() refuses).
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass
class TaskData:
    """One task: a train and an eval split with columns ``text``, optional
    ``text_pair``, and ``label`` (int64 ids, or float32 for regression)."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    label_names: list[str] | None
    problem_type: str
    headline_metric: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """Number of model outputs: 1 for regression, else the number of classes."""
        return 1 if self.problem_type == REGRESSION else len(self.label_names or [])

    @property
    def is_pair(self) -> bool:
        """True when examples are text pairs."""
        return "text_pair" in self.train.column_names

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Examples per class name in ``split`` ("train" or "eval"), largest first."""
        if self.label_names is None:
            raise ValueError(f"{self.name} is a regression task: it has no classes")
        ds = self.train if split == "train" else self.eval
        counts = Counter(int(i) for i in ds["label"])
        pairs = [(self.label_names[i], counts.get(i, 0)) for i in range(len(self.label_names))]
        return dict(sorted(pairs, key=lambda kv: -kv[1]))


@dataclass
class RawSplit:
    """Raw columns of one split before cleaning, plus rows a reader already dropped."""

    columns: dict[str, list]
    skipped: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------- file reading


def read_split(
    path, text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label"
) -> RawSplit:
    """Columns ``text`` [``text_pair``] ``label`` of a local file as raw strings (a missing cell
    is ""), with its blank lines counted as ``"empty line"``, its rows with more fields than
    the header as ``"more fields than the header"`` and its (JSON) rows whose cell in one of
    these columns is a list or an object as ``"not a text or number"`` in ``RawSplit.skipped``.

    The file is read by :func:`balora.data.files.read_table`; a missing column raises a
    one-line ValueError listing the columns that are there.
    """
    table = read_table(path)
    wanted = {"text": text_column, "label": label_column}
    if text_pair_column:
        wanted = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    missing = [c for c in wanted.values() if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: no column {', '.join(map(repr, missing))}; "
            f"the columns are: {', '.join(table.columns) or '(none)'}"
        )
    rows = [r for i, r in enumerate(table.rows) if i not in table.long_rows]
    kept = [r for r in rows if not any(isinstance(r.get(c), (list, dict)) for c in wanted.values())]
    cols = {ours: [cell_text(r.get(theirs)) for r in kept] for ours, theirs in wanted.items()}
    skipped = Counter({"empty line": table.blank_lines, "more fields than the header": len(table.long_rows),
                       "not a text or number": len(rows) - len(kept)})
    return RawSplit(cols, +skipped)


def load_table(
    path,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> datasets.Dataset:
    """Read a CSV, TSV, JSON(-lines) or Parquet file (see :mod:`balora.data.files`).

    Returns a Dataset with columns ``text``, ``text_pair`` (only when
    ``text_pair_column`` is given) and ``label``, all raw strings (a missing cell is
    ""): no row is dropped here except blank lines, which are logged.

    Raises a one-line FileNotFoundError for a missing file and a one-line ValueError for an
    unknown extension, a malformed or empty file, or a missing column (listing the columns
    that are there).
    """
    raw = read_split(path, text_column, text_pair_column, label_column)
    blank = raw.skipped["empty line"]
    if blank:
        logger.warning("skipped %d blank line%s of %s", blank, "s" * (blank != 1), path)
    return datasets.Dataset.from_dict(raw.columns, features=_raw_features(raw.columns))


def _raw_features(cols: Mapping[str, list]) -> datasets.Features:
    return datasets.Features({k: datasets.Value("string") for k in cols})


# ---------------------------------------------------------------- cleaning


def _as_float(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _label_key(value) -> str:
    """Canonical string of a class label: integral numbers lose their ".0"."""
    s = cell_text(value).strip()
    x = _as_float(s)
    if x is not None and x.is_integer() and s.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(x))
    return s


def _sorted_labels(keys) -> list[str]:
    """Numeric order when every label is an integer, else string order."""
    keys = set(keys)
    if keys and all(_INTEGER.fullmatch(k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def _infer_problem_type(values) -> str:
    nums = [_as_float(cell_text(v).strip()) for v in values]
    if nums and all(x is not None for x in nums) and not all(x.is_integer() for x in nums):
        return REGRESSION
    return CLASSIFICATION


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def build_task(
    name: str,
    train: RawSplit,
    eval: RawSplit,
    *,
    problem_type: str | None = None,
    label_names: Sequence[str] | None = None,
    headline_metric: str | None = None,
    label_source: str | None = None,
    sources: Mapping[str, str] | None = None,
) -> TaskData:
    """Clean two raw splits into a :class:`TaskData` (see the module docstring).

    ``label_names`` fixes the classes (GLUE): a label may then be a class name or
    an integer id ``0..K-1``; anything else is an ``"unknown label"``. Without it,
    classes are the sorted labels of the train split. ``problem_type=None`` means
    regression when every label is a number and some are not integers, else
    classification. ``headline_metric`` defaults to accuracy / pearson.
    ``label_source`` names the train labels (file and column) in the free-text error;
    ``sources`` (``{"train": ..., "eval": ...}``, e.g. the files) names each split in the
    errors about it (else the task ``name`` does).
    """
    splits = {"train": train, "eval": eval}
    pair = "text_pair" in train.columns
    skipped = {s: Counter(raw.skipped) for s, raw in splits.items()}
    keep = {s: [] for s in splits}  # row indices that survive the text/label checks
    for s, raw in splits.items():
        c = raw.columns
        for i, label in enumerate(c["label"]):
            if not cell_text(label).strip():
                skipped[s]["empty label"] += 1
            elif not cell_text(c["text"][i]).strip():
                skipped[s]["empty text"] += 1
            elif pair and not cell_text(c["text_pair"][i]).strip():
                skipped[s]["empty text pair"] += 1
            else:
                keep[s].append(i)

    if problem_type is None:
        problem_type = _infer_problem_type(train.columns["label"][i] for i in keep["train"])
        if problem_type == REGRESSION:
            logger.info("%s: labels are non-integer numbers, treating it as regression", name)
    if problem_type not in (CLASSIFICATION, REGRESSION):
        raise ValueError(f"problem_type must be {CLASSIFICATION!r} or {REGRESSION!r}, not {problem_type!r}")

    if problem_type == REGRESSION:
        names = None
        def convert(value):
            x = _as_float(cell_text(value).strip())
            return (x, None) if x is not None else (None, "bad label")
    else:
        if label_names is not None:
            names = [str(n) for n in label_names]
        else:
            names = _sorted_labels(_label_key(train.columns["label"][i]) for i in keep["train"])
        if len(names) == 1:  # (no names at all: no usable rows, reported below)
            raise ValueError(
                f"{(sources or {}).get('train', name)}: classification needs at least two classes in the "
                f"train split, found only {names[0]!r}"
            )
        rows = len(keep["train"])
        if len(names) > FREE_TEXT_MIN_LABELS and len(names) > FREE_TEXT_LABEL_SHARE * rows:
            raise ValueError(
                f"{label_source or name}: the labels look like free text, not classes ({len(names)} "
                f"distinct labels in {rows} rows); check the label column, and quote text that holds "
                "the delimiter"
            )
        index = {n: i for i, n in enumerate(names)}
        def convert(value):
            key = cell_text(value).strip()
            if key in index:
                return index[key], None
            key = _label_key(value)
            if key in index:
                return index[key], None
            if label_names is not None and _INTEGER.fullmatch(key) and 0 <= int(key) < len(names):
                return int(key), None
            return None, "unknown label"

    out = {}
    for s, raw in splits.items():
        cols = {k: [] for k in ("text", "text_pair", "label") if k in raw.columns}
        for i in keep[s]:
            y, reason = convert(raw.columns["label"][i])
            if reason:
                skipped[s][reason] += 1
                continue
            cols["label"].append(y)
            cols["text"].append(cell_text(raw.columns["text"][i]).strip())
            if pair:
                cols["text_pair"].append(cell_text(raw.columns["text_pair"][i]).strip())
        feats = {k: datasets.Value("string") for k in cols if k != "label"}
        feats["label"] = datasets.Value("float32" if problem_type == REGRESSION else "int64")
        out[s] = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))

    total = Counter()
    for counts in skipped.values():
        total.update(counts)
    if total:
        parts = [
            f"{s} {_plural(sum(c.values()), 'row')} ("
            + ", ".join(f"{r}: {n}" for r, n in sorted(c.items())) + ")"
            for s, c in skipped.items() if c
        ]
        logger.warning(
            "skipped %s of %s: %s", _plural(sum(total.values()), "row"), name, "; ".join(parts)
        )
    for s in splits:
        if len(out[s]) == 0:
            raise ValueError(f"{(sources or {}).get(s, name)}: no usable rows left in the {s} split "
                             f"(skipped: {dict(skipped[s])})")
    if headline_metric is None:
        headline_metric = "pearson" if problem_type == REGRESSION else "accuracy"
    return TaskData(
        name=name,
        train=out["train"],
        eval=out["eval"],
        label_names=names,
        problem_type=problem_type,
        headline_metric=headline_metric,
        skipped=dict(sorted(total.items())),
    )


def load_classification_files(
    name: str,
    train_file,
    eval_file,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    problem_type: str | None = None,
) -> TaskData:
    """A task from two local files (CSV/TSV/JSON(L)/Parquet, see :func:`read_split`).

    Classes are the sorted labels of ``train_file`` (strings or integers); eval
    rows with a class unseen in train, and rows with an empty text or label, are
    skipped and counted. Numeric non-integer labels, or ``problem_type="regression"``,
    give a regression task with float labels. Blank lines count as ``"empty line"``.
    """
    train, eval_ = (read_split(p, text_column, text_pair_column, label_column) for p in (train_file, eval_file))
    return build_task(name, train, eval_, problem_type=problem_type,
                      label_source=f"{train_file} (column {label_column!r})",
                      sources={"train": str(train_file), "eval": str(eval_file)})


def load_scored_file(
    name: str,
    path,
    label_names: Sequence[str],
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> datasets.Dataset:
    """The rows of one local file, to be scored by a model of the classes ``label_names``
    (out-of-distribution data): columns ``text`` [``text_pair``] ``label`` (int64 ids into
    ``label_names``). A label may be a class name or an integer id ``0..K-1`` (GLUE's convention);
    a file may hold only some of the classes. Rows with another label, or an empty text, are
    skipped and counted in one warning; a file with no usable row is a one-line ValueError."""
    raw = read_split(path, text_column, text_pair_column, label_column)
    return build_task(name, raw, raw, label_names=label_names, sources={"train": str(path), "eval": str(path)},
                      problem_type=CLASSIFICATION).eval


# ---------------------------------------------------------------- splitting


def stratified_split(
    labels: Sequence, eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Deterministic stratified split of row indices: (train indices, eval indices),
    each sorted ascending. Same labels and seed -> same split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, ev = train_test_split(
        idx, test_size=eval_fraction, random_state=seed, shuffle=True, stratify=list(labels)
    )
    return sorted(tr.tolist()), sorted(ev.tolist())


def subsample(ds: datasets.Dataset, n: int | None, seed: int = 0) -> datasets.Dataset:
    """At most ``n`` rows of ``ds``: a seeded shuffle then the first ``n`` (None: all)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"the number of examples must be at least 1, not {n}")
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def relabel(split: datasets.Dataset, from_names: Sequence[str], to_names: Sequence[str]) -> datasets.Dataset:
    """``split`` with its label ids (positions in ``from_names``) renumbered to the positions of the
    same class names in ``to_names``; both must name the same classes (in any order), else a
    one-line ValueError naming the difference."""
    if set(from_names) != set(to_names) or len(from_names) != len(to_names):
        only_from = sorted(set(from_names) - set(to_names))
        only_to = sorted(set(to_names) - set(from_names))
        raise ValueError(f"the classes differ: {', '.join(only_from) or 'none'} only in one, "
                         f"{', '.join(only_to) or 'none'} only in the other")
    if list(from_names) == list(to_names):
        return split
    new_id = [list(to_names).index(n) for n in from_names]
    remapped = [new_id[int(label)] for label in split["label"]]
    return split.remove_columns("label").add_column("label", remapped).cast_column("label", split.features["label"])


# ---------------------------------------------------------------- tokenisation


def encode(dataset: datasets.Dataset, tokenizer, max_length: int, *, with_example_id: bool = True) -> datasets.Dataset:
    """Tokenise ``text`` (and ``text_pair``) with truncation to ``max_length``, no padding.

    Output columns: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
    tokenizer returns them), ``labels`` (int64, or float32 for a float ``label``)
    and ``example_id`` (the row index in ``dataset``) when ``with_example_id``.
    Pad per batch with a collator, e.g. ``transformers.DataCollatorWithPadding``.
    """
    if "text" not in dataset.column_names or "label" not in dataset.column_names:
        raise ValueError(f"encode needs columns 'text' and 'label'; got {dataset.column_names}")
    pair = "text_pair" in dataset.column_names
    regression = str(dataset.features["label"].dtype).startswith("float")

    def tok(batch, indices):
        enc = tokenizer(
            batch["text"], batch["text_pair"] if pair else None,
            truncation=True, max_length=max_length, padding=False,
        )
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = batch["label"]
        if with_example_id:
            out["example_id"] = list(indices)
        return out

    encoded = dataset.map(
        tok, batched=True, with_indices=True, remove_columns=dataset.column_names,
        desc="tokenising",
    )
    encoded = encoded.cast_column("labels", datasets.Value("float32" if regression else "int64"))
    if with_example_id:
        encoded = encoded.cast_column("example_id", datasets.Value("int64"))
    return encoded
