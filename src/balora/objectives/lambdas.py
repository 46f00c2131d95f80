"""Schedules for the regulariser weights λ1, λ2, λ3.

A schedule maps (step, total_steps) to a factor in [0, 1]; the weight used at that step is
``λ_base · factor``. ``step`` counts optimiser updates already done (0 at the first update).

- ``constant``: 1.
- ``linear_warmup``: rises linearly from 0 to 1 over the first ``warmup_ratio`` of the steps.
- ``cosine``: decays from 1 to ``floor`` along half a cosine over the whole run. The paper puts
  λ1 on "a cosine schedule" (B.4) without a floor; ours defaults to ``floor=0.1`` (λ1 ends at 10%
  of its base value) so the consistency anchor never switches off entirely.
- ``two_phase``: the paper names it for λ2/λ3 with "a 0.2 warm-up and 0.05 ramp-up ratio" (B.4)
  but does not define it, and the authors' code leaves it unimplemented. Our definition: the
  factor is 0 for the first ``warmup_ratio`` (0.2) of the steps, then rises linearly to 1 over the
  next ``ramp_ratio`` (0.05), and stays 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear_warmup", "cosine", "two_phase")


@dataclass(frozen=True)
class LambdaSchedule:
    """A validated λ schedule; call ``factor(step, total_steps)``."""

    kind: str = "constant"
    warmup_ratio: float = 0.2
    ramp_ratio: float = 0.05
    floor: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        for name in ("warmup_ratio", "ramp_ratio", "floor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"schedule {name} must be in [0, 1], got {value}")

    def factor(self, step: int, total_steps: int) -> float:
        """The multiplier in [0, 1] for λ at optimiser step ``step`` of ``total_steps``."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        progress = min(max(step, 0) / total_steps, 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear_warmup":
            return 1.0 if self.warmup_ratio == 0 else min(progress / self.warmup_ratio, 1.0)
        if self.kind == "cosine":
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # two_phase
        if progress < self.warmup_ratio:
            return 0.0
        if self.ramp_ratio == 0:
            return 1.0
        # rounded so that float error does not leave the factor at 0.9999999999999998
        return min(round((progress - self.warmup_ratio) / self.ramp_ratio, 12), 1.0)


def parse_schedule(spec: str | dict | LambdaSchedule | None) -> LambdaSchedule:
    """Build a schedule from a name (``"cosine"``), a dict of fields, or pass one through."""
    if spec is None:
        return LambdaSchedule()
    if isinstance(spec, LambdaSchedule):
        return spec
    if isinstance(spec, str):
        return LambdaSchedule(kind=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"kind", "warmup_ratio", "ramp_ratio", "floor"}
        if unknown:
            raise ValueError(f"unknown schedule field(s) {sorted(unknown)}")
        return LambdaSchedule(**spec)
    raise ValueError(f"a schedule is a name or a mapping, got {type(spec).__name__}")


@dataclass(frozen=True)
class Lambdas:
    """(λ1, λ2, λ3) at one step: the weights of consistency, diversity and SVD (eq. 8)."""

    consistency: float
    diversity: float
    svd: float

    def logs(self) -> dict[str, float]:
        return {"lambda_consistency": self.consistency, "lambda_diversity": self.diversity,
                "lambda_svd": self.svd}


@dataclass(frozen=True)
class LambdaWeights:
    """The base weights and their schedules, shared by every objective.

    λ1 follows ``consistency_schedule``; λ2 and λ3 share ``focus_schedule`` (paper B.4).
    """

    consistency: float = 0.0
    diversity: float = 0.0
    svd: float = 0.0
    consistency_schedule: LambdaSchedule = LambdaSchedule()
    focus_schedule: LambdaSchedule = LambdaSchedule()

    @classmethod
    def from_config(cls, config) -> "LambdaWeights":
        """From a RegularizerConfig whose ``None`` fields are already resolved (``config.resolved(family)``)."""
        return cls(config.lambda_consistency, config.lambda_diversity, config.lambda_svd,
                   parse_schedule(config.consistency_schedule), parse_schedule(config.focus_schedule))

    def at(self, step: int, total_steps: int) -> Lambdas:
        """The weights at optimiser step ``step`` of ``total_steps``."""
        focus = self.focus_schedule.factor(step, total_steps)
        return Lambdas(self.consistency * self.consistency_schedule.factor(step, total_steps),
                       self.diversity * focus, self.svd * focus)
