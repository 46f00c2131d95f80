"""I-LoRA routing tuning (balora.objectives.routing) on the tiny BERT and the tiny Llama: the terms
against naive references (values and gradients), the ablations, the hooks, the general data, runs
of both families, the shrinking of the LoRA outputs on general data, and the config's checks."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import tiny_classifier_overrides
from peft import TaskType
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import balora.objectives.routing as routing
from balora.adapters import apply_method
from balora.cli import main
from balora.config import AdapterConfig, ConfigError, RegularizerConfig, load_config
from balora.objectives import ClassificationObjective, GenerationObjective, RoutingObjective, build_objective
from balora.objectives.routing import (
    GeneralBatches,
    GeneralTexts,
    encode_general,
    general_batches,
    load_general_texts,
    lora_output_norms,
    pad_general,
)
from balora.runs import train_run
from balora.teacher import SnapshotTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

#: general texts of uneven lengths: with max_length 11 they give pieces of several lengths (padding)
GENERAL = [
    "Once upon a time there lived a king who had three daughters, and the youngest was so fair "
    "that the sun itself wondered whenever it shone upon her face.",
    "The miller's son went into the forest.",
    "A wolf met the little girl on the path and asked her where she was going so early in the morning.",
    "Hansel and Gretel",
]
TASK = ["goal match team score league", "stock price bank rate", "rain storm wind snow cloud sun", "coach player win"]
BERT_TARGETS = ["query", "value", "dense"]  # "dense" includes the pooler: a LoRA layer on (B, d) inputs
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- models and batches


def _adapted(model_dir, auto_class, targets, task_type, method, seed):
    """(adapted tiny model in eval mode, its pre-trained copy, tokenizer)."""
    torch.manual_seed(seed)
    base = auto_class.from_pretrained(model_dir)
    original = copy.deepcopy(base).eval()
    model = apply_method(base, AdapterConfig(method=method, rank=4, target_modules=targets), task_type)
    return model.eval(), original, AutoTokenizer.from_pretrained(model_dir)


def bert(model_dir, method="lora", seed=0):
    return _adapted(model_dir, AutoModelForSequenceClassification, BERT_TARGETS, TaskType.SEQ_CLS, method, seed)


def llama(model_dir, method="lora", seed=0):
    return _adapted(model_dir, AutoModelForCausalLM, LLAMA_TARGETS, TaskType.CAUSAL_LM, method, seed)


def general_batch(tokenizer, family, max_length=11):
    examples = encode_general(GeneralTexts(GENERAL, None, "test"), tokenizer, max_length, family)
    batch = pad_general(examples[:5], tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] == max_length  # padded rows
    return batch


def task_batch(tokenizer, family):
    enc = tokenizer(TASK, padding=True, return_tensors="pt")
    batch = {k: v for k, v in enc.items()}
    if family == "generation":
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[:, 0] = -100
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    return {**batch, "labels": torch.tensor([0, 1, 2, 0])}


def perturb(model, scale=0.3, seed=1):
    """Random B (and head) so that the adapter is no longer the pre-trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def shared_head(model, original, seed=4):
    """A random head of std 1 for the classifier and its pre-trained copy (the teacher shares the
    current head): the tiny BERT's own head (std 0.02) leaves every distribution nearly uniform."""
    head = model.base_model.model.classifier.modules_to_save["default"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    original.classifier.load_state_dict(head.state_dict())


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def routing_objective(task, batch, family, **kw):
    return RoutingObjective(task, itertools.repeat(batch), family=family, chunk_size=5, **kw)


# ---------------------------------------------------------------------------- naive references


def naive_l2(model, batch, family):
    """Σ over LoRA layers of the mean over valid positions of ‖s·B·A·x‖², x captured at each layer."""
    inputs, handles = [], []
    for layer in lora_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda m, args, _l=layer: inputs.append((_l, args[0]))))
    try:
        if family == "generation":
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        else:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"].double()
    total = 0.0
    for layer, x in inputs:
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        u = s * (x.double() @ a.double().T @ b.double().T)
        if u.dim() == 3:
            total = total + ((u**2).sum(-1) * mask).sum() / mask.sum()
        else:  # the pooler: one row per example
            total = total + (u**2).sum(-1).mean()
    return total


def naive_kl(model, original, batch, family):
    """KL(p_base ‖ p_adapted) from full logits: per example, or per non-pad token over the vocabulary."""
    keys = ("input_ids", "attention_mask") if family == "generation" else tuple(batch)
    inputs = {k: batch[k] for k in keys}
    with torch.no_grad():
        p_logits = original(**inputs).logits.double()
    q_logits = model(**inputs).logits.double()
    kl = (p_logits.softmax(-1) * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)
    if family == "generation":
        mask = batch["attention_mask"].bool()
        return kl[mask].mean()
    return kl.mean()


