"""Schemathesis over the live server's own OpenAPI schema: no server errors, no schema violations.

Each configuration (no API key; the key ``test-key``) runs the app as ``mrl serve`` does,
with uvicorn and the service's own protocol on a loopback port, over a keyword index built
in a temporary folder. Schemathesis loads ``/openapi.json`` from that server (the schema
carries the served dims and the settings' limits) and runs every check on every operation,
with positive and negative data, in its examples, coverage and fuzzing phases. With the key,
every operation is run once with ``X-API-Key`` and once with ``Authorization: Bearer``.

The rules the schema cannot state are the only rejections of schema-valid data that
:func:`positive_data_acceptance_but_rerank_rule` excuses: ``rerank_dim`` larger than ``dim``; dims
or a target (``min_quality``, ``latency_budget_ms``), not both; no quality target on an index
without measured quality (the keyword index here has none); and ``GET /search``'s ``filter``, JSON text
that a query parameter's schema can only call a string (the POST body states every field and operator).
The other way round, the filter schema states a subset of what the service takes (2 levels of nesting, short
lists), so :func:`negative_data_rejection_but_filter_subset` lets a filter beyond that subset be accepted.
Fuzzing reaches the odd whitespace characters on which JSON Schema's regexes (ECMA-262) and
Python's differ only by chance, so :func:`test_schema_and_service_agree_on_blank_text` tries each.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData

from service.engine import BOTH_GIVEN, NO_QUALITY
from service.settings import ServiceSettings
from tests.helpers import servers as harness
from tests.helpers.service import build_keyword_index, write_data

API_KEY = "test-key"
AUTH_HEADERS = ("x-api-key", "authorization")
SEED = 20240611
# Every character Python's `\s` or ECMA-262's `\s` (JSON Schema's regex dialect) calls whitespace.
BLANK_CANDIDATES = sorted({chr(code) for code in range(0x3001) if chr(code).isspace()} | {"\ufeff"})
RERANK_RULE = re.compile(r"rerank_dim must be larger than dim \((\d+)\), got (\d+)")

# Bounded and seeded: at most 30 fuzzed requests per operation and test (plus the schema's
# examples and the coverage phase's cases), the same ones on every run. Thirty reach every
# (phase, positive or negative data, status code, error type) of every operation that forty did;
# forty's one more, a negative `dim` fuzzed into `unknown_dimension` on /search without a key, the
# coverage phase sends in all three tests anyway.
FUZZ_SETTINGS = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def schemathesis_config() -> SchemathesisConfig:
    """Every check, positive and negative data, every phase the pytest plugin runs; a fixed seed.

    Spelled out rather than discovered from a ``schemathesis.toml``, so that no file elsewhere changes the run.
    """
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all"},
            "checks": {"enabled": True},
            "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
        }
    )


# --- the live server ------------------------------------------------------------------------


@contextmanager
def live_server(root: Path, api_key: str | None) -> Iterator[str]:
    """Serve ``root`` as ``mrl serve`` does, on a free loopback port; yields its URL."""
    service_settings = ServiceSettings(
        index=root, device="cpu", api_key=api_key, host="127.0.0.1", port=0, log_level="warning"
    )
    with harness.live_server(service_settings) as server:
        yield server.url


@pytest.fixture(scope="module", autouse=True)
def _pytest_node_id_alias() -> Iterator[None]:
    """Let schemathesis name its per-operation subtests on pytest 9.2, which renamed ``Node._nodeid``.

    ``schemathesis.pytest.from_fixture`` (4.32) reads and writes ``request.node._nodeid``;
    pytest 9.2 keeps the id in ``Node._id`` (a ``NodeId``). Patched only while this module runs.
    """
    from _pytest import nodes
    from _pytest.nodeid import coerce_node_id

    if hasattr(nodes.Node, "_nodeid"):
        yield
        return
    alias = property(lambda node: str(node._id), lambda node, value: setattr(node, "_id", coerce_node_id(value)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nodes.Node, "_nodeid", alias, raising=False)
        yield


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("schemathesis")
    build_keyword_index(write_data(folder / "data"), folder / "index")
    return folder / "index"


@pytest.fixture(scope="module")
def open_server(keyword_index: Path) -> Iterator[str]:
    with live_server(keyword_index, api_key=None) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_server(keyword_index: Path) -> Iterator[str]:
    with live_server(keyword_index, api_key=API_KEY) as base:
        yield base


@pytest.fixture(scope="module")
def open_schema(open_server: str):
    return schemathesis.openapi.from_url(f"{open_server}/openapi.json", config=schemathesis_config())


@pytest.fixture(scope="module")
def keyed_schema(keyed_server: str):
    # Without public_docs the schema itself is behind the key.
    return schemathesis.openapi.from_url(
        f"{keyed_server}/openapi.json", config=schemathesis_config(), headers={"X-API-Key": API_KEY}
    )


# --- the one exception to positive data acceptance --------------------------------------------


def _sent(case: Any, name: str) -> str | None:
    """The value of ``name`` in the request (query string of a GET, JSON body of a POST), as sent on the wire."""
    source = case.query if case.method.upper() == "GET" else case.body
    value = source.get(name) if isinstance(source, dict) else None
    return None if value is None else str(value)  # the coverage phase writes query values as strings


def positive_data_acceptance_but_rerank_rule(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, except for the 422 of the rule the schema cannot state.

    A schema-valid request with ``rerank_dim`` not larger than ``dim`` is refused with
    ``rerank_dim must be larger than dim (D), got R``; every other refusal still fails.
    """
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if not (breaks_rerank_rule(response, case) or breaks_target_rule(response, case)
                or breaks_filter_text_rule(response, case)):  # fmt: skip
            raise
        return None


