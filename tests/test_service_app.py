"""The service through its real app and lifespan, over an index built by the real builder with a keyword encoder.

Every score here can be worked out by hand: each document is about one keyword (one
coordinate), ``d8`` about three; truncating to 4 or 2 dims drops the later keywords.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest

from core.matryoshka import truncate_normalize
from core.models import ModelError
from index.manifest import IndexFolderError
from index.plans import Plan
from service.engine import ConfigurationError
from tests.helpers.service import (
    DIMS,
    ServiceKeywordEncoder,
    add_evaluation,
    add_plans,
    assert_error,
    build_keyword_index,
    keyword_loader,
    serve,
    write_data,
)


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("service") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    add_evaluation(root, {8: 0.9, 4: 0.75})
    return root


@pytest.fixture(scope="module")
def client(keyword_index: Path):
    with serve(keyword_index) as client:
        yield client


def top(response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(hit["id"], round(hit["score"], 4)) for hit in response.json()["results"][0]["hits"]]


# --- search -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS)
def test_get_search_at_every_dim(client, dim: int):
    response = client.get("/search", params={"q": "fever", "dim": dim, "k": 2})
    body = response.json()
    assert (body["dim"], body["k"], body["rerank_dim"]) == (dim, 2, None)
    assert set(body["timings_ms"]) == {"encode_ms", "search_ms", "rerank_ms", "total_ms"}
    # d8 is about fever, cough and rash: cosine 1/sqrt(3) at 8 and 4 dims, 1/sqrt(2) at 2 (rash is cut off).
    expected = 0.7071 if dim == 2 else 0.5774
    assert top(response) == [("d0", 1.0), ("d8", expected)]
    hit = body["results"][0]["hits"][0]
    assert hit == {
        "id": "d0",
        "score": pytest.approx(1.0),
        "title": "Leaflet 0",
        "text": "advice about fever at home",
        "metadata": {"topic": "fever"},
        "doc_id": "d0",
        "start": 0,
        "end": 26,
    }


def test_default_dim_is_the_largest_or_the_configured_one(client, keyword_index: Path):
    assert client.get("/search", params={"q": "pain"}).json()["dim"] == 8
    with serve(keyword_index, default_dim=4) as other:
        assert other.get("/search", params={"q": "pain"}).json()["dim"] == 4


def test_keywords_cut_off_by_truncation_score_zero(client):
    # "allergy" is coordinate 8: at 2 dims the query vector is zero, so no document matches it.
    assert top(client.get("/search", params={"q": "allergy", "dim": 8, "k": 1})) == [("d7", 1.0)]
    assert all(score == 0.0 for _, score in top(client.get("/search", params={"q": "allergy", "dim": 2})))


def test_post_single_query_and_batch(client):
    single = client.post("/search", json={"query": "cough", "dim": 4, "k": 1})
    assert top(single) == [("d1", 1.0)]
    batch = client.post("/search", json={"queries": ["rash", "fever", "pain"], "dim": 4, "k": 1})
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert [r["query"] for r in results] == ["rash", "fever", "pain"]
    assert [r["hits"][0]["id"] for r in results] == ["d2", "d0", "d3"]


def test_k_larger_than_the_corpus_returns_every_document(client):
    assert len(top(client.get("/search", params={"q": "fever", "k": 100}))) == 9


def test_snippets_are_cut(keyword_index: Path):
    with serve(keyword_index, snippet_chars=10) as other:
        hit = other.get("/search", params={"q": "fever", "k": 1}).json()["results"][0]["hits"][0]
    assert hit["text"] == "advice abo…"


def test_two_stage_search_rescoring_at_a_larger_dim(client):
    # Query = fever + 2 x allergy. At 2 dims only "fever" is left, so d0 wins; re-scored at 8 dims,
    # the allergy leaflet does (cosine 2/sqrt(5) against 1/sqrt(5)).
    query = {"q": "fever allergy allergy", "dim": 2, "k": 2}
    assert top(client.get("/search", params=query))[0] == ("d0", 1.0)
    response = client.get("/search", params={**query, "rerank_dim": 8})
    assert top(response) == [("d7", 0.8944), ("d0", 0.4472)]
    body = response.json()
    assert (body["dim"], body["rerank_dim"]) == (2, 8)
    assert body["timings_ms"]["rerank_ms"] > 0
    posted = client.post("/search", json={"query": "fever allergy allergy", "dim": 2, "k": 2, "rerank_dim": 8})
    assert top(posted) == top(response)


def test_two_stage_without_dim_shortlists_at_the_smallest_dim(client):
    response = client.get("/search", params={"q": "fever allergy allergy", "k": 1, "rerank_dim": 8})
    assert (response.json()["dim"], response.json()["rerank_dim"]) == (2, 8)
    assert top(response) == [("d7", 0.8944)]


# --- embeddings ---------------------------------------------------------------------------


class CountingKeywordEncoder(ServiceKeywordEncoder):
    """Notes token counts while encoding (as the real ServingEncoder does); a second pass would fail."""

    def _encode(self, texts: list[str]) -> np.ndarray:
        self.last_token_counts = [100 + len(text) for text in texts]
        return super()._encode(texts)

    encode_queries = _encode
    encode_documents = _encode

    def count_tokens(self, texts: list[str]) -> int:
        raise AssertionError("texts were tokenized a second time")


def test_embedding_usage_comes_from_the_encoding_not_a_second_tokenization(keyword_index: Path):
    with serve(keyword_index, encoder=CountingKeywordEncoder()) as client:
        response = client.post("/v1/embeddings", json={"input": ["fever", "cough rash"]})
        assert response.status_code == 200, response.text
        assert response.json()["usage"] == {"prompt_tokens": 105 + 110, "total_tokens": 215}


def test_token_ids_embed_exactly_as_the_texts_they_spell(client):
    # The keyword encoder's token id i is VOCABULARY[i]: [0, 1, 2] spells "fever cough rash".
    def embed(input, **options) -> dict:
        response = client.post("/v1/embeddings", json={"input": input, **options})
        assert response.status_code == 200, response.text
        return response.json()

    assert embed([0, 1, 2]) == embed("fever cough rash")
    assert embed([[0], [1, 2, 1]], dimensions=4) == embed(["fever", "cough rash cough"], dimensions=4)
    assert embed([[7, 3]], encoding_format="base64", input_type="query") == embed(
        ["allergy pain"], encoding_format="base64", input_type="query"
    )
    assert embed([[0], [1, 2, 1]])["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    refused = client.post("/v1/embeddings", json={"input": [0], "dimensions": 3})
    assert_error(refused, 422, "unknown_dimension", "dimensions 3 is not served; allowed: 8, 4, 2")


def test_embeddings_full_and_truncated_are_unit_length(client):
    response = client.post("/v1/embeddings", json={"input": "fever cough rash pain sleep", "model": "any"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == "keywords"
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    full = np.array(item["embedding"])
    np.testing.assert_allclose(full, [1, 1, 1, 1, 1, 0, 0, 0] / np.sqrt(5), atol=1e-6)
    for dim in DIMS:
        data = client.post("/v1/embeddings", json={"input": ["fever cough rash pain sleep"], "dimensions": dim})
        vector = np.array(data.json()["data"][0]["embedding"])
        assert len(vector) == dim
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vector, truncate_normalize(full, dim), atol=1e-6)


def test_embeddings_list_input_base64_and_query_prompt(client):
    response = client.post(
        "/v1/embeddings",
        json={"input": ["rash", "diet"], "dimensions": 8, "encoding_format": "base64", "input_type": "query"},
    )
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
    np.testing.assert_array_equal(vectors[0], np.eye(8)[2])
    np.testing.assert_array_equal(vectors[1], np.eye(8)[5])


def test_embeddings_quantised_to_int8_with_the_corpus_ranges_and_to_packed_bits(client, keyword_index: Path):
    from core.quantization import int8_ranges
    from index.loaded import open_index

    texts = ["fever and rash", "sleep", "allergy pain pain"]
    floats = np.array([d["embedding"] for d in client.post("/v1/embeddings", json={"input": texts}).json()["data"]])
    index = open_index(keyword_index, device="cpu", lease=False)
    ranges = int8_ranges(index.vectors, 8)
    index.close()
    body = client.post("/v1/embeddings", json={"input": texts, "dimensions": 8, "encoding_format": "int8"}).json()
    codes = np.array([d["embedding"] for d in body["data"]])
    low, high = ranges
    expected = ((np.clip(floats, low, high) - low) / ((high - low) / 255) - 128).astype(np.int8)
    np.testing.assert_allclose(codes, expected, atol=1)  # each coordinate mapped from its corpus range (± rounding)
    assert codes.min() >= -128 and codes.max() <= 127
    bits = client.post("/v1/embeddings", json={"input": texts, "dimensions": 8, "encoding_format": "ubinary"}).json()
    packed = np.array([d["embedding"] for d in bits["data"]])
    assert packed.shape == (3, 1)  # 8 coordinates, one byte
    np.testing.assert_array_equal(packed, np.packbits(floats > 0, axis=1))
    two = client.post("/v1/embeddings", json={"input": ["cough"], "dimensions": 2, "encoding_format": "ubinary"})
    assert two.json()["data"][0]["embedding"] == [0b01000000]  # 2 coordinates: one byte, its 6 unused bits 0


def test_embeddings_dimensions_are_validated(client):
    assert_error(
        client.post("/v1/embeddings", json={"input": "fever", "dimensions": 3}),
        422,
        "unknown_dimension",
        "dimensions 3 is not served; allowed: 8, 4, 2",
    )


# --- bad input: always 422 in the one body shape, never 500 -----------------------------------


@pytest.mark.parametrize(
    ("params", "error_type", "fragment"),
    [
        ({"q": "fever", "dim": 100}, "unknown_dimension", "dim 100 is not served; allowed: 8, 4, 2"),
        ({"q": "fever", "dim": 2, "rerank_dim": 3}, "unknown_dimension", "rerank_dim 3 is not served; allowed: 8"),
        ({"q": "fever", "dim": 4, "rerank_dim": 2}, "invalid_request", "rerank_dim must be larger than dim (4)"),
        ({"q": "fever", "k": 0}, "invalid_request", "k must be between 1 and 100, got 0"),
        ({"q": "fever", "k": 101}, "invalid_request", "k must be between 1 and 100, got 101"),
        ({"q": "fever", "k": -5}, "invalid_request", "k must be between 1 and 100"),
        ({"q": ""}, "invalid_request", "query is empty"),
        ({"q": "   "}, "invalid_request", "query is empty"),
        ({"q": "x" * 2001}, "invalid_request", "query is 2001 characters long; at most 2000 are allowed"),
        ({}, "invalid_request", "query parameter 'q': Field required"),
        ({"q": "fever", "k": "ten"}, "invalid_request", "query parameter 'k': Input should be a valid integer"),
        ({"q": "fever", "dim": "1.5"}, "invalid_request", "query parameter 'dim'"),
        ({"q": "fever", "k": 10**30}, "invalid_request", "k must be between 1 and 100"),
    ],
)
def test_bad_get_search_is_422(client, params: dict, error_type: str, fragment: str):
    assert_error(client.get("/search", params=params), 422, error_type, fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "give exactly one of 'query' (a string) or 'queries' (a list of strings)"),
        ({"query": "a", "queries": ["b"]}, "give exactly one of 'query'"),
        ({"queries": []}, "at least one query is required"),
        ({"queries": ["fever"] * 65}, "at most 64 query texts per request, got 65"),
        ({"queries": ["fever", ""]}, "query 1 is empty"),
        ({"query": 123}, "body field 'query': Input should be a valid string"),
        ({"queries": "fever"}, "body field 'queries': Input should be a valid list"),
        ({"query": "fever", "k": "ten"}, "body field 'k': Input should be a valid integer"),
        ({"query": "fever", "k": 2.5}, "body field 'k'"),
        ({"query": "fever", "dim": None, "dimm": 4}, "body field 'dimm': Extra inputs are not permitted"),
        ([1, 2], "body: Input should be a valid dictionary"),
        ("fever", "body: Input should be a valid dictionary"),
    ],
)
def test_bad_post_search_is_422(client, body, fragment: str):
    assert_error(client.post("/search", json=body), 422, "invalid_request", fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"query": "fever",', "the request body is not valid JSON"),
        (b"\xff\xfe", "the request body is not valid JSON"),
        (b"", "body"),
    ],
)
def test_malformed_json_is_422(client, content: bytes, fragment: str):
    response = client.post("/search", content=content, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request", fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"input": []}, "body field 'input': an empty list; give a text, a list of texts, a list of token ids"),
        ({"input": ""}, "input is empty"),
        ({"input": {"text": "fever"}}, "body field 'input': give a text, a list of texts, a list of token ids"),
        ({"input": ["fever", 1]}, "body field 'input': a list that mixes texts and token ids; give a text"),
        ({"input": [[1], "fever"]}, "a list that mixes lists and texts"),
        ({"input": [[1, "a"]]}, "input[0] holds 'a', not a token id (an integer)"),
        ({"input": [[0], [1, None]]}, "input[1] holds None, not a token id (an integer)"),
        ({"input": [1.5]}, "input[0] is 1.5; give a text"),
        ({"input": [True]}, "input[0] is True; give a text"),
        ({"input": [[1, 2], []]}, "input[1] is an empty token array; give 1-2000 ids of the model's vocabulary (0..7)"),
        ({"input": [[1, 2], [3, 8]]}, "input[1][1]: token id 8 is outside the model's vocabulary (0..7)"),
        ({"input": [3, -1]}, "input[1]: token id -1 is outside the model's vocabulary (0..7)"),
        ({"input": [0] * 2001}, "input holds 2001 token ids; at most 2000 are allowed"),
        ({"input": [[0]] * 65}, "at most 64 input token arrays per request, got 65"),
        ({"input": "fever", "dimensions": "big"}, "body field 'dimensions': Input should be a valid integer"),
        ({"input": "fever", "encoding_format": "int4"}, "body field 'encoding_format'"),
        ({"input": ["fine", "x" * 2001]}, "input 1 is 2001 characters long"),
        ({}, "body field 'input': Field required"),
    ],
)
def test_bad_embeddings_requests_are_422(client, body, fragment: str):
    assert_error(client.post("/v1/embeddings", json=body), 422, "invalid_request", fragment)


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/search"), 405, "method_not_allowed")


def test_unexpected_failure_is_a_generic_500_with_detail_only_in_the_log(client, caplog):
    response = client.get("/search", params={"q": "explode"})
    message = assert_error(response, 500, "internal_error")
    assert "secret" not in message
    assert "secret internal detail" in caplog.text
    assert top(client.get("/search", params={"q": "fever", "k": 1})) == [("d0", 1.0)]  # still serving


# --- info, metrics, readiness, auth -----------------------------------------------------------


def test_dims_lists_cost_and_measured_quality(client):
    body = client.get("/dims").json()
    assert (body["model"], body["full_dim"], body["default_dim"], body["num_vectors"]) == ("keywords", 8, 8, 9)
    assert [d["dim"] for d in body["dims"]] == DIMS
    assert [d["ndcg_at_10"] for d in body["dims"]] == [0.9, 0.75, None]
    for entry in body["dims"]:
        assert entry["index_type"] == "Flat" and entry["vectors"] == 9 and entry["recall_at_10"] is None
        assert entry["bytes"] > 0
    assert client.get("/info").json() == body


def test_metrics_after_requests(keyword_index: Path):
    with serve(keyword_index) as fresh:
        fresh.get("/search", params={"q": "fever", "dim": 4})
        fresh.post("/search", json={"queries": ["rash", "cough"], "dim": 2, "rerank_dim": 8})
        fresh.post("/v1/embeddings", json={"input": "secret words", "dimensions": 2})
        fresh.get("/search", params={"q": "fever", "dim": 5})
        text = fresh.get("/metrics").text
    for line in [
        'mrl_request_duration_seconds_count{dim="4",endpoint="/search",status="2xx"} 1.0',
        'mrl_request_duration_seconds_count{dim="2",endpoint="/search",status="2xx"} 1.0',
        'mrl_request_duration_seconds_count{dim="2",endpoint="/v1/embeddings",status="2xx"} 1.0',
        'mrl_request_duration_seconds_count{dim="none",endpoint="/search",status="4xx"} 1.0',
        'mrl_request_duration_seconds_bucket{dim="4",endpoint="/search",le="10.0",status="2xx"} 1.0',
        'mrl_search_duration_seconds_count{dim="4"} 1.0',
        'mrl_rerank_duration_seconds_count{dim="8"} 1.0',
        'mrl_encode_duration_seconds_count{dim="2"} 2.0',
        'mrl_failures_total{type="unknown_dimension"} 1.0',
        'mrl_requests_total{endpoint="/search",status="2xx"} 2.0',
        "mrl_requests_in_flight 0.0",
        'mrl_index_vectors{dim="8"} 9.0',
        "mrl_encode_batch_size_count",
    ]:
        assert line in text, line
    assert 'le="0.0005"' in text and "secret" not in text and "fever" not in text


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "index_version": client.get("/dims").json()["index_version"]}


def test_not_ready_while_loading_in_the_background(keyword_index: Path):
    loading = threading.Event()
    release = threading.Event()
    encoder = ServiceKeywordEncoder()
    inner = keyword_loader(encoder)

    def slow_loader(settings, manifest):
        loading.set()
        assert release.wait(timeout=30)
        return inner(settings, manifest)

    with serve(keyword_index, loader=slow_loader, load_in_background=True) as client:
        assert loading.wait(timeout=30)
        assert client.get("/healthz").status_code == 200
        assert_error(client.get("/readyz"), 503, "not_ready", "still loading")
        assert_error(client.get("/search", params={"q": "fever"}), 503, "not_ready")
        release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        assert top(client.get("/search", params={"q": "fever", "k": 1})) == [("d0", 1.0)]


def test_failed_background_load_stays_not_ready_with_the_reason(keyword_index: Path):
    def broken_loader(settings, manifest):
        raise ModelError("cannot load model 'keywords': no such folder")

    with serve(keyword_index, loader=broken_loader, load_in_background=True) as client:
        wait_until(lambda: "loading failed" in client.get("/readyz").text)
        assert_error(client.get("/readyz"), 503, "not_ready", "loading failed: cannot load model 'keywords'")
        assert client.get("/healthz").status_code == 200


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll an event-driven condition; the timeout only bounds a hang, it is not a timing assumption."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_startup_refuses_an_index_of_another_model(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    with pytest.raises(IndexFolderError, match="not the model being served"):
        with serve(keyword_index, loader=keyword_loader(encoder, fingerprint="sha256:" + "0" * 64)):
            pass


def test_startup_refuses_a_default_dim_the_index_lacks(keyword_index: Path):
    with pytest.raises(ConfigurationError, match=r"default dim 5 is not served by this index \(it has \[8, 4, 2\]\)"):
        with serve(keyword_index, default_dim=5):
            pass


def test_api_key_protects_all_but_health_readiness_and_metrics(keyword_index: Path):
    with serve(keyword_index, api_key="s3cret") as client:
        for method, path, kwargs in [
            ("get", "/search", {"params": {"q": "fever"}}),
            ("post", "/search", {"json": {"query": "fever"}}),
            ("post", "/v1/embeddings", {"json": {"input": "fever"}}),
            ("get", "/dims", {}),
            ("post", "/admin/reload", {}),
        ]:
            assert_error(getattr(client, method)(path, **kwargs), 401, "unauthorized", "X-API-Key")
            wrong = getattr(client, method)(path, headers={"X-API-Key": "guess"}, **kwargs)
            assert_error(wrong, 401, "unauthorized")
        assert client.get("/search", params={"q": "fever"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200


def test_overload_is_refused_fast_with_429(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    with serve(keyword_index, encoder=encoder, max_in_flight=1) as client:
        encoder.hold_next_call()
        statuses = []
        first = threading.Thread(target=lambda: statuses.append(client.get("/search", params={"q": "fever"})))
        first.start()
        assert encoder.entered.wait(timeout=30)  # the first request is now inside the encoder
        refused = client.get("/search", params={"q": "rash"})
        assert_error(refused, 429, "overloaded", "more than 1 requests in flight")
        assert refused.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200  # probes are never refused
        encoder.release.set()
        first.join(timeout=30)
        assert statuses[0].status_code == 200
        assert "mrl_requests_in_flight 0.0" in client.get("/metrics").text


# --- micro-batching ---------------------------------------------------------------------------


def test_concurrent_queries_are_encoded_in_one_batch(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    with serve(keyword_index, encoder=encoder, batch_max_size=32) as client:
        encoder.hold_next_call()
        threads = [
            threading.Thread(target=client.get, args=("/search",), kwargs={"params": {"q": word}})
            for word in ("fever", "cough", "rash", "pain")
        ]
        threads[0].start()
        assert encoder.entered.wait(timeout=30)
        for thread in threads[1:]:
            thread.start()
        # The encoder is busy with the first query: the other three queue up and become one batch.
        wait_until(lambda: "mrl_encode_queue_texts 3.0" in client.get("/metrics").text)
        encoder.release.set()
        for thread in threads:
            thread.join(timeout=30)
    assert encoder.calls[-2:] == [1, 3]


# --- reload ----------------------------------------------------------------------------------


def test_reload_under_concurrent_searches_fails_no_request(tmp_path: Path):
    root = tmp_path / "index"
    first = build_keyword_index(write_data(tmp_path / "v1"), root)
    encoder = ServiceKeywordEncoder()
    with serve(root, encoder=encoder) as client:
        second = build_keyword_index(write_data(tmp_path / "v2", extra=3), root)
        failures: list[str] = []
        versions: set[str] = set()
        stop = threading.Event()

        def search_until_stopped() -> None:
            while not stop.is_set():
                response = client.get("/search", params={"q": "allergy rash", "dim": 8, "k": 5})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.add(response.json()["index_version"])

        threads = [threading.Thread(target=search_until_stopped) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: first.name in versions)
        reload = client.post("/admin/reload")
        wait_until(lambda: second.name in versions)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert failures == []
        assert reload.json() == {"previous_version": first.name, "version": second.name, "changed": True}
        assert versions == {first.name, second.name}
        hits = client.get("/search", params={"q": "allergy rash", "k": 3}).json()["results"][0]["hits"]
        assert sorted(h["id"] for h in hits) == ["n0", "n1", "n2"]  # equal scores: any order
        assert client.get("/dims").json()["num_vectors"] == 12
        assert client.post("/admin/reload").json()["changed"] is False
        metrics = client.get("/metrics").text
        assert 'mrl_index_vectors{dim="8"} 12.0' in metrics
        assert 'mrl_index_reloads_total{outcome="changed"} 1.0' in metrics


def test_reload_of_a_broken_version_keeps_serving_the_old_one(tmp_path: Path):
    root = tmp_path / "index"
    first = build_keyword_index(write_data(tmp_path / "v1"), root)
    with serve(root) as client:
        broken = build_keyword_index(write_data(tmp_path / "v2", extra=1), root)
        (broken / "index_4.faiss").write_bytes(b"short")
        message = assert_error(client.post("/admin/reload"), 409, "reload_failed", f"still serving {first.name}")
        assert "index_4.faiss" in message
        assert client.get("/search", params={"q": "fever"}).json()["index_version"] == first.name


def test_openapi_documents_every_parameter(client):
    schema = client.get("/openapi.json").json()
    parameters = {p["name"]: p for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert {"q", "dim", "k", "rerank_dim"} <= set(parameters)
    for name in ("q", "dim", "k", "rerank_dim"):
        parameter = parameters[name]
        assert parameter["description"] and parameter["schema"]["examples"], parameter
    assert "/v1/embeddings" in schema["paths"] and "/admin/reload" in schema["paths"]
    assert schema["paths"]["/search"]["get"]["responses"]["422"]["content"]["application/json"]["schema"]


# --- query-embedding cache ----------------------------------------------------------------


def test_query_cache_encodes_each_text_once_and_counts_hits_and_misses(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    with serve(keyword_index, encoder=encoder, query_cache_size=2) as client:
        del encoder.calls[:]  # the warm-up query at start-up
        first = top(client.get("/search", params={"q": "fever cough", "dim": 8}))
        again = top(client.get("/search", params={"q": "fever cough", "dim": 4}))  # cached at full dim
        client.post("/search", json={"queries": ["rash", "fever cough", "rash"], "dim": 8})
        client.get("/search", params={"q": "pain", "dim": 8})  # the cache holds two: "fever cough" goes
        client.get("/search", params={"q": "fever cough", "dim": 8})
        text = client.get("/metrics").text
    assert first == top_of(keyword_index, "fever cough", 8) and again == top_of(keyword_index, "fever cough", 4)
    assert encoder.calls == [1, 1, 1, 1]  # fever cough, rash (once for two), pain, fever cough again
    assert 'mrl_query_cache_lookups_total{result="hit"} 3.0' in text
    assert 'mrl_query_cache_lookups_total{result="miss"} 4.0' in text


def top_of(root: Path, query: str, dim: int) -> list[tuple[str, float]]:
    """The top hits of ``query`` from a server without a cache."""
    with serve(root) as client:
        return top(client.get("/search", params={"q": query, "dim": dim}))


def test_query_cache_is_off_by_default(client):
    client.get("/search", params={"q": "fever"})
    assert "mrl_query_cache_lookups_total{" not in client.get("/metrics").text


# --- quality and latency targets ----------------------------------------------------------

# Hand-made plans of the keyword index (dims 8, 4, 2): qualities and build-time search times known.
PLANS = [
    Plan(8, ndcg_at_10=0.9, ratio=1.0, search_ms=30.0, bytes_per_vector=32),
    Plan(4, ndcg_at_10=0.855, ratio=0.95, search_ms=10.0, bytes_per_vector=16),
    Plan(2, ndcg_at_10=0.63, ratio=0.7, search_ms=1.0, bytes_per_vector=8),
    Plan(2, 8, 3, ndcg_at_10=0.9, ratio=1.0, search_ms=20.0, bytes_per_vector=40),
]


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planned") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    add_plans(root, PLANS)
    return root


def search_plan(client, **params) -> dict:
    response = client.get("/search", params={"q": "fever cough", **params})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("params", "key", "missed"),
    [
        ({"min_quality": 1.0}, "2>8x3", []),  # 20 ms beats 8's 30 ms at full quality
        ({"min_quality": 0.9}, "4", []),
        ({"min_quality": 0.5}, "2", []),
        ({"latency_budget_ms": 25}, "2>8x3", []),  # the best that fits; 8 does not
        ({"latency_budget_ms": 15}, "4", []),
        ({"latency_budget_ms": 0.5}, "2", ["latency"]),  # none fits: the fastest
        ({"min_quality": 1.0, "latency_budget_ms": 15}, "4", ["quality"]),
    ],
)
def test_targets_choose_the_plan_the_measurements_say(planned: Path, params: dict, key: str, missed: list):
    with serve(planned) as client:
        body = search_plan(client, **params)
        plan = body["plan"]
        assert plan["key"] == key and plan["targets_missed"] == missed and plan["reason"]
        assert (body["dim"], body["rerank_dim"]) == (plan["dim"], plan["rerank_dim"])
        measured = next(p for p in PLANS if p.key == key)
        assert (plan["expected_ndcg_at_10"], plan["expected_ratio"]) == (measured.ndcg_at_10, measured.ratio)
        assert plan["latency_source"] == "estimate" and plan["latency_samples"] == 0
        dims = {"dim": plan["dim"]} | ({"rerank_dim": plan["rerank_dim"]} if plan["rerank_dim"] else {})
        same = search_plan(client, **dims)
        assert same["results"] == body["results"]  # the plan's dims, asked for by hand, give the same hits


def test_post_search_takes_targets_and_every_response_names_its_plan(planned: Path):
    with serve(planned) as client:
        response = client.post("/search", json={"queries": ["fever", "rash"], "min_quality": 0.9})
        assert response.status_code == 200, response.text
        assert response.json()["plan"]["key"] == "4" and len(response.json()["results"]) == 2
        explicit = search_plan(client, dim=2)["plan"]
        assert explicit["key"] == "2" and explicit["reason"] == "the dims the request gave"
        assert explicit["expected_ratio"] == 0.7
        assert search_plan(client)["plan"]["reason"] == "the default dim"


def test_live_latency_replaces_the_estimate_after_enough_requests(planned: Path):
    with serve(planned) as client:
        for _ in range(20):
            search_plan(client, dim=2)
        plans = {plan["key"]: plan for plan in client.get("/plans").json()["plans"]}
        assert plans["2"]["latency_source"] == "live" and plans["2"]["latency_samples"] == 20
        assert 0 < plans["2"]["p50_ms"] < 10.0  # whole requests with the keyword encoder: a few ms at most
        assert plans["8"]["latency_source"] == "estimate" and plans["8"]["p50_ms"] >= 30.0
        text = client.get("/metrics").text
    assert 'mrl_plan_requests_total{plan="2"} 20.0' in text


def test_plans_lists_every_plan_with_its_quality_and_latency(planned: Path):
    with serve(planned) as client:
        body = client.get("/plans").json()
    assert [plan["key"] for plan in body["plans"]] == ["8", "4", "2", "2>8x3"]
    first = body["plans"][0]
    assert first["ndcg_at_10"] == 0.9 and first["ratio"] == 1.0 and first["bytes_per_vector"] == 32
    assert first["build_search_ms"] == 30.0 and first["quality_kind"] == "judged"


def test_target_errors_say_what_to_do(planned: Path, tmp_path: Path):
    with serve(planned) as client:
        assert_error(client.get("/search", params={"q": "fever", "dim": 4, "min_quality": 0.9}), 422,
                     "invalid_request", "give either dim (and rerank_dim) or a target")  # fmt: skip
        body = {"query": "fever", "rerank_dim": 8, "latency_budget_ms": 5}
        assert_error(client.post("/search", json=body), 422, "invalid_request", "not both")
        assert_error(client.get("/search", params={"q": "fever", "min_quality": 1.5}), 422, "invalid_request")
        assert_error(client.get("/search", params={"q": "fever", "latency_budget_ms": 0}), 422, "invalid_request")
        assert client.get("/search", params={"q": "fever", "latency_budget_ms": 0.001}).status_code == 200
        assert 'mrl_targets_missed_total{target="latency"} 1.0' in client.get("/metrics").text
    bare = tmp_path / "bare"
    build_keyword_index(write_data(tmp_path / "data"), bare)
    with serve(bare) as client:
        assert_error(client.get("/search", params={"q": "fever", "min_quality": 0.9}), 422, "invalid_request",
                     "no measured quality", "`mrl index build`", "--eval-data BEIR_FOLDER")  # fmt: skip
        assert search_plan(client, latency_budget_ms=1000)["plan"]["key"] == "8"  # unmeasured: the largest that fits


def test_training_report_figures_make_single_stage_plans(keyword_index: Path):
    with serve(keyword_index) as client:  # its manifest has a training report's NDCG: 8 → 0.9, 4 → 0.75
        plans = client.get("/plans").json()["plans"]
        assert [(p["key"], p["ratio"], p["quality_kind"]) for p in plans] == [
            ("8", 1.0, "training report"),
            ("4", 0.8333, "training report"),
        ]
        source = "the model's training report: NDCG@10 on its evaluation data, not on this index's documents"
        assert {p["quality_source"] for p in plans} == {source}
        chosen = search_plan(client, min_quality=0.9)["plan"]
        assert chosen["key"] == "8" and chosen["reason"].endswith(f"; its quality is from {source}")
        dims = client.get("/dims").json()
        assert dims["quality_kind"] == "training report" and dims["dims"][0]["ndcg_source"].startswith(source[:30])
        either = search_plan(client, min_quality=0.8)["plan"]  # both meet it: the one estimated faster answers
        assert either["key"] in ("8", "4") and either["expected_ratio"] >= 0.8
