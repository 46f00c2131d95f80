"""Wrapping a pre-trained model with the adapter of a method, and saving the result.

The adapter mechanics come from PEFT: LoRA, PiSSA (``init_lora_weights="pissa"``), DoRA
(``use_dora``), AdaLoRA (``AdaLoraConfig``), LoRA-GA (``preprocess_loraga``), CorDA
(``preprocess_corda``) and the conversion of adapters whose init rewrote the base weights to
plain LoRA at save time (``path_initial_model_for_weight_conversion``). MiLoRA, which PEFT does
not have, is :func:`milora_init`: PEFT's PiSSA init with the r SMALLEST singular components
instead of the largest, saved through the same conversion. The optimisers of LoRA+ and LoRA-FA
and AdaLoRA's budget schedule run in :mod:`balora.trainer`.

A saved classifier (adapter or full model) carries its labels: ``config.json`` beside the adapter
is the model's transformers config with ``id2label``, ``label2id``, ``num_labels``,
``problem_type`` and ``_name_or_path``, the base model's portable name (see
:func:`balora.assets.portable_name`), so plain transformers + PEFT recover the class names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from balora.config import AdapterConfig
from balora.methods import MethodSpec, parse_method

logger = logging.getLogger("balora")

INITIAL_ADAPTER_DIR = "initial_adapter"

#: A training batch as the collator makes it: ``input_ids`` (B, T), ``attention_mask`` (B, T),
#: ``labels`` ((B,) for classification, (B, T) unshifted for a causal LM), ...
Batch = Mapping[str, torch.Tensor]


def apply_method(model: torch.nn.Module, adapter: AdapterConfig, task_type: str | None = None, *,
                 init_batches: Sequence[Batch] | None = None):
    """Return ``model`` ready to train with ``adapter.method``.

    ``full``: every parameter trainable, no adapter. Otherwise a ``PeftModel`` whose trainable
    parameters are the adapter (and, for classification, the task head, which PEFT keeps in
    ``modules_to_save``); for ``lorafa`` the A matrices are frozen. ``task_type`` defaults to the
    model's: ``CAUSAL_LM`` for a model that generates, ``SEQ_CLS`` otherwise.

    ``init_batches``: training batches (with ``labels``) for the data-driven inits, needed by
    ``lora_ga`` (the task gradient, averaged over the batches) and ``corda`` (the covariance of
    each adapted layer's inputs, one example at a time without its padding); ignored otherwise.
    """
    spec = parse_method(adapter.method)
    if task_type is None:
        task_type = TaskType.CAUSAL_LM if _generates(model) else TaskType.SEQ_CLS
    if spec.full:
        model.requires_grad_(True)
        return model
    if spec.needs_init_data and not init_batches:
        raise ValueError(f"adapter.method={adapter.method} estimates its init from training batches: "
                         "pass init_batches (a few collated training batches with labels)")
    config = build_peft_config(spec, adapter, task_type, model)
    if spec.base == "lora_ga":
        _estimate_task_gradient(model, config, init_batches)
    elif spec.base == "corda":
        _estimate_input_covariance(model, config, init_batches)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"cannot apply {adapter.method!r} to this model: {err}") from None
    if spec.base == "milora":
        milora_init(peft_model)
    elif spec.base == "lorafa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)  # LoRA-FA: A stays at its init (as create_lorafa_optimizer sets)
    return peft_model


def build_peft_config(spec: MethodSpec, adapter: AdapterConfig, task_type: str, model: torch.nn.Module | None = None):
    """The PEFT config of a method: ``AdaLoraConfig`` for ``adalora``, ``LoraConfig`` otherwise.

    For the data-driven inits the target modules are resolved (PEFT's default for the
    architecture of ``model`` when ``adapter.target_modules`` is None): their preprocessing runs
    before the PEFT model exists.
    """
    alpha = adapter.alpha if adapter.alpha is not None else adapter.rank
    common = dict(task_type=task_type, lora_dropout=adapter.dropout, target_modules=adapter.target_modules)
    if spec.adalora:
        from peft import AdaLoraConfig

        init_r, target_r = adapter.adalora_ranks()
        # the schedule (total_step, tinit, tfinal) is set from the real number of training steps by
        # set_adalora_schedule when training starts; these placeholders only pass PEFT's checks
        return AdaLoraConfig(
            init_r=init_r, target_r=target_r, lora_alpha=adapter.alpha if adapter.alpha is not None else init_r,
            deltaT=adapter.adalora_delta_t, orth_reg_weight=adapter.adalora_orth_reg_weight,
            total_step=1, tinit=0, tfinal=0, **common)
    extra = {}
    if spec.base == "lora_ga":
        from peft import LoraGAConfig

        extra["lora_ga_config"] = LoraGAConfig(direction=adapter.lora_ga_direction, scale=adapter.lora_ga_scale,
                                               stable_gamma=adapter.lora_ga_stable_gamma)
    elif spec.base == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method=adapter.corda_mode)
    if spec.needs_init_data and common["target_modules"] is None and model is not None:
        from peft.tuners.lora import LoraModel

        model_type = LoraModel.get_model_config(model).get("model_type")
        defaults = LoraModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError(f"set adapter.target_modules: PEFT has no default target modules for {model_type!r}")
        common["target_modules"] = list(defaults)
    return LoraConfig(r=adapter.rank, lora_alpha=alpha, init_lora_weights=spec.init_lora_weights,
                      use_dora=spec.use_dora, **common, **extra)


def _estimate_task_gradient(model: torch.nn.Module, config: LoraConfig, batches: Sequence[Batch]) -> None:
    """LoRA-GA's gradient estimate (PEFT ``preprocess_loraga``): the task loss's gradient of every
    target weight, averaged over ``batches`` (one forward and backward each)."""
    from peft.tuners.lora.loraga import preprocess_loraga

    def train_step() -> None:
        for batch in batches:
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("lora_ga: the model returned no loss; its init batches need 'labels'")
            loss.backward()

    preprocess_loraga(model, config, train_step)


def _estimate_input_covariance(model: torch.nn.Module, config: LoraConfig, batches: Sequence[Batch]) -> None:
    """CorDA's covariance of each target layer's inputs (PEFT ``preprocess_corda``).

    PEFT's hook takes one sequence per forward, (T, d_in): the batches are split into their
    examples, each without its padding. A target layer fed one vector per example (a pooler's
    dense layer, input (1, d_in)) gets it as a one-token sequence (1, 1, d_in) while the
    covariance is collected, so its covariance is a (d_in, d_in) matrix too.
    """
    from peft.tuners.lora.corda import preprocess_corda, target_modules

    was_training = model.training

    def as_sequence(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            return (args[0].unsqueeze(1), *args[1:])
        return None

    def run_model() -> None:
        handles = [module.register_forward_pre_hook(as_sequence) for _, module in target_modules(model, config)]
        try:
            for batch in batches:
                for example in _examples(batch):
                    model(**example)
        finally:
            for handle in handles:
                handle.remove()

    try:
        preprocess_corda(model, config, run_model=run_model)
    finally:
        model.train(was_training)


def _examples(batch: Batch) -> Iterator[dict[str, torch.Tensor]]:
    """The examples of a padded batch, one at a time: each (1, T_i) input without its padding."""
    ids = batch["input_ids"]  # (B, T)
    mask = batch.get("attention_mask")
    for i in range(ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        yield {key: value[i:i + 1, keep] for key, value in batch.items()
               if key in ("input_ids", "attention_mask", "token_type_ids") and value.shape == ids.shape}


@torch.no_grad()
def milora_init(model: PeftModel) -> int:
    """MiLoRA init (Wang et al., 2024, "MiLoRA: Harnessing Minor Singular Components for
    Parameter-Efficient LLM Finetuning", arXiv:2406.09044, eq. 3-5) of every LoRA layer of ``model``.

    With W = U·diag(S)·Vᴴ (S descending) of the (out, in) base weight and the r minor components
    U_m (out, r), S_m (r,), V_mᴴ (r, in), the adapter becomes A = diag(√(S_m/s))·V_mᴴ (r, in) and
    B = U_m·diag(√(S_m/s)) (out, r), s the LoRA scaling, and the base keeps the principal part
    W_res = W − s·B·A, so the model is unchanged at step 0. PiSSA is the same with the r LARGEST
    components; like PiSSA, the base is rewritten, so the run saves the initial adapter and
    converts the trained one to plain LoRA for the original model (:func:`save_final`).
    Returns the number of layers initialised.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    adapter = model.active_adapter
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        if base.weight.dim() != 2:
            raise ValueError(f"milora adapts linear layers only; {name} has a weight of shape {tuple(base.weight.shape)}")
        dtype = base.weight.dtype
        weight = transpose(base.weight.float(), layer.fan_in_fan_out)  # (out, in)
        r, scaling = layer.r[adapter], layer.scaling[adapter]
        if r > min(weight.shape):
            raise ValueError(f"milora: rank {r} exceeds min{tuple(weight.shape)} of layer {name}")
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in); s descending
        root = (s[-r:] / scaling).sqrt()  # (r,)
        lora_a = (root[:, None] * vh[-r:]).to(dtype)  # (r, in)
        lora_b = (u[:, -r:] * root).to(dtype)  # (out, r)
        layer.lora_A[adapter].weight.data = lora_a.contiguous()
        layer.lora_B[adapter].weight.data = lora_b.contiguous()
        residual = weight - scaling * (lora_b.float() @ lora_a.float())
        base.weight.data = transpose(residual, layer.fan_in_fan_out).to(dtype).contiguous()
        count += 1
    if not count:
        raise ValueError("milora: the model has no LoRA layer to initialise")
    return count


def set_adalora_schedule(model: torch.nn.Module, adapter: AdapterConfig, total_steps: int) -> tuple[int, int]:
    """Give an AdaLoRA model its budget schedule for a run of ``total_steps`` optimiser steps.

    t_i = ⌊adalora_tinit·T⌋ steps at the initial rank, then a cubic decrease of the budget
    (AdaLoRA eq. 12) until T − t_f, t_f = max(1, round(adalora_tfinal·T)) steps at the final
    budget: at least one, so the last pruning is the rank pattern the saved adapter keeps.
    Returns (t_i, t_f); a run too short for a pruning phase is a ValueError.
    """
    config = _adalora_config(model)
    tinit = int(adapter.adalora_tinit * total_steps)
    tfinal = max(1, round(adapter.adalora_tfinal * total_steps))
    if tinit >= total_steps - tfinal:
        raise ValueError(f"adalora: {total_steps} training steps leave no pruning phase after "
                         f"t_i={tinit} and before t_f={tfinal}; train longer or lower adapter.adalora_tinit")
    config.total_step, config.tinit, config.tfinal = total_steps, tinit, tfinal
    return tinit, tfinal


def is_adalora(model: torch.nn.Module) -> bool:
    """True for a PEFT model with an AdaLoRA adapter."""
    from peft.tuners.adalora import AdaLoraModel

    return isinstance(model, PeftModel) and isinstance(model.base_model, AdaLoraModel)


def _adalora_config(model: torch.nn.Module):
    if not is_adalora(model):
        raise ValueError("not an AdaLoRA model (adapter.method=adalora)")
    return model.peft_config[model.base_model.trainable_adapter_name]


def adalora_orthogonal_loss(model: torch.nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty (Zhang et al., 2023b, eq. 4), in PEFT's form: the mean
    over the adapted matrices of ‖PᵀP − I‖_F (P = lora_B, (out, r)) and ‖QQᵀ − I‖_F (Q = lora_A,
    (r, in)). PEFT adds ``orth_reg_weight`` × this to a loss the model computes itself (labels
    given); :class:`balora.trainer.BALoRATrainer` adds it for every objective instead (see
    :func:`peft_orthogonal_penalty_off`)."""
    name = model.base_model.trainable_adapter_name
    terms = []
    for key, param in model.named_parameters():
        if ("lora_A" in key or "lora_B" in key) and name in key:
            gram = param @ param.T if "lora_A" in key else param.T @ param  # (r, r)
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    if not terms:
        raise ValueError("the AdaLoRA model has no lora_A/lora_B parameters")
    return torch.stack(terms).mean()


@contextlib.contextmanager
def peft_orthogonal_penalty_off(model: torch.nn.Module) -> Iterator[float]:
    """Inside: PEFT's AdaLoRA forward adds no orthogonality penalty to the model's loss; yields
    the configured weight, for the caller to add :func:`adalora_orthogonal_loss` itself."""
    config = _adalora_config(model)
    weight = config.orth_reg_weight
    config.orth_reg_weight = 0.0
    try:
        yield weight
    finally:
        config.orth_reg_weight = weight


def _generates(model: torch.nn.Module) -> bool:
    """True for a model that generates (a causal LM), False for a classifier."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate())


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters (adapter + head, or all for full fine-tuning)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_initial_adapter(model: torch.nn.Module, method: str, run_dir: str | os.PathLike) -> Path | None:
    """Save the adapter as initialised, where the final save will need it for conversion.

    Only methods that rewrite the base weights (PiSSA, MiLoRA, LoRA-GA, CorDA, OLoRA) need it;
    returns its path or None.
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
    pre-trained model: the adapters whose base holds W_res = W − s·B0·A0 (PiSSA, MiLoRA, LoRA-GA,
    CorDA, OLoRA) are converted to a plain LoRA adapter of rank 2r by PEFT; AdaLoRA's keeps the
    ranks its budget schedule left (PEFT's ``rank_pattern``). ``full`` saves the whole model with ``save_pretrained``. A
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
    SVD, which for ``pissa_niter_N`` (and LoRA-GA's randomized SVD) depends on the random state: a model rebuilt on resume may
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
