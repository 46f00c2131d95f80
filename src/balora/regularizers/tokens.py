"""Generation losses over the valid tokens of a batch, from final hidden states and the output head.

A causal LM's logits are Z = H·Wᵀ (+ b): H (M, d) are the final hidden states of the M valid
(response) tokens, W (|V|, d) the output head. BA-LoRA's generation terms (paper eq. 9, 10-11,
12) and the task cross-entropy only ever need Z at valid tokens, and never all of it at once:

* :func:`head_objective` walks the valid tokens in chunks. Each per-token loss is a
  :class:`TokenTerm` that supplies its plain formula (the cross-entropy, the consistency term of
  any kind, eq. 9, the negative top-K entropy, eq. 10-11; the formulas live in
  :mod:`balora.regularizers.formulas`). One mechanism does the chunking for all of them: for each
  chunk it builds the student logits (and the teacher's, from the teacher's hidden states),
  accumulates every term's SUM, and -- when W is a frozen linear map -- also the chunk's gradient
  with respect to H, so nothing of size chunk × |V| survives the chunk (a fused forward/backward
  in the spirit of Liger-Kernel's chunked losses). A term's gradient w.r.t. the logits comes from
  autograd of its formula, or from a closed form where one is cheaper (cross-entropy, KL, top-K
  entropy: measured equal in speed to the former hand-fused kernel, while autograd per chunk cost
  1.8× as much); the tests check each closed form against autograd. The caller divides by M once.
  The result equals the unchunked computation, values and gradients.
* :func:`exact_head_svd_loss` computes eq. 12 EXACTLY on an M × d matrix: with the thin QR
  factorisation W = Q·R (R is d × d, computed once per head), Z = H·Wᵀ = (H·Rᵀ)·Qᵀ and Q has
  orthonormal columns, so Z and H·Rᵀ have the same singular values and the same Frobenius norm.
  A bias is folded in exactly: [H, 1]·[W, b]ᵀ. The authors' code takes the SVD of the M × |V|
  logits instead (|V| = 49,152 for SmolLM2): same numbers, far more work.
* :func:`randomized_svd_loss` is the fallback when the head is trainable or adapted (W changes
  every step, so a QR per step would cost more than it saves): a randomized range finder
  (``torch.svd_lowrank`` with ``oversample`` extra columns and ``niter`` power iterations, on the
  detached logits) gives an orthonormal basis U (M × q); the singular values of Uᵀ·Z (q × |V|)
  approximate the top ones of Z, and are differentiated with ``svdvals`` (finite gradients on
  rank-deficient inputs, unlike differentiating through the QR inside the range finder).

Every sum is taken in fp32 (fp64 inputs stay fp64), whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from balora.regularizers import formulas
from balora.regularizers.common import (
    CONSISTENCY_KINDS,
    IGNORE_INDEX,
    check_choice,
    check_int,
    compute_dtype,
    no_autocast,
)


# ---------------------------------------------------------------------------- token alignment


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift Hugging Face labels to the targets of each position.

    Args:
        labels: (B, T) long, unshifted: ``labels[b, t]`` is the token at position t, or -100
            for prompt and padding tokens.

    Returns:
        (B, T) long: ``targets[b, t] = labels[b, t + 1]`` -- the token the logits at position t
        predict -- and -100 at the last position. The position whose logits predict the first
        response token is therefore valid; the position of the last target token is not.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, sequence), got shape {tuple(labels.shape)}")
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


# ---------------------------------------------------------------------------- the output head


@dataclass
class LinearHead:
    """The output head as a plain linear map: logits = h·Wᵀ + b.

    ``frozen`` is True when neither W nor b receives gradients (the fused path and the exact
    SVD apply); otherwise the generic autograd path and the randomized SVD are used.
    """

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None  # (V,) or None
    frozen: bool

    @classmethod
    def from_module(cls, module: nn.Module) -> "LinearHead | None":
        """A :class:`LinearHead` for an ``nn.Linear`` head, None for anything else (adapted heads)."""
        if type(module) is not nn.Linear:  # noqa: E721 - a LoRA/DoRA-wrapped head is not a plain Linear
            return None
        frozen = not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)
        return cls(module.weight, module.bias, frozen)

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(M, d) hidden -> (M, V) logits in ``dtype``."""
        weight = self.weight.to(dtype)
        if self.bias is None:
            return hidden.to(dtype) @ weight.T
        return torch.addmm(self.bias.to(dtype), hidden.to(dtype), weight.T)


