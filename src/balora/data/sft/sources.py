"""Load instruction-tuning data: the paper's hub sets by short name, any hub id, or a local file.

``source`` may be

* an alias of a set used in the BA-LoRA paper (see :data:`SFT_DATASETS`);
* any Hugging Face Hub dataset id ``owner/name`` (needs the internet on first use);
* a local ``.jsonl`` / ``.json`` / ``.parquet`` file (or a local dataset folder).

The result keeps the source's own columns; :func:`balora.data.sft.encode_sft` detects the format.
"""

from __future__ import annotations

from pathlib import Path

import datasets

__all__ = ["SFT_DATASETS", "load_sft_dataset"]

#: Short names of the paper's instruction sets -> Hugging Face Hub ids.
SFT_DATASETS: dict[str, str] = {
    "metamathqa": "meta-math/MetaMathQA",
    "codefeedback": "m-a-p/CodeFeedback-Filtered-Instruction",
    "wizardlm-evol-instruct": "WizardLMTeam/WizardLM_evol_instruct_V2_196k",
}

#: Local file extension -> ``datasets`` packaged builder.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _looks_local(source: str) -> bool:
    """A filesystem path rather than a hub id ``owner/name``."""
    return (
        Path(source).expanduser().exists()
        or Path(source).suffix.lower() in _FILE_BUILDERS
        or source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
    )


def _load_local(source: str, cache_dir: str | None) -> datasets.Dataset:
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"SFT data file not found: {source}")
    if path.is_dir():
        return _guarded(lambda: datasets.load_dataset(str(path), split="train", cache_dir=cache_dir), source)
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{source}: unsupported SFT data file type {path.suffix!r}; use .jsonl, .json or .parquet")
    return _guarded(
        lambda: datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir), source
    )


def _guarded(load, what: str) -> datasets.Dataset:
    """Run ``load()``; any failure becomes a one-line ValueError naming ``what``."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - every reader error is reported the same way
        raise ValueError(f"cannot read SFT data {what!r}: {_first_line(exc)}") from None


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
        "or a local .jsonl/.json/.parquet file"
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
    ``cache_dir`` is passed to ``datasets.load_dataset``. Every failure to find or read the
    data raises a one-line ``ValueError``.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be at least 1 or None, not {max_examples}")
    target, local = _resolve(source)
    if local:
        ds = _load_local(target, cache_dir)
    else:
        ds = _guarded(lambda: datasets.load_dataset(target, split=split, cache_dir=cache_dir), f"{target} [{split}]")
    if max_examples is not None and max_examples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_examples)).flatten_indices()
    return ds
