"""What the deploy tests read from deploy/: the dashboard's and the rules' PromQL, and the external tools they run.

:func:`promql_references` is a small reader of PromQL, enough for the expressions we write: it
finds the metric names an expression selects and the label names it matches or groups by, so a
test can check them against what the service really exposes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mrl-retrieval.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
DEBIAN_PROMETHEUS = "Debian's `prometheus` package (apt-get install --no-install-recommends prometheus; .ci/run does)"

# Labels Prometheus attaches to every scraped series, and the series it makes itself for each target.
TARGET_LABELS = frozenset({"job", "instance"})
TARGET_SERIES = {"up": TARGET_LABELS}


def require_tool(name: str, install_hint: str) -> str:
    """The path of program ``name`` (on PATH or beside this Python); skip without it, but fail in CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"`{name}` is not installed; it comes from {install_hint}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}, and CI must run this test")
    pytest.skip(message)


# --- the dashboard and the rules -------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query of every panel, rows' panels included."""
    queries = []
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def _panels(panels: list[dict]) -> list[dict]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _panels(panel.get("panels", []))
    return found


def template_queries() -> list[tuple[str, str]]:
    """``(variable, query)`` of the dashboard's query variables."""
    variables = dashboard()["templating"]["list"]
    return [(v["name"], v["query"]["query"]) for v in variables if v["type"] == "query"]


def rules() -> list[dict]:
    import yaml

    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recorded_series() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")


def substitute_grafana_variables(expr: str, interval: str = "1m") -> str:
    """The PromQL Grafana would send: time variables become ``interval``, the others match everything."""
    return GRAFANA_VARIABLE.sub(".*", GRAFANA_INTERVALS.sub(interval, expr))


# --- reading PromQL ----------------------------------------------------------------------------------


@dataclass
class PromqlReferences:
    """The metric names an expression selects (each with the labels it matches) and the labels it groups by."""

    metrics: dict[str, set[str]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)


STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'" + r"|`[^`]*`")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
BRACKETS = re.compile(r"\[[^\]]*\]")  # ranges and subqueries
NUMBER = re.compile(r"(?<![a-zA-Z0-9_:])\d[a-zA-Z0-9_.]*")  # numbers and durations
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
    | {"atan2", "inf", "nan", "Inf", "NaN"}
)


def promql_references(expr: str) -> PromqlReferences:
    """Metric and label names in ``expr``; functions, keywords, numbers and string contents are not names."""
    refs = PromqlReferences()
    text = STRING.sub('""', substitute_grafana_variables(expr))

    def selector(match: re.Match) -> str:
        name = match.group(1) or ""  # "" for a selector without a metric name: no metric exposes it
        refs.metrics.setdefault(name, set()).update(MATCHER.findall(match.group(2)))
        return f" {name} "

    text = SELECTOR.sub(selector, text)
    for match in GROUPING.finditer(text):
        refs.grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    text = NUMBER.sub(" ", BRACKETS.sub(" ", GROUPING.sub(" ", text)))
    for match in IDENTIFIER.finditer(text):
        name = match.group(0)
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and name not in KEYWORDS:
            refs.metrics.setdefault(name, set())
    return refs
