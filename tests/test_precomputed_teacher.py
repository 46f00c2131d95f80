"""The precomputed sparse teacher: the bucketed top-K KL against naive references, the store written
by ``balora teacher precompute`` against the teacher's own logits, resume, refusals, and training with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from balora.config import ConfigError, load_config
from balora.regularizers.tokens import (
    ConsistencyTerm,
    LinearHead,
    SparseConsistencyTerm,
    TopKTeacher,
    head_objective,
)


def _naive_bucket_kl(s: torch.Tensor, t: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Σ_rows T²·KL between the (K+1)-bucket coarsenings, row by row, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for s_row, t_row in zip(s.double(), t.double()):
        p, q = (t_row / temperature).softmax(-1), (s_row / temperature).softmax(-1)
        top = p.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        p_b = torch.cat([p[top], p[rest].sum()[None]])
        q_b = torch.cat([q[top], q[rest].sum()[None]])
        keep = p_b > 0
        total = total + (temperature**2) * (p_b[keep] * (p_b[keep].log() - q_b[keep].log())).sum()
    return total


@pytest.mark.parametrize("k", [1, 3, 7])
def test_sparse_kl_equals_the_naive_bucketed_kl_and_its_closed_form_gradient_equals_autograd(k):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g) * 2, torch.randn(5, 11, generator=g) * 2
    teacher = TopKTeacher.from_logits(t, temperature=2.0, top_k=k)
    term = SparseConsistencyTerm(2.0)
    torch.testing.assert_close(term.value(s, teacher, None).double(), _naive_bucket_kl(s, t, k, 2.0), rtol=1e-5, atol=1e-6)
    leaf = s.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(term.value(leaf, teacher, None), leaf)
    grad = torch.zeros_like(s)
    value = term.value_and_add_grad(s.clone(), teacher, None, grad, 0.5)
    torch.testing.assert_close(value, term.value(s, teacher, None))
    torch.testing.assert_close(grad, 0.5 * auto, rtol=1e-5, atol=1e-6)


def test_with_every_token_kept_the_sparse_kl_is_the_full_kl_and_it_never_exceeds_it():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g) * 3
    full = ConsistencyTerm("kl", 2.0).value(s, t.clone(), None)
    whole = TopKTeacher.from_logits(t, temperature=2.0, top_k=9)
    assert torch.isinf(whole.rest).all() and (whole.rest < 0).all()  # no mass left outside: log 0
    torch.testing.assert_close(SparseConsistencyTerm(2.0).value(s, whole, None), full, rtol=1e-5, atol=1e-6)
    values = [float(SparseConsistencyTerm(2.0).value(s, TopKTeacher.from_logits(t, temperature=2.0, top_k=k), None))
              for k in (1, 2, 4, 8, 9)]
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:]))  # coarser buckets lose information
    assert values[-1] == pytest.approx(float(full), rel=1e-5)
    rest = TopKTeacher.from_logits(t, temperature=2.0, top_k=3)
    torch.testing.assert_close(rest.rest.exp() + rest.logprobs.exp().sum(-1), torch.ones(6))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_head_objective_with_a_top_k_teacher_fused_equals_generic_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(2)
    m, d, v = 13, 6, 17
    weight = torch.randn(v, d, generator=g)
    hidden = torch.randn(m, d, generator=g)
    targets = torch.randint(0, v, (m,), generator=g)
    teacher = TopKTeacher.from_logits(torch.randn(m, d, generator=g) @ weight.T, temperature=2.0, top_k=5)
    results = []
    for head in (LinearHead(weight, None, frozen=True), torch.nn.Linear(d, v, bias=False)):
        if isinstance(head, torch.nn.Linear):
            head.weight.data.copy_(weight)
            head.weight.requires_grad_(False)
        h = hidden.clone().requires_grad_(True)
        loss, sums = head_objective(h, targets, head, teacher_topk=teacher, weights=(0.1, 0.7, 0.3),
                                    chunk_size=chunk)
        (grad,) = torch.autograd.grad(loss, h)
        results.append((loss.detach(), sums.consistency, grad))
    (fused_loss, fused_cr, fused_grad), (generic_loss, generic_cr, generic_grad) = results
    torch.testing.assert_close(fused_loss, generic_loss, rtol=1e-5, atol=1e-6)
    assert fused_cr == pytest.approx(generic_cr, rel=1e-5) and fused_cr > 0
    torch.testing.assert_close(fused_grad, generic_grad, rtol=1e-4, atol=1e-6)


def test_head_objective_refuses_a_top_k_teacher_of_another_kind_or_length():
    h, targets = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    head = LinearHead(torch.randn(5, 4), None, frozen=True)
    teacher = TopKTeacher.from_logits(torch.randn(3, 5), temperature=2.0, top_k=2)
    with pytest.raises(ValueError, match="consistency_kind=.kl. only"):
        head_objective(h, targets, head, teacher_topk=teacher, consistency_kind="cosine")
    with pytest.raises(ValueError, match="rows"):
        head_objective(h[:2], targets[:2], head, teacher_topk=teacher)


# ------------------------------------------------------------------ the store and training with it


def _config(model_dir, tmp_path, *extra):
    return load_config(None, [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={model_dir}", "model.max_length=96",
        "data.task=gsm-symbolic", "data.max_train_examples=6", "adapter.method=balora", "adapter.rank=4",
        "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.batch_size=3", "train.logging_steps=1",
        "train.save_steps=2", "train.report_to=[]", "train.loss_chunk_size=16", "eval.max_examples=2",
        "eval.max_new_tokens=4", "eval.batch_size=2", "regularizers.consistency_schedule=constant",
        "regularizers.focus_schedule=constant", *extra,
    ])


@pytest.fixture(scope="module")
def store(tiny_causal_lm_dir, tmp_path_factory):
    from balora.precomputed_teacher import precompute_teacher

    folder = tmp_path_factory.mktemp("teacher")
    config = _config(tiny_causal_lm_dir, folder)
    return config, precompute_teacher(config, folder / "store", top_k=32, batch_size=4, progress=False)


def test_the_store_holds_the_teachers_top_k_of_every_valid_token_of_every_example(store, tiny_causal_lm_dir):
    from balora.objectives.generation import GenerationObjective, model_inputs, valid_targets
    from balora.precomputed_teacher import PrecomputedTeacher
    from balora.runs_generation import GenerationRun

    config, path = store
    teacher = PrecomputedTeacher(path)
    family = GenerationRun(config, progress=False)
    model, _ = family.load()
    counts = [GenerationObjective.count_items(family.collator([row])) for row in family.train_set]
    assert np.diff(teacher.offsets).tolist() == counts and teacher.meta["tokens"] == sum(counts) > 0
    assert teacher.indices.dtype == np.uint16 and teacher.indices.shape == (sum(counts), 32)
    batch = family.collator([family.train_set[i] for i in (4, 1)])  # any order: rows follow example_id
    valid = valid_targets(batch) != -100
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[valid]  # (M, V), the naive way
    expected = TopKTeacher.from_logits(logits, temperature=2.0, top_k=32)
    rows = teacher.rows(batch["example_id"], valid.sum(1))
    assert (rows.indices == expected.indices).float().mean() > 0.99  # ties in fp32 may swap neighbours
    torch.testing.assert_close(rows.logprobs, expected.logprobs, atol=1e-2, rtol=1e-3)  # stored in float16
    torch.testing.assert_close(rows.rest, expected.rest, atol=1e-5, rtol=1e-5)
    buckets = rows.logprobs.double().exp().sum(-1) + rows.rest.double().exp()
    torch.testing.assert_close(buckets, torch.ones_like(buckets), atol=1e-6, rtol=0)  # consistent after rounding
    with pytest.raises(ValueError, match="other data"):
        teacher.rows(batch["example_id"], valid.sum(1) + 1)


def test_an_interrupted_precompute_resumes_to_the_same_arrays_and_a_complete_one_is_kept(store, tmp_path):
    import shutil

    from balora.precomputed_teacher import precompute_teacher

    config, path = store
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (copy / "progress.json").write_text(json.dumps({"examples_done": 4}))
    first_undone = int(np.load(copy / "offsets.npy")[4])
    np.lib.format.open_memmap(copy / "rest.npy", mode="r+")[first_undone:] = 0.0  # "not yet written"
    precompute_teacher(config, copy, top_k=32, batch_size=4, progress=False)
    for name in ("indices", "logprobs", "rest", "offsets", "example_ids"):
        np.testing.assert_array_equal(np.load(copy / f"{name}.npy"), np.load(path / f"{name}.npy"))
    with pytest.raises(FileExistsError, match="complete"):
        precompute_teacher(config, copy, top_k=32, progress=False)
    with pytest.raises(FileExistsError, match="other settings"):
        (copy / "meta.json").write_text(json.dumps({**meta, "complete": False}))
        precompute_teacher(config, copy, top_k=16, progress=False)


def test_a_store_of_other_data_or_temperature_is_refused_in_one_line(store, tiny_causal_lm_dir, tmp_path):
    from balora.precomputed_teacher import PrecomputedTeacher

    _, path = store
    teacher = PrecomputedTeacher(path)
    with pytest.raises(ConfigError, match="another model, data set or seed"):
        teacher.check(_config(tiny_causal_lm_dir, tmp_path, "train.seed=7"))
    with pytest.raises(ConfigError, match="temperature"):
        teacher.check(_config(tiny_causal_lm_dir, tmp_path, "regularizers.temperature=1.0"))
    with pytest.raises(ConfigError, match="teacher_path"):
        _config(tiny_causal_lm_dir, tmp_path, "regularizers.teacher=precomputed")
    with pytest.raises(ConfigError, match="kl"):
        _config(tiny_causal_lm_dir, tmp_path, "regularizers.teacher=precomputed", f"regularizers.teacher_path={path}",
                "regularizers.consistency_kind=cosine")
    with pytest.raises(ConfigError, match="not a precomputed teacher"):
        PrecomputedTeacher(tmp_path)


def test_the_objective_with_the_store_equals_the_sparse_kl_of_the_exact_teachers_logits(store, tiny_causal_lm_dir):
    from balora.adapters import apply_method
    from balora.objectives import build_objective
    from balora.objectives.generation import GenerationObjective, final_hidden_states, valid_targets
    from balora.runs_generation import GenerationRun
    from balora.teacher import SnapshotTeacher

    config, path = store
    precomputed = _config(tiny_causal_lm_dir, path.parent, "regularizers.teacher=precomputed",
                          f"regularizers.teacher_path={path}")
    family = GenerationRun(precomputed, progress=False)
    model, _ = family.load()
    model = apply_method(model, precomputed.adapter)
    exact_teacher = SnapshotTeacher(model)
    objective = build_objective(precomputed, model)
    assert objective.precomputed is not None and not objective.needs_teacher and objective.teacher is None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the student off the teacher
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    batch = family.collator([family.train_set[i] for i in (2, 5, 0)])
    adapter = [p for n, p in model.named_parameters() if p.requires_grad]
    loss, logs = objective(model, batch)
    grads = torch.autograd.grad(loss, adapter)
    # the reference: the exact teacher's logits, bucketed at the same K, in full precision
    valid = valid_targets(batch) != -100
    with exact_teacher.active(model) as pretrained, torch.no_grad():
        teacher_logits = pretrained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[valid]
    reference = GenerationObjective(precomputed.regularizers)
    reference.precomputed = None
    hidden, _ = final_hidden_states(model, batch)
    head = model.get_output_embeddings()
    m = int(valid.sum())
    lam = reference.weights.at(0, 1)
    ref_loss, sums = head_objective(
        hidden[valid], valid_targets(batch)[valid], LinearHead.from_module(head),
        teacher_topk=TopKTeacher.from_logits(teacher_logits, temperature=2.0, top_k=32).rounded_to_half(),
        weights=(1 / m, lam.consistency / m, lam.diversity / m), chunk_size=16)
    ref_loss = ref_loss + lam.svd * reference._svd_term(hidden[valid], head, LinearHead.from_module(head))
    ref_grads = torch.autograd.grad(ref_loss, adapter)
    assert logs["reg_consistency"] == pytest.approx(sums.consistency / m, rel=2e-3) and logs["reg_consistency"] > 1e-8
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-3, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-5)


def test_balora_train_with_the_precomputed_teacher(store, tiny_causal_lm_dir, capsys):
    from balora.cli import main

    config, path = store
    overrides = [f"{k}={v}" for k, v in (("regularizers.teacher", "precomputed"), ("regularizers.teacher_path", path))]
    args = ["family=generation", f"output_dir={path.parent / 'trained'}", f"model.name={tiny_causal_lm_dir}",
            "model.max_length=96", "data.task=gsm-symbolic", "data.max_train_examples=6", "adapter.method=balora",
            "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.batch_size=3",
            "train.logging_steps=1", "train.save_steps=2", "train.report_to=[]", "train.loss_chunk_size=16",
            "eval.max_examples=2", "eval.max_new_tokens=4", "eval.batch_size=2",
            "regularizers.consistency_schedule=constant", "regularizers.focus_schedule=constant", *overrides]
    assert main(["train", *args, "--no-progress"]) == 0
    (run,) = (path.parent / "trained").iterdir()
    history = json.loads((run / "log_history.json").read_text())
    assert [h["reg_consistency"] for h in history if "reg_consistency" in h][0] == pytest.approx(0.0, abs=2e-3)
    assert (run / "metrics.json").is_file()
    assert main(["teacher", "precompute", *args[:6], "--output", str(path)]) == 2  # complete: kept, one line
    assert "already holds" in capsys.readouterr().err


def test_balora_teacher_precompute_prints_the_store_and_how_to_train_with_it(tiny_causal_lm_dir, tmp_path, capsys):
    from balora.cli import main

    args = ["family=generation", f"output_dir={tmp_path}", f"model.name={tiny_causal_lm_dir}", "model.max_length=96",
            "data.task=gsm-symbolic", "data.max_train_examples=3"]
    assert main(["teacher", "precompute", *args, "--output", str(tmp_path / "store"), "--top-k", "8",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-8 at T=2" in out and f"regularizers.teacher_path={tmp_path / 'store'}" in out
    assert json.loads((tmp_path / "store" / "meta.json").read_text())["complete"] is True
    assert main(["teacher", "precompute", *args, "--output", str(tmp_path / "other"), "--top-k", "0"]) == 2
