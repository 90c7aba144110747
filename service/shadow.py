"""Live quality: a sample of reduced-plan searches compared, off the request path, with the full dim.

With ``shadow_fraction`` above 0, each search answered by a reduced plan (a dim below the full one,
or a two-stage plan) is sampled with that probability. Sampling costs the request one random draw
and a non-blocking put on a bounded queue: the response is already computed and is not held. One
worker thread takes the samples in turn and searches the same query vectors at the full dim, single
stage, through the service's own search path (so filters, grouping and a writable server's live
writes apply), then records the served hits' agreement with that answer per plan
(:func:`index.calibration.agreement`, the build-time calibration's measure). The reference is the
full dim's index as a full-dim request would search it: exact for a Flat index.

The worker spends at most ``shadow_cpu_budget`` of one core: a token bucket fills at that many
seconds per second (up to :data:`BURST_S`) and each comparison spends its wall time. A sample that
finds the queue full, or the bucket empty, is dropped and counted; so is one whose index version
changed before it was compared.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.calibration import K, agreement

logger = logging.getLogger(__name__)

QUEUE_SIZE = 64  # samples waiting for the worker; a full queue drops the new sample
BURST_S = 1.0  # the most CPU seconds the budget saves up while idle
WINDOW = 200  # recent samples per plan behind the live figure of /plans


@dataclass(frozen=True)
class Sample:
    """One sampled search: what the full dim is searched with, and the hit ids the plan served."""

    plan: str
    version: str
    vectors: np.ndarray
    k: int
    group_by: str | None
    filter: dict[str, Any] | None
    served: list[list[str]]


# The full-dim answer for a sample: (the index version searched, per query the hit ids best first).
FullSearch = Callable[[Sample], tuple[str, list[list[str]]]]


class ShadowSampler:
    """Samples reduced-plan searches and measures their agreement with the full dim in a worker thread."""

    def __init__(
        self,
        fraction: float,
        cpu_budget: float,
        search_full: FullSearch,
        metrics: Any,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fraction = fraction
        self.cpu_budget = cpu_budget
        self._search_full = search_full
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: queue.Queue[Sample | None] = queue.Queue(QUEUE_SIZE)
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._tokens = BURST_S
        self._filled_at = clock()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mrl-shadow", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker once the sample it compares now is done (waiting ones are dropped)."""
        if self._thread is None:
            return
        while True:  # make room for the stop signal
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout)
        self._thread = None

    def offer(self, sample: Callable[[], Sample]) -> bool:
        """On the request path: draw, and when drawn queue ``sample()`` without waiting. True when queued."""
        if not self.enabled or self._rng.random() >= self.fraction:
            return False
        try:
            self._queue.put_nowait(sample())
        except queue.Full:
            self._count("dropped_queue")
            return False
        return True

    def live(self, plan: str) -> tuple[float | None, int]:
        """The mean agreement of ``plan``'s recent samples, and how many there are."""
        with self._lock:
            recent = self._recent.get(plan)
            if not recent:
                return None, 0
            return round(float(np.mean(recent)), 4), len(recent)

    def reset(self) -> None:
        """Forget the recent samples (a new index version's plans start afresh)."""
        with self._lock:
            self._recent.clear()

    def _count(self, outcome: str) -> None:
        self._metrics.shadow_samples.labels(outcome=outcome).inc()

    def _spend(self) -> bool:
        now = self._clock()
        self._tokens = min(BURST_S, self._tokens + (now - self._filled_at) * self.cpu_budget)
        self._filled_at = now
        return self._tokens > 0

    def _run(self) -> None:
        while True:
            sample = self._queue.get()
            if sample is None:
                return
            if not self._spend():
                self._count("dropped_budget")
                continue
            started = self._clock()
            try:
                self._compare(sample)
            except Exception:  # noqa: BLE001 - a failed comparison must never stop the worker
                logger.warning("shadow comparison of plan %s failed", sample.plan, exc_info=True)
                self._count("failed")
            finally:
                self._tokens -= self._clock() - started

    def _compare(self, sample: Sample) -> None:
        version, reference = self._search_full(sample)
        if version != sample.version:
            self._count("dropped_reloaded")
            return
        depth = min(sample.k, K)
        for served, full in zip(sample.served, reference, strict=True):
            rank_aware, _ = agreement(served[:depth], full[:depth], depth)
            self._metrics.plan_agreement.labels(plan=sample.plan).observe(rank_aware)
            with self._lock:
                self._recent.setdefault(sample.plan, deque(maxlen=WINDOW)).append(rank_aware)
        self._count("compared")