def refusal(response: Any) -> str | None:
    """The message of a 422 answer, or None for any other answer."""
    if response.status_code != 422:
        return None
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def breaks_target_rule(response: Any, case: Any) -> bool:
    """True if ``response`` is the 422 for dims sent with a target, or for a quality target this index cannot meet."""
    message = refusal(response)
    dims = _sent(case, "dim") is not None or _sent(case, "rerank_dim") is not None
    targets = _sent(case, "min_quality") is not None or _sent(case, "latency_budget_ms") is not None
    if message == BOTH_GIVEN:
        return dims and targets
    return message == NO_QUALITY and _sent(case, "min_quality") is not None


def breaks_filter_text_rule(response: Any, case: Any) -> bool:
    """True if ``response`` is the 422 for ``GET /search``'s ``filter``: JSON text, which a query parameter's schema
    can only call a string (``POST /search`` states the filter's every field and operator)."""
    message = refusal(response)
    return (
        message is not None
        and message.startswith("filter")
        and case.method.upper() == "GET"
        and _sent(case, "filter") is not None
    )


def breaks_rerank_rule(response: Any, case: Any) -> bool:
    """True if ``response`` is the 422 for this request's ``rerank_dim`` not being larger than its ``dim``."""
    message = refusal(response)
    rule = RERANK_RULE.fullmatch(message) if message is not None else None
    if rule is None:
        return False
    dim, rerank_dim = int(rule.group(1)), int(rule.group(2))
    return rerank_dim <= dim and _sent(case, "dim") == str(dim) and _sent(case, "rerank_dim") == str(rerank_dim)


def negative_data_rejection_but_filter_subset(ctx: Any, response: Any, case: Any) -> bool | None:
    """``negative_data_rejection``, except where the only violation is of the filter schema's stated subset.

    The schema states filters nested 2 deep with short lists (service/openapi.py), a subset of what the service
    takes (8 levels, 1,000 values), so that fuzzing stays fast; a filter beyond that subset but within the
    service's own limits is rightly accepted.
    """
    try:
        return negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData as failure:
        invalid = [line for line in str(failure.message).splitlines()[2:] if line.strip()]
        if not invalid or not all("filter" in line for line in invalid):
            raise
        return None


def call_and_validate(case: Any, credentials: dict[str, str] | None = None) -> None:
    """Send ``case`` with ``credentials`` in place of any generated ones; run every check on the answer."""
    if credentials is not None and case.headers:
        case.headers = {name: value for name, value in case.headers.items() if name.lower() not in AUTH_HEADERS}
    case.call_and_validate(
        headers=credentials,
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
        additional_checks=[positive_data_acceptance_but_rerank_rule, negative_data_rejection_but_filter_subset],
    )


# --- the tests: one subtest per operation ---------------------------------------------------

open_api = schemathesis.pytest.from_fixture("open_schema")
keyed_api = schemathesis.pytest.from_fixture("keyed_schema")


@open_api.parametrize()
@FUZZ_SETTINGS
def test_without_api_key(case) -> None:
    call_and_validate(case)


@keyed_api.parametrize()
@FUZZ_SETTINGS
def test_with_api_key_header(case) -> None:
    call_and_validate(case, {"X-API-Key": API_KEY})


@keyed_api.parametrize()
@FUZZ_SETTINGS
def test_with_bearer_token(case) -> None:
    call_and_validate(case, {"Authorization": f"Bearer {API_KEY}"})


def test_schema_and_service_agree_on_blank_text(open_server: str) -> None:
    """A one-character text is schema-valid exactly when the service accepts it, for every kind of whitespace."""
    schema = httpx.get(f"{open_server}/openapi.json").json()
    text = next(p["schema"] for p in schema["paths"]["/search"]["get"]["parameters"] if p["name"] == "q")
    validator = jsonschema_rs.validator_for(text)
    disagreements = []
    for char in BLANK_CANDIDATES:
        answers = {
            "GET /search": httpx.get(f"{open_server}/search", params={"q": char}),
            "POST /v1/embeddings": httpx.post(f"{open_server}/v1/embeddings", json={"input": char}),
        }
        for operation, response in answers.items():
            valid = validator.is_valid(char)
            if valid != (response.status_code == 200):
                verdict = "valid" if valid else "invalid"
                disagreements.append(f"{char!r}: {verdict} in the schema, {operation} answered {response.status_code}")
    assert not disagreements, "\n".join(disagreements)
