"""Wrapping a pre-trained model with the adapter of a method, and saving the result.

All adapter mechanics come from PEFT: LoRA, PiSSA (``init_lora_weights="pissa"``), DoRA
(``use_dora``) and the conversion of PiSSA-style adapters to plain LoRA at save time
(``path_initial_model_for_weight_conversion``). Nothing here re-implements them.

A saved classifier (adapter or full model) carries its labels: ``config.json`` beside the adapter
is the model's transformers config with ``id2label``, ``label2id``, ``num_labels``,
``problem_type`` and ``_name_or_path``, the base model's portable name (see
:func:`balora.assets.portable_name`), so plain transformers + PEFT recover the class names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from balora.config import AdapterConfig
from balora.methods import MethodSpec, parse_method

logger = logging.getLogger("balora")

INITIAL_ADAPTER_DIR = "initial_adapter"


def apply_method(model: torch.nn.Module, adapter: AdapterConfig, task_type: str | None = None):
    """Return ``model`` ready to train with ``adapter.method``.

    ``full``: every parameter trainable, no adapter. Otherwise a ``PeftModel`` whose trainable
    parameters are the adapter (and, for classification, the task head, which PEFT keeps in
    ``modules_to_save``). ``task_type`` defaults to the model's: ``CAUSAL_LM`` for a model that
    generates, ``SEQ_CLS`` otherwise.
    """
    spec = parse_method(adapter.method)
    if task_type is None:
        task_type = TaskType.CAUSAL_LM if _generates(model) else TaskType.SEQ_CLS
    if spec.full:
        model.requires_grad_(True)
        return model
    config = LoraConfig(
        task_type=task_type,
        r=adapter.rank,
        lora_alpha=adapter.alpha if adapter.alpha is not None else adapter.rank,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        init_lora_weights=spec.init_lora_weights,
        use_dora=spec.use_dora,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"cannot apply {adapter.method!r} to this model: {err}") from None


def _generates(model: torch.nn.Module) -> bool:
    """True for a model that generates (a causal LM), False for a classifier."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate())


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters (adapter + head, or all for full fine-tuning)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_initial_adapter(model: torch.nn.Module, method: str, run_dir: str | os.PathLike) -> Path | None:
    """Save the adapter as initialised, where the final save will need it for conversion.

    Only methods that rewrite the base weights (PiSSA, OLoRA) need it; returns its path or None.
    """
    spec = parse_method(method)
    if not (isinstance(model, PeftModel) and spec.mutates_base):
        return None
    path = Path(run_dir) / INITIAL_ADAPTER_DIR
    model.save_pretrained(str(path))
    return path


def save_final(model: torch.nn.Module, method: str, out_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Save the trained model to ``out_dir`` in the standard format.

    Adapters are PEFT directories that ``PeftModel.from_pretrained`` loads on the ORIGINAL
    pre-trained model: PiSSA-style adapters (whose base holds W_res) are converted to a plain LoRA
    adapter of rank 2r by PEFT. ``full`` saves the whole model with ``save_pretrained``. A
    classifier's directory also gets ``config.json`` with its labels and portable base name (an
    adapter: the base model's config); a causal LM adapter gets none.
    """
    spec: MethodSpec = parse_method(method)
    out_dir = Path(out_dir)
    if not isinstance(model, PeftModel):
        model.save_pretrained(str(out_dir))
        if not _generates(model):
            _complete_config_json(model.config, out_dir)
        return out_dir
    base = model.get_base_model()
    if not _generates(base):
        base.config.save_pretrained(str(out_dir))
        _complete_config_json(base.config, out_dir)
    if spec.mutates_base:
        initial = Path(run_dir) / INITIAL_ADAPTER_DIR
        if not (initial / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"the initial adapter needed for conversion is missing: {initial}")
        model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(initial))
        _restore_modules_to_save(model, out_dir)
    else:
        model.save_pretrained(str(out_dir))
    return out_dir


def _complete_config_json(config, out_dir: Path) -> None:
    """Add ``_name_or_path`` and ``num_labels`` to the ``config.json`` just saved from ``config``.

    transformers leaves both out of a saved config; the first names the base model the adapter
    belongs to, the second makes the number of classes explicit beside ``id2label``.
    """
    path = out_dir / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(_name_or_path=config.name_or_path, num_labels=config.num_labels)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _restore_modules_to_save(model: PeftModel, out_dir: Path) -> None:
    """Put back the trained ``modules_to_save`` (e.g. the classification head).

    PEFT 0.21's PiSSA-to-LoRA conversion keeps only the LoRA tensors, so the saved adapter
    would load with a freshly initialised head. The head is not touched by the conversion, so
    its trained weights are copied from the plain adapter state dict.
    """
    path = out_dir / "adapter_model.safetensors"
    converted = load_file(str(path))
    plain = get_peft_model_state_dict(model)
    missing = {k: v.detach().contiguous() for k, v in plain.items() if "lora_" not in k and k not in converted}
    if missing:
        converted.update(missing)
        save_file(converted, str(path), metadata={"format": "pt"})


def restore_initial_adapter(model: torch.nn.Module, run_dir: str | os.PathLike) -> bool:
    """Make a re-initialised model the run's ORIGINAL initial state again (for resume).

    A PiSSA-style init rewrites the base weights as W_res = W − ΔW0 with ΔW0 = s·B0·A0 from an
    SVD, which for ``pissa_niter_N`` depends on the random state: a model rebuilt on resume may
    hold another (W_res', A0', B0'). With the run's saved ``initial_adapter/``, every adapted
    layer gets W_res = W_res' + ΔW0' − ΔW0 and the saved A0, B0, so both the base and the teacher
    snapshot built afterwards are exactly the run's. Returns False (nothing to do) when the
    method keeps the base weights or the run has no initial adapter.
    """
    from peft.tuners.lora import LoraLayer

    path = Path(run_dir) / INITIAL_ADAPTER_DIR / "adapter_model.safetensors"
    if not (isinstance(model, PeftModel) and path.is_file()):
        return False
    saved = load_file(str(path))
    adapter = model.active_adapter
    restored = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
                continue
            keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
            if not all(key in saved for key in keys):
                raise ValueError(f"{path} does not hold the initial adapter of layer {name}: not this run's model")
            current_delta = layer.get_delta_weight(adapter)
            layer.lora_A[adapter].weight.copy_(saved[keys[0]])
            layer.lora_B[adapter].weight.copy_(saved[keys[1]])
            base = layer.get_base_layer().weight
            base += (current_delta - layer.get_delta_weight(adapter)).to(base.dtype)
            restored += 1
    if not restored:
        raise ValueError(f"{path}: the model has no LoRA layer to restore")
    logger.info("restored the initial adapter of %d layers from %s", restored, path.parent)
    return True
