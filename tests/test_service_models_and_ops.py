"""The OpenAI model list, readable operationIds, and what /metrics says of the process and of what it serves.

Through the real app and lifespan with the keyword encoder (exact and fast).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.service import MODEL_NAME, build_keyword_index, serve, write_data


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    return root


def test_v1_models_lists_the_served_model_with_its_dims(keyword_index: Path):
    with serve(keyword_index) as client:
        listed = client.get("/v1/models")
        assert listed.status_code == 200
        body = listed.json()
        assert body["object"] == "list" and len(body["data"]) == 1
        card = body["data"][0]
        assert card["id"] == MODEL_NAME and card["object"] == "model" and card["owned_by"] == "mrl-retrieval"
        assert card["dimensions"] == [8, 4, 2] and card["default_dimensions"] == 8 and card["created"] > 1.7e9
        assert client.get(f"/v1/models/{MODEL_NAME}").json() == card
        missing = client.get("/v1/models/text-embedding-3-small")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        assert "this server serves 'keywords'" in missing.json()["error"]["message"]


def test_operation_ids_are_the_route_names(keyword_index: Path):
    with serve(keyword_index) as client:
        schema = client.get("/openapi.json").json()
    ids = [operation["operationId"] for path in schema["paths"].values() for operation in path.values()]
    assert sorted(ids) == sorted(
        ["search_get", "search_post", "embeddings", "list_models", "get_model", "dims", "plans", "reload"]
        + ["healthz", "readyz", "metrics"]
    )  # FastAPI's own would be search_get_search_get, reload_admin_reload_post, ...


# The HTTP API reference (docs/hooks.py) has one section per tag; an untagged route would land under "other".
TAGS = {"search", "admin", "documents", "operations"}


@pytest.mark.parametrize("writable", [False, True])
def test_every_operation_has_exactly_one_of_the_documented_tags(writable: bool):
    from service.app import create_app
    from service.settings import ServiceSettings

    schema = create_app(ServiceSettings(index="unused", writable=writable)).openapi()  # as the reference reads it
    tags = {f"{method.upper()} {path}": operation.get("tags", []) for path, item in schema["paths"].items()
            for method, operation in item.items()}  # fmt: skip
    wrong = {operation: found for operation, found in tags.items() if len(found) != 1 or found[0] not in TAGS}
    assert not wrong, f"each operation needs one tag of {sorted(TAGS)}"
    used = {found[0] for found in tags.values()}
    assert used == (TAGS if writable else TAGS - {"documents"})  # write paths only where writes are on


def test_metrics_say_what_is_served_and_how_the_process_does_without_created_series(tmp_path: Path):
    root = tmp_path / "index"
    first = build_keyword_index(write_data(tmp_path / "data"), root)
    with serve(root) as client:
        client.get("/search", params={"q": "fever"})
        text = client.get("/metrics").text
        assert not [line for line in text.splitlines() if "_created" in line]
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
            assert any(line.startswith(name + " ") for line in text.splitlines()), name
        serving = [line for line in text.splitlines() if line.startswith("mrl_serving_info{")]
        assert len(serving) == 1 and f'version="{first.name}"' in serving[0] and f'model="{MODEL_NAME}"' in serving[0]
        assert f'index="{root}"' in serving[0] and 'fingerprint="sha256:abab' in serving[0]
        second = build_keyword_index(write_data(tmp_path / "data2", extra=2), root)
        assert client.post("/admin/reload").json()["changed"] is True
        serving = [line for line in client.get("/metrics").text.splitlines() if line.startswith("mrl_serving_info{")]
        assert len(serving) == 1 and f'version="{second.name}"' in serving[0]  # one series: the old one went


# --- request ids and JSON logs ---------------------------------------------------------------


def test_every_answer_carries_a_request_id_the_caller_may_choose(keyword_index: Path):
    with serve(keyword_index) as client:
        chosen = client.get("/healthz", headers={"X-Request-ID": "trace-42:a.b"})
        assert chosen.headers["x-request-id"] == "trace-42:a.b"
        generated = client.get("/search", params={"q": "fever"}).headers["x-request-id"]
        assert len(generated) == 16 and int(generated, 16) >= 0
        refused = client.get("/healthz", headers={"X-Request-ID": "no spaces<script>"}).headers["x-request-id"]
        assert refused != "no spaces<script>" and len(refused) == 16  # not echoed: a fresh one
        error = client.get("/search", params={"q": "fever", "dim": 3}, headers={"X-Request-ID": "r1"})
        assert error.status_code == 422 and error.headers["x-request-id"] == "r1"  # errors too


def test_json_logs_are_one_object_per_line_with_the_request_id(keyword_index: Path):
    import io
    import json
    import logging

    from service.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("mrl.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        with serve(keyword_index) as client:
            client.get("/search", params={"q": "fever"}, headers={"X-Request-ID": "json-1"})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    searched = [line for line in lines if "GET /search" in line["message"]]
    assert len(searched) == 1 and searched[0]["request_id"] == "json-1"
    assert searched[0]["level"] == "info" and searched[0]["logger"] == "mrl.access" and "T" in searched[0]["time"]
    assert "fever" not in stream.getvalue()  # query strings stay out of the log, as in text


def test_log_format_json_formats_the_whole_process_and_uvicorn_logs_through_it(keyword_index: Path):
    import logging

    from service.cli import uvicorn_config
    from service.logs import JsonFormatter, use_json_logs
    from service.settings import ServiceSettings

    root = logging.getLogger()
    saved = [(handler, handler.formatter) for handler in root.handlers]
    try:
        use_json_logs()
        assert root.handlers and all(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    finally:
        for handler, formatter in saved:
            handler.setFormatter(formatter)
    json_settings = ServiceSettings(index=keyword_index, log_format="json")
    assert uvicorn_config(None, json_settings).log_config is None  # uvicorn's loggers propagate to the root
    assert uvicorn_config(None, ServiceSettings(index=keyword_index)).log_config is not None


# --- a server-side default for embeddings --------------------------------------------------


def test_embeddings_without_dimensions_take_the_servers_default(keyword_index: Path):
    with serve(keyword_index, embeddings_default_dim=4) as client:
        vectors = client.post("/v1/embeddings", json={"input": ["fever", "cough"]}).json()["data"]
        assert [len(item["embedding"]) for item in vectors] == [4, 4]
        asked = client.post("/v1/embeddings", json={"input": "fever", "dimensions": 8}).json()["data"]
        assert len(asked[0]["embedding"]) == 8  # a client that names one still gets it
        assert client.get("/v1/models").json()["data"][0]["default_dimensions"] == 4
    with serve(keyword_index) as client:
        assert len(client.post("/v1/embeddings", json={"input": "fever"}).json()["data"][0]["embedding"]) == 8


def test_an_embeddings_default_the_index_does_not_serve_is_refused_at_start(keyword_index: Path):
    from service.engine import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"embeddings default dim 3 is not served by this index"):
        with serve(keyword_index, embeddings_default_dim=3):
            pass


def test_what_the_server_loaded_is_frozen_once_loading_is_done_and_not_after_a_failed_load():
    """``mrl serve`` freezes the loaded objects: a full collection of them stalled every request in flight."""
    import asyncio
    import gc
    from types import SimpleNamespace

    from service.cli import freeze_when_loaded

    state = SimpleNamespace(embedder=None, load_error=None)

    async def load_then_freeze() -> None:
        watcher = asyncio.create_task(freeze_when_loaded(state, poll_s=0.001))
        await asyncio.sleep(0.02)
        assert not watcher.done() and gc.get_freeze_count() == 0  # still loading: nothing frozen yet
        state.embedder = object()
        await asyncio.wait_for(watcher, 5)

    try:
        asyncio.run(load_then_freeze())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the test process keeps collecting as before
    asyncio.run(freeze_when_loaded(SimpleNamespace(embedder=None, load_error="loading failed: no index")))
    assert gc.get_freeze_count() == 0
