"""BA-LoRA output-space regularisers (consistency, diversity, SVD).

Pure functions: tensors in, a 0-dim tensor out. Equation numbers refer to the BA-LoRA paper
("Bias-Alleviating Low-Rank Adaptation"):

* eq. 4 / eq. 9  -- consistency between fine-tuned (student) and pre-trained (teacher) logits,
* eq. 5-6        -- covariance (off-diagonal) diversity regulariser for NLU,
* eq. 10-11      -- top-K entropy diversity regulariser for NLG,
* eq. 7 / eq. 12 -- SVD (top-k singular value share) regulariser, nuclear / Frobenius normalised.

Shape conventions: logits are ``(N, D)`` (rows x classes) or ``(B, L, V)`` (batch x length x
vocabulary). A mask is a bool tensor, True = valid: ``(B, L)`` for 3-D logits or ``(N,)`` for
2-D logits. 3-D logits without a mask count every position as valid.

Precision: all math runs in float32 (bf16/fp16 input is cast up); float64 input stays float64
(so ``torch.autograd.gradcheck`` works). The result is a 0-dim tensor of that compute dtype.

Chunking: the per-row losses are means of per-row terms and are built on ``*_sum`` helpers that
return ``(sum_over_valid_rows, count)``; summing the pairs over row blocks and dividing gives the
same value and gradients as the unchunked call.

Degenerate inputs (an all-masked batch, a single row, rank-deficient or all-zero logits) give
finite values and finite gradients; "no valid rows" gives exactly 0, still attached to the graph.
Bad arguments raise a one-line ``ValueError``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from balora.regularizers.common import (
    CONSISTENCY_KINDS,
    EPS,
    SVD_NORMALIZATIONS,
    check_choice,
    check_finite,
    check_int,
    compute_dtype,
    no_autocast,
)

__all__ = [
    "consistency_loss",
    "consistency_loss_sum",
    "consistency_rows_sum",
    "covariance_diversity_loss",
    "neg_topk_entropy_rows_sum",
    "svd_loss",
    "top_singular_value_ratio",
    "topk_entropy_diversity_loss",
    "topk_entropy_sum",
]


# --------------------------------------------------------------------------- validation


def _check_logits(logits, name: str, dims: tuple[int, ...] = (2, 3)) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(logits.shape)}")
    check_finite(logits, name)


def _check_mask(mask, logits: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = valid), got {got}")
    want = tuple(logits.shape[:-1])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape {want} to match logits, got {tuple(mask.shape)}")


def _valid_rows(logits: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(N, D) or (B, L, V) logits -> (M, D) float rows at the valid positions."""
    rows = logits if mask is None else logits[mask.to(logits.device)]
    return rows.reshape(-1, logits.shape[-1]).to(dtype)


# --------------------------------------------------------------------------- consistency


def consistency_rows_sum(s: torch.Tensor, t: torch.Tensor, *, temperature: float, kind: str) -> torch.Tensor:
    """The plain formula: Σ over rows of the per-row consistency term (no checks, no mask).

    Args:
        s: (N, D) student logits Z_F, in the compute dtype.
        t: (N, D) teacher logits Z_P, same shape and dtype.
        temperature: T of eq. 4 / 9 (``kl`` only).
        kind: one of :data:`CONSISTENCY_KINDS`, per row:
            ``kl``             T²·KL(softmax(Z_P/T) ‖ softmax(Z_F/T)) (eq. 4 / 9, the paper);
            ``cosine``         1 − cos(Z_F, Z_P);
            ``mse``            mean over classes of (Z_F − Z_P)², on the raw logits (no temperature:
                               dividing both by T and multiplying by T², as ``kl`` does, gives the
                               same value);
            ``mse_normalized`` mean over classes of (Z_F/‖Z_F‖ − Z_P/‖Z_P‖)², which equals
                               (2/D)·(1 − cos): ``cosine`` scaled by 2/D.

    Returns:
        0-dim sum over the N rows (differentiable in ``s`` and ``t``).
    """
    if kind == "kl":
        log_q = F.log_softmax(s / temperature, dim=-1)  # student F (model)
        log_p = F.log_softmax(t / temperature, dim=-1)  # teacher P (target)
        return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * temperature**2
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).sum()
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1).sum()
    return (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).mean(dim=-1).sum()


