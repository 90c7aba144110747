"""A LangChain retriever over an mrl-retrieval server (``pip install './client[langchain]'``).

    from mrl_client.langchain import MrlRetriever
    retriever = MrlRetriever(base_url="http://127.0.0.1:8000", dim=128, k=4)
    documents = retriever.invoke("sudden painful swollen big toe joint at night")

Each hit becomes a ``Document``: the passage as ``page_content``, its id as ``id``, and its title,
score and metadata (the corpus's own fields) in ``metadata``.
"""

from __future__ import annotations

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from mrl_client.client import DEFAULT_TIMEOUT_S, AsyncMrlClient, MrlClient
from mrl_client.models import Hit, SearchResponse


class MrlRetriever(BaseRetriever):
    """Top-``k`` passages from ``GET``/``POST /search`` at a Matryoshka ``dim`` (or the plan a target picks)."""

    base_url: str
    api_key: str | None = None
    dim: int | None = None
    k: int = 4
    rerank_dim: int | None = None
    min_quality: float | None = None
    latency_budget_ms: float | None = None
    group_by: str | None = None  # "document": one passage per document
    filter: dict | None = None  # only documents whose metadata match, e.g. {"topic": "Gout"}
    timeout: float = DEFAULT_TIMEOUT_S

    def _options(self) -> dict:
        return {
            "dim": self.dim,
            "k": self.k,
            "rerank_dim": self.rerank_dim,
            "min_quality": self.min_quality,
            "latency_budget_ms": self.latency_budget_ms,
            "group_by": self.group_by,
            "filter": self.filter,
        }

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        with MrlClient(self.base_url, api_key=self.api_key, timeout=self.timeout) as client:
            return _documents(client.search(query, **self._options()))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        async with AsyncMrlClient(self.base_url, api_key=self.api_key, timeout=self.timeout) as client:
            return _documents(await client.search(query, **self._options()))


def _documents(response: SearchResponse) -> list[Document]:
    return [_document(hit) for hit in response.hits]


def _document(hit: Hit) -> Document:
    metadata = {**hit.metadata, "id": hit.id, "title": hit.title, "score": hit.score}
    metadata.update(doc_id=hit.doc_id, start=hit.start, end=hit.end)  # the passage's place in its document
    return Document(id=hit.id, page_content=hit.text, metadata=metadata)
