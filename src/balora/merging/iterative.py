"""I-LoRA's iterative merging, as tensor functions: truncate each task update ΔW_i = s_i·B_i·A_i by
SVD, merge the truncated updates pairwise, ((ΔW_1 ⊕ ΔW_2) ⊕ ΔW_3) ⊕ …, and refactor the merge into
LoRA factors of a chosen rank.

The full text of I-LoRA is not available; what is implemented is what its public summaries agree on
(ρ = 0.8 of the singular values kept, ⊕ = the element-wise entry of larger magnitude). Where a
detail is open it is an option, with the choice documented here:

* the rank a proportion ρ applies to (``retain_by="rank"``) is the NUMERICAL rank of ΔW_i
  (:func:`numerical_rank`): for a trained adapter whose factors have full rank it is the stored rank
  (r, or 2r for an adapter converted from PiSSA-style inits), and an update that is exactly zero at
  a layer (B never trained, or a converted adapter whose layer did not move) has rank 0 and
  contributes nothing, instead of keeping ⌈ρ·r⌉ components of rounding noise;
* ``retain_by="energy"`` keeps the smallest k with Σ_{j≤k} σ_j² ≥ ρ·Σ_j σ_j²;
* ⊕ on a tie of magnitudes (x and −x) keeps the positive entry: ⊕ is then the maximum under the
  total order (|x|, x), so it is commutative, associative and idempotent even with ties;
* ``mean`` is the plain mean over the n updates, (1/n)·Σ ΔW_i, computed pairwise as the running
  mean m_k = m_{k−1} + (ΔW_k − m_{k−1})/k. The running PAIRWISE mean ((ΔW_1+ΔW_2)/2 + ΔW_3)/2
  would weight the last adapters most (1/4, 1/4, 1/2) and depend on the order, so it is not used.

Every function takes and returns float tensors; the SVDs run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from balora.merging.adapters import MergedLora, TaskAdapter

__all__ = [
    "DEFAULT_RETAIN",
    "MERGE_FUNCTIONS",
    "RETAIN_BY",
    "Factors",
    "kept_components",
    "low_rank_svd",
    "merge_max",
    "merge_updates",
    "iterative_merge",
    "numerical_rank",
    "refactor",
    "truncate",
]

#: ρ, the proportion of singular values I-LoRA keeps (0.8, as the method's summaries and the
#: ablation plan report; the plan sweeps 0.7, 0.8 and 0.9).
DEFAULT_RETAIN = 0.8
#: How ρ is read: a proportion of the rank (by count) or of the squared singular values (energy).
RETAIN_BY = ("rank", "energy")
#: ⊕: element-wise larger magnitude (I-LoRA), plain mean over n, or sum (task arithmetic).
MERGE_FUNCTIONS = ("max", "mean", "sum")

_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Factors:
    """A thin SVD ΔW = U·diag(S)·Vᵀ: ``u`` (out, k), ``s`` (k,) descending, ``v`` (in, k), float64."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    def dense(self, k: int | None = None) -> torch.Tensor:
        """U_k·diag(S_k)·V_kᵀ (out, in) of the ``k`` leading components (None: all)."""
        k = self.s.numel() if k is None else k
        return (self.u[:, :k] * self.s[:k]) @ self.v[:, :k].T


def low_rank_svd(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> Factors:
    """The thin SVD of ΔW = scaling·B·A without forming ΔW: ``lora_b`` (out, r), ``lora_a`` (r, in).

    With B = Q_b·R_b and Aᵀ = Q_a·R_a (reduced QR), ΔW = Q_b·(scaling·R_b·R_aᵀ)·Q_aᵀ, so the SVD of
    the small core (at most r × r) gives ΔW's: U = Q_b·U_c, V = Q_a·V_c. Returns min(out, in, r)
    components (zeros included).
    """
    q_b, r_b = torch.linalg.qr(lora_b.double())  # (out, m), (m, r)
    q_a, r_a = torch.linalg.qr(lora_a.double().T)  # (in, n), (n, r)
    u_c, s, vh_c = torch.linalg.svd(scaling * (r_b @ r_a.T), full_matrices=False)  # core (m, n)
    return Factors(q_b @ u_c, s, q_a @ vh_c.T)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], scale: float | None = None) -> int:
    """The number of singular values ``s`` above max(out, in)·ε·scale (numpy's ``matrix_rank`` rule,
    ε the float64 epsilon the SVDs run in).

    ``scale`` defaults to σ_1; for a product s·B·A pass s·‖B‖_F·‖A‖_F, an upper bound of σ_1 that
    stays large when B·A cancels to zero (a converted adapter whose layer did not move), so that an
    exactly zero update has rank 0 rather than the rank of its rounding noise.
    """
    if s.numel() == 0:
        return 0
    scale = float(s.max()) if scale is None else scale
    return int((s > max(shape) * _EPS * scale).sum())


def kept_components(s: torch.Tensor, retain: float, retain_by: str = "rank", rank: int | None = None) -> int:
    """How many leading components of the singular values ``s`` (descending) a proportion ``retain``
    (ρ in (0, 1]) keeps, among the first ``rank`` (None: all of ``s``).

    ``"rank"``: ⌈ρ·rank⌉; ``"energy"``: the smallest k with Σ_{j≤k} σ_j² ≥ ρ·Σ_{j≤rank} σ_j². A
    rank of 0 keeps 0.
    """
    if not 0.0 < retain <= 1.0:
        raise ValueError(f"retain must be in (0, 1], got {retain}")
    rank = s.numel() if rank is None else rank
    if rank == 0:
        return 0
    if retain_by == "rank":
        # the 1e-9 keeps ρ·rank that is an integer in exact arithmetic (0.7·10) from rounding up
        return max(1, math.ceil(retain * rank - 1e-9))
    if retain_by == "energy":
        energy = torch.cumsum(s[:rank].double() ** 2, dim=0)  # (rank,)
        # the same cumulative sum is the total, so ρ = 1 keeps every component that adds energy
        return int(torch.searchsorted(energy, retain * energy[-1])) + 1
    raise ValueError(f"retain_by must be one of {', '.join(RETAIN_BY)}, got {retain_by!r}")


