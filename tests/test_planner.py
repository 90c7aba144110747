"""The plan choice for quality targets and latency budgets, from hand-made plans with known figures."""

from __future__ import annotations

import pytest

from index.plans import Plan
from service.planner import MIN_SAMPLES, LiveLatency, choose

# NDCG@10 ratios and build-time search times chosen so that each rule gives one answer.
PLANS = [
    Plan(384, ratio=1.0, ndcg_at_10=0.80, search_ms=9.0, bytes_per_vector=1536),
    Plan(128, ratio=0.97, ndcg_at_10=0.776, search_ms=3.0, bytes_per_vector=512),
    Plan(64, ratio=0.93, ndcg_at_10=0.744, search_ms=2.0, bytes_per_vector=256),
    Plan(64, 384, 10, ratio=0.995, ndcg_at_10=0.796, search_ms=4.0, bytes_per_vector=1792),
    Plan(32, 384, 10, ratio=0.995, ndcg_at_10=0.796, search_ms=4.0, bytes_per_vector=1664),
]
BY_KEY = {plan.key: plan for plan in PLANS}


def live(shared_ms: float = 1.0, **plan_ms: float) -> LiveLatency:
    """Requests that spend ``shared_ms`` outside the search; plans named (64>384x10 as p64_384x10) search in ms."""
    latency = LiveLatency()
    latency.observe("warm-up", shared_ms / 1000, 0.0)
    for name, ms in plan_ms.items():
        key = name.removeprefix("p").replace("_", ">", 1)
        for _ in range(MIN_SAMPLES):
            latency.observe(key, (shared_ms + ms) / 1000, ms / 1000)
    return latency


def chosen(latency: LiveLatency, min_quality=None, budget=None) -> tuple[str, tuple[str, ...]]:
    choice = choose(PLANS, latency, min_quality, budget)
    return choice.plan.key, choice.missed


def test_a_plan_costs_the_shared_part_plus_its_own_search():
    estimate = live(shared_ms=5.0).of(BY_KEY["64>384x10"])  # before samples: its build-time search time
    assert (estimate.p50_ms, estimate.p95_ms, estimate.samples, estimate.source) == (9.0, 9.0, 0, "estimate")
    measured = live(p64=7.0).of(BY_KEY["64"])
    assert (measured.p50_ms, measured.samples, measured.source) == (8.0, MIN_SAMPLES, "live")


def test_percentiles_of_each_part_add_up():
    latency = LiveLatency()
    for number in range(100):  # shared part 1..100 ms, search 0.5 ms
        latency.observe("64", (number + 1 + 0.5) / 1000, 0.5 / 1000)
    figures = latency.of(BY_KEY["64"])
    assert figures.p50_ms == pytest.approx(50.5 + 0.5) and figures.p95_ms == pytest.approx(95.05 + 0.5)


@pytest.mark.parametrize(
    ("min_quality", "expected"),
    [
        (1.0, ("384", ())),
        (0.99, ("32>384x10", ())),  # the two two-stage plans tie on time; fewer bytes per vector wins
        (0.95, ("128", ())),
        (0.90, ("64", ())),
    ],
)
def test_quality_target_picks_the_fastest_plan_that_meets_it(min_quality: float, expected):
    assert chosen(live(), min_quality) == expected


def test_live_latency_overrides_the_build_time_estimate():
    # 128's search is measured slow: at 95% the two-stage plans, though estimated slower at build time, now win
    assert chosen(live(p128=50.0), 0.95) == ("32>384x10", ())
    assert chosen(live(p128=50.0, p32_384x10=60.0), 0.95) == ("64>384x10", ())


def test_an_unreachable_quality_target_gets_the_best_plan_and_says_so():
    unreachable = [plan for plan in PLANS if plan.key != "384"]
    choice = choose(unreachable, live(), 0.999, None)
    assert choice.plan.ratio == 0.995 and choice.missed == ("quality",)
    assert "no plan reaches 99.9% of full quality" in choice.reason


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (20.0, ("384", ())),  # everything fits: the best
        (6.0, ("32>384x10", ())),  # 384 (10 ms) does not; the two-stage plans (5 ms) do
        (4.5, ("128", ())),
        (3.5, ("64", ())),
        (1.0, ("64", ("latency",))),  # nothing fits: the fastest
    ],
)
def test_latency_budget_picks_the_best_plan_that_fits(budget: float, expected):
    assert chosen(live(), budget=budget) == expected


def test_both_targets():
    assert chosen(live(), 0.95, 4.5) == ("128", ())
    assert chosen(live(), 0.99, 4.5) == ("128", ("quality",))  # within budget, the best below the target
    assert chosen(live(), 0.99, 1.0) == ("64", ("latency", "quality"))


def test_unmeasured_plans_take_budgets_larger_dims_first():
    unmeasured = [Plan(384, search_ms=9.0), Plan(64, search_ms=2.0)]
    assert choose(unmeasured, live(), None, 20.0).plan.key == "384"
    assert choose(unmeasured, live(), None, 5.0).plan.key == "64"


def test_every_choice_says_why():
    choice = choose(PLANS, live(), 0.95, None)
    assert choice.reason == "the fastest plan measured at ≥ 95.0% of full quality (plan 128: 97.0% of full)"
    assert choice.latency is not None and choice.latency.source == "estimate"
    choice = choose(PLANS, live(), None, 1.0)
    assert choice.reason == "no plan's p95 fits 1 ms; the fastest plan"