class QRFactorCache:
    """R of the thin QR factorisation of a frozen head's [W, b] (d × d or (d+1) × (d+1)), computed once."""

    def __init__(self):
        self._key = None
        self._r: torch.Tensor | None = None

    def r_factor(self, head: LinearHead) -> torch.Tensor:
        w = head.weight
        key = (w.data_ptr(), tuple(w.shape), w._version, None if head.bias is None else head.bias._version)
        if key != self._key:
            with torch.no_grad():
                full = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
                if head.bias is not None:
                    full = torch.cat([full, head.bias.detach().to(full.dtype)[:, None]], dim=1)
                self._r = torch.linalg.qr(full, mode="r").R  # (d, d) upper triangular
            self._key = key
        return self._r


# ---------------------------------------------------------------------------- chunked objective


@dataclass
class TokenSums:
    """Sums over the M valid tokens (divide by ``count`` for means). Detached, for logging."""

    cross_entropy: float
    consistency: float  # Σ of the per-token consistency term (T²·KL for eq. 9) before the 1/M
    neg_entropy: float  # Σ Σ_v p_v log p_v over the top-K, eq. 10-11 before the 1/M
    count: int


class TokenTerm:
    """One per-token loss of the chunked objective.

    A term supplies its plain formula, :meth:`value` -- a differentiable sum over the C rows of a
    chunk, from the (C, V) student logits ``s``, the (C, V) teacher logits ``t`` (or None) and
    the (C,) targets. That is all the generic path (a trainable head) needs, and all a new term
    has to write. For the fused frozen-head path, :meth:`value_and_add_grad` returns the sum
    (detached) and adds ``weight · d value / d s`` into the chunk's gradient buffer ``g`` in
    place; by default it differentiates :meth:`value` with autograd, and a term may override it
    with a closed form (fewer passes over the C × V chunk, checked against autograd in the tests).
    """

    name = ""
    uses_teacher = False

    def value(self, s: torch.Tensor, t: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value_and_add_grad(self, s, t, targets, g: torch.Tensor, weight: float) -> torch.Tensor:
        """Σ over the chunk (0-dim, detached); ``g += weight · ∂Σ/∂s``. ``t`` may be overwritten."""
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            value = self.value(leaf, t, targets)
            (grad,) = torch.autograd.grad(value, leaf)
        g.add_(grad, alpha=weight)
        return value.detach()


class CrossEntropyTerm(TokenTerm):
    """Σ −log softmax(s)[target]: the task loss. ∂/∂s = softmax(s) − onehot(target)."""

    name = "cross_entropy"

    def value(self, s, t, targets):
        return F.cross_entropy(s, targets, reduction="sum")

    def value_and_add_grad(self, s, t, targets, g, weight):
        rows = torch.arange(s.shape[0], device=s.device)
        lse = torch.logsumexp(s, dim=-1)  # (C,)
        value = (lse - s[rows, targets]).sum()
        g.add_((s - lse[:, None]).exp_(), alpha=weight)
        g[rows, targets] -= weight
        return value


class ConsistencyTerm(TokenTerm):
    """Σ of the per-token consistency term of ``kind`` (eq. 9 for ``kl``; see
    :func:`balora.regularizers.formulas.consistency_rows_sum`). For ``kl``:
    ∂(T²·KL(p ‖ q))/∂s = T·(q − p) with q = softmax(s/T), p = softmax(t/T)."""

    name = "consistency"
    uses_teacher = True

    def __init__(self, kind: str = "kl", temperature: float = 2.0):
        self.kind = check_choice(kind, "consistency kind", CONSISTENCY_KINDS)
        self.temperature = float(temperature)

    def value(self, s, t, targets):
        return formulas.consistency_rows_sum(s, t, temperature=self.temperature, kind=self.kind)

    def value_and_add_grad(self, s, t, targets, g, weight):
        if self.kind != "kl":
            return super().value_and_add_grad(s, t, targets, g, weight)
        temp = self.temperature
        log_p = t.div_(temp)
        log_p -= log_p.logsumexp(-1, keepdim=True)  # in place: t is scratch
        log_q = (s / temp).log_softmax(-1)
        value = (temp**2) * F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        g.add_(log_q.exp_().sub_(log_p.exp_()), alpha=weight * temp)
        return value


class TopKEntropyTerm(TokenTerm):
    """Σ Σ_v p_v log p_v, p = softmax of the row's top-K logits (eq. 10-11).
    ∂/∂s_j = p_j·(log p_j − Σ p log p) on the top-K entries j, 0 elsewhere."""

    name = "neg_entropy"

    def __init__(self, top_k: int = 20):
        self.top_k = check_int(top_k, "top_k")

    def value(self, s, t, targets):
        return formulas.neg_topk_entropy_rows_sum(s, top_k=self.top_k)

    def value_and_add_grad(self, s, t, targets, g, weight):
        top = s.topk(min(self.top_k, s.shape[-1]), dim=-1)
        log_pk = top.values.log_softmax(-1)  # (C, K)
        pk = log_pk.exp()
        neg_ent = (pk * log_pk).sum(-1, keepdim=True)  # (C, 1)
        g.scatter_add_(1, top.indices, pk * (log_pk - neg_ent) * weight)
        return neg_ent.sum()


class _FusedFrozenHead(torch.autograd.Function):
    """Σ over chunks and terms of w·term, with the gradient w.r.t. the student hidden states built
    chunk by chunk in the forward (the head is frozen, so no other gradient is needed): per chunk
    the student logits s (C × V), the teacher logits when a term needs them, each term's value and
    its share of g = Σ w·∂term/∂s, then ∂/∂h = g·W. No C × V tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, targets, weight, bias, terms, chunk_size):
        dtype = compute_dtype(hidden)
        head = LinearHead(weight, bias, frozen=True)
        m, d = hidden.shape
        grad = torch.zeros(m, d, dtype=dtype, device=hidden.device)
        sums = torch.zeros(len(terms), dtype=torch.float64, device=hidden.device)
        w32 = weight.to(dtype)
        for start in range(0, m, chunk_size):
            stop = min(start + chunk_size, m)
            s = head.logits(hidden[start:stop], dtype)  # (C, V)
            g = torch.zeros_like(s)
            for i, (term, w) in enumerate(terms):
                t = head.logits(teacher_hidden[start:stop], dtype) if term.uses_teacher else None
                sums[i] += term.value_and_add_grad(s, t, targets[start:stop], g, w).double()
                del t
            del s
            grad[start:stop] = g @ w32
            del g
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        loss = sum(w * sums[i] for i, (_, w) in enumerate(terms)).to(dtype)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None, None


def _generic_chunks(hidden, targets, head, teacher_logits, terms, chunk_size):
    """Autograd through ``head`` (any module, or a trainable LinearHead), chunk by chunk."""
    dtype = compute_dtype(hidden)
    total = hidden.new_zeros((), dtype=dtype)
    sums = torch.zeros(len(terms), dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:stop]
        s = head.logits(h, dtype) if isinstance(head, LinearHead) else head(h).to(dtype)
        t = None if teacher_logits is None else teacher_logits[start:stop].detach().to(dtype)
        for i, (term, w) in enumerate(terms):
            value = term.value(s, t if term.uses_teacher else None, targets[start:stop])
            total = total + w * value
            sums[i] += float(value.detach())
    return total, sums


@no_autocast()
def head_objective(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: LinearHead | nn.Module,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0),
    temperature: float = 2.0,
    top_k: int = 20,
    consistency_kind: str = "kl",
    chunk_size: int = 1024,
    with_entropy: bool | None = None,
) -> tuple[torch.Tensor, TokenSums]:
    """Weighted sum of token-summed CE, consistency and diversity over the valid tokens, chunked.

    Args:
        hidden: (M, d) student final hidden states at the valid positions (requires grad).
        targets: (M,) long, the next-token targets of those positions (no -100 left).
        head: a frozen :class:`LinearHead` (fused path: per-chunk logits are freed inside the
            chunk) or any module mapping (C, d) -> (C, V) (generic autograd path).
        teacher_hidden: (M, d) teacher hidden states (frozen linear head only: the teacher shares
            the frozen head), or
        teacher_logits: (M, V) teacher logits (generic path). Neither: no consistency term.
        weights: (w_ce, w_consistency, w_entropy) multiplying the three SUMS, e.g. (1/M, λ1/M, λ2/M).
        temperature: T of eq. 9. top_k: K of eq. 10-11.
        consistency_kind: one of :data:`CONSISTENCY_KINDS` (``kl`` = eq. 9).
        chunk_size: tokens per chunk (>= 1).
        with_entropy: compute the top-K entropy (default: when w_entropy != 0).

    Returns:
        (0-dim differentiable loss = Σ_i w_i·sum_i, :class:`TokenSums` for logging). With M = 0
        the loss is 0 and still attached to ``hidden`` (finite, zero gradients).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (M, d) and targets (M,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    check_int(chunk_size, "chunk_size")
    w_ce, w_cr, w_ent = (float(w) for w in weights)
    with_entropy = (w_ent != 0.0) if with_entropy is None else with_entropy
    with_teacher = teacher_hidden is not None or teacher_logits is not None
    terms = [(CrossEntropyTerm(), w_ce)]
    if with_teacher:
        terms.append((ConsistencyTerm(consistency_kind, temperature), w_cr))
    if with_entropy:
        terms.append((TopKEntropyTerm(top_k), w_ent))
    m = hidden.shape[0]
    if m == 0:
        return hidden.sum() * 0.0, TokenSums(0.0, 0.0, 0.0, 0)
    fused = isinstance(head, LinearHead) and head.frozen and teacher_logits is None
    if fused:
        loss, sums = _FusedFrozenHead.apply(
            hidden, None if teacher_hidden is None else teacher_hidden.detach(), targets,
            head.weight.detach(), None if head.bias is None else head.bias.detach(), tuple(terms), chunk_size,
        )
    else:
        if teacher_hidden is not None:
            if not isinstance(head, LinearHead):
                raise ValueError("teacher_hidden needs a LinearHead; pass teacher_logits for other heads")
            teacher_logits = head.logits(teacher_hidden.detach(), compute_dtype(hidden))
        loss, sums = _generic_chunks(hidden, targets, head, teacher_logits, terms, chunk_size)
    by_name = dict(zip((term.name for term, _ in terms), sums.tolist()))
    return loss, TokenSums(by_name["cross_entropy"], by_name.get("consistency", 0.0),
                           by_name.get("neg_entropy", 0.0), m)


# ---------------------------------------------------------------------------- SVD term (eq. 12)


@no_autocast()
def exact_head_svd_loss(hidden: torch.Tensor, head: LinearHead, *, k: int, r_cache: QRFactorCache | None = None) -> torch.Tensor:
    """Eq. 12, −Σ_{i≤k} σ_i(Z) / ‖Z‖_F for Z = H·Wᵀ (+ b), computed exactly on an (M, d) matrix.

    Args:
        hidden: (M, d) hidden states at the valid tokens.
        head: a frozen :class:`LinearHead` (M×|V| logits are never formed).
        k: number of leading singular values (clamped to the rank bound min(M, d)).
        r_cache: reuse R between calls (the head is frozen, so it is computed once).

    Returns:
        0-dim tensor; 0 with zero gradients when M = 0 or Z = 0.
    """
    check_int(k, "k")
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    r = (r_cache or QRFactorCache()).r_factor(head)
    h = hidden.to(r.dtype)
    if head.bias is not None:
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
    small = h @ r.T  # (M, d): same singular values and Frobenius norm as Z
    return formulas.svd_loss(small, k=k, normalize="frobenius")


@no_autocast()
def randomized_svd_loss(logits: torch.Tensor, *, k: int, oversample: int = 10, niter: int = 2) -> torch.Tensor:
    """Eq. 12 with the top-k singular values from a randomized range finder (fallback path).

    Args:
        logits: (M, V) logits Z at the valid tokens (differentiable).
        k: number of leading singular values.
        oversample: extra basis columns beyond k (q = k + oversample, clamped to min(M, V)).
        niter: subspace (power) iterations of ``torch.svd_lowrank``; 2 is its default.

    Returns:
        0-dim tensor; the basis is computed without gradient and the singular values of
        Uᵀ·Z (q × V) carry it, so gradients stay finite on rank-deficient Z.
    """
    check_int(k, "k")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    z = logits.to(compute_dtype(logits))
    q = min(k + oversample, *z.shape)
    with torch.no_grad():
        basis, _, _ = torch.svd_lowrank(z.detach(), q=q, niter=niter)  # (M, q)
    sigma = torch.linalg.svdvals(basis.T @ z)
    return formulas.top_singular_value_ratio(sigma, torch.linalg.vector_norm(z), min(k, q))
