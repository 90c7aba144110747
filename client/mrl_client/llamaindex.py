"""A LlamaIndex retriever over an mrl-retrieval server (``pip install './client[llamaindex]'``).

    from mrl_client.llamaindex import MrlLlamaIndexRetriever
    retriever = MrlLlamaIndexRetriever("http://127.0.0.1:8000", dim=128, k=4)
    nodes = retriever.retrieve("sudden painful swollen big toe joint at night")

Each hit becomes a ``NodeWithScore``: a ``TextNode`` with the hit's id, passage and metadata (title
included), scored by the server's cosine similarity.
"""

from __future__ import annotations

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from mrl_client.client import DEFAULT_TIMEOUT_S, AsyncMrlClient, MrlClient
from mrl_client.models import SearchResponse


class MrlLlamaIndexRetriever(BaseRetriever):
    """Top-``k`` passages from ``/search`` at a Matryoshka ``dim`` (or the plan a target picks)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        dim: int | None = None,
        k: int = 4,
        rerank_dim: int | None = None,
        min_quality: float | None = None,
        latency_budget_ms: float | None = None,
        group_by: str | None = None,
        filter: dict | None = None,  # noqa: A002 (the API's name for it)
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self._where = {"base_url": base_url, "api_key": api_key, "timeout": timeout}
        self._options = {
            "dim": dim,
            "k": k,
            "rerank_dim": rerank_dim,
            "min_quality": min_quality,
            "latency_budget_ms": latency_budget_ms,
            "group_by": group_by,
            "filter": filter,
        }

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        where = dict(self._where)
        with MrlClient(where.pop("base_url"), **where) as client:
            return _nodes(client.search(query_bundle.query_str, **self._options))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        where = dict(self._where)
        async with AsyncMrlClient(where.pop("base_url"), **where) as client:
            return _nodes(await client.search(query_bundle.query_str, **self._options))


def _nodes(response: SearchResponse) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(id_=hit.id, text=hit.text, metadata=_metadata(hit)), score=hit.score)
        for hit in response.hits
    ]  # fmt: skip


def _metadata(hit) -> dict:
    """The document's metadata, its title, and the passage's place in it."""
    return {**hit.metadata, "title": hit.title, "doc_id": hit.doc_id, "start": hit.start, "end": hit.end}
