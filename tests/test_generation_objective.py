"""The generation objective on a real (tiny) Llama, against naive references from full logits."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from peft import TaskType
from transformers import LlamaConfig, LlamaForCausalLM

from balora.adapters import apply_method
from balora.config import AdapterConfig, RegularizerConfig
from balora.objectives.generation import GenerationObjective
from balora.teacher import SnapshotTeacher

V = 257
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batch(seed=1):
    """3 rows: prompt masked, response targets, right padding (attention 0, labels -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100
    labels[2, :2] = -100
    for row, length in ((1, 9), (2, 7)):
        ids[row, length:] = 0
        attn[row, length:] = 0
        labels[row, length:] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def constant_reg(**kw):
    base = dict(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_k=3, top_k=7,
                consistency_schedule="constant", focus_schedule="constant")
    base.update(kw)
    return RegularizerConfig(**base)


def naive_loss(model, teacher_model, inputs, reg: RegularizerConfig | None):
    """Everything from the full (B, T, V) logits, the way the authors' code does it."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    targets = inputs["labels"][:, 1:]
    valid = targets != -100
    z = logits[:, :-1][valid].double()
    ce = F.cross_entropy(z, targets[valid])
    if reg is None:
        return ce
    c = reg.resolved("generation")
    with torch.no_grad():
        zt = teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1][valid].double()
    if c.consistency_kind == "kl":
        p = torch.softmax(zt / c.temperature, -1)
        kl = c.temperature**2 * (p * (p.log() - torch.log_softmax(z / c.temperature, -1))).sum(-1).mean()
    elif c.consistency_kind == "cosine":
        kl = (1 - (z * zt).sum(-1) / (z.norm(dim=-1) * zt.norm(dim=-1))).mean()
    elif c.consistency_kind == "mse":
        kl = ((z - zt) ** 2).mean()
    else:
        kl = ((z / z.norm(dim=-1, keepdim=True) - zt / zt.norm(dim=-1, keepdim=True)) ** 2).mean()
    pk = torch.softmax(z.topk(c.top_k, -1).values, -1)
    neg_ent = (pk * pk.log()).sum(-1).mean()
    sigma = torch.linalg.svdvals(z)
    svd = -sigma[: c.svd_k].sum() / torch.linalg.vector_norm(z)
    return ce + c.lambda_consistency * kl + c.lambda_diversity * neg_ent + c.lambda_svd * svd


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _trained(model, objective, inputs, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        objective(model, inputs)[0].backward()
        opt.step()
    model.zero_grad()


def test_plain_objective_equals_the_models_own_loss():
    model = tiny_llama()
    inputs = batch()
    loss, logs = GenerationObjective()(model, inputs)
    loss.backward()
    mine = grads(model)
    model.zero_grad()
    reference = model(**inputs).loss  # transformers shifts the labels itself
    reference.backward()
    torch.testing.assert_close(loss.float(), reference, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(mine[name], g, rtol=1e-4, atol=1e-6)
    # valid tokens = response tokens that have a next token inside the row
    assert logs["valid_tokens"] == (inputs["labels"][:, 1:] != -100).sum().item()


@pytest.mark.parametrize("method,kind", [("pissa", "kl"), ("lora", "kl"), ("pissa", "cosine"), ("pissa", "mse"),
                                         ("pissa", "mse_normalized")])
def test_balora_objective_equals_naive_reference_at_step_zero_and_after_training(method, kind):
    # every consistency kind runs at token level; kl is the paper's eq. 9
    base = tiny_llama()
    original = copy.deepcopy(base).eval()
    model = apply_method(base, AdapterConfig(method=method + "+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    reg = constant_reg(consistency_kind=kind)
    objective = GenerationObjective(reg, teacher=teacher, chunk_size=5)
    inputs = batch()

    loss, logs = objective(model, inputs)
    assert logs["reg_consistency"] == pytest.approx(0.0, abs=1e-6)  # teacher == student at step 0
    torch.testing.assert_close(loss.double(), naive_loss(model, original, inputs, reg), rtol=1e-4, atol=1e-5)

    _trained(model, objective, inputs)  # a few optimiser steps move the student away from the teacher
    loss, logs = objective(model, inputs)
    loss.backward()
    mine = grads(model)
    model.zero_grad()
    ref = naive_loss(model, original, inputs, reg)
    ref.backward()
    assert logs["reg_consistency"] > (1e-4 if kind == "kl" else 1e-6)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    for name, g in grads(model).items():
        torch.testing.assert_close(mine[name], g, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunk_size_changes_nothing(chunk):
    model = apply_method(tiny_llama(), AdapterConfig(method="pissa+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    inputs = batch()
    results = []
    for size in (chunk, 7):
        model.zero_grad()
        loss, _ = GenerationObjective(constant_reg(), teacher=teacher, chunk_size=size)(model, inputs)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-5, atol=1e-7)


def test_all_masked_batch_gives_zero_and_finite_gradients():
    model = apply_method(tiny_llama(), AdapterConfig(method="pissa+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss, logs = GenerationObjective(constant_reg(), teacher=teacher)(model, inputs)
    loss.backward()
    assert loss.item() == 0.0 and logs["valid_tokens"] == 0
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_schedules_switch_terms_off_and_on():
    objective = GenerationObjective(RegularizerConfig())  # paper defaults: cosine λ1, two-phase λ2/λ3
    lam = objective.weights.at(0, 100)
    assert lam.consistency == pytest.approx(0.025) and lam.diversity == 0.0 and lam.svd == 0.0  # two-phase: off first 20%
    lam = objective.weights.at(30, 100)
    assert lam.diversity == pytest.approx(0.005) and lam.svd == pytest.approx(0.005)
    lam = GenerationObjective().weights.at(50, 100)
    assert (lam.consistency, lam.diversity, lam.svd) == (0.0, 0.0, 0.0)


def test_trainable_head_falls_back_to_randomized_svd_once(caplog):
    model = tiny_llama()
    original = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)  # full fine-tuning: the (tied) head is trained
    teacher = SnapshotTeacher(model)
    reg = constant_reg(svd_k=3, svd_oversample=40)
    objective = GenerationObjective(reg, teacher=teacher, chunk_size=4)
    inputs = batch()
    with caplog.at_level(logging.WARNING, logger="balora"):
        loss, _ = objective(model, inputs)
        objective(model, inputs)
    assert sum("randomized SVD" in r.message for r in caplog.records) == 1
    # oversampling covers the whole rank here, so the randomized SVD is exact
    torch.testing.assert_close(loss.double(), naive_loss(model, original, inputs, reg), rtol=1e-4, atol=1e-5)
    loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_exact_svd_is_refused_for_a_trainable_head_and_bad_settings():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    objective = GenerationObjective(constant_reg(lambda_consistency=0.0, svd_solver="exact"))
    with pytest.raises(ValueError, match="frozen"):
        objective(model, batch())
    with pytest.raises(ValueError, match="svd_solver"):
        GenerationObjective(constant_reg(svd_solver="qr"))
    with pytest.raises(ValueError, match="labels"):
        GenerationObjective()(model, {"input_ids": batch()["input_ids"]})



def test_teacher_runs_the_decoder_alone_with_identical_hidden_states():
    from balora.objectives.generation import final_hidden_states, teacher_hidden_states

    model = apply_method(tiny_llama(), AdapterConfig(method="pissa", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM).eval()
    inputs = batch()
    with torch.no_grad():
        full, _ = final_hidden_states(model, inputs)
        alone = teacher_hidden_states(model, inputs)
    torch.testing.assert_close(alone, full)


def test_a_causal_lm_shares_no_module_with_its_teacher():
    model = apply_method(tiny_llama(), AdapterConfig(method="pissa", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    assert teacher.shared_modules == ()
    assert set(teacher.snapshot) == {n for n, p in model.named_parameters() if p.requires_grad}


def _original_hidden(original, inputs):
    with torch.no_grad():
        return original.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state


def _teacher_hidden(model, teacher, inputs):
    from balora.objectives.generation import teacher_hidden_states

    with teacher.active(model) as pretrained:
        return teacher_hidden_states(pretrained, inputs)


def test_teacher_is_exact_with_dropout_in_train_mode_and_restores_the_modes():
    base = tiny_llama()
    base.config.attention_dropout = 0.5
    original = copy.deepcopy(base).eval()
    model = apply_method(base, AdapterConfig(method="pissa+reg", rank=4, dropout=0.3, target_modules=PROJ),
                         TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    objective = GenerationObjective(constant_reg(), teacher=teacher)
    inputs = batch()
    model.train()
    _trained(model, objective, inputs)
    model.train()
    model.base_model.model.model.layers[0].eval()  # one submodule in its own mode
    torch.testing.assert_close(_teacher_hidden(model, teacher, inputs), _original_hidden(original, inputs),
                               rtol=1e-4, atol=1e-5)
    assert model.training and not model.base_model.model.model.layers[0].training
    assert model.base_model.model.model.layers[1].training


def test_teacher_is_exact_with_gradient_checkpointing():
    base = tiny_llama()
    original = copy.deepcopy(base).eval()
    model = apply_method(base, AdapterConfig(method="pissa+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    teacher = SnapshotTeacher(model)
    objective = GenerationObjective(constant_reg(), teacher=teacher)
    inputs = batch()
    _trained(model, objective, inputs)
    torch.testing.assert_close(_teacher_hidden(model, teacher, inputs), _original_hidden(original, inputs),
                               rtol=1e-4, atol=1e-5)
    loss, logs = objective(model, inputs)
    loss.backward()
    assert logs["reg_consistency"] > 1e-4
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_teacher_under_bf16_autocast_is_the_original_model_in_bf16():
    base = tiny_llama()
    original = copy.deepcopy(base).eval()
    model = apply_method(base, AdapterConfig(method="pissa+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    teacher = SnapshotTeacher(model)
    objective = GenerationObjective(constant_reg(), teacher=teacher)
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, logs = objective(model, inputs)
    assert logs["reg_consistency"] == pytest.approx(0.0, abs=2e-3)  # step 0: student == teacher, in bf16
    _trained(model, objective, inputs, lr=2.0)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = _teacher_hidden(model, teacher, inputs)  # the teacher in an autocast region of its own
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _original_hidden(original, inputs)
        # one autocast region: the student's forward caches bf16 casts of ITS weights first
        with torch.no_grad():
            student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            output_hidden_states=True).hidden_states[-1]
        got = _teacher_hidden(model, teacher, inputs)
    torch.testing.assert_close(got, alone, rtol=0, atol=0)  # the student's cached casts were not used
    # it is the original model in bf16 (W_res + A0·B0 rounds differently from W in bf16: a small gap),
    # far from the student, and not the fp32 original
    gap, student_gap = (got - expected).abs().max(), (student - expected).abs().max()
    assert gap < 0.1 * student_gap, (gap, student_gap)
    assert (_original_hidden(original, inputs) - got).abs().max() > 1e-4


def test_a_packed_batch_trains_exactly_like_the_padded_one():
    # padding-free batching (TRL's packing): two documents in one row, separated by position ids;
    # the last token of the first document must not predict the first token of the second
    model = apply_method(tiny_llama(), AdapterConfig(method="pissa+reg", rank=4, target_modules=PROJ), TaskType.CAUSAL_LM)
    objective = GenerationObjective(constant_reg(), teacher=SnapshotTeacher(model), chunk_size=4)
    padded = batch()
    padded["labels"][2, 0] = padded["input_ids"][2, 0]  # a labelled first token: never a target
    lengths = (9, 7)  # rows 1 and 2 of the padded batch
    ids = torch.cat([padded["input_ids"][r, :n] for r, n in zip((1, 2), lengths)])[None]
    labels = torch.cat([padded["labels"][r, :n] for r, n in zip((1, 2), lengths)])[None]
    packed = {"input_ids": ids, "labels": labels,
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    two_rows = {k: v[1:] for k, v in padded.items()}
    _trained(model, objective, two_rows, steps=2)  # student != teacher, so every term has a gradient
    results = []
    for inputs in (two_rows, packed):
        model.zero_grad()
        loss, logs = objective(model, inputs)
        loss.backward()
        results.append((loss.detach(), logs, grads(model)))
    (l1, logs1, g1), (l2, logs2, g2) = results
    assert logs1["valid_tokens"] == logs2["valid_tokens"]
    assert logs1["reg_consistency"] > 1e-6
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for key in ("task_loss", "reg_consistency", "reg_diversity", "reg_svd"):
        assert logs2[key] == pytest.approx(logs1[key], rel=1e-4, abs=1e-6), key
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-3, atol=1e-6, msg=name)
