"""Peak resident memory of a piece of work, sampled by a thread (Linux /proc)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(work: Callable[[], None], interval_s: float = 0.001) -> tuple[int, int]:
    """(RSS before, peak RSS while ``work()`` runs), sampled every ``interval_s`` seconds.

    The process-wide peak (``ru_maxrss``) is often set by model loading; this isolates training.
    """
    before = rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return before, peak[0]
