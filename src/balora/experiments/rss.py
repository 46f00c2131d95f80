"""Peak resident memory of a piece of work, sampled by a thread (Linux ``/proc``), as the benchmarks measure it.

``with PeakRSS() as rss: work()`` then ``rss.before`` and ``rss.peak`` (bytes), also when
``work()`` raised. The process-wide peak (``ru_maxrss``) would include every earlier cell of an
in-process grid; sampling isolates the work.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["PeakRSS", "rss_bytes"]


def rss_bytes() -> int | None:
    """Current resident set size of this process, or None where ``/proc`` is not available."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakRSS:
    """Samples the RSS every ``interval_s`` seconds while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.before: int | None = None
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.is_set():
            now = rss_bytes()
            if now is not None:
                self.peak = max(self.peak or 0, now)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = rss_bytes()
        if self.before is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        now = rss_bytes()
        if now is not None:
            self.peak = max(self.peak or 0, now)