@no_autocast()
def consistency_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    kind: str = "kl",
) -> tuple[torch.Tensor, int]:
    """Summed consistency terms over the valid rows, and their count (eq. 4 / eq. 9).

    Args:
        student_logits: (N, D) or (B, L, V) logits Z_F of the model being fine-tuned.
        teacher_logits: same shape, logits Z_P of the frozen pre-trained model. Not detached
            here: compute them under ``torch.no_grad()``.
        temperature: T > 0, used by ``kind="kl"`` only.
        mask: optional (B, L) / (N,) bool, True = valid.
        kind: see :func:`consistency_rows_sum`.

    Returns:
        (0-dim sum over the valid rows, int number of valid rows); ``sum / count`` is
        :func:`consistency_loss`. Sums and counts of row chunks add up to the unchunked pair.
    """
    check_choice(kind, "kind", CONSISTENCY_KINDS)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    _check_mask(mask, student_logits)

    dtype = compute_dtype(student_logits, teacher_logits)
    s = _valid_rows(student_logits, mask, dtype)
    t = _valid_rows(teacher_logits.to(student_logits.device), mask, dtype)
    return consistency_rows_sum(s, t, temperature=temperature, kind=kind), s.shape[0]


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    kind: str = "kl",
) -> torch.Tensor:
    """Consistency regulariser L_CR (eq. 4 for (N, D) logits, eq. 9 for masked (B, L, V) logits).

    The mean over the valid rows of the per-row term of ``kind`` (:func:`consistency_rows_sum`).
    See :func:`consistency_loss_sum` for argument shapes. Returns a 0-dim tensor; 0 (attached
    to the graph) when no position is valid.
    """
    total, count = consistency_loss_sum(
        student_logits, teacher_logits, temperature=temperature, mask=mask, kind=kind
    )
    return total / max(count, 1)


# --------------------------------------------------------------------------- diversity


@no_autocast()
def covariance_diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """Covariance diversity regulariser L_DR for NLU (eq. 5-6).

    Args:
        logits: (N, D) batch of output rows Z.

    Returns:
        0-dim ``(1/D) * sum_{i != j} C_ij^2`` with ``C = Zc^T Zc / (N - 1)`` and ``Zc`` the
        batch-centred logits. For N < 2 the covariance is undefined and the result is 0, still
        attached to the graph (zero gradients).
    """
    _check_logits(logits, "logits", dims=(2,))
    z = logits.to(compute_dtype(logits))
    n, d = z.shape
    if n < 2:
        return z.sum() * 0.0
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)
    off_diag = ~torch.eye(d, dtype=torch.bool, device=z.device)
    return cov.pow(2)[off_diag].sum() / d


