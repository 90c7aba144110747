"""Peak memory of a block of work: resident memory sampled on a thread, and the GPU allocator's own peak.

Used around the training stages, so reports can compare what full fine-tuning, LoRA and frozen
layers cost in memory. Resident memory (RSS) is read from ``/proc/self/statm`` every
``interval_s``; a peak shorter than the interval can be missed, which the figures' precision
(tens of MB) allows. Where ``/proc`` is missing, the process's lifetime peak (``ru_maxrss``) is used.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType
from typing import Any

MB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident memory now; the lifetime peak where ``/proc`` is unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager recording resident memory at entry and its peak inside, plus the CUDA peak if any."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.cuda_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    def __enter__(self) -> PeakMemory:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_bytes = self.peak_bytes = resident_bytes()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        import torch

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, resident_bytes())
        if torch.cuda.is_available():
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()

    def to_dict(self) -> dict[str, Any]:
        """MB figures: resident at the start, its peak, the growth, and the CUDA allocator's peak (or None)."""
        return {
            "rss_start_mb": round(self.start_bytes / MB, 1),
            "rss_peak_mb": round(self.peak_bytes / MB, 1),
            "rss_growth_mb": round((self.peak_bytes - self.start_bytes) / MB, 1),
            "cuda_peak_allocated_mb": None if self.cuda_peak_bytes is None else round(self.cuda_peak_bytes / MB, 1),
        }
