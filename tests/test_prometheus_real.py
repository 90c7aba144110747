"""The real metrics path: ``mrl serve`` (real model, sample index) scraped by a real Prometheus on loopback.

Prometheus scrapes every second and evaluates deploy/prometheus/rules.yml; the test then asks
its HTTP API what the dashboard and the alerts would ask. Skipped where the ``prometheus``
binary is missing (Debian's ``prometheus`` package), except in CI, which installs it. The
service serves the session's ``sample_index``; both processes run on the one harness
(``core.servers``, ``tests.helpers.servers``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.servers import LOOPBACK, free_port, running_process
from tests.helpers.deploy import (
    DEBIAN_PROMETHEUS,
    RULES,
    dashboard_queries,
    require_tool,
    rules,
    substitute_grafana_variables,
)
from tests.helpers.sample import JUDGED, copy_index
from tests.helpers.servers import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

DIMS = (64, 128)
SEARCHES_PER_DIM = 20
MEDIAN_BY_DIM = (
    'histogram_quantile(0.5, sum by (le, dim) (rate(mrl_request_duration_seconds_bucket{endpoint="/search"}[1m])))'
)
# Panels whose series only exist after events this test does not cause (a 5xx, an index reload).
NO_DATA_EXPECTED = {"Server error ratio", "Index reloads"}
PROMETHEUS_READY_TIMEOUT_S = 60.0


def test_prometheus_scrapes_the_service_and_answers_dashboard_and_rule_queries(request, tmp_path: Path):
    prometheus_binary = require_tool("prometheus", DEBIAN_PROMETHEUS)
    sample_index = request.getfixturevalue("sample_index")  # after the check: no index is built only to skip
    # query_cache_size: so that the cache panel has data; writable (over a copy): so that the writes row has;
    # every reduced search sampled: so that the live-quality row has
    root = copy_index(sample_index, tmp_path / "index")
    with (
        serve_process(
            tmp_path / "service.log", index=root, device="cpu", query_cache_size=64, writable=True, shadow_fraction=1
        ) as service,
        running_prometheus(prometheus_binary, service.port, tmp_path) as prometheus,
    ):
        with httpx.Client(base_url=service.base, timeout=30) as http:
            # Every series exists and is scraped before the load, so rate() sees the load as an increase.
            for dim in DIMS:
                search(http, dim)
            search(http, 32, rerank_dim=384)
            missed_budget(http)
            assert http.get("/search", params={"q": "x", "dim": 3}).status_code == 422
            wait_until(lambda: scraped_dims(prometheus) >= set(DIMS), "Prometheus to scrape both dims")
            for number in range(SEARCHES_PER_DIM):
                for dim in DIMS:
                    search(http, dim)
                missed_budget(http)
                if number % 10 == 0:
                    document = {"id": f"note-{number}", "text": f"A note on gout number {number}."}
                    assert http.post("/documents", json={"documents": [document]}).status_code == 200
            assert http.post("/admin/compact").status_code == 200

        medians = wait_until(lambda: finite_by_dim(query(prometheus, MEDIAN_BY_DIM)), "a median per dim")
        assert all(0 < seconds < 10 for seconds in medians.values()), medians

        p99 = wait_until(
            lambda: finite_by_dim(query(prometheus, "dim:mrl_request_duration_seconds:p99_5m")),
            "the p99 recording rule per dim",
        )
        assert all(p99[dim] >= medians[dim] for dim in medians), (p99, medians)
        wait_until(lambda: rules_healthy(prometheus), "every rule of rules.yml to evaluate without error")

        for title, expr in dashboard_queries():
            result = query(prometheus, substitute_grafana_variables(expr))
            assert result or title in NO_DATA_EXPECTED, f"panel {title!r} has no data:\n{expr}"


# --- Prometheus --------------------------------------------------------------------------------------


@contextmanager
def running_prometheus(binary: str, target_port: int, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping ``target_port`` every second with rules.yml loaded; yields its base URL once ready."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "mrl-retrieval", "static_configs": [{"targets": [f"{LOOPBACK}:{target_port}"]}]}
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={LOOPBACK}:{port}",
    ]
    log = tmp_path / "prometheus.log"
    with running_process(command, port, log, PROMETHEUS_READY_TIMEOUT_S, dict(os.environ), "/-/ready") as base:
        yield base


# --- asking the two of them ------------------------------------------------------------------------------


def search(http: httpx.Client, dim: int, **params: Any) -> None:
    response = http.get("/search", params={"q": JUDGED[0][0], "dim": dim, "k": 5, **params})
    assert response.status_code == 200, response.text


def missed_budget(http: httpx.Client) -> None:
    """A search whose latency budget no plan can meet: answered by the fastest plan, counted as missed."""
    response = http.get("/search", params={"q": JUDGED[0][0], "k": 5, "latency_budget_ms": 0.001})
    assert response.status_code == 200 and response.json()["plan"]["targets_missed"] == ["latency"], response.text


def query(prometheus: str, expr: str) -> list[dict]:
    """The instant vector ``expr`` evaluates to now; a query Prometheus refuses fails the test."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
    return body["data"]["result"]


def scraped_dims(prometheus: str) -> set[int]:
    series = query(prometheus, 'mrl_request_duration_seconds_count{endpoint="/search"}')
    return {int(s["metric"]["dim"]) for s in series if s["metric"]["dim"].isdigit()}


def finite_by_dim(result: list[dict]) -> dict[int, float] | None:
    """``{dim: value}`` once every dim of the test has a finite value, else ``None``."""
    values = {int(s["metric"]["dim"]): float(s["value"][1]) for s in result if s["metric"]["dim"].isdigit()}
    finite = {dim: value for dim, value in values.items() if math.isfinite(value)}
    return finite if set(DIMS) <= set(finite) else None


def rules_healthy(prometheus: str) -> bool:
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules()), "Prometheus did not load every rule of rules.yml"
    errors = [f"{rule['name']}: {rule.get('lastError')}" for rule in loaded if rule["health"] == "err"]
    assert not errors, errors
    return all(rule["health"] == "ok" for rule in loaded)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something truthy (which is returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