# ---------------------------------------------------------------------------- the terms


@pytest.mark.parametrize("family", ["classification", "generation"])
def test_epsilon_zero_is_plain_training_exactly(family, tiny_model_dir, tiny_causal_lm_dir):
    model, _, tok = bert(tiny_model_dir) if family == "classification" else llama(tiny_causal_lm_dir)
    perturb(model)
    model.train()  # dropout on: the random state must be the task objective's alone
    task = ClassificationObjective(None, 3) if family == "classification" else GenerationObjective(chunk_size=5)
    inputs = task_batch(tok, family)
    drawn = []
    general = (drawn.append(1) or general_batch(tok, family) for _ in itertools.count())
    objective = RoutingObjective(task, general, family=family, epsilon_kl=0.0, epsilon_l2=0.0)

    torch.manual_seed(3)
    loss, logs = objective(model, inputs)
    loss.backward()
    mine, after = grads(model), torch.random.get_rng_state()
    model.zero_grad()
    torch.manual_seed(3)
    reference, ref_logs = task(model, inputs)
    reference.backward()
    assert torch.equal(loss, reference) and torch.equal(after, torch.random.get_rng_state())
    for name, g in grads(model).items():
        assert torch.equal(mine[name], g), name
    assert not drawn and logs == {**ref_logs, "epsilon_kl": 0.0, "epsilon_l2": 0.0}


@pytest.mark.parametrize("family", ["classification", "generation"])
def test_terms_and_gradients_equal_naive_references(family, tiny_model_dir, tiny_causal_lm_dir):
    model, original, tok = bert(tiny_model_dir) if family == "classification" else llama(tiny_causal_lm_dir)
    teacher = SnapshotTeacher(model)  # at the initial adapter, before B is perturbed
    perturb(model)
    if family == "classification":
        shared_head(model, original)
    task = ClassificationObjective(None, 3) if family == "classification" else GenerationObjective(chunk_size=5)
    general, inputs = general_batch(tok, family), task_batch(tok, family)
    objective = routing_objective(task, general, family, epsilon_kl=0.7, epsilon_l2=0.3, teacher=teacher)
    loss, logs = objective(model, inputs)
    loss.backward()
    mine = grads(model)
    model.zero_grad()

    kl, l2 = naive_kl(model, original, general, family), naive_l2(model, general, family)
    reference = task(model, inputs)[0].double() + 0.7 * kl + 0.3 * l2
    reference.backward()
    assert logs["routing_kl"] == pytest.approx(float(kl.detach()), rel=1e-4, abs=1e-7)  # fp32 vs fp64
    assert logs["routing_l2"] == pytest.approx(float(l2.detach()), rel=1e-4)
    assert kl > 1e-3 and l2 > 1e-3  # the perturbed adapter is not the pre-trained model
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    reference_grads = grads(model)
    assert set(mine) == set(reference_grads)
    for name, g in reference_grads.items():
        torch.testing.assert_close(mine[name].double(), g.double(), rtol=1e-3, atol=1e-6, msg=name)


def test_kl_with_a_trained_output_head_uses_the_teachers_own_head(tiny_causal_lm_dir):
    """Full fine-tuning trains the (tied) head: the KL then takes the generic path with the
    pre-trained model's own logits (no fused frozen-head shortcut)."""
    model, original, tok = llama(tiny_causal_lm_dir, "full")
    teacher = SnapshotTeacher(model)
    noise = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * noise)
    general = general_batch(tok, "generation")
    objective = routing_objective(GenerationObjective(), general, "generation", epsilon_kl=1.0, epsilon_l2=0.0,
                                  teacher=teacher)
    kl, l2 = objective.general_terms(model, general)
    kl.backward()
    mine = grads(model)
    model.zero_grad()
    reference = naive_kl(model, original, general, "generation")
    reference.backward()
    assert l2 is None and float(reference.detach()) > 1e-3
    torch.testing.assert_close(kl.double(), reference, rtol=1e-4, atol=1e-7)
    for name, g in grads(model).items():
        torch.testing.assert_close(mine[name].double(), g.double(), rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["classification", "generation"])
