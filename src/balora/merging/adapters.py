"""The adapters ``balora merge`` reads and writes.

* :func:`read_adapters` -- each run directory or PEFT adapter directory as a :class:`TaskAdapter`:
  per adapted layer the factors (B, A) and the scaling s (``lora_alpha / r``, or PEFT's
  ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` read from ``adapter_config.json``), so
  ΔW = s·B·A is the update relative to the ORIGINAL pre-trained weights (PiSSA-style adapters are
  saved converted, see :func:`balora.adapters.save_final`), plus the tensors that are not LoRA
  factors (a classifier's head, PEFT's ``modules_to_save``). The adapters must agree on the base
  model, the task family, the target modules and the adapted layers; every mistake is a one-line
  ValueError, raised before anything is written.
* :func:`peft_merge` -- the baselines of PEFT's ``add_weighted_adapter`` (cat, linear, svd, ties,
  dare_ties): the base model loaded once, every adapter's LoRA layers loaded into it under its own
  name, combined with equal weights.
* :func:`write_merged` -- a :class:`MergedLora` saved as standard PEFT adapters that
  ``PeftModel.from_pretrained(original_base, folder)`` loads: one folder per task for classifiers
  (the merged backbone LoRA + that task's head + its ``config.json`` with the labels), one folder for
  a causal LM; built in a temporary sibling folder and renamed into place, so a failure leaves none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from balora.assets import portable_name
from balora.config import CLASSIFICATION
from balora.models import (ADAPTER_CONFIG, MODEL_CONFIG, first_line, load_causal_lm, load_sequence_classifier, read_json,
                           resolve_model_source, transformers_quiet)
from balora.run_dir import CONFIG_FILE

__all__ = [
    "ADAPTER_WEIGHTS",
    "PEFT_METHODS",
    "MergedLora",
    "TaskAdapter",
    "check_out_dir",
    "peft_merge",
    "read_adapter",
    "read_adapters",
    "write_merged",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: ``add_weighted_adapter`` combination types offered as baselines (I-LoRA compares with these).
PEFT_METHODS = ("cat", "linear", "svd", "ties", "dare_ties")
#: The run config copy saved beside a run's adapter (:mod:`balora.model_card`), read for the task name.
_CONFIG_COPY = "balora_config.yaml"
_A, _B = ".lora_A.weight", ".lora_B.weight"
#: The prefix of PEFT's saved keys in front of the module name (``base_model.model.bert.encoder...``).
_PEFT_PREFIX = "base_model.model."
#: Tokenizer files copied beside the merged adapter (the tokenizer training used).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json")


@dataclasses.dataclass(frozen=True)
class TaskAdapter:
    """One input adapter.

    ``path``: as given (run or adapter directory); ``adapter_dir``: the PEFT folder; ``task``: its name
    (unique among the inputs: the output folder of a classifier); ``family``, ``base``: as
    :func:`balora.models.resolve_model_source` resolves them; ``config``: ``adapter_config.json``;
    ``lora``: module name -> (B (out, r), A (r, in)); ``scaling``: module name -> s; ``keys``: module
    name -> the saved key in front of ``.lora_A.weight``; ``extra``: the saved tensors that are not
    LoRA factors (the head).
    """

    path: str
    adapter_dir: Path
    task: str
    family: str
    base: str
    config: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]
    keys: dict[str, str]
    extra: dict[str, torch.Tensor]

    @property
    def stored_rank(self) -> int:
        """The largest rank of the adapter's config (``r`` or a ``rank_pattern`` value)."""
        return max([int(self.config["r"]), *map(int, (self.config.get("rank_pattern") or {}).values())])

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A (out, in) of one layer, float64."""
        lora_b, lora_a = self.lora[module]
        return self.scaling[module] * (lora_b.double() @ lora_a.double())

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors under their saved keys (what ``set_peft_model_state_dict`` takes)."""
        state = {}
        for module, (lora_b, lora_a) in self.lora.items():
            state[self.keys[module] + _A], state[self.keys[module] + _B] = lora_a, lora_b
        return state


