"""Load instruction-tuning data: the paper's hub sets by short name, any hub id, or a local file.

``source`` may be

* an alias of a set used in the BA-LoRA paper (see :data:`SFT_DATASETS`);
* any Hugging Face Hub dataset id ``owner/name`` (needs the internet on first use);
* a local data file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ...: see
  :mod:`balora.data.files`) or a local dataset folder.

The result keeps the source's own columns; :func:`balora.data.sft.encode_sft` detects the format.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow

from balora.data.files import SUFFIXES, read_records
from balora.data.hub import load_hub_dataset

__all__ = ["SFT_DATASETS", "load_sft_dataset"]

#: Short names of the paper's instruction sets -> Hugging Face Hub ids.
SFT_DATASETS: dict[str, str] = {
    "metamathqa": "meta-math/MetaMathQA",
    "codefeedback": "m-a-p/CodeFeedback-Filtered-Instruction",
    "wizardlm-evol-instruct": "WizardLMTeam/WizardLM_evol_instruct_V2_196k",
}

#: What to do without internet (the end of every hub error).
OFFLINE_HINT = (
    "Without internet, use a local .jsonl/.json/.parquet/.csv file "
    "(load_sft_dataset(PATH) in Python, data.train_file=PATH on the command line)"
)


def _looks_local(source: str) -> bool:
    """A filesystem path rather than a hub id ``owner/name``."""
    return (
        Path(source).expanduser().exists()
        or Path(source).suffix.lower() in (*SUFFIXES, ".gz")
        or source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
    )


def _from_file(source: str) -> datasets.Dataset:
    """The rows of a local data file; a key missing from a row becomes ``None`` there.

    A column whose values Arrow cannot hold in one type (a number in one row and a text in
    another, a list and a text, an integer beyond 64 bits) is a one-line ValueError naming the
    file, the column and the first row that breaks it; so is a value nested too deeply.
    """
    rows = read_records(source, what="SFT data file")
    columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
    try:
        return datasets.Dataset.from_dict(columns)
    except RecursionError:  # datasets copies the features recursively
        raise ValueError(f"cannot read SFT data file {source}: a value is nested too deeply") from None
    except (pyarrow.ArrowException, TypeError, ValueError, OverflowError) as exc:
        for key, values in columns.items():
            reason = _arrow_failure(values)
            if reason is not None:
                raise ValueError(f"cannot read SFT data file {source}: column {key!r}: {reason}; "
                                 "give every row the same type") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read SFT data file {source}: {type(exc).__name__}: {first}") from None


def _arrow_failure(values: list) -> str | None:
    """Why Arrow cannot hold ``values`` as one column (naming the first row that breaks it), or None."""
    try:
        pyarrow.array(values)
        return None
    except (pyarrow.ArrowException, TypeError, ValueError, OverflowError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    low, high = 1, len(values)  # the shortest failing prefix: its last row is the first bad one
    while low < high:
        mid = (low + high) // 2
        try:
            pyarrow.array(values[:mid])
            low = mid + 1
        except (pyarrow.ArrowException, TypeError, ValueError, OverflowError):
            high = mid
    return f"row {low} holds a value that cannot be stored with the rows before it ({first})"


def _from_folder(folder: Path, cache_dir: str | None) -> datasets.Dataset:
    """A local dataset folder (data files ``datasets`` can build a train split from)."""
    try:
        return datasets.load_dataset(str(folder), split="train", cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - every builder error means "not a readable dataset folder"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read SFT data folder {folder}: {type(exc).__name__}: {first}") from None


def _resolve(source: str) -> tuple[str, bool]:
    """``(hub id or path, is_local)``; unknown bare names raise a one-line ValueError."""
    alias = SFT_DATASETS.get(source.strip().lower())
    if alias is not None:
        return alias, False
    if _looks_local(source):
        return source, True
    if source.count("/") == 1 and all(source.split("/")):
        return source, False
    raise ValueError(
        f"unknown SFT dataset {source!r}: use one of {sorted(SFT_DATASETS)}, a hub id 'owner/name', "
        "or a local .jsonl/.json/.parquet/.csv file"
    )


def load_sft_dataset(
    source: str,
    *,
    split: str = "train",
    max_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load an instruction dataset (see the module docstring for ``source``).

    ``split`` selects the hub split (local files have one split). ``max_examples`` keeps a
    seeded random subset of that many rows (all rows when ``None`` or larger than the set).
    ``cache_dir`` is passed to ``datasets.load_dataset`` (hub sets and folders). A missing
    file raises a one-line ``FileNotFoundError``, a bad file or folder a one-line
    ``ValueError``, and a hub set that cannot be loaded a one-line
    :class:`~balora.data.hub.HubLoadError`.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be at least 1 or None, not {max_examples}")
    target, local = _resolve(source)
    folder = Path(target).expanduser()
    if local and folder.is_dir():
        ds = _from_folder(folder, cache_dir)
    elif local:
        ds = _from_file(target)
    else:
        ds = load_hub_dataset(
            target, split=split, cache_dir=cache_dir, what=f"SFT data set (split {split})", offline_hint=OFFLINE_HINT
        )
    if max_examples is not None and max_examples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_examples)).flatten_indices()
    return ds
