"""Chunked generation losses from hidden states and the head, against naive references."""

from __future__ import annotations

import pytest
import torch

from balora.regularizers.common import CONSISTENCY_KINDS
from balora.regularizers.formulas import consistency_loss_sum
from balora.regularizers.tokens import (
    ConsistencyTerm,
    CrossEntropyTerm,
    LinearHead,
    TokenTerm,
    TopKEntropyTerm,
    QRFactorCache,
    exact_head_svd_loss,
    head_objective,
    next_token_targets,
    randomized_svd_loss,
)

T, K = 2.0, 5


def naive_sums(z, zt, targets, temperature=T, top_k=K):
    """Reference sums from full (M, V) logits, written from the formulas (eq. 9, 10-11)."""
    z, zt = z.double(), zt.double()
    log_soft = z - z.logsumexp(-1, keepdim=True)
    ce = -log_soft[torch.arange(len(targets)), targets].sum()
    p = torch.softmax(zt / temperature, -1)
    q_log = torch.log_softmax(z / temperature, -1)
    kl = temperature**2 * (p * (p.log() - q_log)).sum()
    top = z.topk(top_k, -1).values
    pk = torch.softmax(top, -1)
    neg_ent = (pk * pk.log()).sum()
    return ce, kl, neg_ent


def make_case(m=13, d=6, v=37, bias=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(m, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    return hidden, teacher, weight, b, targets


def full_logits(h, weight, bias):
    return h @ weight.T + (0 if bias is None else bias)


# ------------------------------------------------------------------ alignment


def test_next_token_targets_on_a_hand_made_example():
    # prompt p0 p1 | response r0 r1 <eos> | padding
    labels = torch.tensor([[-100, -100, 11, 12, 2, -100, -100]])
    targets = next_token_targets(labels)
    assert targets.tolist() == [[-100, 11, 12, 2, -100, -100, -100]]
    valid = (targets != -100)[0].tolist()
    # the last prompt position predicts the first response token: in
    assert valid[1] is True
    # the position of the last target (<eos>) predicts padding: out
    assert valid[4] is False
    assert sum(valid) == 3  # exactly the response tokens are predicted


def test_next_token_targets_rejects_bad_shape():
    with pytest.raises(ValueError, match="batch, sequence"):
        next_token_targets(torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ fused / generic vs naive


@pytest.mark.parametrize("chunk", [1, 3, 7, 13, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_frozen_head_equals_naive_values_and_gradients(chunk, bias):
    hidden, teacher, weight, b, targets = make_case(bias=bias)
    w = (0.3, 0.7, 0.11)
    head = LinearHead(weight, b, frozen=True)
    loss, sums = head_objective(hidden, targets, head, teacher_hidden=teacher, weights=w,
                                temperature=T, top_k=K, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss * 1.7, hidden)

    h2 = hidden.detach().clone().requires_grad_(True)
    ce, kl, ne = naive_sums(full_logits(h2, weight, b), full_logits(teacher, weight, b), targets)
    ref = w[0] * ce + w[1] * kl + w[2] * ne
    (ref_grad,) = torch.autograd.grad(ref * 1.7, h2)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)
    assert sums.count == 13
    assert sums.cross_entropy == pytest.approx(ce.item())
    assert sums.consistency == pytest.approx(kl.item())
    assert sums.neg_entropy == pytest.approx(ne.item())


TERMS = [CrossEntropyTerm(), TopKEntropyTerm(5), TopKEntropyTerm(100)] + [
    ConsistencyTerm(kind, temperature) for kind in CONSISTENCY_KINDS for temperature in (0.7, 2.0)
]


@pytest.mark.parametrize("term", TERMS, ids=lambda t: f"{t.name}-{getattr(t, 'kind', '')}-{getattr(t, 'temperature', getattr(t, 'top_k', ''))}")
def test_each_terms_fused_gradient_equals_autograd_of_its_formula(term):
    # closed forms (ce, kl, top-K entropy) and the autograd default (cosine, mse, mse_normalized)
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 29, generator=g, dtype=torch.float64) * 3
    t = torch.randn(7, 29, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 29, (7,), generator=g)
    leaf = s.clone().requires_grad_(True)
    ref = term.value(leaf, t.clone(), targets)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    buffer = torch.full_like(s, 0.25)  # the term must ADD into the buffer
    value = term.value_and_add_grad(s.clone(), t.clone(), targets, buffer, 0.6)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buffer, 0.25 + 0.6 * ref_grad, rtol=1e-10, atol=1e-12)


def test_a_new_term_needs_only_its_formula():
    class SquaredLogits(TokenTerm):
        name = "squares"

        def value(self, s, t, targets):
            return (s**2).sum()

    s = torch.randn(4, 6, dtype=torch.float64)
    buffer = torch.zeros_like(s)
    value = SquaredLogits().value_and_add_grad(s, None, None, buffer, 0.5)
    torch.testing.assert_close(value, (s**2).sum())
    torch.testing.assert_close(buffer, s)  # 0.5 * 2s


@pytest.mark.parametrize("kind", CONSISTENCY_KINDS)
@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_every_consistency_kind_runs_fused_and_equals_the_formula_on_full_logits(kind, chunk):
    hidden, teacher, weight, b, targets = make_case()
    head = LinearHead(weight, b, frozen=True)
    loss, sums = head_objective(hidden, targets, head, teacher_hidden=teacher, weights=(0.0, 1.0, 0.0),
                                temperature=1.3, consistency_kind=kind, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    ref, count = consistency_loss_sum(full_logits(h2, weight, b), full_logits(teacher, weight, b),
                                      temperature=1.3, kind=kind)
    (ref_grad,) = torch.autograd.grad(ref, h2)
    assert count == sums.count == 13
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    assert sums.consistency == pytest.approx(ref.item())


@pytest.mark.parametrize("chunk", [2, 5, 100])
def test_generic_path_equals_naive_for_a_trainable_head(chunk):
    hidden, teacher, weight, b, targets = make_case(m=9, d=5, v=23)
    weight = weight.clone().requires_grad_(True)
    head = LinearHead(weight, b, frozen=False)
    w = (1.0, 0.5, 0.25)
    loss, _ = head_objective(hidden, targets, head, teacher_hidden=teacher, weights=w, top_k=K, chunk_size=chunk)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ce, kl, ne = naive_sums(full_logits(h2, w2, b), full_logits(teacher, weight.detach(), b), targets)
    ref = w[0] * ce + w[1] * kl + w[2] * ne
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_generic_path_accepts_any_module_and_teacher_logits():
    hidden, teacher, weight, b, targets = make_case(m=8, d=4, v=19, dtype=torch.float32)
    module = torch.nn.Linear(4, 19).to(torch.float32)
    teacher_logits = module(teacher).detach()
    loss, sums = head_objective(hidden, targets, module, teacher_logits=teacher_logits, weights=(1, 1, 1), top_k=K, chunk_size=3)
    ce, kl, ne = naive_sums(module(hidden), teacher_logits, targets)
    torch.testing.assert_close(loss.double(), ce + kl + ne, rtol=1e-5, atol=1e-5)
    assert sums.count == 8


def test_fused_skips_terms_it_is_not_asked_for():
    hidden, teacher, weight, b, targets = make_case()
    loss, sums = head_objective(hidden, targets, LinearHead(weight, b, True), weights=(1.0, 0.0, 0.0))
    ce, _, _ = naive_sums(full_logits(hidden, weight, b), full_logits(teacher, weight, b), targets)
    torch.testing.assert_close(loss, ce)
    assert sums.consistency == 0.0 and sums.neg_entropy == 0.0


def test_all_masked_batch_gives_zero_with_finite_gradients():
    hidden = torch.randn(0, 6, requires_grad=True)
    _, _, weight, b, _ = make_case(dtype=torch.float32)
    for head in (LinearHead(weight, b, True), LinearHead(weight, b, False)):
        loss, sums = head_objective(hidden, torch.zeros(0, dtype=torch.long), head,
                                    teacher_hidden=torch.randn(0, 6), weights=(1, 1, 1))
        (grad,) = torch.autograd.grad(loss, hidden)
        assert loss.item() == 0.0 and sums.count == 0
        assert torch.isfinite(grad).all()
    svd = exact_head_svd_loss(hidden, LinearHead(weight, b, True), k=3)
    (grad,) = torch.autograd.grad(svd, hidden)
    assert svd.item() == 0.0 and grad.shape == (0, 6)


def test_bf16_hidden_states_are_computed_in_fp32():
    hidden, teacher, weight, b, targets = make_case(m=11, d=8, v=31, dtype=torch.float32)
    head32 = LinearHead(weight, b, True)
    ref, _ = head_objective(hidden, targets, head32, teacher_hidden=teacher, weights=(1, 1, 1), chunk_size=4)
    hb = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    headb = LinearHead(weight.to(torch.bfloat16), b.to(torch.bfloat16), True)
    loss, _ = head_objective(hb, targets, headb, teacher_hidden=teacher.to(torch.bfloat16), weights=(1, 1, 1), chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hb)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss, ref, rtol=0.05, atol=0.5)


def test_bad_arguments_raise_one_line_errors():
    hidden, teacher, weight, b, targets = make_case()
    with pytest.raises(ValueError, match="chunk_size"):
        head_objective(hidden, targets, LinearHead(weight, b, True), chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        head_objective(hidden, targets[:3], LinearHead(weight, b, True))


# ------------------------------------------------------------------ exact SVD via QR (eq. 12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,k", [(13, 3), (4, 10), (30, 6)])
def test_exact_svd_equals_svd_of_full_logits(bias, m, k):
    hidden, _, weight, b, _ = make_case(m=m, d=6, v=37, bias=bias)
    loss = exact_head_svd_loss(hidden, LinearHead(weight, b, True), k=k)
    (grad,) = torch.autograd.grad(loss, hidden)

    h2 = hidden.detach().clone().requires_grad_(True)
    z = full_logits(h2, weight, b)
    sigma = torch.linalg.svdvals(z)
    ref = -sigma[: min(k, len(sigma))].sum() / torch.linalg.vector_norm(z)
    (ref_grad,) = torch.autograd.grad(ref, h2)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)


def test_exact_svd_is_finite_on_rank_deficient_and_zero_inputs():
    _, _, weight, b, _ = make_case(dtype=torch.float32)
    head = LinearHead(weight, None, True)
    base = torch.randn(2, 6)
    hidden = base.repeat(5, 1).requires_grad_(True)  # rank 2, repeated rows
    loss = exact_head_svd_loss(hidden, head, k=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    zeros = torch.zeros(7, 6, requires_grad=True)
    loss = exact_head_svd_loss(zeros, head, k=4)
    (grad,) = torch.autograd.grad(loss, zeros)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_qr_cache_is_reused_and_refreshed_after_an_in_place_update():
    _, _, weight, _, _ = make_case(dtype=torch.float32)
    cache, head = QRFactorCache(), LinearHead(weight, None, True)
    r1 = cache.r_factor(head)
    assert cache.r_factor(head) is r1
    with torch.no_grad():
        weight.mul_(2.0)
    r2 = cache.r_factor(head)
    assert r2 is not r1
    torch.testing.assert_close(r2.abs(), 2 * r1.abs())


# ------------------------------------------------------------------ randomized fallback


def test_randomized_svd_matches_exact_on_a_low_rank_matrix_and_stays_finite():
    torch.manual_seed(0)
    z = (torch.randn(40, 5) @ torch.randn(5, 60)).double().requires_grad_(True)  # rank 5
    approx = randomized_svd_loss(z, k=3, oversample=4, niter=2)
    sigma = torch.linalg.svdvals(z.detach())
    exact = -sigma[:3].sum() / torch.linalg.vector_norm(z.detach())
    torch.testing.assert_close(approx.detach(), exact, rtol=1e-8, atol=1e-10)
    (grad,) = torch.autograd.grad(approx, z)
    assert torch.isfinite(grad).all()

    z2 = z.detach().clone().requires_grad_(True)
    ref = -torch.linalg.svdvals(z2)[:3].sum() / torch.linalg.vector_norm(z2)
    (ref_grad,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


def test_randomized_svd_approximates_a_full_rank_matrix_within_a_stated_tolerance():
    # Where the oversampling does NOT cover the rank the randomized value is an approximation.
    # Spectra decaying like 0.97^i and 0.99^i (rank 80, q = k + 10 = 20, niter = 2, the defaults):
    # measured relative errors 0.26% and 1.8%; the tolerance below states the bound we rely on.
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(200, 80, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 80, dtype=torch.float64))
    for decay, tolerance in ((0.97, 5e-3), (0.99, 3e-2)):
        sigma = 10.0 * decay ** torch.arange(80, dtype=torch.float64)
        z = ((u * sigma) @ v.T).requires_grad_(True)
        exact = -sigma[:10].sum() / torch.linalg.vector_norm(z.detach())
        approx = randomized_svd_loss(z, k=10, oversample=10, niter=2)
        # a projection never increases singular values: |approx| <= |exact|, and it is close
        assert approx.item() >= exact.item() - 1e-12
        assert approx.item() != pytest.approx(exact.item(), rel=1e-6)  # really an approximation
        assert approx.item() == pytest.approx(exact.item(), rel=tolerance)
        (grad,) = torch.autograd.grad(approx, z)
        assert torch.isfinite(grad).all()