@dataclasses.dataclass(frozen=True)
class MergedLora:
    """A merged LoRA adapter: ``lora``: module name -> (B (out, R), A (R, in)); the PEFT config
    fields that give every layer its scaling (``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``use_rslora``); ``layers``: module name -> what ``merge.json`` records."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    layers: dict[str, dict]

    @classmethod
    def with_unit_scaling(cls, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], layers: dict[str, dict]):
        """Factors whose product is the update itself: every layer gets lora_alpha = its rank (s = 1);
        ``r`` is the largest rank, the others are in ``rank_pattern`` / ``alpha_pattern`` under their
        escaped full module names (PEFT matches the patterns as regular expressions)."""
        ranks = {module: lora_a.shape[0] for module, (_, lora_a) in lora.items()}
        r = max(ranks.values())
        pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != r}
        return cls(lora, r, float(r), pattern, {key: float(rank) for key, rank in pattern.items()}, False, layers)


# ----------------------------------------------------------------------------- reading


def _configured_task(path: Path) -> str | None:
    """``data.task`` of a run config (``config.yaml`` or its copy beside the adapter), or None."""
    try:
        task = (yaml.safe_load(path.read_text(encoding="utf-8")) or {})["data"]["task"]
        return str(task) if task else None
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _task_name(given: Path, adapter_dir: Path) -> str:
    """The task of an adapter: the run's ``data.task`` (its ``config.yaml``, or the copy saved beside
    the adapter), else the adapter folder's name (its parent's when the folder is ``adapter``), made
    safe as a folder name."""
    for config in (given / CONFIG_FILE, adapter_dir / _CONFIG_COPY):
        task = _configured_task(config) if config.is_file() else None
        if task:
            break
    else:
        folder = adapter_dir.resolve()
        task = folder.parent.name if folder.name == "adapter" else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", task).strip("-.") or "task"


def _module_name(key: str) -> str:
    """The module name PEFT matches patterns against: the saved key without ``base_model.model.``."""
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _layer_scaling(config: dict, module: str, rank: int, folder: Path) -> float:
    """s of one layer, as PEFT sets it: ``rank_pattern`` / ``alpha_pattern`` (regular expressions
    matched against the module name) over ``r`` / ``lora_alpha``; alpha / √r with ``use_rslora``."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    configured = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    if int(configured) != rank:
        raise ValueError(f"{folder}: layer {module} has rank {rank} but its adapter_config.json says {configured}")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_lora_config(config: dict, folder: Path) -> None:
    """A one-line ValueError for an adapter whose update is not ΔW = s·B·A of plain LoRA."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{folder} is a {peft_type} adapter; balora merge merges LoRA adapters (peft_type LORA)")
    if config.get("use_dora"):
        raise ValueError(f"{folder} is a DoRA adapter (its update renormalises W + ΔW, not a low-rank ΔW); "
                         "balora merge merges LoRA adapters")
    if config.get("lora_bias"):
        raise ValueError(f"{folder} trains a LoRA bias (lora_bias), which balora merge does not merge")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise ValueError(f"{folder / ADAPTER_CONFIG}: no numeric {key}")


def read_adapter(path: str | os.PathLike) -> TaskAdapter:
    """The adapter of a ``balora train`` run directory or a PEFT LoRA adapter directory.

    One-line ValueErrors: a path that is not an adapter (missing, a fully fine-tuned model, no
    adapter weights), an adapter that is not plain LoRA (AdaLoRA, DoRA, a LoRA bias, embedding
    layers), inconsistent factors.
    """
    given = Path(path).expanduser()
    source = resolve_model_source(None, given, family=None)
    if source.adapter_dir is None:
        raise ValueError(f"{given} is a fully fine-tuned model, not an adapter: balora merge merges LoRA adapters")
    folder = source.adapter_dir
    config = read_json(folder / ADAPTER_CONFIG)
    _check_lora_config(config, folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder} has no {ADAPTER_WEIGHTS} (the adapter's weights)")
    try:
        tensors = load_file(str(weights))
    except (OSError, RuntimeError, ValueError) as err:  # safetensors reports a bad file as any of these
        raise ValueError(f"cannot read {weights}: {first_line(err)}") from None
    lora, keys, extra = {}, {}, {}
    for key, tensor in tensors.items():
        if key.endswith(_A) and key[:-len(_A)] + _B in tensors:
            stem = key[:-len(_A)]
            lora_b, lora_a = tensors[stem + _B], tensor
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
                raise ValueError(f"{weights}: {stem} has factors of shapes {tuple(lora_b.shape)} and "
                                 f"{tuple(lora_a.shape)}, not (out, r) and (r, in)")
            lora[_module_name(stem)], keys[_module_name(stem)] = (lora_b, lora_a), stem
        elif key.endswith(_B) and key[:-len(_B)] + _A in tensors:
            continue
        elif key.endswith((_A, _B)):
            raise ValueError(f"{weights}: {key} has no {'lora_B' if key.endswith(_A) else 'lora_A'} partner")
        elif "lora_" in key:
            raise ValueError(f"{weights}: {key} is not a LoRA factor of a linear layer (embedding, convolution "
                             "or DoRA layers are not merged)")
        else:
            extra[key] = tensor
    if not lora:
        raise ValueError(f"{weights} holds no LoRA layers")
    scaling = {module: _layer_scaling(config, module, lora_a.shape[0], folder)
               for module, (_, lora_a) in lora.items()}
    return TaskAdapter(str(path), folder, _task_name(given, folder), source.family, source.base, config,
                       lora, scaling, keys, extra)


def _same_base(one: str, other: str) -> bool:
    """True when two base-model names name the same model: equal portable names (a short name and
    its hub id), or the same folder."""
    if portable_name(one) == portable_name(other):
        return True
    return os.path.isdir(one) and os.path.isdir(other) and os.path.samefile(one, other)


def _targets(config: dict) -> object:
    """``target_modules`` comparably: a sorted list of names, or the regular expression string."""
    targets = config.get("target_modules")
    return sorted(targets) if isinstance(targets, list) else targets


def _check_compatible(first: TaskAdapter, other: TaskAdapter) -> None:
    """A one-line ValueError when ``other`` cannot be merged with ``first``."""
    pair = f"{first.path} and {other.path}"
    if other.family != first.family:
        raise ValueError(f"{pair} have different task types ({first.family} and {other.family}); "
                         "merge adapters of one family")
    if not _same_base(first.base, other.base):
        raise ValueError(f"{pair} belong to different base models ({first.base} and {other.base})")
    if _targets(other.config) != _targets(first.config):
        raise ValueError(f"{pair} adapt different target modules ({_targets(first.config)} and "
                         f"{_targets(other.config)})")
    if set(other.lora) != set(first.lora):
        only = sorted(set(first.lora) ^ set(other.lora))
        raise ValueError(f"{pair} adapt different layers ({len(only)} in one only, e.g. {only[0]})")
    if bool(other.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
        raise ValueError(f"{pair} differ in fan_in_fan_out")
    for module, (lora_b, lora_a) in first.lora.items():
        shape, other_shape = (lora_b.shape[0], lora_a.shape[1]), (other.lora[module][0].shape[0],
                                                                   other.lora[module][1].shape[1])
        if shape != other_shape:
            raise ValueError(f"{pair} have layers of different shapes ({module}: {shape} and {other_shape})")


def read_adapters(paths: Sequence[str | os.PathLike]) -> list[TaskAdapter]:
    """The adapters of ``paths``, checked to be mergeable: one base model, one task family, the same
    target modules, layers and shapes; a causal LM adapter must hold LoRA layers only (a head or
    embedding saved beside them could not be shared). Tasks named alike get ``-2``, ``-3``, ...
    """
    adapters = [read_adapter(path) for path in paths]
    first = adapters[0]
    for other in adapters[1:]:
        _check_compatible(first, other)
    if first.family != CLASSIFICATION:
        for adapter in adapters:
            if adapter.extra:
                raise ValueError(f"{adapter.adapter_dir} saves tensors beside its LoRA layers (e.g. "
                                 f"{next(iter(adapter.extra))}); a merged causal LM adapter has no place for them")
    taken: set[str] = set()
    unique = []
    for adapter in adapters:
        name, n = adapter.task, 1
        while name in taken:
            n += 1
            name = f"{adapter.task}-{n}"
        taken.add(name)
        unique.append(dataclasses.replace(adapter, task=name))
    return unique


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path; a one-line FileExistsError when it exists and is not an empty folder
    (a merge never overwrites)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; balora merge never overwrites: "
                              "choose another --out")
    return out


# ----------------------------------------------------------------------------- PEFT baselines


def _load_base(adapter: TaskAdapter) -> torch.nn.Module:
    """The original pre-trained model of ``adapter`` (a classifier: with a head of its size, unused)."""
    if adapter.family != CLASSIFICATION:
        return load_causal_lm(adapter.base)[0]
    path = adapter.adapter_dir / MODEL_CONFIG
    labels = read_json(path) if path.is_file() else {}
    num_labels = int(labels.get("num_labels") or len(labels.get("id2label") or {}) or 2)
    with transformers_quiet():
        return load_sequence_classifier(adapter.base, num_labels)


def _lora_only_config(adapter: TaskAdapter):
    """The adapter's ``LoraConfig`` without its head (``modules_to_save``) and task type, as a plain
    LoRA init: its LoRA layers only, loaded next to the others'."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter.adapter_dir))
    return dataclasses.replace(config, modules_to_save=None, task_type=None, init_lora_weights=True,
                               inference_mode=True)


