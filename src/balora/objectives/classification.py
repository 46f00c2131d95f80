"""The BA-LoRA objective for classification: λ1·L_CR + λ2·L_DR + λ3·L_SVD (paper eq. 8).

:class:`ClassificationRegularizers` turns student and teacher logits of one batch into the
weighted sum of the three regularisers, with each λ taken from its schedule at the current
step, and reports every term and every λ so the trainer can log them.

Regression (one output, STS-B-like): the three classification regularisers are undefined for
D = 1 (a softmax over one class, a 1×1 covariance, a single singular value). Consistency becomes
the MSE between teacher and student predictions; diversity and SVD are skipped (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from balora.regularizers import formulas as losses
from balora.config import RegularizerConfig

logger = logging.getLogger("balora")


@dataclass
class RegularizerTerms:
    """One batch's weighted regulariser sum and the values to log."""

    total: torch.Tensor  # 0-dim, differentiable
    logs: dict[str, float]


class ClassificationRegularizers:
    """Consistency, diversity and SVD terms on (N, D) classification logits."""

    def __init__(self, config: RegularizerConfig, num_labels: int):
        self.config = config.resolved("classification")
        self.num_labels = num_labels
        self.consistency_schedule, self.focus_schedule = self.config.schedules()
        self.regression = num_labels == 1
        if self.regression:
            logger.warning(
                "regression head (one output): consistency is the MSE between teacher and student "
                "predictions; the diversity and SVD regularisers are undefined for D=1 and skipped"
            )
        elif self.config.lambda_svd and self.config.svd_k >= num_labels:
            logger.warning(
                "svd_k=%d >= number of classes %d: the SVD term (eq. 7) is the constant -1 and has no "
                "gradient; lower regularizers.svd_k below the number of classes for it to act",
                self.config.svd_k, num_labels,
            )

    @property
    def needs_teacher(self) -> bool:
        return bool(self.config.lambda_consistency)

    def lambdas(self, step: int, total_steps: int) -> tuple[float, float, float]:
        """(λ1, λ2, λ3) at optimiser step ``step`` of ``total_steps``."""
        c = self.config
        focus = self.focus_schedule.factor(step, total_steps)
        return (
            c.lambda_consistency * self.consistency_schedule.factor(step, total_steps),
            0.0 if self.regression else c.lambda_diversity * focus,
            0.0 if self.regression else c.lambda_svd * focus,
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        step: int,
        total_steps: int,
    ) -> RegularizerTerms:
        """student_logits, teacher_logits: (N, D). Returns Σ λ_i·L_i and the logged values."""
        c = self.config
        lam_cr, lam_dr, lam_svd = self.lambdas(step, total_steps)
        total = student_logits.new_zeros((), dtype=torch.float32)
        logs = {"lambda_consistency": lam_cr, "lambda_diversity": lam_dr, "lambda_svd": lam_svd}

        if lam_cr > 0:
            if teacher_logits is None:
                raise ValueError("the consistency regulariser needs teacher logits")
            if self.regression:
                cr = F.mse_loss(student_logits.float(), teacher_logits.float())
            else:
                cr = losses.consistency_loss(
                    student_logits, teacher_logits, temperature=c.temperature, kind=c.consistency_kind
                )
            total = total + lam_cr * cr
            logs["reg_consistency"] = cr.item()
        if lam_dr > 0:
            if c.diversity_kind == "entropy":
                dr = losses.topk_entropy_diversity_loss(student_logits, top_k=c.top_k)
            else:
                dr = losses.covariance_diversity_loss(student_logits)
            total = total + lam_dr * dr
            logs["reg_diversity"] = dr.item()
        if lam_svd > 0:
            k = min(c.svd_k, *student_logits.shape)
            sv = losses.svd_loss(student_logits, k=k, normalize=c.svd_normalize)
            total = total + lam_svd * sv
            logs["reg_svd"] = sv.item()
        return RegularizerTerms(total=total, logs=logs)
