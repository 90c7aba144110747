"""Hostile input and faults, through the real app and lifespan with the keyword encoder (exact and fast).

One test (or a few) per defect of the hardening issue: the API key before the body, body
limits, Bearer keys, the docs behind the key, error shapes, the schema's limits, query
texts kept out of logs, server paths kept out of bodies, corrupt versions on reload, a
reload with nothing new, a dead encoder worker. Faults that live in a server process
(pruning, start-up, slow clients, the soak) are in ``test_service_faults_real.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import index.loaded as loaded_module
from index.layout import LEASES, resolve_version
from service.app import create_app
from service.limits import NON_BLANK_PATTERN
from service.settings import ServiceSettings
from tests.conftest import scramble, without_checksums
from tests.helpers.service import (
    ServiceKeywordEncoder,
    assert_error,
    build_keyword_index,
    keyword_loader,
    serve,
    write_data,
)

KEY = "s3cret"


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    return root


@pytest.fixture(scope="module")
def client(keyword_index: Path):
    with serve(keyword_index) as client:
        yield client


def point_current(root: Path, version: Path) -> None:
    (root / "current").unlink()
    (root / "current").symlink_to(Path("versions") / version.name)


def two_versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An index root with two versions; ``current`` points at the second."""
    data = write_data(tmp_path / "data")
    root = tmp_path / "index"
    first = build_keyword_index(data, root)
    second = build_keyword_index(write_data(tmp_path / "data2", extra=2), root)
    return root, first, second


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- 3. the API key before the body; body limits ---------------------------------------------


def call_asgi(
    client, method: str, path: str, headers: dict[str, str], chunks: list[bytes], *, stall: bool = False
) -> tuple[int, dict, int]:
    """One request straight through ASGI, on the app's event loop: (status, JSON body, body chunks read).

    With ``stall``, the client promises more body after ``chunks`` and never sends it.
    """
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": stall or read < len(chunks)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    client.portal.call(client.app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


@pytest.fixture(scope="module")
def keyed_app(keyword_index: Path):
    """A client of the app with a key and a 1 KiB body limit."""
    with serve(keyword_index, api_key=KEY, max_body_bytes=1024) as client:
        yield client


def test_an_unauthenticated_body_is_refused_before_it_is_read(keyed_app):
    big = [b"x" * 65536] * 64  # 4 MiB, never read
    status, body, read = call_asgi(keyed_app, "POST", "/search", {"content-type": "application/json"}, big)
    assert (status, body["error"]["type"], read) == (401, "unauthorized", 0)


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(keyed_app):
    headers = {"x-api-key": KEY, "content-type": "application/json", "content-length": str(4 << 20)}
    status, body, read = call_asgi(keyed_app, "POST", "/search", headers, [b"x" * 65536] * 64)
    assert (status, body["error"]["type"], read) == (413, "payload_too_large", 0)
    assert "limit of 1024 bytes" in body["error"]["message"]


def test_a_streamed_body_over_the_limit_is_413_once_the_limit_is_passed(keyed_app):
    headers = {"x-api-key": KEY, "content-type": "application/json"}  # chunked: no content-length
    status, body, read = call_asgi(keyed_app, "POST", "/search", headers, [b" " * 600] * 64)
    assert (status, body["error"]["type"]) == (413, "payload_too_large")
    assert read == 2  # 1,200 bytes: stopped at the first chunk over the limit


def test_a_body_within_the_limit_is_answered(keyed_app):
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    status, body, _ = call_asgi(keyed_app, "POST", "/search", headers, [b'{"query": "fever",', b' "k": 1}'])
    assert status == 200 and body["results"][0]["hits"][0]["id"] == "d0"


def test_a_body_that_stops_arriving_is_408(keyword_index: Path):
    with serve(keyword_index, body_timeout_s=0.2) as client:
        headers = {"content-type": "application/json", "content-length": "100"}
        status, body, _ = call_asgi(client, "POST", "/search", headers, [b'{"query": '], stall=True)
    assert (status, body["error"]["type"]) == (408, "request_timeout")


# --- 5, 6. the key as Bearer; the docs behind the key ----------------------------------------


