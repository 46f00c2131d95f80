"""λ calibration by gradient shares (paper D.1, step 1, automated).

The paper's recipe for a new model and task: choose λ1, λ2, λ3 so that, on a small calibration
batch, each regulariser's gradient is "roughly commensurate" with the task loss's, then keep
their ratios and tune one global scale on a validation split. This module measures what that
needs and proposes the λs.

What is measured
----------------
For each calibration batch b, on the trainable parameters θ (the adapter):

* g_task = ∇θ L_task(b);
* g_i = ∇θ L_i(b) for each regulariser i ∈ {consistency, diversity, svd} at unit weight (the
  objective run with λ_i = 1 and the others 0, minus g_task: the objective is linear in λ).

The gradient share of term i under weight λ_i is ``share_i = λ_i·‖g_i‖ / ‖g_task‖`` (norms
averaged over the batches).

At step 0 the student equals the teacher, the consistency term sits at its minimum and its
gradient is exactly 0 (eq. 4/9), so measuring there would propose an infinite λ1. The model is
therefore first moved off the pre-trained point by ``drift_steps`` task-only AdamW steps at the
run's learning rate (default 10), measured there, and then put back exactly as it was: the
trainable parameters and the torch RNG state are restored, so calibration does not change the
run that follows.

What is proposed
----------------
``target_share`` ρ is the gradient share of the three regularisers together. Its default,
:data:`DEFAULT_TARGET_SHARE` = 0.1, is what the paper's classification λs give on the demo task
(MiniLM-L6 on Reuters R8, rank 8, after 10 drift steps: consistency 0.100, SVD 0.006,
covariance diversity 0.00001, total 0.106), so ``scale`` proposes about the paper's values there
and rescales them where a model or task makes the terms pull harder or softer. ρ is distributed
by one of two modes:

* ``scale`` (default; D.1 "keep the ratios"): one factor c multiplies the configured λs (the
  paper's when not set) so that the shares add up to ρ: λ_i ← c·λ_i, c = ρ / Σ_i share_i.
* ``shares``: each term gets its own λ so that its share is ρ·λ_i/Σ_j λ_j (the configured λs
  set the split of ρ, in gradient space instead of λ space). This is how the consistency-loss
  ablation gives every consistency kind a comparable pull.

``terms`` (``regularizers.calibration_terms``, ``balora calibrate --terms``) limits the
calibration to some terms: ρ is then the share of those terms together, distributed among them
by the mode, and every other term keeps its configured λ (its share is measured and reported,
not changed). The consistency-loss ablation calibrates λ1 alone, so that the consistency kinds
differ in nothing but their loss and its weight.

A term whose unit-λ gradient is below 10⁻⁶ of the task's (the consistency term without drift
steps, an SVD term with k ≥ the rank of the logits) keeps its configured λ and is flagged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from balora.objectives.lambdas import LambdaWeights

__all__ = ["CALIBRATION_MODES", "DEFAULT_TARGET_SHARE", "Calibration", "TERMS", "calibrate_for_run",
           "calibrate_objective", "calibrate_run"]

logger = logging.getLogger("balora")

TERMS = ("consistency", "diversity", "svd")
CALIBRATION_MODES = ("scale", "shares")
DEFAULT_TARGET_SHARE = 0.1
_FLAT = 1e-6  # a unit-λ gradient norm below this fraction of the task's is "no gradient"
_ZERO_GRAD = 1e-12
_PRECISE_RATIO = 10.0  # ‖g_task‖ / ‖λ·g_term‖ above this: measure again with a larger probe λ
_MAX_PROBE_WEIGHT = 1e6


@dataclass
class Calibration:
    """The measured gradient norms and the proposed λs.

    ``configured``: the λs the run would use (config or paper defaults); ``shares``: their
    gradient shares; ``proposed``: the calibrated λs; ``flat``: terms without a gradient.
    """

    task_grad_norm: float
    term_grad_norms: dict[str, float]
    configured: dict[str, float]
    shares: dict[str, float]
    proposed: dict[str, float]
    mode: str
    target_share: float
    drift_steps: int
    batches: int
    flat: list[str] = field(default_factory=list)

    def proposed_shares(self) -> dict[str, float]:
        """The gradient share of each term under the proposed λs."""
        return {t: self.proposed[t] * self.term_grad_norms[t] / self.task_grad_norm for t in self.proposed}

    def table(self) -> str:
        """A Markdown table: λ configured, its share, λ proposed, its share."""
        new_shares = self.proposed_shares()
        rows = ["| term | ‖g‖ at λ=1 | λ configured | share | λ proposed | share |", "|---|---|---|---|---|---|"]
        for t in self.proposed:
            flag = " (no gradient)" if t in self.flat else ""
            rows.append(f"| {t}{flag} | {self.term_grad_norms[t]:.4g} | {self.configured[t]:.4g} | "
                        f"{self.shares[t]:.3f} | {self.proposed[t]:.4g} | {new_shares[t]:.3f} |")
        rows.append(f"| task | {self.task_grad_norm:.4g} | | 1 | | 1 |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "task_grad_norm": self.task_grad_norm, "term_grad_norms": self.term_grad_norms,
            "configured": self.configured, "shares": self.shares, "proposed": self.proposed,
            "proposed_shares": self.proposed_shares(), "mode": self.mode,
            "target_share": self.target_share, "drift_steps": self.drift_steps, "batches": self.batches,
            "flat": self.flat,
        }


def _grad_norm(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _norm(grads: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _term_norm(model, objective, batch, term: str, params, g_task, task_norm: float, rng) -> float:
    """‖∇ L_term‖ at unit λ, as (∇(L_task + λ·L_term) − ∇L_task) / λ.

    λ = 1 first; when the term's gradient is much smaller than the task's, the difference loses
    float32 digits, so it is measured again with λ ≈ ‖g_task‖ / ‖g_term‖ (the loss is linear in λ).
    """
    weight, value = 1.0, 0.0
    for _ in range(2):
        objective.weights = LambdaWeights(**{term: weight})
        torch.random.set_rng_state(rng)
        loss, _ = objective(model, batch)
        g_total = _grad_norm(loss, params)
        value = _norm(a - b for a, b in zip(g_total, g_task)) / weight
        if value < _ZERO_GRAD or task_norm <= _PRECISE_RATIO * value * weight:
            break
        weight = min(task_norm / value, _MAX_PROBE_WEIGHT)
    return value


def _check_options(mode: str, target_share: float, drift_steps: int) -> None:
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    if isinstance(target_share, bool) or not isinstance(target_share, (int, float)) \
            or not math.isfinite(target_share) or target_share <= 0:
        raise ValueError(f"target_share must be a finite number > 0, got {target_share!r}")
    if isinstance(drift_steps, bool) or not isinstance(drift_steps, int) or drift_steps < 0:
        raise ValueError(f"drift_steps must be an integer >= 0, got {drift_steps!r}")


def calibrate_objective(
    model: nn.Module,
    objective,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    drift_batches: Sequence[Mapping[str, torch.Tensor]] = (),
    learning_rate: float = 1e-4,
    mode: str = "scale",
    target_share: float = DEFAULT_TARGET_SHARE,
    terms: Sequence[str] | None = None,
) -> Calibration:
    """Measure the gradient shares of ``objective``'s regularisers on ``model`` and propose λs.

    Args:
        model: the model with its adapter, as the run built it (trainable = what the optimiser updates).
        objective: a regularised objective (``objective.config`` not None) with its teacher.
        batches: the calibration batches (model inputs with labels).
        drift_batches: task-only AdamW steps taken first (one per batch), undone afterwards.
        learning_rate: the drift steps' learning rate (the run's).
        mode, target_share: see the module docstring.
        terms: the terms to calibrate (see the module docstring); None: every term with λ > 0.
    """
    _check_options(mode, target_share, len(drift_batches))
    if terms is not None and (not terms or any(t not in TERMS for t in terms)):
        raise ValueError(f"calibration terms must be among {', '.join(TERMS)}, got {list(terms)}")
    if getattr(objective, "config", None) is None:
        raise ValueError("calibration needs a regularised method (a '+reg' method such as balora)")
    if not batches:
        raise ValueError("calibration needs at least one batch")
    configured = {t: float(getattr(objective.weights, t)) for t in TERMS}
    active = [t for t in TERMS if configured[t] > 0]
    if not active:
        raise ValueError("every λ is 0: nothing to calibrate")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")

    saved_params = [p.detach().clone() for p in params]
    saved_rng = torch.random.get_rng_state()
    saved_weights, was_training = objective.weights, model.training
    model.train()
    try:
        objective.weights = LambdaWeights()  # task loss only
        if drift_batches:
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
            for batch in drift_batches:
                loss, _ = objective(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del optimizer
        task_norms, term_norms = [], {t: [] for t in active}
        for batch in batches:
            objective.weights = LambdaWeights()
            rng = torch.random.get_rng_state()  # the same dropout masks for every pass over a batch
            loss, _ = objective(model, batch)
            g_task = _grad_norm(loss, params)
            task_norms.append(_norm(g_task))
            for t in active:
                term_norms[t].append(_term_norm(model, objective, batch, t, params, g_task, task_norms[-1], rng))
    finally:
        objective.weights = saved_weights
        with torch.no_grad():
            for p, value in zip(params, saved_params):
                p.copy_(value)
        torch.random.set_rng_state(saved_rng)
        model.train(was_training)

    task_norm = sum(task_norms) / len(task_norms)
    if not task_norm > 0:
        raise ValueError("the task loss has no gradient on the calibration batches")
    norms = {t: sum(v) / len(v) for t, v in term_norms.items()}
    flat = [t for t in active if norms[t] < _FLAT * task_norm]
    shares = {t: configured[t] * norms[t] / task_norm for t in active}
    chosen = list(active) if terms is None else [t for t in active if t in terms]
    if not chosen:
        raise ValueError(f"none of the calibration terms {list(terms)} has a λ > 0")
    live = [t for t in chosen if t not in flat]
    proposed = {t: configured[t] for t in active}
    if live and mode == "scale":
        factor = target_share / sum(shares[t] for t in live)
        proposed.update({t: configured[t] * factor for t in live})
    elif live:
        total = sum(configured[t] for t in live)
        proposed.update({t: target_share * configured[t] / total * task_norm / norms[t] for t in live})
    if flat:
        logger.warning("calibration: %s has no gradient on these batches; its λ is kept", ", ".join(flat))
    return Calibration(task_grad_norm=task_norm, term_grad_norms=norms,
                       configured={t: configured[t] for t in active}, shares=shares, proposed=proposed,
                       mode=mode, target_share=float(target_share), drift_steps=len(drift_batches),
                       batches=len(batches), flat=flat)


def _batches(dataset, collator, batch_size: int, count: int, generator: torch.Generator) -> list[dict]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         collate_fn=collator, generator=generator, drop_last=False)
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(dict(batch))
            if len(out) == count:
                break
    return out


def _run_batches(config, family, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(config.train.seed)
    return _batches(family.train_set, family.collator, config.train.batch_size, count, generator)


#: Batches of ``regularizers.lambdas: auto`` (drift steps, then measured batches).
AUTO_DRIFT_STEPS, AUTO_BATCHES = 10, 4


def calibrate_for_run(config, model: nn.Module, objective, family):
    """``regularizers.lambdas: auto``: calibrate on the run's own model, objective and data, set
    the proposal as the objective's λs and return ``(config with those λs fixed, Calibration)``.

    The returned config is the one a run saves, so a resumed run trains with the same λs
    without calibrating again.
    """
    r = config.regularizers
    data = _run_batches(config, family, AUTO_DRIFT_STEPS + AUTO_BATCHES)
    result = calibrate_objective(model, objective, data[AUTO_DRIFT_STEPS:], drift_batches=data[:AUTO_DRIFT_STEPS],
                                 learning_rate=config.train.learning_rate, mode=r.calibration_mode,
                                 target_share=r.calibration_share, terms=r.calibration_terms)
    fixed = {f"lambda_{t}": result.proposed.get(t, 0.0) for t in TERMS}
    objective.weights = dataclasses.replace(objective.weights, **{t: fixed[f"lambda_{t}"] for t in TERMS})
    regularizers = dataclasses.replace(r, lambdas="fixed", calibration_mode="scale", calibration_share=0.1,
                                       calibration_terms=None, **fixed)
    logger.info("calibrated λs (%s, share %.3g): %s", r.calibration_mode, r.calibration_share,
                ", ".join(f"{k}={v:.4g}" for k, v in fixed.items()))
    return dataclasses.replace(config, regularizers=regularizers), result


def calibrate_run(
    config,
    *,
    batches: int = 4,
    drift_steps: int = 10,
    mode: str = "scale",
    target_share: float = DEFAULT_TARGET_SHARE,
    terms: Sequence[str] | None = None,
    progress: bool = False,
) -> Calibration:
    """Calibrate the λs of a run configuration (``RunConfig``) on its own model, adapter and data.

    Loads what :func:`balora.runs.train_run` would (same plug-in, same adapter init, same
    objective and teacher), takes ``drift_steps`` + ``batches`` batches of the training set
    (seeded by ``train.seed``) and returns the :class:`Calibration`. Nothing is written.
    """
    from transformers import set_seed

    from balora.adapters import apply_method
    from balora.objectives import build_objective
    from balora.runs import FAMILIES, check_precision

    _check_options(mode, target_share, drift_steps)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    check_precision(config.train)
    set_seed(config.train.seed)
    family = FAMILIES[config.family](config, progress)
    model, _ = family.load()
    model = apply_method(model, copy.deepcopy(config.adapter))
    # the λs are weighed against the task loss alone (as in a run): routing's general terms stay out
    plain = dataclasses.replace(config, routing=type(config.routing)())
    objective = build_objective(plain, model, num_labels=family.num_labels)
    data = _run_batches(config, family, drift_steps + batches)
    return calibrate_objective(model, objective, data[drift_steps:], drift_batches=data[:drift_steps],
                               learning_rate=config.train.learning_rate, mode=mode, target_share=target_share,
                               terms=terms)