def truncate(factors: Factors, retain: float, retain_by: str = "rank", rank: int | None = None
             ) -> tuple[torch.Tensor, int]:
    """``(ΔW_k, k)``: the dense (out, in) update of the components :func:`kept_components` keeps."""
    k = kept_components(factors.s, retain, retain_by, rank)
    return factors.dense(k), k


def merge_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊕ b, element by element the entry of larger magnitude with its sign; on |a| = |b| the larger
    value (the positive one of x, −x), so ⊕ is the maximum under the order (|x|, x): commutative,
    associative and idempotent."""
    take_a = (a.abs() > b.abs()) | ((a.abs() == b.abs()) & (a >= b))
    return torch.where(take_a, a, b)


def merge_updates(updates: Iterable[torch.Tensor], merge_fn: str = "max") -> torch.Tensor:
    """The pairwise iterative merge ((u_1 ⊕ u_2) ⊕ u_3) ⊕ … of same-shape updates.

    ``"max"``: :func:`merge_max`; ``"sum"``: u_1 + u_2 + …; ``"mean"``: the plain mean over n, as the
    running mean m_k = m_{k−1} + (u_k − m_{k−1})/k. The updates are consumed one at a time, so only
    the running result and the current update are held.
    """
    if merge_fn not in MERGE_FUNCTIONS:
        raise ValueError(f"merge_fn must be one of {', '.join(MERGE_FUNCTIONS)}, got {merge_fn!r}")
    merged = None
    for k, update in enumerate(updates, start=1):
        if merged is None:
            merged = update.clone()
        elif merge_fn == "max":
            merged = merge_max(merged, update)
        elif merge_fn == "sum":
            merged = merged + update
        else:
            merged = merged + (update - merged) / k
    if merged is None:
        raise ValueError("no updates to merge")
    return merged


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """LoRA factors of a dense update ``delta`` (out, in) at (at most) ``rank``: ``(B, A, R, residual)``.

    With delta = U·diag(S)·Vᵀ, B = U_R·diag(√S_R) (out, R) and A = diag(√S_R)·V_Rᵀ (R, in), so that
    B·A is the best rank-R approximation and the adapter's scaling is 1 (lora_alpha = R). R is
    ``rank`` capped at min(out, in) and at the numerical rank of ``delta`` (components beyond it are
    rounding noise), and at least 1 (an all-zero update gives zero factors of rank 1).
    ``residual`` = ‖delta − B·A‖_F / ‖delta‖_F (0 for an all-zero update), float64 factors.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, m), (m,), (m, in)
    r = max(1, min(rank, numerical_rank(s, tuple(delta.shape))))
    root = s[:r].sqrt()  # (R,)
    total = float((s ** 2).sum())
    residual = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    return u[:, :r] * root, root[:, None] * vh[:r], r, residual


def _truncated_updates(adapters: Sequence[TaskAdapter], module: str, retain: float, retain_by: str,
                       ranks: list[int], kept: list[int]) -> Iterator[torch.Tensor]:
    """The truncated ΔW_i of one layer, adapter after adapter (their numerical and kept ranks are
    appended to ``ranks`` and ``kept``)."""
    for adapter in adapters:
        lora_b, lora_a = adapter.lora[module]
        scaling = adapter.scaling[module]
        factors = low_rank_svd(lora_b, lora_a, scaling)
        norms = torch.linalg.matrix_norm(lora_b.double()) * torch.linalg.matrix_norm(lora_a.double())  # Frobenius
        bound = abs(scaling) * float(norms)  # ≥ σ_1 of ΔW, whatever cancels in B·A
        rank = numerical_rank(factors.s, (lora_b.shape[0], lora_a.shape[1]), scale=bound)
        update, k = truncate(factors, retain, retain_by, rank)
        ranks.append(rank)
        kept.append(k)
        yield update


def iterative_merge(adapters: Sequence[TaskAdapter], *, retain: float = DEFAULT_RETAIN, retain_by: str = "rank",
                    merge_fn: str = "max", rank: int | None = None) -> MergedLora:
    """I-LoRA's merge of ``adapters``, layer by layer: each ΔW_i = s_i·B_i·A_i truncated to the
    proportion ``retain`` of its singular values (:func:`truncate`, ``retain_by`` rank or energy), the
    truncated updates merged pairwise with ``merge_fn`` (:func:`merge_updates`), the result refactored
    (:func:`refactor`) at ``rank`` (None: the sum of the truncated ranks), capped at min(out, in).

    ``layers`` of the result records per layer the inputs' numerical ranks, the kept ranks, the
    merged rank and the relative residual of the refactor.
    """
    lora, layers = {}, {}
    for module in adapters[0].lora:
        ranks, kept = [], []
        merged = merge_updates(_truncated_updates(adapters, module, retain, retain_by, ranks, kept), merge_fn)
        lora_b, lora_a, r, residual = refactor(merged, min(rank or sum(kept), *merged.shape))
        lora[module] = (lora_b, lora_a)
        layers[module] = {"input_ranks": ranks, "kept_ranks": kept, "rank": r, "residual": residual}
    return MergedLora.with_unit_scaling(lora, layers)