def test_l2_equals_a_naive_sum_over_modules_with_padding_and_odd_shapes(family, tiny_model_dir, tiny_causal_lm_dir):
    model, _, tok = bert(tiny_model_dir) if family == "classification" else llama(tiny_causal_lm_dir)
    perturb(model, seed=2)
    for max_length in (9, 11, 13):  # odd lengths, 5 rows with padding
        batch = general_batch(tok, family, max_length)
        objective = routing_objective(GenerationObjective(), batch, family, epsilon_kl=0.0, epsilon_l2=1.0)
        kl, l2 = objective.general_terms(model, batch)
        assert kl is None
        torch.testing.assert_close(l2.double(), naive_l2(model, batch, family), rtol=1e-5, atol=1e-8)
    if family == "classification":  # the pooler (B, d) is one of the adapted layers
        assert any("pooler" in n for n, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("family", ["classification", "generation"])
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_kl_is_zero_at_step_zero_with_finite_gradients(family, method, tiny_model_dir, tiny_causal_lm_dir):
    model, _, tok = (bert(tiny_model_dir, method) if family == "classification"
                     else llama(tiny_causal_lm_dir, method))
    batch = general_batch(tok, family)
    objective = routing_objective(GenerationObjective(), batch, family, epsilon_kl=1.0, epsilon_l2=1.0,
                                  teacher=SnapshotTeacher(model))
    kl, l2 = objective.general_terms(model, batch)
    assert abs(float(kl.detach())) < 1e-6
    if method == "lora":
        assert float(l2.detach()) == 0.0  # B = 0
    (kl + l2).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hooks_are_only_in_the_general_student_forward_and_always_removed(tiny_model_dir, monkeypatch):
    model, _, tok = bert(tiny_model_dir)
    teacher = SnapshotTeacher(model)
    perturb(model)
    general, inputs = general_batch(tok, "classification"), task_batch(tok, "classification")
    reg = RegularizerConfig(lambda_consistency=0.5, lambda_diversity=0.0, lambda_svd=0.0)
    task = ClassificationObjective(reg, 3)
    objective = routing_objective(task, general, "classification", epsilon_kl=1.0, epsilon_l2=1.0,
                                  general_ratio=2, teacher=teacher)
    calls = []
    mean_square = routing._mean_square
    monkeypatch.setattr(routing, "_mean_square", lambda *a: calls.append(1) or mean_square(*a))
    _, logs = objective(model, inputs)
    # one value per adapted layer and general batch: not on the task batch nor on either teacher forward
    assert len(calls) == 2 * len(lora_layers(model))
    assert {"task_loss", "reg_consistency", "routing_kl", "routing_l2", "epsilon_kl", "epsilon_l2"} <= set(logs)
    b_modules = [layer.lora_B["default"] for layer in lora_layers(model)]
    assert all(not m._forward_hooks for m in b_modules)

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.base_model.model.bert.encoder.layer[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with lora_output_norms(model, general["attention_mask"]) as values:
                model(**general)
        assert values  # the first layer's hooks ran before the error
    finally:
        handle.remove()
    assert all(not m._forward_hooks for m in b_modules)


def test_gradient_checkpointing_is_off_for_the_general_forward(tiny_causal_lm_dir):
    model, _, tok = llama(tiny_causal_lm_dir)
    teacher = SnapshotTeacher(model)
    perturb(model)
    general, inputs = general_batch(tok, "generation"), task_batch(tok, "generation")
    objective = routing_objective(GenerationObjective(chunk_size=5), general, "generation", epsilon_kl=1.0,
                                  epsilon_l2=1.0, teacher=teacher)
    loss, _ = objective(model, inputs)
    loss.backward()
    plain = grads(model)
    model.zero_grad()
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing acts in training mode; the tiny Llama has no dropout
    loss_ckpt, _ = objective(model, inputs)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-4, atol=1e-6)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # restored


def test_plain_lora_layers_only_for_the_l2(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    model = apply_method(base, AdapterConfig(method="dora", rank=4, target_modules=["query"]), TaskType.SEQ_CLS)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = general_batch(tok, "classification")
    with pytest.raises(ValueError, match="DoRA"):
        routing_objective(ClassificationObjective(None, 3), batch, "classification",
                          epsilon_kl=0.0).general_terms(model, batch)
    with pytest.raises(ValueError, match="regression"):
        RoutingObjective(ClassificationObjective(None, 1), iter([]), family="classification", num_labels=1)


# ---------------------------------------------------------------------------- the effect


def _train(model, objective, inputs, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        objective(model, inputs, step=step, total_steps=steps)[0].backward()
        opt.step()


def test_routing_shrinks_the_lora_outputs_on_general_data(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_part = encode_general(GeneralTexts(GENERAL, None, "test"), tok, 12, "classification")
    held_out = pad_general(encode_general(GeneralTexts([GENERAL[2] + " " + GENERAL[0]], None, "held"), tok, 16,
                                          "classification"), tok.pad_token_id)
    inputs = task_batch(tok, "classification")
    sizes = {}
    for name, eps in (("plain", 0.0), ("routing", 1.0)):  # large next to the tiny model's LoRA outputs
        model, _, _ = bert(tiny_model_dir, seed=0)
        model.train()
        batches = GeneralBatches(train_part, 4, seed=0, pad_token_id=tok.pad_token_id)
        objective = RoutingObjective(ClassificationObjective(None, 3), batches, family="classification",
                                     epsilon_kl=0.0, epsilon_l2=eps)
        torch.manual_seed(0)  # same seed, same task batches, same steps
        _train(model, objective, inputs, steps=30)
        model.eval()
        with torch.no_grad(), lora_output_norms(model, held_out["attention_mask"]) as values:
            model(**held_out)
        sizes[name] = float(sum(values))
    # measured: plain 20.0, routing 5e-4 (held-out general text, summed over the adapted layers)
    assert sizes["plain"] > 1.0 and sizes["routing"] < 0.01 * sizes["plain"], sizes


# ---------------------------------------------------------------------------- general data


def test_general_data_sources_pieces_and_batches(tmp_path, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "a.txt").write_text(GENERAL[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in GENERAL + [""]), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    assert load_general_texts(str(tmp_path / "a.txt")).texts == [GENERAL[0]]
    assert load_general_texts(str(tmp_path / "b.jsonl")).texts == GENERAL  # the empty text is dropped
    assert len(load_general_texts(str(tmp_path / "b.jsonl"), max_examples=2, seed=1).texts) == 2
    with pytest.raises(ValueError, match="'text' field"):
        load_general_texts(str(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="general_data"):
        load_general_texts(str(tmp_path / "missing.txt"))
    grimm = load_general_texts("grimm-tales", max_examples=1)
    assert len(grimm.texts) == 1 and grimm.pairs is None

    # a long text becomes several pieces of at most max_length tokens (special tokens included)
    pieces = encode_general(load_general_texts(str(tmp_path / "a.txt")), tok, 10, "classification")
    assert len(pieces) > 2 and all(len(p["input_ids"]) <= 10 for p in pieces)
    assert all(p["input_ids"][0] == tok.cls_token_id for p in pieces)

    state = torch.random.get_rng_state()
    first = [next(GeneralBatches(pieces, 3, seed=5))["input_ids"] for _ in range(2)]
    batches = GeneralBatches(pieces, 3, seed=5)
    drawn = [next(batches) for _ in range(len(pieces))]  # more than one pass
    assert torch.equal(first[0], first[1]) and torch.equal(drawn[0]["input_ids"], first[0])
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(b["input_ids"].shape[0] == 3 for b in drawn)


def test_build_objective_wraps_the_task_objective_with_its_teacher(tiny_model_dir, task_files, tmp_path):
    train_file, eval_file = task_files
    config = load_config(None, [
        f"model.name={tiny_model_dir}", "model.max_length=16", "data.task=files", f"data.train_file={train_file}",
        f"data.eval_file={eval_file}", "adapter.method=lora", "routing.general_data=grimm-tales",
        "routing.general_max_examples=1", "routing.general_batch_size=3",
    ])
    model, _, tok = bert(tiny_model_dir)
    with pytest.raises(ValueError, match="general="):
        build_objective(config, model, num_labels=3)
    general = general_batches(config, tok)
    objective = build_objective(config, model, num_labels=3, general=general)
    assert isinstance(objective, RoutingObjective) and isinstance(objective.task, ClassificationObjective)
    assert objective.teacher is not None and objective.task.teacher is objective.teacher  # for ε_kl only
    assert next(general)["input_ids"].shape[0] == 3 and next(general)["input_ids"].shape[1] <= 16
    plain = build_objective(load_config(None, ["adapter.method=lora"]), model, num_labels=3)
    assert isinstance(plain, ClassificationObjective) and plain.teacher is None


# ---------------------------------------------------------------------------- runs


def test_classification_run_logs_every_routing_term(tiny_model_dir, task_files, tmp_path):
    train_file, eval_file = task_files
    config = load_config(None, [
        *tiny_classifier_overrides(tiny_model_dir, tmp_path / "runs", train_file, eval_file),
        "train.max_steps=3", "train.save_steps=10", "train.logging_steps=1", "train.batch_size=8",
        "train.report_to=[]", "train.learning_rate=1e-2",
        "routing.general_data=book-excerpts", "routing.general_max_examples=2", "routing.general_ratio=2",
    ])
    result = train_run(config, progress=False)
    logged = [h for h in result.log_history if "task_loss" in h]
    assert len(logged) == 3
    for key in ("routing_kl", "routing_l2", "epsilon_kl", "epsilon_l2", "reg_consistency", "reg_svd"):
        assert all(key in h for h in logged), key
    assert logged[0]["epsilon_l2"] == 1.0 and logged[-1]["routing_l2"] > 0
    saved = (result.run_dir / "config.yaml").read_text()
    assert "general_data: book-excerpts" in saved


def test_generation_run_logs_every_routing_term(tiny_causal_lm_dir, tmp_path):
    config = load_config(None, [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_causal_lm_dir}",
        "model.max_length=96", "data.task=gsm-symbolic", "data.max_train_examples=8", "adapter.method=lora",
        "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.save_steps=10",
        "train.logging_steps=1", "train.batch_size=2", "train.report_to=[]", "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "train.loss_chunk_size=16", "eval.max_examples=1", "eval.max_new_tokens=2", "eval.batch_size=1",
        "routing.general_data=grimm-tales", "routing.general_max_examples=1", "routing.general_max_length=32",
        "routing.epsilon_kl=0.5",
    ])
    result = train_run(config, progress=False)
    logged = [h for h in result.log_history if "task_loss" in h]
    assert len(logged) == 2
    for key in ("routing_kl", "routing_l2", "epsilon_kl", "epsilon_l2", "valid_tokens"):
        assert all(key in h for h in logged), key
    assert logged[0]["epsilon_kl"] == 0.5 and logged[-1]["routing_kl"] > 0


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["routing.general_data=grimm-tales", "routing.epsilon_kl=-1"], "routing.epsilon_kl must be >= 0"),
    (["routing.general_data=grimm-tales", "routing.epsilon_l2=-0.5"], "routing.epsilon_l2 must be >= 0"),
    (["routing.general_data=grimm-tales", "routing.epsilon_kl=.nan"], "routing.epsilon_kl must be a finite number"),
    (["routing.epsilon_kl=0.5"], "routing.epsilon_kl is read only with routing.general_data"),
    (["routing.general_ratio=2"], "routing.general_ratio is read only with routing.general_data"),
    (["routing.general_data=grimm-tales", "routing.general_ratio=0"], "routing.general_ratio must be >= 1"),
    (["routing.general_data=grimm-tales", "routing.general_max_length=4"], "routing.general_max_length must be >= 8"),
    (["data.task=imdb", "routing.general_data=imdb"], "is the training data itself"),
    (["data.task=imdb-to-rotten-tomatoes", "routing.general_data=IMDB"], "is the training data itself"),
    (["data.task=files", "data.train_file=t.jsonl", "data.eval_file=e.csv", "routing.general_data=./t.jsonl"],
     "is the training data itself"),
    (["routing.general_data=nope"], "routing.general_data='nope': not a text corpus"),
    (["routing.general_data=grimm-tales", "adapter.method=dora"], "routing.epsilon_l2 needs LoRA layers"),
    (["routing.general_data=grimm-tales", "adapter.method=full"], "routing.epsilon_l2 needs LoRA layers"),
])
def test_config_errors_are_one_line(overrides, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_config_accepts_the_ablations_and_the_cli_error_is_one_line(capsys):
    for eps in ("routing.epsilon_kl=0", "routing.epsilon_l2=0"):
        config = load_config(None, ["routing.general_data=grimm-tales", eps])
        assert config.routing.general_data == "grimm-tales"
    assert load_config(None, ["routing.general_data=grimm-tales", "routing.epsilon_l2=0",
                              "adapter.method=dora"]).routing.epsilon_l2 == 0.0
    assert main(["train", "routing.general_data=grimm-tales", "routing.epsilon_l2=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "routing.epsilon_l2 must be >= 0" in err and len(err.splitlines()) == 1


def test_model_card_names_the_routing_terms():
    from balora.config import load_config
    from balora.methods import parse_method
    from balora.model_card import _method_section

    config = load_config(None, ["adapter.method=lora", "routing.general_data=grimm-tales", "routing.epsilon_kl=0",
                                "routing.epsilon_l2=0.1"])
    text = _method_section(config, parse_method("lora"), 8)
    assert "I-LoRA routing tuning" in text and "`grimm-tales`" in text and "ε_kl = 0.0, ε_l2 = 0.1" in text
    assert "No BA-LoRA regulariser." in text and "task loss alone" not in text
    plain = _method_section(load_config(None, ["adapter.method=lora"]), parse_method("lora"), 8)
    assert "routing" not in plain and "No regulariser: the task loss alone." in plain
