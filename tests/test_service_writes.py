"""Document writes over HTTP on a writable server (keyword encoder, a real socket, a FAISS folder index).

Writes go through the real write path (chunking with MiniLM's tokenizer, the write-ahead log, the live
index); only the encoders are the keyword stand-ins. The crash test with real processes and SIGKILL is
in ``tests/test_service_writes_crash.py``.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

import service.engine as engine_module
import service.writes as writes_module
from core.errors import ConfigError
from service.routes import DELETE_IDS_PER_DOCUMENT
from service.settings import ServiceSettings, load_settings
from service.writes import DocumentWriter
from tests.helpers.servers import live_server
from tests.helpers.service import (
    ServiceKeywordEncoder,
    assert_error,
    build_keyword_index,
    stand_in_model,
    write_data,
)

LONG = "\n\n".join(f"Part {n}. A rash with fever needs a doctor; a rash alone often passes. " * 4 for n in range(10))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("writes")
    build_keyword_index(write_data(folder / "data"), folder / "index")
    return folder / "index"


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(built, copy, symlinks=True)
    return copy


@pytest.fixture(autouse=True)
def keyword_documents(monkeypatch):
    """The writer's document encoder: the keyword encoder, with MiniLM's tokenizer for chunking."""

    def load(live, settings, metrics):
        return DocumentWriter(live, settings, metrics, stand_in_model(), ServiceKeywordEncoder())

    monkeypatch.setattr(engine_module.DocumentWriter, "load", staticmethod(load))
    monkeypatch.setattr(writes_module, "COMPACT_CHECK_S", 0.05)


def settings(root: Path, **extra) -> ServiceSettings:
    return ServiceSettings(index=root, device="cpu", host="127.0.0.1", port=0, writable=True, **extra)


def top(server, query: str, **params) -> list[dict]:
    response = httpx.get(f"{server.url}/search", params={"q": query, "dim": 8, "k": 5, **params})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["hits"]


def upsert(server, *documents: dict, **headers) -> httpx.Response:
    return httpx.post(f"{server.url}/documents", json={"documents": list(documents)}, headers=headers)


def test_a_written_document_is_found_at_once_and_a_rewrite_replaces_it(root: Path):
    with live_server(settings(root)) as server:
        written = upsert(
            server, {"id": "new", "title": "Allergy", "text": "allergy allergy stress", "metadata": {"x": 1}}
        )
        assert written.status_code == 200, written.text
        body = written.json()
        assert body["documents"] == ["new"] and body["passages"] == 1 and body["seq"] == 1
        assert body["unmerged_passages"] == 1 and body["replaced"] == []
        assert top(server, "allergy stress")[0]["id"] == "new"  # read your own writes
        replaced = upsert(server, {"id": "new", "text": "sleep sleep diet"}).json()
        assert replaced["replaced"] == ["new"]
        assert all(hit["doc_id"] != "new" for hit in top(server, "allergy stress"))
        assert top(server, "sleep diet")[0]["doc_id"] == "new"


def test_a_long_document_is_split_and_its_passages_replaced_and_deleted_together(root: Path):
    with live_server(settings(root)) as server:
        body = upsert(server, {"id": "long", "title": "Rash", "text": LONG}).json()
        assert body["passages"] > 2
        hits = [hit for hit in top(server, "rash fever", k=10) if hit["doc_id"] == "long"]
        assert hits and all(LONG[h["start"] : h["end"]].startswith(h["text"].rstrip("…")[:50]) for h in hits)
        deleted = httpx.delete(f"{server.url}/documents/long").json()
        assert deleted["documents"] == ["long"] and deleted["passages"] == body["passages"]
        assert all(hit["doc_id"] != "long" for hit in top(server, "rash fever", k=10))


def test_deletes_by_ids_and_by_filter_and_unknown_ids(root: Path):
    with live_server(settings(root)) as server:
        gone = httpx.post(f"{server.url}/documents/delete", json={"ids": ["d0", "nope"]}).json()
        assert gone["documents"] == ["d0"] and gone["not_found"] == ["nope"]
        assert all(hit["doc_id"] != "d0" for hit in top(server, "fever", k=10))
        by_filter = httpx.post(f"{server.url}/documents/delete", json={"filter": {"topic": "cough"}}).json()
        assert by_filter["documents"] == ["d1"]
        assert all(hit["doc_id"] != "d1" for hit in top(server, "cough", k=10))
        both = httpx.post(f"{server.url}/documents/delete", json={"ids": ["d2"], "filter": {"topic": "rash"}})
        assert both.status_code == 422 and "exactly one of 'ids'" in both.json()["error"]["message"]


@pytest.mark.parametrize(
    ("documents", "fragment"),
    [
        ([{"id": f"n{i}", "text": "fever"} for i in range(5)], "5 documents in one write; at most 4"),
        ([{"id": "big", "text": "fever " * 100}], "600 characters of text; at most 500"),
        ([{"id": "a", "text": "fever"}, {"id": "a", "text": "rash"}], "the id 'a' is given twice"),
        ([{"id": "blank", "text": "   "}], "the text is blank"),
        ([{"id": "", "text": "fever"}], "documents.0.id"),
        ([{"id": "x", "text": "fever", "colour": "red"}], "documents.0.colour"),
    ],
)
def test_writes_beyond_the_limits_are_422s(root: Path, documents, fragment):
    with live_server(settings(root, max_write_documents=4, max_document_chars=500)) as server:
        response = upsert(server, *documents)
        assert response.status_code == 422 and fragment in response.json()["error"]["message"], response.text
        assert httpx.get(f"{server.url}/dims").json()["num_vectors"] == 9  # nothing was written


def test_writes_are_off_unless_enabled_and_need_the_write_key(root: Path):
    off = ServiceSettings(index=root, device="cpu", host="127.0.0.1", port=0)
    with live_server(off) as server:
        refused = upsert(server, {"id": "n", "text": "fever"})
        assert refused.status_code == 403 and "start it with --writable" in refused.json()["error"]["message"]
    keyed = settings(root, api_key="read-key", write_key="write-key")
    with live_server(keyed) as server:
        assert upsert(server, {"id": "n", "text": "fever"}).status_code == 401
        read_only = upsert(server, {"id": "n", "text": "fever"}, **{"X-API-Key": "read-key"})
        assert read_only.status_code == 403 and "writes need the write key" in read_only.json()["error"]["message"]
        written = upsert(server, {"id": "n", "text": "allergy"}, Authorization="Bearer write-key")
        assert written.status_code == 200, written.text
        searched = httpx.get(
            f"{server.url}/search", params={"q": "allergy", "dim": 8}, headers={"X-API-Key": "write-key"}
        )
        assert searched.status_code == 200  # the write key searches too
    with pytest.raises(ConfigError, match="writable with an api_key needs a write_key"):
        load_settings(index=str(root), writable=True, api_key="read-key")


def test_writes_survive_a_restart_and_a_compaction(root: Path):
    with live_server(settings(root)) as server:
        upsert(server, {"id": "kept", "text": "allergy and stress"})
        httpx.delete(f"{server.url}/documents/d3")
        before = httpx.get(f"{server.url}/dims").json()["index_version"]
    with live_server(settings(root, compact_max_unmerged=1)) as server:  # replayed from the log at start
        assert top(server, "allergy stress")[0]["id"] == "kept"  # replayed (or already compacted: the same)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/dims").json()["index_version"] == before and time.monotonic() < deadline:
            time.sleep(0.1)
        dims = httpx.get(f"{server.url}/dims").json()
        assert dims["index_version"] != before and dims["num_vectors"] == 9  # 9 - d3 + kept
        assert top(server, "allergy stress")[0]["id"] == "kept"
        assert all(hit["doc_id"] != "d3" for hit in top(server, "pain", k=10))
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'mrl_compactions_total{outcome="done"}' in metrics and "mrl_document_writes_total" in metrics
    assert not (root / "wal" / "log.jsonl").exists() or (root / "wal" / "log.jsonl").stat().st_size == 0


def test_the_schema_has_the_documents_endpoints(root: Path):
    limits = {"max_write_documents": 4, "max_document_chars": 500, "max_body_bytes": 4096}
    with live_server(settings(root, **limits)) as server:
        schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/documents", "/documents/{doc_id}", "/documents/delete"} <= set(schema["paths"])
    assert schema["paths"]["/documents"]["post"]["operationId"] == "upsert_documents"
    models = schema["components"]["schemas"]
    documents = models["UpsertRequest"]["properties"]["documents"]
    assert (documents["minItems"], documents["maxItems"]) == (1, 4)  # the settings' values, not their names
    text = models["DocumentIn"]["properties"]["text"]
    assert (text["minLength"], text["maxLength"]) == (1, 500) and "pattern" in text  # a blank text is a 422
    assert "max_document_chars" in text["description"]  # the field's own words are kept
    ids = models["DeleteRequest"]["properties"]["ids"]["anyOf"]
    assert ids[0]["maxItems"] == 4 * DELETE_IDS_PER_DOCUMENT and ids[1] == {"type": "null"}
    too_large = schema["paths"]["/documents"]["post"]["responses"]["413"]
    assert too_large["description"].endswith("limit of 4096 bytes")
    assert too_large["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_a_write_body_over_the_limit_is_a_413_and_writes_nothing(root: Path):
    with live_server(settings(root, max_body_bytes=2048)) as server:
        declared = upsert(server, {"id": "big", "text": "fever " * 500})  # 3,000 characters: within the text limit
        assert_error(declared, 413, "payload_too_large", "over the limit of 2048 bytes")
        body = b'{"documents": [{"id": "big", "text": "' + b"rash " * 600 + b'"}]}'
        streamed = httpx.post(
            f"{server.url}/documents",
            content=iter([body[:1024], body[1024:]]),  # chunked: no content-length to refuse it by
            headers={"content-type": "application/json"},
        )
        assert_error(streamed, 413, "payload_too_large", "over the limit of 2048 bytes")
        deleted = httpx.post(f"{server.url}/documents/delete", json={"ids": [f"d{n}" for n in range(400)]})
        assert_error(deleted, 413, "payload_too_large")
        dims = httpx.get(f"{server.url}/dims").json()
        assert dims["num_vectors"] == 9 and dims["writes"]["last_seq"] == 0  # nothing was written


def settled(dims: dict, compact_max_unmerged: int = 4) -> bool:
    """Whether a writable server has nothing left that would start a compaction (and none is running)."""
    writes = dims["writes"]
    return writes["unmerged_passages"] + writes["tombstones"] < compact_max_unmerged


def test_writes_during_reloads_are_kept(root: Path):
    """On a writable server only the server itself publishes versions (by compacting): a reload finds nothing
    new and leaves the writes alone, or loads the version a compaction just published. Every write is kept."""
    with live_server(settings(root, compact_max_unmerged=4)) as server:
        before = httpx.get(f"{server.url}/dims").json()["index_version"]
        reloads: list[httpx.Response] = []
        stop = threading.Event()

        def reload() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    reloads.append(client.post("/admin/reload"))

        reloading = threading.Thread(target=reload)
        reloading.start()
        try:
            for n in range(24):
                written = upsert(server, {"id": f"r{n}", "text": "allergy stress", "metadata": {"batch": "reload"}})
                assert written.status_code == 200, written.text
                time.sleep(0.02)
        finally:
            stop.set()
            reloading.join(timeout=30)
        assert len(reloads) > 5 and all(r.status_code == 200 for r in reloads), [r.text for r in reloads[-3:]]
        deadline = time.monotonic() + 30
        while not settled(httpx.get(f"{server.url}/dims").json()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the last compaction done, and too little left for another
        final = httpx.post(f"{server.url}/admin/reload").json()
        dims = httpx.get(f"{server.url}/dims").json()
        assert final["changed"] is False and final["version"] == dims["index_version"] != before  # compacted
        assert dims["writes"]["documents"] == 9 + 24
        response = httpx.get(
            f"{server.url}/search", params={"q": "allergy stress", "dim": 8, "k": 50, "filter": '{"batch": "reload"}'}
        )
        assert response.status_code == 200, response.text
        assert {hit["doc_id"] for hit in response.json()["results"][0]["hits"]} == {f"r{n}" for n in range(24)}


def test_the_client_writes_deletes_and_compacts(root: Path):
    from mrl_client import AsyncMrlClient, MrlAPIError, MrlClient

    with live_server(settings(root, write_key="w")) as server:
        with MrlClient(server.url, api_key="w") as client:
            written = client.upsert([{"id": "c1", "text": "allergy and stress", "metadata": {"topic": "new"}}])
            assert written.documents == ["c1"] and written.seq == 1
            assert client.search("allergy stress", dim=8, k=1).hits[0].doc_id == "c1"
            assert client.dims().model_extra["writes"]["unmerged_passages"] == 1
            assert client.delete(filter={"topic": "new"}).documents == ["c1"]
            compacted = client.compact()
            assert compacted.version != compacted.previous_version and compacted.unmerged_passages == 0
        with MrlClient(server.url) as anonymous, pytest.raises(MrlAPIError) as refused:
            anonymous.upsert([{"id": "c2", "text": "fever"}])
        assert refused.value.status == 401

        async def asynchronous() -> list[str]:
            async with AsyncMrlClient(server.url, api_key="w") as client:
                await client.upsert([{"id": "c3", "text": "sleep and diet"}])
                return (await client.delete(["c3", "nope"])).not_found

        import asyncio

        assert asyncio.run(asynchronous()) == ["nope"]