def neg_topk_entropy_rows_sum(s: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """The plain formula of eq. 10-11: Σ over rows of Σ_v p_v log p_v, p = softmax of the row's top-K.

    ``s`` is (N, D) in the compute dtype (no checks, no mask); ``top_k > D`` is clamped to D.
    Returns a 0-dim sum (differentiable: the gradient reaches the top-K entries only).
    """
    log_p = F.log_softmax(s.topk(min(top_k, s.shape[-1]), dim=-1).values, dim=-1)
    return (log_p.exp() * log_p).sum()


@no_autocast()
def topk_entropy_sum(
    logits: torch.Tensor, *, top_k: int = 20, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed negative top-K entropies over the valid rows, and the row count (eq. 10-11).

    Args:
        logits: (N, D) or (B, L, V) student logits.
        top_k: K >= 1; K > D is clamped to D.
        mask: optional (B, L) / (N,) bool, True = valid.

    Returns:
        (0-dim sum over valid rows of ``sum_v p_v log p_v`` with p = softmax of the row's top-K
        logits, int number of valid rows). Chunk sums/counts add up to the unchunked pair.
    """
    check_int(top_k, "top_k")
    _check_logits(logits, "logits")
    _check_mask(mask, logits)
    rows = _valid_rows(logits, mask, compute_dtype(logits))
    return neg_topk_entropy_rows_sum(rows, top_k=top_k), rows.shape[0]


def topk_entropy_diversity_loss(
    logits: torch.Tensor, *, top_k: int = 20, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-K entropy diversity regulariser L_DR for NLG (eq. 10-11).

    Per valid row/position: p = softmax over its K largest logits (the probabilities renormalised
    inside the top-K set), term = sum_v p_v log p_v (the negative entropy, so minimising it
    maximises entropy; minimum -log K for uniform top-K logits). Returns the mean over valid
    rows as a 0-dim tensor; 0 (attached to the graph) when nothing is valid. ``top_k > D`` is
    clamped to D. Shapes as in :func:`topk_entropy_sum`.
    """
    total, count = topk_entropy_sum(logits, top_k=top_k, mask=mask)
    return total / max(count, 1)


# --------------------------------------------------------------------------- SVD


@no_autocast()
def svd_loss(
    logits: torch.Tensor,
    *,
    k: int,
    mask: torch.Tensor | None = None,
    normalize: str = "nuclear",
) -> torch.Tensor:
    """SVD regulariser L_SVD (eq. 7 nuclear-normalised, eq. 12 Frobenius-normalised).

    Args:
        logits: (N, D) matrix Z, or (B, L, V) logits whose valid rows form an (M, V) matrix.
        k: number of leading singular values, >= 1; k > min(M, D) is clamped to min(M, D).
        mask: optional (B, L) / (N,) bool, True = valid.
        normalize: ``"nuclear"`` -> -(sum_{i<=k} s_i) / (sum_j s_j) (eq. 7);
            ``"frobenius"`` -> -(sum_{i<=k} s_i) / ||Z||_F (eq. 12).

    Returns:
        0-dim tensor. Edge cases: with k >= min(M, D) the nuclear ratio is the constant -1
        (returned exactly, zero gradients); a denominator <= 1e-8 (e.g. an all-zero matrix) or
        no valid rows gives 0 with zero gradients. Gradients of ``torch.linalg.svdvals`` stay
        finite for repeated singular values.
    """
    check_int(k, "k")
    check_choice(normalize, "normalize", SVD_NORMALIZATIONS)
    _check_logits(logits, "logits")
    _check_mask(mask, logits)
    z = _valid_rows(logits, mask, compute_dtype(logits))
    if z.shape[0] == 0:
        return z.sum() * 0.0
    k = min(k, min(z.shape))
    if normalize == "nuclear" and k == min(z.shape):
        return z.sum() * 0.0 - 1.0
    sigma = torch.linalg.svdvals(z)  # descending
    denom = sigma.sum() if normalize == "nuclear" else torch.linalg.vector_norm(z)
    return top_singular_value_ratio(sigma, denom, k)


def top_singular_value_ratio(sigma: torch.Tensor, denominator: torch.Tensor, k: int) -> torch.Tensor:
    """−Σ_{i≤k} σ_i / denominator (eq. 7 with the nuclear norm, eq. 12 with ‖Z‖_F).

    ``sigma`` (r,) descending singular values, ``denominator`` 0-dim. A denominator <= 1e-8
    (an all-zero matrix) gives 0 with zero gradients instead of a division by ~0.
    """
    ratio = -sigma[:k].sum() / denominator.clamp_min(EPS)
    return torch.where(denominator > EPS, ratio, torch.zeros_like(ratio))
