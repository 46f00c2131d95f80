"""Summary statistics of a grid: mean ± std over seeds, and paired differences with a bootstrap interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "MIN_RELIABLE_PAIRS", "PairedDifference", "mean_std", "paired_bootstrap"]

#: The seed of every report's bootstrap intervals (the same runs give the same intervals).
BOOTSTRAP_SEED = 0
#: Resamples of the bootstrap intervals (scipy's default).
BOOTSTRAP_RESAMPLES = 9999
#: Below this many pairs a bootstrap interval has too few distinct resamples to mean much
#: (2 pairs: 3 distinct means); it is computed, and reports say it is not to be trusted.
MIN_RELIABLE_PAIRS = 5


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample standard deviation (ddof=1), n)``; the std is NaN for fewer than two values,
    both are NaN for none."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size)


@dataclass(frozen=True)
class PairedDifference:
    """The mean of paired differences (method − baseline) and its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def includes_zero(self) -> bool | None:
        """True when the interval contains 0 (no difference shown); None when it is undefined."""
        if math.isnan(self.low) or math.isnan(self.high):
            return None
        return self.low <= 0.0 <= self.high


def paired_bootstrap(
    differences: Sequence[float], *, confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> PairedDifference:
    """Mean of ``differences`` (one per pair, e.g. per task × seed) with a percentile bootstrap interval.

    The pairs are resampled with replacement (``scipy.stats.bootstrap``, percentile method,
    ``numpy.random.default_rng(seed)``): the same differences and seed give the same interval.
    With fewer than two pairs the interval is undefined (NaN).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, confidence)
    if d.size < 2:
        return PairedDifference(float(d.mean()), math.nan, math.nan, int(d.size), confidence)
    if np.all(d == d[0]):  # every resample has the same mean
        return PairedDifference(float(d[0]), float(d[0]), float(d[0]), int(d.size), confidence)
    result = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return PairedDifference(float(d.mean()), float(interval.low), float(interval.high), int(d.size), confidence)
