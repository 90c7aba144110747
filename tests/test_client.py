"""The Python client (``client/``, package ``mrl_client``) against a real server: uvicorn on a socket, keyword encoder.

Every method, sync and async, with typed results; the embeddings decoded from base64 equal the
server's float answer; error answers raise ``MrlAPIError`` carrying the error body; the API key
goes as a Bearer token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from mrl_client import AsyncMrlClient, MrlAPIError, MrlClient

from service.settings import ServiceSettings
from tests.helpers.servers import live_server
from tests.helpers.service import MODEL_NAME, build_keyword_index, write_data


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    return root


def settings(root: Path, **extra) -> ServiceSettings:
    return ServiceSettings(index=root, device="cpu", host="127.0.0.1", port=0, log_level="warning", **extra)


@pytest.fixture(scope="module")
def server(keyword_index: Path):
    with live_server(settings(keyword_index)) as running:
        yield running


def test_every_method_of_the_sync_client(server, keyword_index: Path):
    with MrlClient(server.url) as client:
        assert client.ready()
        found = client.search("fever at night", dim=8, k=3)
        assert found.dim == 8 and found.hits[0].id == "d0" and found.hits[0].title == "Leaflet 0"
        assert found.hits[0].metadata == {"topic": "fever"} and found.timings_ms.total_ms >= 0
        batch = client.search(["fever", "cough"], dim=4, k=2)
        assert [result.query for result in batch.results] == ["fever", "cough"]
        assert [result.hits[0].id for result in batch.results] == ["d0", "d1"]
        vectors = np.array(client.embed(["fever", "cough rash"], dimensions=4))
        assert vectors.shape == (2, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
        floats = np.array([item["embedding"] for item in client._http.post(
            "/v1/embeddings", json={"input": ["fever", "cough rash"], "dimensions": 4}
        ).json()["data"]])  # fmt: skip
        np.testing.assert_allclose(vectors, floats, atol=1e-7)  # base64 decoded exactly
        dims = client.dims()
        assert dims.model == MODEL_NAME and [d.dim for d in dims.dims] == [8, 4, 2] and dims.full_dim == 8
        assert {plan.dim for plan in client.plans().plans} >= {8, 4, 2}
        assert client.models().data[0].dimensions == [8, 4, 2]
        assert client.models().data[0].index_version == dims.index_version
        assert client.reload().changed is False
        with pytest.raises(MrlAPIError) as refused:
            client.search("fever", dim=3)
        assert refused.value.status == 422 and refused.value.type == "unknown_dimension"
        assert "allowed: 8, 4, 2" in refused.value.message


def test_the_async_client_answers_the_same(server):
    async def run():
        async with AsyncMrlClient(server.url) as client:
            assert await client.ready()
            found = await client.search("fever at night", dim=8, k=3)
            vectors = await client.embed("fever", dimensions=8)
            dims, plans, models = await client.dims(), await client.plans(), await client.models()
            with pytest.raises(MrlAPIError, match="422 unknown_dimension"):
                await client.embed("fever", dimensions=5)
            return found, vectors, dims, plans, models, (await client.reload()).changed

    found, vectors, dims, plans, models, changed = asyncio.run(run())
    with MrlClient(server.url) as client:
        assert found.results == client.search("fever at night", dim=8, k=3).results
        assert np.allclose(vectors, client.embed("fever", dimensions=8))
    assert dims.full_dim == 8 and plans.plans and models.data[0].id == MODEL_NAME and changed is False


def test_the_api_key_goes_as_a_bearer_token(keyword_index: Path):
    with live_server(settings(keyword_index, api_key="s3cret")) as keyed:
        with MrlClient(keyed.url, api_key="s3cret") as client:
            assert client.search("fever", dim=2, k=1).hits
        with MrlClient(keyed.url) as anonymous, pytest.raises(MrlAPIError) as refused:
            anonymous.dims()
        assert refused.value.status == 401 and refused.value.type == "unauthorized"


def test_embed_takes_token_ids_sync_and_async(server):
    # The keyword model's token id i is its i-th keyword: [0, 1] spells "fever cough".
    with MrlClient(server.url) as client:
        assert client.embed([0, 1]) == client.embed("fever cough")
        assert client.embed([[0], (1, 2)], dimensions=4) == client.embed(["fever", "cough rash"], dimensions=4)
        with pytest.raises(MrlAPIError) as refused:
            client.embed([[0], [99]])
        assert refused.value.status == 422 and refused.value.type == "invalid_request"
        assert refused.value.message == "input[1][0]: token id 99 is outside the model's vocabulary (0..7)"
        expected = client.embed(["rash", "pain"], dimensions=2, input_type="query")
        assert client.embed(["fever", "cough rash"], dimensions=8, encoding_format="ubinary") == [[128], [96]]
        codes = client.embed(["fever"], dimensions=8, encoding_format="int8")
        assert len(codes[0]) == 8 and all(-128 <= c <= 127 and isinstance(c, int) for c in codes[0])
        with pytest.raises(ValueError, match="use float, int8 or ubinary"):
            client.embed("fever", encoding_format="binary")

    async def run():
        async with AsyncMrlClient(server.url) as client:
            bits = await client.embed(["fever"], dimensions=8, encoding_format="ubinary")
            return await client.embed([[2], [3]], dimensions=2, input_type="query"), bits

    assert asyncio.run(run()) == (expected, [[128]])


def test_model_health_and_the_index_sync_and_async(server):
    with MrlClient(server.url) as client:
        card = client.model(MODEL_NAME)
        assert card == client.models().data[0] and card.dimensions == [8, 4, 2]
        with pytest.raises(MrlAPIError) as unknown:
            client.model("sentence-transformers/all-MiniLM-L6-v2")  # a hub name: its slash is kept in the path
        assert unknown.value.status == 404 and "'sentence-transformers/all-MiniLM-L6-v2' is not served" in str(
            unknown.value
        )
        assert client.health().status == "ok"
        dims = client.dims()
        assert dims.index == client._http.get("/dims").json().get("index")  # where the index is, on servers that say

    async def run():
        async with AsyncMrlClient(server.url) as client:
            return await client.model(MODEL_NAME), await client.health()

    card_async, health = asyncio.run(run())
    assert card_async == card and health.status == "ok"


def test_the_dims_answer_reads_the_index_it_names():
    from mrl_client import DimsResponse

    answer = {"model": "m", "index_version": "v", "encoder": "torch", "full_dim": 8, "default_dim": 8}
    answer |= {"num_vectors": 9, "built_at": "now", "dims": []}
    assert DimsResponse.model_validate(answer).index is None  # a server that does not say
    assert DimsResponse.model_validate({**answer, "index": "milvus://m:19530/docs"}).index == "milvus://m:19530/docs"


@pytest.fixture
def writable(keyword_index: Path, tmp_path: Path, monkeypatch):
    """A writable server over a copy of the index; its writer encodes with the keyword encoder."""
    import shutil

    import service.engine as engine_module
    from service.writes import DocumentWriter
    from tests.helpers.service import ServiceKeywordEncoder, stand_in_model

    def load(live, settings, metrics):
        return DocumentWriter(live, settings, metrics, stand_in_model(), ServiceKeywordEncoder())

    monkeypatch.setattr(engine_module.DocumentWriter, "load", staticmethod(load))
    root = tmp_path / "index"
    shutil.copytree(keyword_index, root, symlinks=True)
    with live_server(settings(root, writable=True)) as running:
        yield running


def test_delete_document_removes_one_document_by_its_id_sync_and_async(writable, server):
    with MrlClient(writable.url) as client:
        client.upsert([{"id": "notes/a b#1.md", "text": "allergy allergy stress"}])  # a file's path as its id
        assert client.search("allergy stress", dim=8, k=1).hits[0].doc_id == "notes/a b#1.md"
        deleted = client.delete_document("notes/a b#1.md")
        assert deleted.documents == ["notes/a b#1.md"] and deleted.not_found == []
        assert "notes/a b#1.md" not in {hit.doc_id for hit in client.search("allergy stress", dim=8, k=9).hits}
        assert client.delete_document("d3").documents == ["d3"]  # a document of the built index

    async def run():
        async with AsyncMrlClient(writable.url) as client:
            return (await client.delete_document("nope")).not_found

    assert asyncio.run(run()) == ["nope"]
    with MrlClient(server.url) as read_only, pytest.raises(MrlAPIError) as refused:
        read_only.delete_document("d0")
    assert refused.value.status == 403
