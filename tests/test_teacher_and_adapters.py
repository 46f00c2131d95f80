"""The exact teacher (snapshot swap), PiSSA invariants and the PEFT save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from balora.adapters import apply_method, save_final, save_initial_adapter, trainable_parameters
from balora.config import AdapterConfig
from balora.methods import parse_method
from balora.teacher import SnapshotTeacher, TeacherFeatureCache

TARGETS = ["query", "key", "value", "dense"]


def _batch(seed=0, n=5, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _load(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)


def _train_steps(model, steps=4, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        out = model(**_batch(step), labels=torch.tensor([0, 1, 2, 0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def _reference_logits(original, model, batch):
    """The untouched pre-trained model with the student's CURRENT head (paper B.3)."""
    ref = copy.deepcopy(original)
    head = [m for n, m in model.named_modules() if n.endswith("classifier")][0]
    current = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
    ref.classifier.load_state_dict(current.state_dict())
    ref.eval()
    with torch.no_grad():
        return ref(**batch).logits


@pytest.mark.parametrize("method", ["pissa", "lora", "dora", "pissa_niter_2", "full"])
def test_teacher_is_the_original_model_before_and_after_training(tiny_model_dir, method):
    torch.manual_seed(0)
    original = _load(tiny_model_dir)
    model = apply_method(copy.deepcopy(original), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    teacher = SnapshotTeacher(model)
    batch = _batch(99)
    before = teacher.logits(model, batch)
    torch.testing.assert_close(before, _reference_logits(original, model, batch), atol=1e-5, rtol=0)
    _train_steps(model)
    assert model.training
    after = teacher.logits(model, batch)
    assert model.training  # the teacher forward ran in eval mode and put train mode back
    torch.testing.assert_close(after, _reference_logits(original, model, batch), atol=1e-5, rtol=0)
    # the student really moved away from the teacher, and the swap left it untouched
    model.eval()
    with torch.no_grad():
        student = model(**batch).logits
    assert (student - after).abs().max() > 1e-3
    teacher.logits(model, batch)
    assert not any(m.training for m in model.modules())  # eval stays eval


def test_teacher_restores_each_submodules_own_mode(tiny_model_dir):
    model = apply_method(_load(tiny_model_dir), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    model.train()
    frozen_layer = [m for n, m in model.named_modules() if n.endswith("encoder.layer.0")][0]
    frozen_layer.eval()  # e.g. a user who keeps one block in eval mode
    modes = {name: m.training for name, m in model.named_modules()}
    SnapshotTeacher(model).logits(model, _batch())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not frozen_layer.training and model.training


def test_shared_modules_are_derived_from_the_model(tiny_model_dir):
    peft_model = apply_method(_load(tiny_model_dir), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    assert SnapshotTeacher(peft_model).shared_modules == ("classifier", "score")  # PEFT's modules_to_save
    full = apply_method(_load(tiny_model_dir), AdapterConfig(method="full"))
    teacher = SnapshotTeacher(full)
    assert teacher.shared_modules == ("classifier",)
    assert not any(name.startswith("classifier") for name in teacher.snapshot)


@pytest.mark.parametrize("method", ["pissa_niter_2", "pissa"])
def test_restore_initial_adapter_rebuilds_base_and_teacher_from_the_saved_adapter(tiny_model_dir, tmp_path, method):
    from balora.adapters import restore_initial_adapter

    original = _load(tiny_model_dir)
    torch.manual_seed(0)
    first = apply_method(copy.deepcopy(original), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    save_initial_adapter(first, method, tmp_path)
    torch.manual_seed(123)  # another random state: pissa_niter_2 draws another randomized SVD
    again = apply_method(copy.deepcopy(original), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    first_state = {n: p.detach().clone() for n, p in first.named_parameters() if "classifier" not in n}
    differs = any(not torch.equal(first_state[n], p) for n, p in again.named_parameters() if n in first_state)
    assert differs == (method == "pissa_niter_2")
    assert restore_initial_adapter(again, tmp_path)
    for name, p in again.named_parameters():
        if name in first_state:
            torch.testing.assert_close(p, first_state[name], atol=2e-6, rtol=0, msg=name)
    batch = _batch(7)
    torch.testing.assert_close(SnapshotTeacher(again).logits(again, batch), _reference_logits(original, again, batch),
                               atol=1e-5, rtol=0)
    assert not restore_initial_adapter(apply_method(_load(tiny_model_dir), AdapterConfig(method="lora", rank=4,
                                                    target_modules=TARGETS)), tmp_path / "none")


def test_disable_adapter_is_not_the_teacher_for_pissa(tiny_model_dir):
    original = _load(tiny_model_dir)
    model = apply_method(copy.deepcopy(original), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    batch = _batch(3)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        residual_only = model(**batch).logits
    reference = _reference_logits(original, model, batch)
    assert (residual_only - reference).abs().max() > 1e-3  # W_res alone is not W


def test_pissa_leaves_outputs_unchanged_at_step_zero(tiny_model_dir):
    original = _load(tiny_model_dir).eval()
    model = apply_method(copy.deepcopy(original), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    model.eval()
    batch = _batch(5)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, _reference_logits(original, model, batch), atol=1e-5, rtol=0)


def test_teacher_memory_is_the_adapter_not_a_model_copy(tiny_model_dir):
    model = apply_method(_load(tiny_model_dir), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    teacher = SnapshotTeacher(model)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if "lora_" in n)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert teacher.nbytes == adapter_bytes
    assert teacher.nbytes < 0.05 * model_bytes
    assert not any("classifier" in name for name in teacher.snapshot)


def test_teacher_feature_cache_matches_the_teacher(tiny_model_dir):
    torch.manual_seed(0)
    model = apply_method(_load(tiny_model_dir), AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    teacher = SnapshotTeacher(model)
    cache = TeacherFeatureCache(teacher, model)
    batch, ids = _batch(7), torch.arange(5)
    first = cache.logits(model, batch, ids)
    torch.testing.assert_close(first, teacher.logits(model, batch), atol=1e-6, rtol=0)
    assert (cache.misses, cache.hits) == (5, 0)
    _train_steps(model)  # the head changes; cached features must be reused with the CURRENT head
    sub = {k: v[[3, 1]] for k, v in batch.items()}
    again = cache.logits(model, sub, ids[[3, 1]])
    assert (cache.misses, cache.hits) == (5, 2)
    torch.testing.assert_close(again, teacher.logits(model, sub), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "lora"])
def test_saved_adapter_loads_on_the_original_model(tiny_model_dir, tmp_path, method):
    torch.manual_seed(0)
    model = apply_method(_load(tiny_model_dir), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    save_initial_adapter(model, method, tmp_path)
    assert (tmp_path / "initial_adapter").is_dir() == parse_method(method).mutates_base
    _train_steps(model)
    save_final(model, method, tmp_path / "adapter", tmp_path)
    model.eval()
    batch = _batch(11)
    with torch.no_grad():
        trained = model(**batch).logits
    reloaded = PeftModel.from_pretrained(_load(tiny_model_dir), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "full"])
def test_saved_classifier_carries_its_labels_and_base_name(tiny_model_dir, tmp_path, method):
    import json

    from transformers import AutoConfig

    from balora.models import load_sequence_classifier

    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_model_dir, 3, ["zeta", "alpha", "mid"])
    model = apply_method(model, AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    save_initial_adapter(model, method, tmp_path)
    save_final(model, method, tmp_path / "adapter", tmp_path)
    saved = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert saved["id2label"] == {"0": "zeta", "1": "alpha", "2": "mid"} and saved["label2id"]["mid"] == 2
    assert saved["num_labels"] == 3 and saved["problem_type"] == "single_label_classification"
    assert saved["_name_or_path"] == tiny_model_dir
    assert AutoConfig.from_pretrained(tmp_path / "adapter").id2label == {0: "zeta", 1: "alpha", 2: "mid"}
    if method == "pissa":  # converted to LoRA: the config names the base model, not the initial adapter
        adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == tiny_model_dir and adapter_config["r"] == 8


def test_trainable_parameter_counts(tiny_model_dir):
    full = apply_method(_load(tiny_model_dir), AdapterConfig(method="full"))
    lora = apply_method(_load(tiny_model_dir), AdapterConfig(method="lora", rank=4, target_modules=TARGETS))
    assert trainable_parameters(full) == sum(p.numel() for p in full.parameters())
    assert 0 < trainable_parameters(lora) < 0.1 * trainable_parameters(full)


@pytest.mark.parametrize("name, base, reg", [
    ("balora", "pissa", True), ("lora+reg", "lora", True), ("pissa_niter_4", "pissa_niter_4", False),
    ("DoRA", "dora", False), ("full+reg", "full", True), ("gaussian", "gaussian", False),
])
def test_parse_method(name, base, reg):
    spec = parse_method(name)
    assert (spec.base, spec.regularized) == (base, reg)


@pytest.mark.parametrize("bad", ["", "lorax", "pissa+foo", "pissa+reg+reg", "loftq"])
def test_parse_method_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        parse_method(bad)
