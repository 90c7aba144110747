"""The client's LangChain and LlamaIndex retrievers (its extras), with the real frameworks, against a real server."""

from __future__ import annotations

import asyncio

import pytest

from service.settings import ServiceSettings
from tests.helpers.servers import live_server
from tests.helpers.service import build_keyword_index, write_data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrations") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    settings = ServiceSettings(index=root, device="cpu", host="127.0.0.1", port=0, log_level="warning")
    with live_server(settings) as running:
        yield running


def test_the_langchain_retriever_returns_documents_with_their_place(server):
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from mrl_client.langchain import MrlRetriever

    retriever = MrlRetriever(base_url=server.url, dim=8, k=2)
    assert isinstance(retriever, BaseRetriever)
    documents = retriever.invoke("fever at night")
    assert all(isinstance(document, Document) for document in documents) and len(documents) == 2
    best = documents[0]
    assert best.id == "d0" and best.page_content == "advice about fever at home"
    assert best.metadata["title"] == "Leaflet 0" and best.metadata["topic"] == "fever" and best.metadata["score"] > 0
    again = asyncio.run(retriever.ainvoke("fever at night"))
    assert [document.id for document in again] == [document.id for document in documents]


def test_the_llamaindex_retriever_returns_scored_nodes(server):
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore
    from mrl_client.llamaindex import MrlLlamaIndexRetriever

    retriever = MrlLlamaIndexRetriever(server.url, dim=4, k=3)
    assert isinstance(retriever, BaseRetriever)
    nodes = retriever.retrieve("cough medicine")
    assert all(isinstance(node, NodeWithScore) for node in nodes) and len(nodes) == 3
    assert nodes[0].node.node_id == "d1" and nodes[0].node.get_content() == "advice about cough at home"
    assert nodes[0].node.metadata["title"] == "Leaflet 1" and nodes[0].score >= nodes[1].score
    again = asyncio.run(retriever.aretrieve("cough medicine"))
    assert [node.node.node_id for node in again] == [node.node.node_id for node in nodes]
