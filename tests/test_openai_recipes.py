"""The OpenAI-client recipes of the docs against a real ``mrl serve`` process (the tiny model, with an API key).

OpenAI's own client (floats, base64, token ids), LangChain's ``OpenAIEmbeddings`` and LlamaIndex's
``OpenAIEmbedding`` pointed at ``/v1`` with ``dimensions=64``: each answers what the service itself
answers. LangChain's default (``check_embedding_ctx_length=True``) tokenizes with tiktoken first, so
the recipes pass ``check_embedding_ctx_length=False``; the last test shows why, on this machine.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.helpers.servers import MRL_SERVE, ServeProcess, serve_process

API_KEY = "recipe-key"
TEXTS = ["gout in the big toe", "knee pain after running"]
DIM = 64


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """``mrl serve --model`` over the tiny model (dims 64 and 32, MiniLM's tokenizer), with an API key."""
    log = tmp_path_factory.mktemp("recipes") / "serve.log"
    with serve_process(log, (*MRL_SERVE, "--model", str(tiny_model)), device="cpu", api_key=API_KEY) as running:
        yield running


def reference(server: ServeProcess, input: str | list, dimensions: int = DIM) -> np.ndarray:
    """The service's own answer, in floats, without any client library."""
    body = {"input": input, "dimensions": dimensions, "encoding_format": "float"}
    response = httpx.post(f"{server.base}/v1/embeddings", json=body, headers={"X-API-Key": API_KEY}, timeout=30)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def embeddings_requests(server: ServeProcess) -> float:
    """How many /v1/embeddings requests the server has answered (its Prometheus counter)."""
    lines = server.get("/metrics").text.splitlines()
    prefix = 'mrl_requests_total{endpoint="/v1/embeddings"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def test_the_openai_client_floats_base64_and_token_ids(server: ServeProcess, tiny_model: Path):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    assert model == "tiny"
    expected = reference(server, TEXTS)
    # The client asks for base64 and decodes it itself unless told a format: both ways give the same floats.
    response = client.embeddings.create(model=model, input=TEXTS, dimensions=DIM)
    np.testing.assert_allclose([item.embedding for item in response.data], expected, atol=1e-6)
    assert response.model == model and response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)
    raw = client.embeddings.create(model=model, input=TEXTS, dimensions=DIM, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in raw.data]
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))  # the served model's own token ids
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    by_ids = client.embeddings.create(model=model, input=ids, dimensions=DIM)
    np.testing.assert_allclose([item.embedding for item in by_ids.data], expected, atol=1e-6)
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions 5 is not served; allowed: 64, 32"):
        client.embeddings.create(model=model, input=TEXTS, dimensions=5)


def test_langchain_openai_embeddings(server: ServeProcess):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="tiny",
        base_url=f"{server.base}/v1",
        api_key=API_KEY,
        check_embedding_ctx_length=False,  # send the texts; LangChain would send tiktoken's token ids instead
        dimensions=DIM,
        max_retries=0,
    )
    expected = reference(server, TEXTS)
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(TEXTS[0]), expected[0], atol=1e-6)


def test_llamaindex_openai_embedding_takes_any_model_name(server: ServeProcess):
    from llama_index.embeddings.openai import OpenAIEmbedding

    # model_name= (not model=, which must be one of OpenAI's names) is sent as the request's model.
    embed_model = OpenAIEmbedding(
        model_name="tiny", api_base=f"{server.base}/v1", api_key=API_KEY, dimensions=DIM, max_retries=0
    )
    expected = reference(server, TEXTS)
    np.testing.assert_allclose(embed_model.get_text_embedding_batch(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(embed_model.get_query_embedding(TEXTS[1]), expected[1], atol=1e-6)


def test_langchain_by_default_tokenizes_with_tiktoken_which_is_not_the_served_models_tokenizer(server):
    """Without ``check_embedding_ctx_length=False`` LangChain sends token ids of tiktoken's ``cl100k_base``.

    Offline (as here) tiktoken cannot even fetch that encoding, and the call fails before any request; online,
    the ids it sends are not ids of the served model's vocabulary: refused, or embedded as other text.
    """
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="tiny", base_url=f"{server.base}/v1", api_key=API_KEY, dimensions=DIM, max_retries=0
    )
    before = embeddings_requests(server)
    try:
        tiktoken.get_encoding("cl100k_base")
    except Exception as offline:  # its BPE file comes from openaipublic.blob.core.windows.net
        with pytest.raises(type(offline)):
            embeddings.embed_query(TEXTS[0])
        assert embeddings_requests(server) == before  # nothing was sent
        return
    try:
        vector = embeddings.embed_query(TEXTS[0])
    except openai.UnprocessableEntityError as refused:
        assert "outside the model's vocabulary" in str(refused)
    else:
        assert not np.allclose(vector, reference(server, TEXTS[0])[0], atol=1e-3)
