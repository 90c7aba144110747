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
