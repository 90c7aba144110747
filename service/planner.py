"""Choosing a plan for a quality target or a latency budget, from measurements only.

Quality comes from the index's measured plans (``index.plans``). Latency is live, in two parts:
what every request costs whatever its plan (encoding, queueing, HTTP: the whole request time
minus its search), over the last :data:`WINDOW` requests of all plans; and what the plan costs
(its search and re-scoring), over its own last :data:`WINDOW` requests once it has
:data:`MIN_SAMPLES`, and its build-time search time before that. A plan's p50 (p95) is the sum of
the two parts' p50s (p95s). Splitting them keeps plans comparable from the first request on: an
unsampled plan is not made to look faster than a sampled one by leaving out the shared part, and the
noise of encoding, which every plan shares, does not decide between plans.

- ``min_quality`` alone: of the plans whose measured ratio to the full dim meets it, the one
  with the lowest p50 (bytes per vector break ties); none: the best-measured plan, and why.
- ``latency_budget_ms`` alone: the highest-quality plan whose p95 fits; none: the fastest.
- both: the cheapest plan meeting both; else the highest-quality plan within the budget; else
  the fastest. The budget is kept before the quality target: a caller with a deadline gets an
  answer in time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from index.plans import AGREEMENT, Plan

WINDOW = 200  # recent requests per plan whose latency is kept
MIN_SAMPLES = 20  # requests of a plan before its live latency replaces the estimate
QUALITY, LATENCY = "quality", "latency"


@dataclass(frozen=True)
class Latency:
    """A plan's expected whole-request latency and where the figure comes from."""

    p50_ms: float
    p95_ms: float
    samples: int
    source: str  # plan part "live", or "estimate" (build-time search); the shared part is always live


@dataclass(frozen=True)
class Choice:
    """The plan chosen for a request, what it is expected to cost, and why."""

    plan: Plan
    latency: Latency | None
    reason: str
    missed: tuple[str, ...] = ()  # targets the plan does not meet: "quality", "latency"


class LiveLatency:
    """Recent requests' time outside the search (all plans together) and search time per plan key."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._search: dict[str, deque[float]] = {}
        self._shared: deque[float] = deque(maxlen=window)

    def observe(self, key: str, total_s: float, search_s: float) -> None:
        """One request of plan ``key``: its whole time, and the part spent searching (and re-scoring)."""
        self._search.setdefault(key, deque(maxlen=self._window)).append(search_s)
        self._shared.append(max(0.0, total_s - search_s))

    def of(self, plan: Plan, min_samples: int = MIN_SAMPLES) -> Latency:
        shared = np.percentile(np.asarray(self._shared) * 1000, [50, 95]) if self._shared else np.zeros(2)
        searches = self._search.get(plan.key, ())
        if len(searches) >= min_samples:
            own, source = np.percentile(np.asarray(searches) * 1000, [50, 95]), "live"
        else:
            own, source = np.full(2, plan.search_ms or 0.0), "estimate"
        p50, p95 = (round(float(value), 3) for value in shared + own)
        return Latency(p50, p95, len(searches), source)


def choose(plans: list[Plan], live: LiveLatency, min_quality: float | None, latency_budget_ms: float | None) -> Choice:
    """The plan for these targets (at least one given; ``plans`` not empty)."""
    latency = {plan.key: live.of(plan) for plan in plans}
    quality = lambda plan: plan.ratio if plan.ratio is not None else -1.0  # noqa: E731
    cheapest = lambda plan: (latency[plan.key].p50_ms, plan.bytes_per_vector)  # noqa: E731
    # the best: measured quality first (unmeasured plans: the larger dim), then speed, then memory
    best = lambda plan: (quality(plan), plan.dim if plan.ratio is None else 0, -latency[plan.key].p95_ms,  # noqa: E731
                         -plan.bytes_per_vector)  # fmt: skip
    fastest = min(plans, key=lambda plan: (latency[plan.key].p95_ms, plan.bytes_per_vector))
    meets = [p for p in plans if min_quality is None or (p.ratio is not None and p.ratio >= min_quality)]
    fits = [p for p in plans if latency_budget_ms is None or latency[p.key].p95_ms <= latency_budget_ms]

    def done(plan: Plan, reason: str, missed: tuple[str, ...] = ()) -> Choice:
        return Choice(plan, latency[plan.key], reason, missed)

    if min_quality is not None and latency_budget_ms is None:
        if meets:
            plan = min(meets, key=cheapest)
            return done(plan, f"the fastest plan measured at ≥ {_pct(min_quality)} of full quality ({_of(plan)})")
        plan = max(plans, key=best)
        return done(plan, f"no plan reaches {_pct(min_quality)} of full quality; the best measured: {_of(plan)}",
                    (QUALITY,))  # fmt: skip
    if latency_budget_ms is not None and min_quality is None:
        if fits:
            plan = max(fits, key=best)
            return done(plan, f"the best-measured plan whose p95 fits {latency_budget_ms:g} ms ({_of(plan)})")
        return done(fastest, f"no plan's p95 fits {latency_budget_ms:g} ms; the fastest plan", (LATENCY,))
    both = [p for p in meets if p in fits]
    if both:
        plan = min(both, key=cheapest)
        return done(
            plan,
            f"the fastest plan measured at ≥ {_pct(min_quality)} of full quality whose p95 fits "
            f"{latency_budget_ms:g} ms ({_of(plan)})",
        )
    if fits:
        plan = max(fits, key=best)
        return done(
            plan,
            f"no plan within {latency_budget_ms:g} ms reaches {_pct(min_quality)} of full quality; the best-measured "
            f"plan within the budget ({_of(plan)})",
            (QUALITY,),
        )
    return done(fastest, f"no plan's p95 fits {latency_budget_ms:g} ms; the fastest plan", (LATENCY, QUALITY))


def _pct(ratio: float | None) -> str:
    return f"{100 * (ratio or 0):.1f}%"


def _of(plan: Plan) -> str:
    if plan.ratio is None:
        return f"plan {plan.key}: quality not measured"
    if plan.source == AGREEMENT:
        return f"plan {plan.key}: agreement@10 {_pct(plan.ratio)} with the full dim"
    return f"plan {plan.key}: {_pct(plan.ratio)} of full"
