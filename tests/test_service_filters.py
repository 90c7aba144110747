"""Metadata filters through the HTTP API, over a real socket (keyword encoder, a FAISS folder index).

The grammar and the engines' exactness are tested in ``tests/test_filters.py``; here: the request
shapes (POST object, GET JSON text), the 422s, the schema, and filters together with grouping,
two-stage plans, latency targets, batches and the client.
"""

from __future__ import annotations

import json

import httpx
import pytest
from mrl_client import MrlAPIError, MrlClient

from service.settings import ServiceSettings
from tests.conftest import write_beir
from tests.helpers.servers import live_server
from tests.helpers.service import VOCABULARY, build_keyword_index

# Every document mentions fever, so an unfiltered search for it ranks them all; the filter decides.
DOCUMENTS = [
    {"_id": f"d{i}", "title": f"Leaflet {i}", "text": f"fever and {VOCABULARY[i % 8]} advice " * (1 + i % 3),
     "metadata": {"topic": VOCABULARY[i % 8], "year": 2015 + i, "reviewed": i % 2 == 0}}
    for i in range(16)
] + [{"_id": "bare", "title": "No metadata", "text": "fever fever", "metadata": {}}]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filters")
    data = write_beir(folder / "data", DOCUMENTS, [{"_id": "q", "text": "fever"}], {"test": [("q", "d0", 1)]})
    build_keyword_index(data, folder / "index")
    settings = ServiceSettings(index=folder / "index", device="cpu", host="127.0.0.1", port=0)
    with live_server(settings) as running:
        yield running


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/search", json={"query": "fever", "dim": 8, "k": 20, **body})


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["doc_id"] for hit in response.json()["results"][0]["hits"]]


def matching(predicate) -> set[str]:
    return {doc["_id"] for doc in DOCUMENTS if predicate(doc["metadata"])}


@pytest.mark.parametrize(
    ("where", "predicate"),
    [
        ({"topic": "rash"}, lambda m: m.get("topic") == "rash"),
        ({"year": {"$gte": 2025}}, lambda m: m.get("year", 0) >= 2025),
        ({"topic": {"$in": ["cough", "pain"]}, "reviewed": True}, lambda m: m.get("topic") in ("cough", "pain")
         and m.get("reviewed") is True),  # fmt: skip
        ({"topic": {"$ne": "fever"}}, lambda m: m.get("topic") != "fever"),  # "bare" has no topic: it matches
        ({"$or": [{"year": {"$lt": 2017}}, {"topic": {"$nin": ["fever", "cough", "rash", "pain", "sleep"]}}]},
         lambda m: m.get("year", 9999) < 2017 or m.get("topic") not in ("fever", "cough", "rash", "pain", "sleep")),
    ],
)  # fmt: skip
def test_a_filter_returns_exactly_the_matching_documents(server, where, predicate):
    assert set(ids(post(server, filter=where))) == matching(predicate)
    as_text = httpx.get(f"{server.url}/search", params={"q": "fever", "dim": 8, "k": 20, "filter": json.dumps(where)})
    assert ids(as_text) == ids(post(server, filter=where))


def test_filters_combine_with_two_stage_grouping_targets_and_batches(server):
    where = {"reviewed": True}
    expected = matching(lambda m: m.get("reviewed") is True)
    assert set(ids(post(server, filter=where, dim=4, rerank_dim=8))) == expected
    assert set(ids(post(server, filter=where, group_by="document"))) == expected
    targeted = post(server, filter=where, dim=None, latency_budget_ms=1000)
    assert set(ids(targeted)) == expected
    batch = httpx.post(f"{server.url}/search", json={"queries": ["fever", "rash"], "k": 3, "filter": where}).json()
    assert all(hit["metadata"]["reviewed"] is True for result in batch["results"] for hit in result["hits"])
    assert ids(post(server, filter={"topic": "nothing-like-it"})) == []  # an empty answer, not an error


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ({"topc": "rash"}, "filter.topc: unknown field 'topc'; fields: reviewed, topic, year"),
        ({"year": {"$gt": "2020"}}, "filter.year.$gt: expects a number"),
        ({"topic": {"$like": "r%"}}, "unknown operator; operators: $eq, $ne, $in, $nin, $gt, $gte, $lt, $lte"),
        ({"$or": []}, "filter.$or: expects a non-empty list"),
    ],
)
def test_a_bad_filter_is_a_422_that_says_what_is_allowed(server, where, fragment):
    response = post(server, filter=where)
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request"
    assert fragment in response.json()["error"]["message"], response.json()["error"]["message"]


@pytest.mark.parametrize("text", ["{topic: rash}", '["topic"]'])
def test_a_get_filter_that_is_not_a_json_object_is_a_422(server, text):
    response = httpx.get(f"{server.url}/search", params={"q": "fever", "filter": text})
    assert response.status_code == 422 and "filter must be a JSON object" in response.json()["error"]["message"]


def test_dims_lists_the_fields_and_the_schema_describes_the_filter(server):
    dims = httpx.get(f"{server.url}/dims").json()
    assert dims["metadata_fields"] == {"reviewed": "bool", "topic": "string", "year": "number"}
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["components"]["schemas"]["SearchRequest"]["properties"]["filter"]
    assert "$gte" in json.dumps(body) and "$or" in json.dumps(body)
    get_filter = next(p for p in schema["paths"]["/search"]["get"]["parameters"] if p["name"] == "filter")
    assert "JSON" in get_filter["description"]


def test_the_client_sends_filters_and_carries_the_422(server):
    with MrlClient(server.url) as client:
        hits = client.search("fever", dim=8, k=20, filter={"topic": "rash"}).hits
        assert {hit.doc_id for hit in hits} == matching(lambda m: m.get("topic") == "rash")
        assert client.dims().metadata_fields["year"] == "number"
        with pytest.raises(MrlAPIError) as refused:
            client.search("fever", filter={"colour": "red"})
    assert refused.value.status == 422 and "unknown field 'colour'" in refused.value.message