def test_the_key_is_accepted_as_bearer_token_like_openai_clients_send_it(keyword_index: Path):
    with serve(keyword_index, api_key=KEY) as client:
        body = {"input": "fever", "dimensions": 8}
        assert client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.post("/v1/embeddings", json=body, headers={"X-API-Key": KEY}).status_code == 200
        wrong = client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "X-API-Key", "Bearer")
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/embeddings", json=body, headers={"Authorization": f"Basic {KEY}"}).status_code == 401


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"])
def test_docs_and_schema_need_the_key_unless_opened(keyword_index: Path, path: str):
    with serve(keyword_index, api_key=KEY) as client:
        assert_error(client.get(path), 401, "unauthorized")
        assert client.get(path, headers={"X-API-Key": KEY}).status_code == 200
    with serve(keyword_index, api_key=KEY, public_docs=True) as client:
        assert client.get(path).status_code == 200
        assert client.get("/dims").status_code == 401  # only the docs are opened


# --- 7. error shapes that leaked -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"query": "fever \xff\xfe"}', "not UTF-8"),
        (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
    ],
)
def test_undecodable_bodies_are_422_like_any_bad_json(client, content: bytes, fragment: str):
    response = client.post("/search", content=content, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request", "not valid JSON", fragment)


def test_405_keeps_its_allow_header(client):
    response = client.delete("/search")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"  # both routes of the path, not only the first


def test_a_query_string_that_is_not_utf8_is_422_not_replaced(client):
    response = client.get("/search?q=fever%FF%FE&dim=8")
    assert_error(response, 422, "invalid_request", "query string is not valid UTF-8")
    assert client.get("/search?q=fi%C3%A8vre&dim=8").status_code == 200  # "fièvre", valid UTF-8


# --- 8. the schema says what is accepted -----------------------------------------------------


def test_schema_states_the_limits_of_these_settings_and_dims(keyword_index: Path):
    with serve(keyword_index, max_k=7, max_query_chars=50, max_batch_queries=3) as client:
        schema = client.get("/openapi.json").json()
    parameters = {p["name"]: p["schema"] for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert {key: parameters["q"][key] for key in ("minLength", "maxLength", "pattern")} == {
        "minLength": 1,
        "maxLength": 50,
        "pattern": NON_BLANK_PATTERN,
    }
    assert parameters["dim"]["examples"] == [8]  # the route's example (256) is not served here
    assert (parameters["k"]["minimum"], parameters["k"]["maximum"]) == (1, 7)
    assert parameters["dim"]["enum"] == [8, 4, 2] and parameters["rerank_dim"]["enum"] == [8, 4]
    request = schema["components"]["schemas"]["SearchRequest"]
    assert request["properties"]["queries"]["maxItems"] == 3 and request["properties"]["queries"]["minItems"] == 1
    assert request["oneOf"] == [{"required": ["query"]}, {"required": ["queries"]}]
    assert request["properties"]["query"]["type"] == "string"  # not nullable
    embeddings = schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert embeddings["dimensions"]["anyOf"][0]["enum"] == [8, 4, 2]
    text, texts, ids, arrays = embeddings["input"]["anyOf"]  # a text, texts, token ids, lists of token ids
    assert (text["type"], texts["items"], texts["maxItems"]) == ("string", text, 3)
    assert ids["items"] == {"type": "integer", "minimum": 0, "maximum": 7}  # the keyword encoder's 8 ids
    assert (ids["type"], ids["minItems"], ids["maxItems"]) == ("array", 1, 50)  # as many ids as characters
    assert (arrays["items"], arrays["minItems"], arrays["maxItems"]) == (ids, 1, 3)
    assert "securitySchemes" not in schema.get("components", {})  # no key configured: none required


def test_schema_declares_both_key_schemes_only_when_a_key_is_set(keyword_index: Path):
    with serve(keyword_index, api_key=KEY) as client:
        schema = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    schemes = schema["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    assert len(schema["paths"]["/search"]["get"]["security"]) == 2  # either one, not both


@pytest.mark.parametrize(
    "body",
    [{"query": None, "queries": ["fever"]}, {"query": "fever", "queries": None}, {"queries": None}],
)
def test_explicit_nulls_for_query_fields_are_refused_as_the_schema_says(client, body):
    assert_error(client.post("/search", json=body), 422, "invalid_request", "exactly one of")


def test_blank_text_is_whatever_the_schema_pattern_says(client):
    # U+2003 (em space) is whitespace to Python's str and to the schema's \S alike.
    assert_error(client.get("/search", params={"q": "\u2003\t"}), 422, "invalid_request", "is empty")
    assert client.get("/search", params={"q": "\u200b"}).status_code == 200  # zero-width space is not whitespace


# --- 9. query texts stay out of the logs; server paths out of bodies ----------------------------


def test_access_log_has_paths_without_query_strings(keyword_index: Path, caplog):
    with caplog.at_level(logging.INFO, logger="mrl.access"), serve(keyword_index) as client:
        client.get("/search", params={"q": "my private symptom fever", "dim": 8})
    lines = [r.getMessage() for r in caplog.records if r.name == "mrl.access"]
    assert any(" GET /search 200 " in line for line in lines), lines
    assert not any("private" in line for line in lines)


def test_access_log_with_queries_when_asked(keyword_index: Path, caplog):
    with caplog.at_level(logging.INFO, logger="mrl.access"), serve(keyword_index, log_queries=True) as client:
        client.get("/search", params={"q": "fever", "dim": 8})
    assert any("/search?q=fever&dim=8 200" in r.getMessage() for r in caplog.records if r.name == "mrl.access")


def test_bodies_name_files_relative_to_the_index_root(tmp_path: Path):
    root, first, second = two_versions(tmp_path)
    point_current(root, first)
    with serve(root) as client:
        point_current(root, second)
        (second / "docs.sqlite").write_bytes(b"")
        message = assert_error(client.post("/admin/reload"), 409, "reload_failed")
        dims = client.get("/dims").text
    assert f"versions/{second.name}/docs.sqlite" in message and str(tmp_path) not in message
    assert str(tmp_path) not in dims


# --- 2. corrupt versions on reload -----------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["checksummed", "no-checksums"])
def test_a_corrupt_document_store_is_refused_on_reload_and_counted(tmp_path: Path, legacy: bool):
    root, first, second = two_versions(tmp_path)
    point_current(root, first)
    with serve(root) as client:
        point_current(root, second)
        if legacy:
            without_checksums(second)
        scramble(second / "docs.sqlite")  # same size, random bytes
        message = assert_error(client.post("/admin/reload"), 409, "reload_failed", f"still serving {first.name}")
        assert "docs.sqlite" in message
        assert metric(client, 'mrl_index_reloads_total{outcome="failed"}') == 1
        assert client.get("/search", params={"q": "fever", "dim": 8}).status_code == 200
        held = [p.name for p in (root / LEASES).iterdir()]
    assert held and all(name.startswith(first.name) for name in held)  # the refused version holds no lease


def test_a_corrupt_page_inside_the_store_fails_the_integrity_check(tmp_path: Path):
    from index.manifest import IndexFolderError
    from index.store import DocumentStore

    root, _, second = two_versions(tmp_path)
    data = bytearray((second / "docs.sqlite").read_bytes())
    # Page 1 (the header) and the first row, which is read when the store opens, stay intact; the cell
    # pointers of a later page do not.
    last_page = len(data) // 4096 - 1
    data[last_page * 4096 + 8 : last_page * 4096 + 40] = np.random.default_rng(1).bytes(32)
    (second / "docs.sqlite").write_bytes(bytes(data))
    store = DocumentStore(second / "docs.sqlite")
    with pytest.raises(IndexFolderError, match="docs.sqlite: corrupt document store"):
        store.check_integrity()
    store.close()


# --- 12. a reload that finds nothing new loads nothing ------------------------------------------


def test_a_reload_with_nothing_new_opens_nothing(keyword_index: Path, monkeypatch):
    with serve(keyword_index) as client:
        opened: list = []
        monkeypatch.setattr(loaded_module, "open_index", lambda *a, **k: opened.append(a) or pytest.fail("loaded"))
        response = client.post("/admin/reload")
        assert response.status_code == 200 and response.json()["changed"] is False
        assert opened == []
        assert metric(client, 'mrl_index_reloads_total{outcome="unchanged"}') == 1


def test_a_reload_while_the_engine_does_not_answer_is_503_not_a_refused_index(keyword_index: Path, monkeypatch):
    """An engine outage is its own error: the index is not at fault, so not 409 reload_failed but 503, retry later."""
    from index.backends import EngineUnavailable

    def down(*args, **kwargs):
        raise EngineUnavailable("Milvus at http://db:19530: looking up 'idx_meta' failed (connection refused)")

    with serve(keyword_index) as client:
        monkeypatch.setattr(type(client.app.state.service.searcher.source), "current", down)
        assert_error(client.post("/admin/reload"), 503, "not_ready", "the index engine did not answer")
        assert metric(client, 'mrl_index_reloads_total{outcome="failed"}') == 0
        assert metric(client, 'mrl_index_reloads_total{outcome="unavailable"}') == 1
        assert client.get("/search", params={"q": "fever"}).status_code == 200  # the served version goes on


# --- 10. a dead encoder worker is not ready, not a hang ----------------------------------------


def test_a_dead_encoder_worker_makes_readyz_fail_and_requests_503(keyword_index: Path):
    with serve(keyword_index) as client:
        searcher = client.app.state.service.searcher
        assert client.get("/readyz").status_code == 200
        client.portal.call(_kill_worker, searcher)
        assert_error(client.get("/readyz"), 503, "not_ready", "encoder stopped")
        assert_error(client.get("/search", params={"q": "fever"}), 503, "not_ready", "encoder is not running")


async def _kill_worker(searcher) -> None:
    searcher.embedder.batcher._worker.cancel()
    await asyncio.sleep(0)


def test_one_unencodable_text_does_not_fail_its_batch_neighbours(keyword_index: Path, caplog):
    encoder = ServiceKeywordEncoder()
    app = create_app(
        ServiceSettings(index=keyword_index, device="cpu", batch_max_wait_ms=50), encoder_loader=keyword_loader(encoder)
    )
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        good, bad = client.portal.call(concurrent_searches, app, ["fever", "explode now"])
    assert good.status_code == 200 and good.json()["results"][0]["hits"][0]["id"] == "d0"
    assert bad.status_code == 500 and "secret" not in bad.text
    assert any("a batch of 2 requests failed" in r.getMessage() for r in caplog.records)
    assert encoder.calls[1:] == [1]  # after the warm-up: each request retried alone, only "fever" encoded


# --- 1. leases keep what a server serves --------------------------------------------------------


def test_a_served_version_holds_a_lease_until_it_is_swapped_out(tmp_path: Path):
    root, first, second = two_versions(tmp_path)
    with serve(root) as client:
        assert [p.name.split("~")[0] for p in (root / LEASES).iterdir()] == [second.name]
        build_keyword_index(write_data(tmp_path / "data3", extra=3), root)
        assert client.post("/admin/reload").json()["changed"] is True
        held = {p.name.split("~")[0] for p in (root / LEASES).iterdir()}
        assert held == {resolve_version(root).name}
    assert list((root / LEASES).iterdir()) == []


# --- 16. token counting never shares the tokenizer across threads --------------------------------


class ThreadRecordingEncoder(ServiceKeywordEncoder):
    """Records the thread of every tokenizer use: encoding and token counting."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        return super().encode_documents(texts)

    def count_tokens(self, texts: list[str]) -> int:
        self.threads.add(threading.current_thread().name)
        return super().count_tokens(texts)


def test_tokens_are_counted_on_the_encoder_thread(keyword_index: Path):
    # A fast tokenizer used from two threads at once pads one call with the other's settings: under
    # load, whole batches failed with "Unable to create tensor ... activate truncation and/or padding".
    encoder = ThreadRecordingEncoder()
    with serve(keyword_index, encoder=encoder) as client:
        for texts in (["fever"], ["cough and rash", "pain"]):
            response = client.post("/v1/embeddings", json={"input": texts})
            assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] > 0
    assert len(encoder.threads) == 1 and next(iter(encoder.threads)).startswith("mrl-encode")


def test_a_served_version_deleted_by_hand_keeps_answering(tmp_path: Path):
    # Everything is opened at load (document-store connections included), so nothing is re-opened lazily
    # from a worker thread later: deleting the folder cannot turn searches into 500s.
    root, _, second = two_versions(tmp_path)
    with serve(root) as client:
        shutil.rmtree(second)
        responses = client.portal.call(concurrent_searches, client.app, ["fever"] * 16)  # several worker threads
        assert [response.status_code for response in responses] == [200] * 16
        assert client.get("/dims").status_code == 200


async def concurrent_searches(app, queries: list[str]) -> list:
    """``GET /search`` for every query at once, through ASGI on the app's loop; the responses in order."""
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await asyncio.gather(*(http.get("/search", params={"q": query}) for query in queries))
