"""Generation losses over the valid tokens of a batch, from final hidden states and the output head.

A causal LM's logits are Z = H·Wᵀ (+ b): H (M, d) are the final hidden states of the M valid
(response) tokens, W (|V|, d) the output head. BA-LoRA's generation terms (paper eq. 9, 10-11,
12) and the task cross-entropy only ever need Z at valid tokens, and never all of it at once:

* :func:`head_objective` walks the valid tokens in chunks. For each chunk it builds the student
  logits (and the teacher's, from the teacher's hidden states), computes the cross-entropy, the
  token KL (·T²) and the negative top-K entropy, accumulates their SUMS, and -- when W is a frozen
  linear map -- also the chunk's gradient with respect to H, so nothing of size chunk × |V|
  survives the chunk (a fused forward/backward in the spirit of Liger-Kernel's fused linear
  losses). The caller divides by M once. The result equals the unchunked computation, values
  and gradients (tests compare against a naive reference).
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

from balora.regularizers import formulas as losses

IGNORE_INDEX = -100
_SVD_EPS = 1e-8


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
    consistency: float  # Σ T²·KL(p_teacher ‖ q_student), eq. 9 before the 1/M
    neg_entropy: float  # Σ Σ_v p_v log p_v over the top-K, eq. 10-11 before the 1/M
    count: int


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_terms(s, t_logits, targets, temperature, top_k, with_entropy):
    """Differentiable per-chunk sums (ce, kl, neg_entropy) from (C, V) student logits ``s``."""
    ce = F.cross_entropy(s, targets, reduction="sum")
    kl = s.new_zeros(())
    if t_logits is not None:
        kl, _ = losses.consistency_loss_sum(s, t_logits, temperature=temperature, kind="kl")
    ent = s.new_zeros(())
    if with_entropy:
        ent, _ = losses.topk_entropy_sum(s, top_k=top_k)
    return ce, kl, ent


class _FusedFrozenHeadObjective(torch.autograd.Function):
    """Σ over chunks of w_ce·CE + w_kl·T²·KL + w_ent·(−H_topK), with the gradient w.r.t. the student
    hidden states computed chunk by chunk in the forward (W frozen, so no other gradient is needed).

    Per chunk of C tokens, with s = student logits, q = softmax(s/T), p = softmax(teacher/T):
      d CE/ds          = softmax(s) − onehot(target)
      d (T²·KL)/ds     = T·(q − p)
      d (Σ pk log pk)/ds_j = pk_j·(log pk_j − Σ pk log pk)   on the top-K entries j, 0 elsewhere
    and d/dh = (Σ_terms w·d/ds) · W.
    """

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, targets, weight, bias, w_ce, w_kl, w_ent, temperature, top_k,
                chunk_size, with_entropy):
        dtype = _compute_dtype(hidden)
        head = LinearHead(weight, bias, frozen=True)
        m, d = hidden.shape
        grad = torch.zeros(m, d, dtype=dtype, device=hidden.device)
        sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        w32 = weight.to(dtype)
        for start in range(0, m, chunk_size):
            stop = min(start + chunk_size, m)
            s = head.logits(hidden[start:stop], dtype)  # (C, V)
            rows = torch.arange(stop - start, device=s.device)
            tgt = targets[start:stop]
            # cross-entropy: its gradient softmax(s) - onehot is built in place in g
            lse = torch.logsumexp(s, dim=-1)  # (C,)
            sums[0] += (lse - s[rows, tgt]).sum().double()
            g = (s - lse[:, None]).exp_().mul_(w_ce)  # (C, V)
            g[rows, tgt] -= w_ce
            del lse
            if teacher_hidden is not None:
                log_p = (head.logits(teacher_hidden[start:stop], dtype) / temperature).log_softmax(-1)
                log_q = (s / temperature).log_softmax(-1)
                sums[1] += (temperature**2) * F.kl_div(log_q, log_p, reduction="sum", log_target=True).double()
                g.add_(log_q.exp_().sub_(log_p.exp_()), alpha=w_kl * temperature)
                del log_p, log_q
            if with_entropy:
                top = s.topk(min(top_k, s.shape[-1]), dim=-1)
                log_pk = top.values.log_softmax(-1)  # (C, K)
                pk = log_pk.exp()
                neg_ent = (pk * log_pk).sum(-1, keepdim=True)  # (C, 1)
                sums[2] += neg_ent.sum().double()
                g.scatter_add_(1, top.indices, pk * (log_pk - neg_ent) * w_ent)
            del s
            grad[start:stop] = g @ w32
            del g
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        loss = (w_ce * sums[0] + w_kl * sums[1] + w_ent * sums[2]).to(dtype)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None, None, None, None, None, None, None


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
        weights: (w_ce, w_kl, w_ent) multiplying the three SUMS, e.g. (1/M, λ1/M, λ2/M).
        temperature: T of eq. 9. top_k: K of eq. 10-11.
        chunk_size: tokens per chunk (>= 1).
        with_entropy: compute the top-K entropy (default: when w_ent != 0).

    Returns:
        (0-dim differentiable loss = Σ_i w_i·sum_i, :class:`TokenSums` for logging). With M = 0
        the loss is 0 and still attached to ``hidden`` (finite, zero gradients).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (M, d) and targets (M,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    w_ce, w_kl, w_ent = (float(w) for w in weights)
    with_entropy = (w_ent != 0.0) if with_entropy is None else with_entropy
    m = hidden.shape[0]
    if m == 0:
        return hidden.sum() * 0.0, TokenSums(0.0, 0.0, 0.0, 0)
    if isinstance(head, LinearHead) and head.frozen and teacher_logits is None:
        loss, sums = _FusedFrozenHeadObjective.apply(
            hidden, None if teacher_hidden is None else teacher_hidden.detach(), targets,
            head.weight.detach(), None if head.bias is None else head.bias.detach(),
            w_ce, w_kl, w_ent, float(temperature), int(top_k), chunk_size, with_entropy,
        )
        s = sums.tolist()
        return loss, TokenSums(s[0], s[1], s[2], m)
    if teacher_hidden is not None:
        if not isinstance(head, LinearHead):
            raise ValueError("teacher_hidden needs a LinearHead; pass teacher_logits for other heads")
        teacher_logits = head.logits(teacher_hidden.detach(), _compute_dtype(hidden))
    total = hidden.new_zeros((), dtype=_compute_dtype(hidden))
    sums = [0.0, 0.0, 0.0]
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        h = hidden[start:stop]
        s = head.logits(h, _compute_dtype(hidden)) if isinstance(head, LinearHead) else head(h).to(_compute_dtype(hidden))
        t = None if teacher_logits is None else teacher_logits[start:stop].detach()
        terms = _chunk_terms(s, t, targets[start:stop], temperature, top_k, with_entropy)
        total = total + w_ce * terms[0] + w_kl * terms[1] + w_ent * terms[2]
        for i, value in enumerate(terms):
            sums[i] += float(value.detach())
    return total, TokenSums(sums[0], sums[1], sums[2], m)


# ---------------------------------------------------------------------------- SVD term (eq. 12)


def _frobenius_ratio(sigma: torch.Tensor, frobenius: torch.Tensor, k: int) -> torch.Tensor:
    ratio = -sigma[:k].sum() / frobenius.clamp_min(_SVD_EPS)
    return torch.where(frobenius > _SVD_EPS, ratio, torch.zeros_like(ratio))


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
    losses._check_int(k, "k")
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    r = (r_cache or QRFactorCache()).r_factor(head)
    h = hidden.to(r.dtype)
    if head.bias is not None:
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
    small = h @ r.T  # (M, d): same singular values and Frobenius norm as Z
    return losses.svd_loss(small, k=k, normalize="frobenius")


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
    losses._check_int(k, "k")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    z = logits.to(_compute_dtype(logits))
    q = min(k + oversample, *z.shape)
    with torch.no_grad():
        basis, _, _ = torch.svd_lowrank(z.detach(), q=q, niter=niter)  # (M, q)
    sigma = torch.linalg.svdvals(basis.T @ z)
    return _frobenius_ratio(sigma, torch.linalg.vector_norm(z), min(k, q))
