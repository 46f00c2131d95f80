"""Tests for balora.regularizers.formulas against naive reference implementations (explicit loops / formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balora.regularizers.formulas import (
    consistency_loss,
    consistency_loss_sum,
    covariance_diversity_loss,
    svd_loss,
    topk_entropy_diversity_loss,
    topk_entropy_sum,
)

KINDS = ("kl", "cosine", "mse", "mse_normalized")
LENGTHS = (5, 2, 4)  # ragged valid lengths for (B, L) = (3, 5)


# --------------------------------------------------------------------------- inputs


def make_logits(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def ragged_mask(lengths=LENGTHS, max_len=5):
    return torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]


def case(name, dtype=torch.float64):
    """(student, teacher, mask) for a named shape case."""
    if name == "2d":
        return make_logits((7, 5), dtype, 0), make_logits((7, 5), dtype, 1), None
    if name == "2d_mask":
        mask = torch.tensor([True, False, True, True, False, True, True])
        return make_logits((7, 5), dtype, 0), make_logits((7, 5), dtype, 1), mask
    if name == "3d":
        return make_logits((3, 5, 11), dtype, 2), make_logits((3, 5, 11), dtype, 3), None
    if name == "3d_mask":
        return make_logits((3, 5, 11), dtype, 2), make_logits((3, 5, 11), dtype, 3), ragged_mask()
    raise KeyError(name)


CASES = ("2d", "2d_mask", "3d", "3d_mask")


def valid_row_list(x, mask):
    """Explicit loop collecting the valid rows (1-D tensors) of (N, D) or (B, L, V) logits."""
    if x.dim() == 2:
        return [x[i] for i in range(x.shape[0]) if mask is None or bool(mask[i])]
    return [
        x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if mask is None or bool(mask[b, t])
    ]


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


# --------------------------------------------------------------------------- naive references


def ref_consistency(s, t, mask=None, kind="kl", temperature=2.0):
    s_rows, t_rows = valid_row_list(s.double(), mask), valid_row_list(t.double(), mask)
    total = s.new_zeros((), dtype=torch.float64)
    for sr, tr in zip(s_rows, t_rows):
        if kind == "kl":
            p = torch.softmax(tr / temperature, dim=0)
            q = torch.softmax(sr / temperature, dim=0)
            total = total + temperature**2 * sum(p[j] * torch.log(p[j] / q[j]) for j in range(len(p)))
        elif kind == "mse":
            total = total + sum((sr[j] - tr[j]) ** 2 for j in range(len(sr))) / len(sr)
        elif kind == "mse_normalized":
            a, b = sr / torch.sqrt((sr * sr).sum()), tr / torch.sqrt((tr * tr).sum())
            total = total + sum((a[j] - b[j]) ** 2 for j in range(len(a))) / len(a)
        else:
            cos = (sr * tr).sum() / torch.sqrt((sr * sr).sum() * (tr * tr).sum())
            total = total + 1 - cos
    return total / max(len(s_rows), 1)


def ref_covariance(z):
    z = z.double()
    n, d = z.shape
    mean = [sum(z[r, i] for r in range(n)) / n for i in range(d)]
    total = z.new_zeros(())
    for i in range(d):
        for j in range(d):
            if i != j:
                c_ij = sum((z[r, i] - mean[i]) * (z[r, j] - mean[j]) for r in range(n)) / (n - 1)
                total = total + c_ij**2
    return total / d


def ref_topk_entropy(x, top_k, mask=None):
    rows = valid_row_list(x.double(), mask)
    total = x.new_zeros((), dtype=torch.float64)
    for r in rows:
        top = torch.sort(r, descending=True).values[: min(top_k, len(r))]
        e = torch.exp(top - top.max())
        p = e / e.sum()
        total = total + (p * torch.log(p)).sum()
    return total / max(len(rows), 1)


def ref_svd_value_and_grad(x, k, mask=None, normalize="nuclear"):
    """Value via full torch SVD (cross-checked with numpy) and the analytic gradient.

    d(sum_{i<=k} s_i)/dZ = U_k V_k^T, d(sum_i s_i)/dZ = U_r V_r^T, d||Z||_F/dZ = Z / ||Z||_F.
    """
    rows = valid_row_list(x.double(), mask)
    z = torch.stack(rows)
    u, s, vh = torch.linalg.svd(z, full_matrices=True)
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(z.numpy(), compute_uv=False), rtol=1e-10, atol=1e-12)
    r = min(z.shape)
    k = min(k, r)
    a, ga = s[:k].sum(), u[:, :k] @ vh[:k]
    if normalize == "nuclear":
        b, gb = s.sum(), u[:, :r] @ vh[:r]
    else:
        b = torch.sqrt((s**2).sum())
        gb = z / b
    value = -a / b
    g_rows = -(ga * b - a * gb) / b**2
    grad = torch.zeros_like(x, dtype=torch.float64)
    if mask is None:
        grad = g_rows.reshape(x.shape)
    else:
        grad[mask] = g_rows
    return value, grad


# --------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_consistency_matches_reference(kind, name, dtype, tol):
    s, t, mask = case(name, dtype)
    temp = 1.7
    out, g = grad_of(lambda x: consistency_loss(x, t, temperature=temp, mask=mask, kind=kind), s)
    ref, g_ref = grad_of(lambda x: ref_consistency(x, t, mask, kind, temp), s.double())
    assert out.dim() == 0 and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_consistency_bf16_computed_in_fp32(kind):
    s, t, mask = case("3d_mask", torch.bfloat16)
    out, g = grad_of(lambda x: consistency_loss(x, t, mask=mask, kind=kind), s)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    # Exactly the fp32 computation on the bf16-rounded values ...
    out32 = consistency_loss(s.float(), t.float(), mask=mask, kind=kind)
    torch.testing.assert_close(out, out32, rtol=1e-6, atol=1e-7)
    # ... and close to the float64 reference on the unrounded values.
    s64, t64, _ = case("3d_mask")
    ref, g_ref = grad_of(lambda x: ref_consistency(x, t64, mask, kind), s64)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(g.double(), g_ref, rtol=5e-2, atol=3e-3)


def test_mse_normalized_is_cosine_scaled_by_two_over_d():
    # the ablation plan's "MSE" (of L2-normalised logits) is the cosine loss with lambda1 rescaled
    s, t, mask = case("3d_mask")
    d = s.shape[-1]
    normalized, g_normalized = grad_of(lambda x: consistency_loss(x, t, mask=mask, kind="mse_normalized"), s)
    cosine, g_cosine = grad_of(lambda x: consistency_loss(x, t, mask=mask, kind="cosine"), s)
    torch.testing.assert_close(normalized, 2.0 / d * cosine, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_normalized, 2.0 / d * g_cosine, rtol=1e-12, atol=1e-12)


def test_the_four_consistency_kinds_are_distinct_losses():
    # a binary task (D = 2) is where mse_normalized and cosine used to coincide with "mse"
    s, t = make_logits((6, 2), seed=4), make_logits((6, 2), seed=5)
    values = {kind: float(consistency_loss(s, t, kind=kind)) for kind in KINDS}
    ratios = {kind: values[kind] / values["cosine"] for kind in KINDS}
    assert ratios["mse_normalized"] == pytest.approx(1.0)  # 2/D = 1 for D = 2
    assert len({round(ratios[k], 6) for k in ("kl", "cosine", "mse")}) == 3
    # only kl depends on the temperature; mse is on the raw logits
    for kind in ("cosine", "mse", "mse_normalized"):
        assert float(consistency_loss(s, t, kind=kind, temperature=5.0)) == pytest.approx(values[kind])
    assert float(consistency_loss(s, t, kind="kl", temperature=5.0)) != pytest.approx(values["kl"])
    # mse is invariant to neither scale: doubling both logits quadruples it, unlike cosine
    assert float(consistency_loss(2 * s, 2 * t, kind="mse")) == pytest.approx(4 * values["mse"])
    assert float(consistency_loss(2 * s, 2 * t, kind="cosine")) == pytest.approx(values["cosine"])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_consistency_zero_when_student_equals_teacher(kind, name):
    s, _, mask = case(name, torch.float32)
    out = consistency_loss(s, s.clone(), mask=mask, kind=kind, temperature=0.5)
    torch.testing.assert_close(out, torch.zeros(()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0, 10.0])
def test_kl_nonnegative(temperature):
    for seed in range(5):
        s, t = make_logits((6, 9), torch.float32, seed, scale=5.0), make_logits((6, 9), torch.float32, seed + 50)
        assert consistency_loss(s, t, temperature=temperature).item() >= 0.0


def test_kl_temperature_scaling_matches_definition():
    s, t, _ = case("2d")
    temp = 3.0
    p, log_q = torch.softmax(t / temp, -1), torch.log_softmax(s / temp, -1)
    expected = temp**2 * (p * (torch.log(p) - log_q)).sum(-1).mean()
    torch.testing.assert_close(consistency_loss(s, t, temperature=temp), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_consistency_gradient_reaches_valid_rows_only(kind):
    s, t, mask = case("3d_mask")
    _, g = grad_of(lambda x: consistency_loss(x, t, mask=mask, kind=kind), s)
    assert g[~mask].abs().sum() == 0
    assert (g[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_consistency_sum_count_units(kind):
    s, t, mask = case("3d_mask")
    total, count = consistency_loss_sum(s, t, mask=mask, kind=kind)
    n_valid = sum(LENGTHS)
    assert isinstance(count, int)
    assert count == n_valid  # every kind is a per-row term: the count is in rows (tokens)
    torch.testing.assert_close(total / count, consistency_loss(s, t, mask=mask, kind=kind))


# --------------------------------------------------------------------------- chunking


def flat_case():
    s, t, mask = case("3d_mask")
    return s, t, mask, s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), mask.reshape(-1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
@pytest.mark.parametrize("kind", KINDS)
def test_consistency_chunked_equals_unchunked(kind, chunk):
    s, t, mask, _, t_flat, m_flat = flat_case()

    def chunked(x):
        x_flat = x.reshape(-1, x.shape[-1])
        total, count = 0.0, 0
        for i in range(0, x_flat.shape[0], chunk):
            part, n = consistency_loss_sum(
                x_flat[i : i + chunk], t_flat[i : i + chunk], mask=m_flat[i : i + chunk], kind=kind
            )
            total, count = total + part, count + n
        return total / count

    full, g_full = grad_of(lambda x: consistency_loss(x, t, mask=mask, kind=kind), s)
    out, g = grad_of(chunked, s)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_topk_entropy_chunked_equals_unchunked(chunk):
    s, _, mask, _, _, m_flat = flat_case()

    def chunked(x):
        x_flat = x.reshape(-1, x.shape[-1])
        total, count = 0.0, 0
        for i in range(0, x_flat.shape[0], chunk):
            part, n = topk_entropy_sum(x_flat[i : i + chunk], top_k=4, mask=m_flat[i : i + chunk])
            total, count = total + part, count + n
        return total / count

    full, g_full = grad_of(lambda x: topk_entropy_diversity_loss(x, top_k=4, mask=mask), s)
    out, g = grad_of(chunked, s)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_full, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- covariance diversity


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_covariance_matches_reference(dtype, tol):
    z, _, _ = case("2d", dtype)
    out, g = grad_of(covariance_diversity_loss, z)
    ref, g_ref = grad_of(ref_covariance, z.double())
    assert out.dim() == 0 and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)
    c = np.cov(z.double().numpy(), rowvar=False)
    np_value = (np.sum(c**2) - np.sum(np.diag(c) ** 2)) / z.shape[1]
    assert out.item() == pytest.approx(np_value, rel=tol)


def test_covariance_bf16():
    z = make_logits((7, 5), torch.bfloat16)
    out, g = grad_of(covariance_diversity_loss, z)
    assert out.dtype == torch.float32 and torch.isfinite(g.float()).all()
    torch.testing.assert_close(out, covariance_diversity_loss(z.float()))
    ref = ref_covariance(make_logits((7, 5)))
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=1e-2)


def test_covariance_zero_for_uncorrelated_and_single_row():
    # Orthogonal centred columns -> zero off-diagonal covariance.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    torch.testing.assert_close(covariance_diversity_loss(z), torch.zeros(()))
    out, g = grad_of(covariance_diversity_loss, make_logits((1, 5), torch.float32))
    assert out.item() == 0.0 and torch.equal(g, torch.zeros(1, 5))


# --------------------------------------------------------------------------- top-K entropy


@pytest.mark.parametrize("top_k", [1, 3, 11, 50])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", CASES)
def test_topk_entropy_matches_reference(name, dtype, tol, top_k):
    s, _, mask = case(name, dtype)
    out, g = grad_of(lambda x: topk_entropy_diversity_loss(x, top_k=top_k, mask=mask), s)
    ref, g_ref = grad_of(lambda x: ref_topk_entropy(x, top_k, mask), s.double())
    assert out.dim() == 0 and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_topk_entropy_bf16():
    s, _, mask = case("3d_mask", torch.bfloat16)
    out, g = grad_of(lambda x: topk_entropy_diversity_loss(x, top_k=4, mask=mask), s)
    assert out.dtype == torch.float32 and torch.isfinite(g.float()).all()
    torch.testing.assert_close(out, topk_entropy_diversity_loss(s.float(), top_k=4, mask=mask))
    ref = ref_topk_entropy(case("3d_mask")[0], 4, mask)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=1e-2)


def test_topk_entropy_minimised_by_uniform_topk():
    k = 4
    uniform = torch.cat([torch.full((3, k), 5.0), make_logits((3, 6), torch.float32, 9) - 10.0], dim=1)
    assert topk_entropy_diversity_loss(uniform, top_k=k).item() == pytest.approx(-math.log(k), abs=1e-6)
    for seed in range(5):
        random = make_logits((3, 10), torch.float32, seed)
        assert topk_entropy_diversity_loss(random, top_k=k).item() > -math.log(k)
    assert topk_entropy_diversity_loss(random, top_k=1).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_larger_than_vocab_is_clamped():
    s, _, mask = case("3d_mask")
    torch.testing.assert_close(
        topk_entropy_diversity_loss(s, top_k=1000, mask=mask), topk_entropy_diversity_loss(s, top_k=11, mask=mask)
    )
    total, count = topk_entropy_sum(s, top_k=3, mask=mask)
    assert isinstance(count, int) and count == sum(LENGTHS)


# --------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("normalize", ["nuclear", "frobenius"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 5e-5)])
@pytest.mark.parametrize("name", CASES)
def test_svd_matches_reference(name, dtype, tol, k, normalize):
    s, _, mask = case(name, dtype)
    out, g = grad_of(lambda x: svd_loss(x, k=k, mask=mask, normalize=normalize), s)
    ref, g_ref = ref_svd_value_and_grad(s.double(), k, mask, normalize)
    assert out.dim() == 0 and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("normalize", ["nuclear", "frobenius"])
def test_svd_bf16(normalize):
    s, _, mask = case("3d_mask", torch.bfloat16)
    out, g = grad_of(lambda x: svd_loss(x, k=2, mask=mask, normalize=normalize), s)
    assert out.dtype == torch.float32 and torch.isfinite(g.float()).all()
    torch.testing.assert_close(out, svd_loss(s.float(), k=2, mask=mask, normalize=normalize))
    ref, _ = ref_svd_value_and_grad(case("3d_mask")[0], 2, mask, normalize)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-2)


def test_svd_frobenius_formula_with_numpy():
    z = make_logits((7, 5), torch.float32)
    sigma = np.linalg.svd(z.double().numpy(), compute_uv=False)
    expected = -sigma[:2].sum() / np.sqrt(np.sum(sigma**2))
    assert svd_loss(z, k=2, normalize="frobenius").item() == pytest.approx(expected, rel=1e-5)
    expected_nuc = -sigma[:2].sum() / sigma.sum()
    assert svd_loss(z, k=2).item() == pytest.approx(expected_nuc, rel=1e-5)


@pytest.mark.parametrize("k", [5, 6, 100])
def test_svd_k_at_least_rank_is_minus_one_nuclear(k):
    z = make_logits((7, 5), torch.float32)
    out, g = grad_of(lambda x: svd_loss(x, k=k), z)
    assert out.item() == -1.0 and torch.equal(g, torch.zeros_like(z))
    torch.testing.assert_close(svd_loss(z, k=k, normalize="frobenius"), svd_loss(z, k=5, normalize="frobenius"))
    out, g = grad_of(lambda x: svd_loss(x, k=k), torch.zeros(7, 5))  # constant even for Z = 0
    assert out.item() == -1.0 and torch.equal(g, torch.zeros(7, 5))


def test_svd_repeated_singular_values():
    eye = torch.eye(4, dtype=torch.float64)
    for normalize, expected in (("nuclear", -0.5), ("frobenius", -1.0)):
        out, g = grad_of(lambda x: svd_loss(x, k=2, normalize=normalize), eye)
        assert out.item() == pytest.approx(expected)
        assert torch.isfinite(g).all()


# --------------------------------------------------------------------------- degenerate inputs


def all_fns():
    """(name, fn(x, mask)) for every loss; mask ignored by the covariance loss."""
    teacher_seed = 77

    def cons(kind):
        return lambda x, m: consistency_loss(x, make_logits(x.shape, x.dtype, teacher_seed), mask=m, kind=kind)

    fns = [(f"consistency_{k}", cons(k)) for k in KINDS]
    fns += [
        ("topk_entropy", lambda x, m: topk_entropy_diversity_loss(x, top_k=3, mask=m)),
        ("svd_nuclear", lambda x, m: svd_loss(x, k=2, mask=m)),
        ("svd_frobenius", lambda x, m: svd_loss(x, k=2, mask=m, normalize="frobenius")),
    ]
    return fns


FNS = all_fns()


@pytest.mark.parametrize("name,fn", FNS, ids=[n for n, _ in FNS])
@pytest.mark.parametrize("shape", [(3, 5, 11), (7, 5)])
def test_all_masked_gives_exact_zero_with_zero_grads(name, fn, shape):
    x = make_logits(shape, torch.float32)
    mask = torch.zeros(shape[:-1], dtype=torch.bool)
    out, g = grad_of(lambda y: fn(y, mask), x)
    assert out.item() == 0.0 and out.dim() == 0
    assert torch.equal(g, torch.zeros_like(x))


def degenerate_inputs():
    row = make_logits((1, 5), torch.float32)
    return {
        "equal_rows": row.expand(6, 5).clone(),
        "zeros": torch.zeros(6, 5),
        "one_row": row.clone(),
        "repeated_sv": torch.cat([torch.eye(4), torch.zeros(2, 4)]) * 3.0,
        "rank_one_3d": torch.ones(2, 3, 5) * torch.arange(5.0),
    }


@pytest.mark.parametrize("inp", list(degenerate_inputs()))
@pytest.mark.parametrize("name,fn", FNS + [("covariance", lambda x, m: covariance_diversity_loss(x))],
                         ids=[n for n, _ in FNS] + ["covariance"])
def test_degenerate_inputs_finite_values_and_grads(name, fn, inp):
    x = degenerate_inputs()[inp]
    if name == "covariance" and x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    out, g = grad_of(lambda y: fn(y, None), x)
    assert torch.isfinite(out) and torch.isfinite(g).all()


def test_zero_matrix_svd_and_single_row_values():
    out, g = grad_of(lambda x: svd_loss(x, k=1), torch.zeros(6, 5))
    assert out.item() == 0.0 and torch.equal(g, torch.zeros(6, 5))
    # One row: rank 1, k=1 covers everything.
    assert svd_loss(make_logits((1, 5), torch.float32), k=1).item() == -1.0
    assert svd_loss(make_logits((1, 5), torch.float32), k=1, normalize="frobenius").item() == pytest.approx(-1.0)


# --------------------------------------------------------------------------- gradcheck


def test_gradcheck_all():
    s, t = make_logits((4, 3), seed=5), make_logits((4, 3), seed=6)
    s3, t3 = make_logits((2, 3, 4), seed=7), make_logits((2, 3, 4), seed=8)
    m3 = torch.tensor([[True, True, False], [True, False, False]])
    s.requires_grad_(True)
    t.requires_grad_(True)
    s3.requires_grad_(True)
    for kind in KINDS:
        assert torch.autograd.gradcheck(lambda a, b: consistency_loss(a, b, kind=kind, temperature=1.3), (s, t))
        assert torch.autograd.gradcheck(lambda a: consistency_loss(a, t3, mask=m3, kind=kind), (s3,))
    assert torch.autograd.gradcheck(covariance_diversity_loss, (s,))
    assert torch.autograd.gradcheck(lambda a: topk_entropy_diversity_loss(a, top_k=2), (s,))
    assert torch.autograd.gradcheck(lambda a: topk_entropy_diversity_loss(a, top_k=3, mask=m3), (s3,))
    for normalize in ("nuclear", "frobenius"):
        assert torch.autograd.gradcheck(lambda a: svd_loss(a, k=1, normalize=normalize), (s,))
        assert torch.autograd.gradcheck(lambda a: svd_loss(a, k=2, mask=m3, normalize=normalize), (s3,))


# --------------------------------------------------------------------------- argument errors


X2, X3 = make_logits((4, 3), torch.float32), make_logits((2, 3, 4), torch.float32)
NAN, INF = X2.clone(), X2.clone()
NAN[1, 1], INF[0, 2] = float("nan"), float("inf")

BAD_CALLS = [
    ("k0", lambda: svd_loss(X2, k=0), "k must be an integer >= 1"),
    ("k_neg", lambda: svd_loss(X2, k=-2), "k must be an integer >= 1"),
    ("k_float", lambda: svd_loss(X2, k=1.5), "k must be an integer >= 1"),
    ("top_k0", lambda: topk_entropy_diversity_loss(X2, top_k=0), "top_k must be an integer >= 1"),
    ("top_k_sum", lambda: topk_entropy_sum(X2, top_k=-1), "top_k must be an integer >= 1"),
    ("temp0", lambda: consistency_loss(X2, X2, temperature=0.0), "temperature must be"),
    ("temp_neg", lambda: consistency_loss(X2, X2, temperature=-1.0, kind="mse"), "temperature must be"),
    ("temp_nan", lambda: consistency_loss(X2, X2, temperature=float("nan")), "temperature must be"),
    ("kind", lambda: consistency_loss(X2, X2, kind="js"), "kind must be one of"),
    ("normalize", lambda: svd_loss(X2, k=1, normalize="spectral"), "normalize must be one of"),
    ("dim1", lambda: topk_entropy_diversity_loss(X2[0]), "logits must be 2-D or 3-D"),
    ("dim4", lambda: svd_loss(X3[None], k=1), "logits must be 2-D or 3-D"),
    ("cons_dim", lambda: consistency_loss(X2[0], X2[0]), "student_logits must be 2-D or 3-D"),
    ("cov_3d", lambda: covariance_diversity_loss(X3), "logits must be 2-D"),
    ("shape_mismatch", lambda: consistency_loss(X2, X2[:3]), "teacher_logits shape"),
    ("mask_shape", lambda: consistency_loss(X3, X3, mask=torch.ones(2, 4, dtype=torch.bool)), "mask must have shape"),
    ("mask_shape_2d", lambda: svd_loss(X2, k=1, mask=torch.ones(3, dtype=torch.bool)), "mask must have shape"),
    ("mask_dtype", lambda: topk_entropy_diversity_loss(X3, mask=torch.ones(2, 3, dtype=torch.long)), "bool tensor"),
    ("mask_list", lambda: svd_loss(X3, k=1, mask=[[True] * 3] * 2), "bool tensor"),
    ("nan", lambda: svd_loss(NAN, k=1), "NaN or inf"),
    ("inf_teacher", lambda: consistency_loss(X2, INF), "teacher_logits contains NaN or inf"),
    ("inf_cov", lambda: covariance_diversity_loss(INF), "NaN or inf"),
    ("not_tensor", lambda: topk_entropy_diversity_loss([[1.0, 2.0]]), "must be a torch.Tensor"),
    ("int_logits", lambda: svd_loss(torch.ones(3, 4, dtype=torch.long), k=1), "floating point"),
]


@pytest.mark.parametrize("call,match", [(c, m) for _, c, m in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
