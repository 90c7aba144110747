"""``mrl serve --model MODEL`` without an index: the model alone, for ``/v1/embeddings``, and no search.

In process with the keyword encoder (exact), and for real: ``mrl serve --model`` in a subprocess over the
tiny random BERT (MiniLM's tokenizer, so its token ids are real ones), ``mrl serve`` with neither an index
nor a model failing in one line, and (``slow``) the real default model's token ids against its texts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.models import DEFAULT_MODEL, MatryoshkaCard
from service.app import create_app
from service.encoders import LoadedEncoder
from service.engine import ConfigurationError
from service.settings import ServiceSettings
from tests.helpers.models import TINY_DIMS
from tests.helpers.servers import MRL_SERVE, assert_one_line_error, mrl_in_process, serve_process
from tests.helpers.service import FINGERPRINT, MODEL_NAME, ServiceKeywordEncoder, assert_error

INDEX_ONLY = [("GET", "/search?q=fever"), ("POST", "/search"), ("GET", "/dims"), ("GET", "/plans")]
INDEX_ONLY += [("POST", "/admin/reload")]
NO_INDEX = ("serves embeddings only", "started with --model and no --index", "mrl serve --index LOCATOR")


def model_alone(dims: list[int] | None = None, **settings):
    """The app serving the keyword model alone (its dims: ``dims``, else the defaults for its 8 coordinates)."""
    encoder = ServiceKeywordEncoder()
    loader = lambda settings, manifest: LoadedEncoder(encoder, FINGERPRINT, "fake", dims=dims)  # noqa: E731
    return TestClient(create_app(ServiceSettings(model=MODEL_NAME, device="cpu", **settings), encoder_loader=loader))


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_a_model_alone_serves_embeddings_and_models_and_refuses_search(tmp_path: Path):
    with model_alone([8, 4, 2]) as client:
        assert client.get("/readyz").json() == {"status": "ready", "index_version": None}
        assert client.get("/healthz").status_code == 200 and client.get("/docs").status_code == 200
        found = vectors(client.post("/v1/embeddings", json={"input": ["fever", "cough rash"], "dimensions": 4}))
        np.testing.assert_allclose(found, [[1, 0, 0, 0], [0, 1 / np.sqrt(2), 1 / np.sqrt(2), 0]], atol=1e-7)
        assert (vectors(client.post("/v1/embeddings", json={"input": [[0], [1, 2]], "dimensions": 4})) == found).all()
        bits = client.post("/v1/embeddings", json={"input": ["fever"], "dimensions": 8, "encoding_format": "ubinary"})
        assert bits.json()["data"][0]["embedding"] == [128]  # the first coordinate alone is positive
        assert_error(client.post("/v1/embeddings", json={"input": "fever", "encoding_format": "int8"}), 422,
                     "invalid_request", "serves embeddings only (no index): use float, base64 or ubinary")  # fmt: skip
        (card,) = client.get("/v1/models").json()["data"]
        assert (card["id"], card["dimensions"], card["default_dimensions"]) == (MODEL_NAME, [8, 4, 2], 8)
        assert card["index_version"] is None and client.get(f"/v1/models/{MODEL_NAME}").json() == card
        for method, path in INDEX_ONLY:
            assert_error(client.request(method, path, json={"query": "fever"}), 404, "no_index", *NO_INDEX)
        serving = [line for line in client.get("/metrics").text.splitlines() if line.startswith("mrl_serving_info")]
        assert len(serving) == 1 and 'index="none"' in serving[0] and 'version="none"' in serving[0]
        assert f'model="{MODEL_NAME}"' in serving[0]
        assert set(client.get("/openapi.json").json()["paths"]) == {
            "/v1/embeddings", "/v1/models", "/v1/models/{model_id}", "/healthz", "/readyz", "/metrics"
        }  # fmt: skip


def test_without_recorded_dims_a_model_serves_its_full_dim_and_powers_of_two_down_to_32():
    with model_alone() as client:  # 8 coordinates: no power of two from 32 down fits under them
        assert client.get("/v1/models").json()["data"][0]["dimensions"] == [8]
        assert_error(client.post("/v1/embeddings", json={"input": "fever", "dimensions": 4}), 422, "unknown_dimension")
    with model_alone([8, 4, 2], embeddings_default_dim=2) as client:
        assert vectors(client.post("/v1/embeddings", json={"input": "fever"})).shape == (1, 2)
    with pytest.raises(ConfigurationError, match=r"embeddings default dim 3 is not served by this model \(it has"):
        with model_alone([8, 4, 2], embeddings_default_dim=3):
            pass


def test_a_model_folder_serves_the_dims_of_its_mrl_json(tiny_model: Path, tmp_path: Path):
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_model, folder)
    MatryoshkaCard(dims=[64, 48, 16], base_model="tiny").write(folder)
    with TestClient(create_app(ServiceSettings(model=str(folder), device="cpu"))) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert (card["id"], card["dimensions"], card["index_version"]) == ("tuned", [64, 48, 16], None)
        assert vectors(client.post("/v1/embeddings", json={"input": "knee pain", "dimensions": 16})).shape == (1, 16)


def test_mrl_serve_with_a_model_and_no_index_serves_embeddings(tiny_model: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    text = "Sudden, painful swelling of the big toe at night?"
    ids = AutoTokenizer.from_pretrained(str(tiny_model))(text, add_special_tokens=False)["input_ids"]
    command = (*MRL_SERVE, "--model", str(tiny_model), "--device", "cpu", "--log-level", "warning")
    with serve_process(tmp_path / "serve.log", command) as server:
        assert server.get("/readyz").json() == {"status": "ready", "index_version": None}
        (card,) = server.get("/v1/models").json()["data"]
        assert (card["id"], card["dimensions"], card["index_version"]) == ("tiny", TINY_DIMS, None)

        def embed(input) -> httpx.Response:
            return httpx.post(f"{server.base}/v1/embeddings", json={"input": input, "dimensions": 32}, timeout=30)

        by_text, by_ids = embed([text]), embed([ids])
        np.testing.assert_allclose(vectors(by_ids), vectors(by_text), atol=1e-6)  # the model's own tokenization
        seen = len(ids) + 2  # with [CLS] and [SEP]
        assert by_ids.json()["usage"] == by_text.json()["usage"] == {"prompt_tokens": seen, "total_tokens": seen}
        message = f"input[0][{len(ids)}]: token id 30522 is outside the model's vocabulary (0..30521)"
        assert_error(embed([[*ids, 30522]]), 422, "invalid_request", message)
        assert_error(server.get("/search", q="gout"), 404, "no_index", *NO_INDEX)
        assert "mrl.access" not in server.output()  # --log-level warning: no line per request, and none at INFO
        assert " INFO " not in server.output()


def test_mrl_serve_with_neither_an_index_nor_a_model_is_one_line(capsys, caplog, monkeypatch):
    result = mrl_in_process(["serve"], capsys, caplog, monkeypatch)
    assert_one_line_error(result, "nothing to serve: give --index LOCATOR to serve search and embeddings, or --model")


@pytest.mark.slow
def test_token_ids_of_the_real_model_embed_as_their_texts():
    """The default model's tokenizer's ids of a text, without special tokens, give that text's vector."""
    from transformers import AutoTokenizer

    from core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    texts = ["How do I lower my blood sugar?", "Knee pain after running, worse on stairs (2 weeks)", "naïve café"]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    with TestClient(create_app(ServiceSettings(model=DEFAULT_MODEL, device="cpu"))) as client:
        for kind in ("document", "query"):
            by_text = client.post("/v1/embeddings", json={"input": texts, "input_type": kind})
            by_ids = client.post("/v1/embeddings", json={"input": ids, "input_type": kind})
            cosines = (vectors(by_text) * vectors(by_ids)).sum(axis=1)
            assert cosines.min() >= 0.999, cosines
            assert by_ids.json()["usage"] == by_text.json()["usage"]
        assert vectors(client.post("/v1/embeddings", json={"input": ids[0], "dimensions": 64})).shape == (1, 64)
