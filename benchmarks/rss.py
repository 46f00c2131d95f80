"""Peak resident memory of a piece of work: the benchmarks' view of :class:`balora.experiments.rss.PeakRSS`."""

from __future__ import annotations

from collections.abc import Callable

from balora.experiments.rss import PeakRSS, rss_bytes

__all__ = ["peak_rss_during", "rss_bytes"]


def peak_rss_during(work: Callable[[], None], interval_s: float = 0.001) -> tuple[int, int]:
    """(RSS before, peak RSS while ``work()`` runs), sampled every ``interval_s`` seconds.

    The process-wide peak (``ru_maxrss``) is often set by model loading; this isolates training.
    """
    with PeakRSS(interval_s) as rss:
        work()
    return rss.before, rss.peak
