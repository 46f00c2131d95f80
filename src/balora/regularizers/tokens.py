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


@dataclass
class TopKTeacher:
    """A teacher distribution kept sparse: per token its top-K log-probabilities at temperature T
    and the log of the mass left outside them (what :mod:`balora.precomputed_teacher` stores).

    ``indices`` (M, K) long, ``logprobs`` (M, K) float, log softmax(z/T) at those indices;
    ``rest`` (M,) float, log(1 − Σ_K p) (−inf when the top-K hold all the mass).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, *, temperature: float, top_k: int) -> "TopKTeacher":
        """The top-K of log softmax(``logits``/T) of (M, V) logits, and the log of the rest (exact)."""
        check_int(top_k, "top_k")
        log_p = (logits.to(compute_dtype(logits)) / temperature).log_softmax(-1)
        top = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
        rest = log_p.scatter(1, top.indices, float("-inf")).logsumexp(-1)  # stable, not log(1 - Σ p)
        return cls(top.indices, top.values, rest)

    def rounded_to_half(self) -> "TopKTeacher":
        """The log-probabilities rounded to float16 (how a store keeps them) and the rest's mass
        recomputed from the rounded ones (in float64), so the K + 1 buckets still sum to 1: a
        rounding error then moves the KL at second order only, not at first (a near-uniform
        teacher's KL is smaller than the first-order error of float16 log-probabilities)."""
        logprobs = self.logprobs.to(torch.float16)
        left = 1.0 - logprobs.double().exp().sum(-1)
        rest = torch.where(left > 0, left.clamp_min(1e-300).log(), torch.full_like(left, float("-inf")))
        return TopKTeacher(self.indices, logprobs, rest.to(torch.float32))

    def __len__(self) -> int:
        return self.indices.shape[0]

    def rows(self, start: int, stop: int) -> "TopKTeacher":
        return TopKTeacher(self.indices[start:stop], self.logprobs[start:stop], self.rest[start:stop])


class SparseConsistencyTerm(TokenTerm):
    """Σ T²·KL(p ‖ q) of eq. 9 with the teacher p known only through its top-K and the rest's mass:
    the KL between the (K+1)-bucket coarsenings of p and q = softmax(s/T) (the K tokens, and one
    bucket for everything else), which is at most the full KL (data processing) and equals it when
    the top-K hold all the teacher's mass. ``t`` is the chunk's :class:`TopKTeacher`.

    ∂/∂s_j = T·(q_j − p_j) on the teacher's top-K tokens and T·q_j·(1 − p_rest/q_rest) elsewhere.
    """

    name = "consistency"
    uses_teacher = True

    def __init__(self, temperature: float = 2.0):
        self.temperature = float(temperature)

    def _scaled(self, s: torch.Tensor, teacher: TopKTeacher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u = s/T (C, V), lse(u) (C,), log q at the teacher's top-K (C, K), log q_rest (C,)).

        q_rest = 1 − Σ_K q is summed in float64 from the K values (no second pass over the C × V
        chunk); it is clamped at 1e-30 where the student puts all its mass in the teacher's top-K.
        """
        u = s / self.temperature
        lse = u.logsumexp(-1)
        log_q_top = u.gather(1, teacher.indices.long()) - lse[:, None]
        left = 1.0 - log_q_top.double().exp().sum(-1)
        return u, lse, log_q_top, left.clamp_min(1e-30).log().to(u.dtype)

    def _kl(self, teacher: TopKTeacher, log_q_top: torch.Tensor, log_q_rest: torch.Tensor) -> torch.Tensor:
        log_p, rest = teacher.logprobs.to(log_q_top.dtype), teacher.rest.to(log_q_top.dtype)
        top = (log_p.exp() * (log_p - log_q_top)).sum(-1)
        p_rest = rest.exp()
        tail = torch.where(p_rest > 0, p_rest * (rest - log_q_rest), torch.zeros_like(p_rest))
        return (self.temperature**2) * (top + tail).sum()

    def value(self, s, t, targets):
        _, _, log_q_top, log_q_rest = self._scaled(s, t)
        return self._kl(t, log_q_top, log_q_rest)

    def value_and_add_grad(self, s, t, targets, g, weight):
        u, lse, log_q_top, log_q_rest = self._scaled(s, t)
        value = self._kl(t, log_q_top, log_q_rest)
        rest = t.rest.to(u.dtype)
        scale = 1.0 - torch.where(rest > float("-inf"), (rest - log_q_rest).exp(), torch.zeros_like(rest))
        q = u.sub_(lse[:, None]).exp_().mul_(scale[:, None])  # (C, V) in place: q·(1 − p_rest/q_rest)
        top_grad = log_q_top.exp() - t.logprobs.to(u.dtype).exp()  # (C, K): q − p on the top-K
        q.scatter_(1, t.indices.long(), top_grad)
        g.add_(q, alpha=weight * self.temperature)
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
    def forward(ctx, hidden, teacher_hidden, teacher_topk, targets, weight, bias, terms, chunk_size):
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
                t = None
                if term.uses_teacher:
                    t = (teacher_topk.rows(start, stop) if teacher_topk is not None
                         else head.logits(teacher_hidden[start:stop], dtype))
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
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def _generic_chunks(hidden, targets, head, teacher_logits, terms, chunk_size, teacher_topk=None):
    """Autograd through ``head`` (any module, or a trainable LinearHead), chunk by chunk."""
    dtype = compute_dtype(hidden)
    total = hidden.new_zeros((), dtype=dtype)
    sums = torch.zeros(len(terms), dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:stop]
        s = head.logits(h, dtype) if isinstance(head, LinearHead) else head(h).to(dtype)
        if teacher_topk is not None:
            t = teacher_topk.rows(start, stop)
        else:
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
    teacher_topk: TopKTeacher | None = None,
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
        teacher_logits: (M, V) teacher logits (generic path), or
        teacher_topk: the teacher's top-K log-probabilities at temperature T and the rest's mass
            (a precomputed teacher, :class:`TopKTeacher` of M rows): the consistency term is then
            the bucketed KL of :class:`SparseConsistencyTerm` (``kl`` only). None of the three:
            no consistency term.
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
    if sum(x is not None for x in (teacher_hidden, teacher_logits, teacher_topk)) > 1:
        raise ValueError("pass one of teacher_hidden, teacher_logits and teacher_topk")
    terms = [(CrossEntropyTerm(), w_ce)]
    if teacher_topk is not None:
        if consistency_kind != "kl":
            raise ValueError(f"a top-K teacher supports consistency_kind='kl' only, got {consistency_kind!r}")
        if len(teacher_topk) != hidden.shape[0]:
            raise ValueError(f"teacher_topk has {len(teacher_topk)} rows for {hidden.shape[0]} tokens")
        terms.append((SparseConsistencyTerm(temperature), w_cr))
    elif teacher_hidden is not None or teacher_logits is not None:
        terms.append((ConsistencyTerm(consistency_kind, temperature), w_cr))
    if with_entropy:
        terms.append((TopKEntropyTerm(top_k), w_ent))
    m = hidden.shape[0]
    if m == 0:
        return hidden.sum() * 0.0, TokenSums(0.0, 0.0, 0.0, 0)
    fused = isinstance(head, LinearHead) and head.frozen and teacher_logits is None
    if fused:
        loss, sums = _FusedFrozenHead.apply(
            hidden, None if teacher_hidden is None else teacher_hidden.detach(), teacher_topk, targets,
            head.weight.detach(), None if head.bias is None else head.bias.detach(), tuple(terms), chunk_size,
        )
    else:
        if teacher_hidden is not None:
            if not isinstance(head, LinearHead):
                raise ValueError("teacher_hidden needs a LinearHead; pass teacher_logits for other heads")
            teacher_logits = head.logits(teacher_hidden.detach(), compute_dtype(hidden))
        loss, sums = _generic_chunks(hidden, targets, head, teacher_logits, terms, chunk_size, teacher_topk)
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
