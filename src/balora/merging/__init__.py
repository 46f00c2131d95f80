"""Merging task adapters into one: I-LoRA's iterative merging and PEFT's merge baselines.

``balora merge ADAPTER... --out DIR`` is :func:`merge_adapters`. ``iterative`` (the default):
:mod:`balora.merging.iterative` (truncated SVD of every ΔW_i, pairwise element-wise merge, refactor to
LoRA); ``cat``, ``linear``, ``svd``, ``ties``, ``dare_ties``: PEFT's ``add_weighted_adapter``
(:func:`balora.merging.adapters.peft_merge`). The inputs are read and checked, and the output
written, by :mod:`balora.merging.adapters`; :mod:`balora.merging.metrics` holds the metrics of the
merged models (remaining performance, degradation, generalization retention, normalized score).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from balora.merging.adapters import PEFT_METHODS, check_out_dir, peft_merge, read_adapters, write_merged
from balora.merging.iterative import DEFAULT_RETAIN, MERGE_FUNCTIONS, RETAIN_BY, iterative_merge

__all__ = ["MERGE_FILE", "MERGE_FUNCTIONS", "METHODS", "RETAIN_BY", "MergeResult", "check_merge_options",
           "merge_adapters"]

#: Merge methods: I-LoRA's iterative merging, then PEFT's baselines.
METHODS = ("iterative", *PEFT_METHODS)
#: What a merge records beside its adapters.
MERGE_FILE = "merge.json"
_DENSITY_METHODS = ("ties", "dare_ties")
_RANK_METHODS = ("iterative", "svd")


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """``out_dir``; ``adapters``: task name -> its loadable adapter folder (classifiers:
    ``out_dir/<task>``; a causal LM: every task -> ``out_dir``); ``record``: what ``merge.json`` holds."""

    out_dir: Path
    adapters: dict[str, Path]
    record: dict


def _check_options(method: str, *, retain, retain_by, merge_fn, rank, density, weight, seed) -> dict:
    """The options of ``method`` with their defaults; a one-line ValueError for a bad value or an
    option the method does not read."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    for flag, value, kinds in (("--retain", retain, (int, float)), ("--density", density, (int, float)),
                               ("--weight", weight, (int, float)), ("--rank", rank, (int,)), ("--seed", seed, (int,))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            what = "an integer" if kinds == (int,) else "a number"
            raise ValueError(f"{flag} must be {what}, got {value!r}")
    for flag, value in (("--retain-by", retain_by), ("--merge-fn", merge_fn)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{flag} must be a name, got {value!r}")
    given = {"--retain": retain, "--retain-by": retain_by, "--merge-fn": merge_fn, "--rank": rank,
             "--density": density, "--weight": weight, "--seed": seed}
    reads = {"--rank": method in _RANK_METHODS, "--density": method in _DENSITY_METHODS,
             "--seed": method == "dare_ties", "--weight": method != "iterative",
             **{flag: method == "iterative" for flag in ("--retain", "--retain-by", "--merge-fn")}}
    for flag, value in given.items():
        if value is not None and not reads[flag]:
            raise ValueError(f"{flag} does not apply to --method {method}")
    if retain is not None and not (isinstance(retain, (int, float)) and 0.0 < retain <= 1.0):
        raise ValueError(f"--retain must be in (0, 1], got {retain}")
    if retain_by is not None and retain_by not in RETAIN_BY:
        raise ValueError(f"--retain-by must be one of {', '.join(RETAIN_BY)}, got {retain_by!r}")
    if merge_fn is not None and merge_fn not in MERGE_FUNCTIONS:
        raise ValueError(f"--merge-fn must be one of {', '.join(MERGE_FUNCTIONS)}, got {merge_fn!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    if method in _DENSITY_METHODS and density is None:
        raise ValueError(f"--method {method} needs --density, the fraction of entries it keeps, in (0, 1]")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    if weight is not None and not math.isfinite(weight):
        raise ValueError(f"--weight must be a finite number, got {weight}")
    if method == "iterative":
        return {"retain": DEFAULT_RETAIN if retain is None else float(retain), "retain_by": retain_by or "rank",
                "merge_fn": merge_fn or "max", "rank": rank}
    options = {"weight": 1.0 if weight is None else float(weight)}
    if method in _DENSITY_METHODS:
        options["density"] = float(density)
    if method == "svd":
        options["rank"] = rank
    if method == "dare_ties":
        options["seed"] = 0 if seed is None else int(seed)
    return options


def check_merge_options(method: str = "iterative", *, retain: float | None = None, retain_by: str | None = None,
                        merge_fn: str | None = None, rank: int | None = None, density: float | None = None,
                        weight: float | None = None, seed: int | None = None) -> dict:
    """The options :func:`merge_adapters` would use for ``method`` (defaults filled in), or the
    one-line ValueError it would raise for them, without reading any adapter."""
    return _check_options(method, retain=retain, retain_by=retain_by, merge_fn=merge_fn, rank=rank,
                          density=density, weight=weight, seed=seed)


def _check_ranks(adapters, method: str, options: dict) -> None:
    """PEFT's conditions, checked before its base model is loaded: linear, ties and dare_ties combine
    the factors themselves, so every adapter needs the same rank; svd's rank fits every layer."""
    if method in ("linear", *_DENSITY_METHODS) and len({adapter.stored_rank for adapter in adapters}) > 1:
        ranks = ", ".join(f"{adapter.path}: r={adapter.stored_rank}" for adapter in adapters)
        raise ValueError(f"--method {method} combines adapters of one rank only ({ranks}); use iterative, cat or svd")
    smallest = min(min(lora_b.shape[0], lora_a.shape[1]) for lora_b, lora_a in adapters[0].lora.values())
    if method == "svd" and options["rank"] is not None and options["rank"] > smallest:
        raise ValueError(f"--rank {options['rank']} exceeds min(out, in) = {smallest} of the smallest adapted layer")


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(),
            **{name: version(name) for name in ("balora", "peft", "torch", "transformers", "safetensors")}}


def merge_adapters(
    adapters: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    method: str = "iterative",
    retain: float | None = None,
    retain_by: str | None = None,
    merge_fn: str | None = None,
    rank: int | None = None,
    density: float | None = None,
    weight: float | None = None,
    seed: int | None = None,
) -> MergeResult:
    """Merge the task ``adapters`` (run or PEFT adapter directories) into ``out_dir``: what
    ``balora merge`` does.

    ``method`` ``iterative`` reads ``retain`` (ρ in (0, 1], default 0.8), ``retain_by`` (``rank``,
    the default, or ``energy``), ``merge_fn`` (``max``, the default, ``mean`` or ``sum``) and
    ``rank`` (the merged rank of every layer; None: the sum of the truncated ranks), see
    :func:`balora.merging.iterative.iterative_merge`. The PEFT methods read ``weight`` (every
    adapter's, default 1.0), ``density`` (ties, dare_ties: required), ``rank`` (svd) and ``seed``
    (dare_ties' random drop, default 0). None leaves an option at its default; an option the method
    does not read is an error.

    ``out_dir`` must not exist or be empty. Classifiers give ``out_dir/<task>/`` per task (the merged
    LoRA with that task's head and labels); a causal LM gives ``out_dir`` itself; ``out_dir/merge.json``
    records the inputs, the options, the rank of every layer and the library versions. Every user
    mistake (see :func:`balora.merging.adapters.read_adapters`, fewer than 2 adapters, a bad option)
    is a one-line ValueError / FileExistsError raised before anything is written.
    """
    options = _check_options(method, retain=retain, retain_by=retain_by, merge_fn=merge_fn, rank=rank,
                             density=density, weight=weight, seed=seed)
    if len(adapters) < 2:
        raise ValueError(f"balora merge combines at least 2 adapters, got {len(adapters)}")
    check_out_dir(out_dir)
    inputs = read_adapters(adapters)
    if method == "iterative":
        merged = iterative_merge(inputs, **options)
    else:
        _check_ranks(inputs, method, options)
        merged = peft_merge(inputs, method, **options)
    record = {
        "method": method,
        **options,
        "family": inputs[0].family,
        "base_model": inputs[0].base,
        "inputs": [{"path": str(adapter.path), "adapter": str(adapter.adapter_dir), "task": adapter.task,
                    "r": adapter.stored_rank, "lora_alpha": adapter.config["lora_alpha"]} for adapter in inputs],
        "ranks": {module: layer["rank"] for module, layer in merged.layers.items()},
        "layers": merged.layers,
        "versions": _versions(),
    }
    folders = write_merged(out_dir, merged, inputs, record, MERGE_FILE)
    return MergeResult(Path(out_dir), folders, record)
