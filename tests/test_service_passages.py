"""Hits with their place, and hits grouped by document, over a real socket (keyword encoder).

A long leaflet is split into passages at build time (MiniLM's tokenizer, a 254-token window); its
passages compete with short documents for the same words, so an ungrouped search returns several
passages of it and a grouped one returns each document once, with its best passage.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.settings import ServiceSettings
from tests.conftest import write_beir
from tests.helpers.servers import live_server
from tests.helpers.service import build_keyword_index, corpus

PARAGRAPH = (
    "A fever is common in children and usually passes within a few days. Give fluids, let them rest, and "
    "watch for a rash or a stiff neck, which need a doctor at once. A fever with cough can mean a chest "
    "infection; a fever after travel needs a doctor too."
)
LONG = "\n\n".join(f"Part {number}. {PARAGRAPH}" for number in range(12))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("passages")
    documents = [*corpus(), {"_id": "long", "title": "Fever: the long leaflet", "text": LONG, "metadata": {}}]
    data = write_beir(folder / "data", documents, [{"_id": "q", "text": "fever"}], {"test": [("q", "long", 1)]})
    build_keyword_index(data, folder / "index")
    settings = ServiceSettings(index=folder / "index", device="cpu", host="127.0.0.1", port=0, snippet_chars=0)
    with live_server(settings) as running:
        yield running


def search(server, **params) -> list[dict]:
    response = httpx.get(f"{server.url}/search", params={"q": "fever", "dim": 8, "k": 6, **params})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["hits"]


def test_a_hit_is_a_passage_with_its_document_and_span(server):
    hits = search(server)
    passages = [hit for hit in hits if hit["doc_id"] == "long"]
    assert len(passages) >= 2  # several passages of the long leaflet outscore the short documents
    for hit in passages:
        assert hit["id"].startswith("long#") and hit["title"] == "Fever: the long leaflet"
        assert LONG[hit["start"] : hit["end"]] == hit["text"]  # the span is the passage's place in the document
    whole = next(hit for hit in search(server, q="cough") if hit["doc_id"] == "d1")
    assert whole["id"] == "d1" and (whole["start"], whole["end"]) == (0, len(whole["text"]))


@pytest.mark.parametrize("plan", [{"dim": 8}, {"dim": 4, "rerank_dim": 8}])
def test_group_by_document_returns_the_best_passage_of_distinct_documents(server, plan):
    ungrouped = search(server, **plan)
    grouped = search(server, group_by="document", **plan)
    documents = [hit["doc_id"] for hit in grouped]
    assert len(documents) == len(set(documents)) == 6
    best = {}
    for hit in ungrouped:
        best.setdefault(hit["doc_id"], hit)
    for hit in grouped:  # each document's best passage, in score order
        if hit["doc_id"] in best:
            assert hit == best[hit["doc_id"]]
    assert [hit["score"] for hit in grouped] == sorted((hit["score"] for hit in grouped), reverse=True)


def test_group_by_in_a_post_batch_and_a_bad_value_is_a_422(server):
    body = {"queries": ["fever", "rash"], "dim": 8, "k": 3, "group_by": "document"}
    results = httpx.post(f"{server.url}/search", json=body).json()["results"]
    assert all(len({hit["doc_id"] for hit in result["hits"]}) == 3 for result in results)
    refused = httpx.get(f"{server.url}/search", params={"q": "fever", "group_by": "page"})
    assert refused.status_code == 422 and "document" in refused.json()["error"]["message"]


def test_the_schema_describes_the_place_and_the_grouping(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    hit = schema["components"]["schemas"]["HitModel"]["properties"]
    assert {"doc_id", "start", "end"} <= set(hit)
    parameters = {p["name"]: p for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert "document" in str(parameters["group_by"]["schema"])


def test_an_index_built_before_passages_reads_as_whole_documents(tmp_path: Path):
    """A docs.sqlite without the passage columns (older builds) still serves, each row its own document."""
    import sqlite3

    from index.store import DocumentStore

    path = tmp_path / "docs.sqlite"
    connection = sqlite3.connect(path)
    old_schema = "CREATE TABLE documents (row INTEGER PRIMARY KEY, id TEXT, title TEXT, text TEXT, metadata TEXT)"
    connection.execute(old_schema)
    connection.execute("INSERT INTO documents VALUES (0, 'd0', 'T', 'some text', '{}')")
    connection.commit()
    connection.close()
    store = DocumentStore(path)
    try:
        (document,) = store.get([0])
        assert (document.id, document.doc_id, document.span) == ("d0", "d0", (0, 9)) and store.ids() == {"d0"}
    finally:
        store.close()


def test_the_client_and_the_retrievers_carry_the_place_and_group(server):
    from mrl_client import MrlClient
    from mrl_client.langchain import MrlRetriever
    from mrl_client.llamaindex import MrlLlamaIndexRetriever

    with MrlClient(server.url) as client:
        hits = client.search("fever", dim=8, k=4, group_by="document").hits
    assert len({hit.doc_id for hit in hits}) == 4
    long = next(hit for hit in hits if hit.doc_id == "long")
    assert LONG[long.start : long.end] == long.text
    documents = MrlRetriever(base_url=server.url, dim=8, k=4, group_by="document").invoke("fever")
    assert [d.metadata["doc_id"] for d in documents] == [hit.doc_id for hit in hits]
    assert documents[[hit.doc_id for hit in hits].index("long")].metadata["start"] == long.start
    nodes = MrlLlamaIndexRetriever(server.url, dim=8, k=4, group_by="document").retrieve("fever")
    assert [node.node.metadata["doc_id"] for node in nodes] == [hit.doc_id for hit in hits]