def peft_merge(adapters: Sequence[TaskAdapter], method: str, *, weight: float = 1.0, density: float | None = None,
               rank: int | None = None, seed: int = 0) -> MergedLora:
    """A PEFT ``add_weighted_adapter`` baseline of ``method`` (:data:`PEFT_METHODS`), every adapter
    with the same ``weight``.

    The base model is loaded once; each adapter's LoRA layers (not its head) are loaded into it
    under its own name and combined. ``density``: the fraction of entries ties / dare_ties keep;
    ``rank``: svd's rank (None: PEFT's, the largest input rank); ``seed``: dare_ties' random drop.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT merge method {method!r}; use one of {', '.join(PEFT_METHODS)}")
    model, names = None, [f"input{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters):
        config = _lora_only_config(adapter)
        if model is None:
            model = get_peft_model(_load_base(adapter), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        set_peft_model_state_dict(model, adapter.lora_state(), adapter_name=name)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, [weight] * len(names), "merged", combination_type=method,
                                   svd_rank=rank, density=density, svd_full_matrices=False)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    config = model.peft_config["merged"]
    lora = {}
    for module, stem in adapters[0].keys.items():
        lora[module] = (state[stem + _B].detach().clone(), state[stem + _A].detach().clone())
    layers = {module: {"rank": int(lora_a.shape[0])} for module, (_, lora_a) in lora.items()}
    return MergedLora(lora, int(config.r), float(config.lora_alpha), dict(config.rank_pattern or {}),
                      dict(config.alpha_pattern or {}), bool(config.use_rslora), layers)


# ----------------------------------------------------------------------------- writing


def _merged_config(merged: MergedLora, adapter: TaskAdapter):
    """``adapter``'s ``LoraConfig`` (its base model, target modules, task type and head) with the
    ranks and scalings of ``merged``, as a plain LoRA adapter."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter.adapter_dir))
    inits = {key: None for key in ("corda_config", "eva_config", "lora_ga_config") if hasattr(config, key)}
    return dataclasses.replace(config, r=merged.r, lora_alpha=merged.lora_alpha, rank_pattern=merged.rank_pattern,
                               alpha_pattern=merged.alpha_pattern, use_rslora=merged.use_rslora,
                               init_lora_weights=True, inference_mode=True, **inits)


