"""The service with the real default model over real indexes of the bundled sample (``slow``).

The index is the session's ``sample_index`` (``data/sample_medical`` built once with the real
model, its plans scored); the app runs through its real lifespan (torch, then ONNX Runtime), and
one test starts a real uvicorn server process and queries it over HTTP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core.matryoshka import truncate_normalize
from index.loaded import open_index
from service.app import create_app
from service.settings import ServiceSettings
from tests.conftest import SAMPLE
from tests.helpers.sample import DIMS, JUDGED, QUERIES
from tests.helpers.servers import serve_process

pytestmark = pytest.mark.slow

UVICORN_FACTORY = (sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", "{port}")


@pytest.fixture(scope="module")
def client(sample_index: Path):
    with TestClient(create_app(ServiceSettings(index=sample_index, device="cpu"))) as client:
        yield client


def embed(client: TestClient, texts: list[str], **options) -> np.ndarray:
    response = client.post("/v1/embeddings", json={"input": texts, **options})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def hit_ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"][0]["hits"]]


@pytest.mark.parametrize("dim", DIMS)
def test_search_finds_the_judged_passage_at_every_dim(client, dim: int):
    query, relevant = JUDGED[0]
    ids = hit_ids(client.get("/search", params={"q": query, "dim": dim, "k": 10}))
    assert len(ids) == 10 and relevant in ids
    body = client.post("/search", json={"queries": QUERIES, "dim": dim, "k": 3}).json()
    assert body["dim"] == dim and [r["query"] for r in body["results"]] == QUERIES
    assert all(len(r["hits"]) == 3 for r in body["results"])


def test_two_stage_scores_are_exact_full_dimension_scores(client):
    exact = client.get("/search", params={"q": QUERIES[1], "dim": 384, "k": 100}).json()["results"][0]["hits"]
    exact_scores = {hit["id"]: hit["score"] for hit in exact}
    staged = client.get("/search", params={"q": QUERIES[1], "dim": 32, "rerank_dim": 384, "k": 3})
    hits = staged.json()["results"][0]["hits"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:
        assert hit["score"] == pytest.approx(exact_scores[hit["id"]], abs=1e-5)
    assert hits[0]["id"] == exact[0]["id"]


def test_embeddings_match_the_indexed_vectors(client, sample_index: Path):
    loaded = open_index(sample_index, device="cpu")
    try:
        (document,) = loaded.store.get([0])
        stored = np.asarray(loaded.vectors[0])
    finally:
        loaded.close()
    for dim in DIMS:
        served = embed(client, [document.passage], dimensions=dim, input_type="document")[0]
        assert len(served) == dim and np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)
        assert float(served @ truncate_normalize(stored, dim)) > 0.9999


def test_dims_reports_every_index(client):
    body = client.get("/dims").json()
    assert [d["dim"] for d in body["dims"]] == DIMS and body["num_vectors"] == 120 and body["encoder"] == "torch"
    assert all(d["index_type"] == "Flat" and d["vectors"] == 120 and d["bytes"] > 0 for d in body["dims"])
    assert all(d["ndcg_at_10"] is None for d in body["dims"])  # the base model has no training report


@pytest.mark.parametrize(("quantize", "min_cosine"), [(False, 0.9999), (True, 0.97)])
def test_onnx_encoder_agrees_with_torch(client, sample_index: Path, tmp_path_factory, quantize: bool, min_cosine):
    settings = ServiceSettings(
        index=sample_index,
        device="cpu",
        encoder="onnx",
        onnx_quantize=quantize,
        onnx_cache=tmp_path_factory.getbasetemp() / "onnx-cache",
    )
    texts = [*QUERIES, "word " * 390]  # the last one is cut at the token limit
    with TestClient(create_app(settings)) as onnx:
        dims = onnx.get("/dims").json()
        assert dims["encoder"] == "onnx"
        # its plans were scored again with its own query vectors; float32 loses nothing, int8 is measured
        loss = dims["encoder_quality_loss"]
        assert loss is not None and (loss <= 0.001 if not quantize else loss < 0.1)
        assert (dims["encoder_warning"] is not None) == (loss > 0.005)
        source = onnx.get("/plans").json()["plans"][0]["quality_source"]
        assert source.startswith("NDCG@10 on 120 judged queries") and source.endswith("by the served onnx encoder")
        served = onnx.app.state.service.searcher.encoder.encoder
        assert type(served).__name__ == "OnnxEncoder"  # no torch per query
        assert served.packing == (not quantize)  # float32 on CPU packs its texts into rows; int8 pads
        onnx_vectors = embed(onnx, texts, input_type="query")
        onnx_usage = onnx.post("/v1/embeddings", json={"input": texts}).json()["usage"]
        onnx_top = hit_ids(onnx.get("/search", params={"q": QUERIES[0], "k": 1}))
    torch_vectors = embed(client, texts, input_type="query")
    cosines = np.sum(onnx_vectors * torch_vectors, axis=1)
    assert cosines.min() >= min_cosine, cosines
    assert onnx_usage == client.post("/v1/embeddings", json={"input": texts}).json()["usage"]
    if not quantize:
        assert onnx_top == hit_ids(client.get("/search", params={"q": QUERIES[0], "k": 1}))


def test_targets_choose_measured_plans_on_the_real_model(client, sample_index: Path):
    from core.data import load_beir
    from training.evaluate import SplitEmbeddings, score_dims

    plans = {plan["key"]: plan for plan in client.get("/plans").json()["plans"]}
    assert {"384", "64", "64>384x2"} <= set(plans) or {"384", "64"} <= set(plans)
    assert all(plan["quality_source"].startswith("NDCG@10 on 120 judged queries") for plan in plans.values())
    assert all(plan["quality_kind"] == "judged" and plan["agreement_at_10"] is not None for plan in plans.values())
    full = client.get("/search", params={"q": QUERIES[0], "min_quality": 1.0}).json()["plan"]
    meeting = [plan for plan in plans.values() if plan["ratio"] >= 1.0]
    assert full["expected_ratio"] >= 1.0 and full["p50_ms"] == min(plan["p50_ms"] for plan in meeting)
    lower = client.get("/search", params={"q": QUERIES[0], "min_quality": 0.8}).json()["plan"]
    assert plans[lower["key"]]["bytes_per_vector"] < plans["384"]["bytes_per_vector"] and lower["expected_ratio"] >= 0.8
    # the plans' NDCG@10 is what `mrl eval` scores (training.evaluate.score_dims) from the same vectors
    dataset = load_beir(SAMPLE, ["test"])
    qrels = dataset.split("test")
    query_ids = list(qrels)
    loaded = open_index(sample_index, device="cpu")
    try:
        doc_ids = [doc.id for doc in loaded.store.get(range(loaded.manifest.num_vectors))]
        doc_vectors = np.asarray(loaded.vectors)
    finally:
        loaded.close()
    queries = embed(client, [dataset.queries[q] for q in query_ids[:64]], input_type="query")
    queries = np.vstack([queries, embed(client, [dataset.queries[q] for q in query_ids[64:]], input_type="query")])
    scored = score_dims(SplitEmbeddings(doc_ids, doc_vectors, query_ids, queries, 0.0), qrels, DIMS)
    for dim in DIMS:
        assert plans[str(dim)]["ndcg_at_10"] == pytest.approx(scored[dim]["ndcg@10"], abs=1e-4)


def test_onnx_keeps_sentence_transformers_around_a_layout_it_cannot_run_alone(tmp_path: Path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    from core.models import load_model
    from service.encoders import ServingEncoder, onnx_encoder

    base = load_model(None, device="cpu")
    torch.manual_seed(0)
    modules = [base[0], base[1], Dense(384, 64)]
    reference = SentenceTransformer(modules=modules, device="cpu").encode(QUERIES)
    model = SentenceTransformer(modules=[*modules], device="cpu")
    encoder = onnx_encoder(model, "dense", tmp_path, quantize=False, device="cpu", threads=None, batch_size=8)
    assert isinstance(encoder, ServingEncoder) and encoder.dimension == 64
    vectors = encoder.encode_queries(QUERIES)
    cosines = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() > 0.9999


def test_a_real_server_process_answers_over_http(sample_index: Path, tmp_path: Path):
    settings = {"index": sample_index, "device": "cpu", "api_key": "test-key"}
    with serve_process(tmp_path / "server.log", UVICORN_FACTORY, **settings) as server:
        headers = {"X-API-Key": "test-key"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
            found = http.get("/search", params={"q": JUDGED[0][0], "dim": 128, "k": 10})
            assert JUDGED[0][1] in hit_ids(found)
            batch = http.post("/search", json={"queries": QUERIES, "dim": 64, "k": 2}).json()
            assert len(batch["results"]) == 3
            vectors = http.post("/v1/embeddings", json={"input": QUERIES, "dimensions": 64}).json()["data"]
            assert [len(v["embedding"]) for v in vectors] == [64, 64, 64]
            assert http.get("/dims", headers={"X-API-Key": "wrong"}).status_code == 401
            metrics = http.get("/metrics").text
        assert 'mrl_request_duration_seconds_count{dim="128",endpoint="/search",status="2xx"} 1.0' in metrics
        assert 'mrl_index_vectors{dim="32"} 120.0' in metrics
        code = server.stop()
    output = server.output()
    # uvicorn shuts down gracefully, then re-raises SIGTERM, so -15 is a clean exit too.
    assert code in (0, -15) and "Application shutdown complete" in output, output


def test_sample_queries_file_is_what_the_judged_list_assumes():
    lines = [json.loads(line) for line in (SAMPLE / "queries.jsonl").read_text().splitlines() if line.strip()]
    assert JUDGED[0][0] in {q["text"] for q in lines}


def test_the_serving_encoder_counts_the_tokens_it_encodes_in_one_pass():
    """``usage`` comes from the encoding's own tokenization: the counts equal a second pass's, truncation included."""
    from core.models import SentenceTransformerEncoder, load_model
    from service.encoders import ServingEncoder

    model = load_model(None)
    encoder = ServingEncoder(model, "default", batch_size=2)
    texts = ["gout", "sudden painful swollen big toe joint at night " * 3, "gout", "word " * 1000]
    vectors = encoder.encode_documents(texts)
    assert encoder.last_token_counts == [encoder.count_tokens([text]) for text in texts]
    assert encoder.last_token_counts[3] == model.max_seq_length  # truncated, as the model saw it
    encoder.encode_queries(["asthma"])
    assert encoder.last_token_counts == [encoder.count_tokens(["asthma"])]
    plain = SentenceTransformerEncoder(load_model(None), "default", batch_size=2, progress=False)
    np.testing.assert_allclose(vectors, plain.encode_documents(texts), atol=1e-5)  # the wrapper changes nothing