def _write_adapter(folder: Path, merged: MergedLora, adapter: TaskAdapter, head: bool) -> None:
    """``folder``: the merged LoRA layers with ``adapter``'s config (and its head when ``head``), its
    ``config.json`` (a classifier's labels) and its tokenizer files."""
    folder.mkdir(exist_ok=True)
    _merged_config(merged, adapter).save_pretrained(str(folder))
    dtype = next(iter(adapter.lora.values()))[1].dtype
    tensors = dict(adapter.extra) if head else {}
    for module, (lora_b, lora_a) in merged.lora.items():
        tensors[adapter.keys[module] + _A] = lora_a.to(dtype).contiguous()
        tensors[adapter.keys[module] + _B] = lora_b.to(dtype).contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    for name in (MODEL_CONFIG, *_TOKENIZER_FILES):
        if (adapter.adapter_dir / name).is_file():
            shutil.copy2(adapter.adapter_dir / name, folder / name)


def write_merged(out_dir: str | os.PathLike, merged: MergedLora, adapters: Sequence[TaskAdapter],
                 record: Mapping, record_file: str) -> dict[str, Path]:
    """Save ``merged`` under the NEW (or empty) folder ``out_dir`` and ``record`` (plus the outputs)
    as ``out_dir/record_file``; returns task name -> adapter folder.

    Classifiers: ``out_dir/<task>/`` per adapter, each the merged LoRA + that task's head (its
    ``modules_to_save`` tensors) + its ``config.json``, loadable by ``balora predict``; a causal LM:
    ``out_dir`` itself (with the first adapter's config and tokenizer). Everything is written to a
    temporary sibling folder first, which replaces ``out_dir`` only when complete.
    """
    out = check_out_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if adapters[0].family == CLASSIFICATION:
            relative = {adapter.task: adapter.task for adapter in adapters}
            for adapter in adapters:
                _write_adapter(tmp / adapter.task, merged, adapter, head=True)
        else:
            relative = {adapter.task: "." for adapter in adapters}
            _write_adapter(tmp, merged, adapters[0], head=False)
        text = json.dumps({**record, "outputs": relative}, indent=2, sort_keys=False, default=float) + "\n"
        (tmp / record_file).write_text(text, encoding="utf-8")
        try:
            os.replace(tmp, out)  # an empty out_dir is replaced; a non-empty one refuses
        except OSError:
            raise FileExistsError(f"{out} was filled while merging; nothing written: choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {task: out if path == "." else out / path for task, path in relative.items()}
