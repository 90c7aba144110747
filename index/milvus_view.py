"""What a search sees of a Milvus version that live writes change in place (:mod:`index.milvus_live`).

:class:`MilvusLiveView` has the interface of :class:`~index.overlay.LiveView`, over the collections themselves:
Milvus versions the rows, so a view pins nothing, and row numbers are the collections' row ids, valid across
writes (a row deleted since a search reads as None). Filters are checked against the fields as written so far
and evaluated by Milvus; grouping by document reads each row's ``doc_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.data import Document
from core.matryoshka import DimensionError
from index.filters import Filter, SearchFilter, parse_filter
from index.loaded import LoadedIndex
from index.milvus import SEARCH_CONSISTENCY
from index.milvus_docs import MilvusDocuments
from index.search import StagedHits, staged_search


@dataclass(frozen=True)
class MilvusLiveView:
    """The version as searches see it now (``next_row``: above every row written; ``metadata_fields``: the fields
    as written so far)."""

    base: LoadedIndex
    metadata_fields: dict[str, str]
    next_row: int
    consistency: str = SEARCH_CONSISTENCY  # of the queries a delete by filter runs

    @property
    def dims(self) -> list[int]:
        return self.base.dims

    def parse_filter(self, raw: Any) -> Filter | None:
        """A request's filter checked against :attr:`metadata_fields` (None for none).

        Raises:
            FilterError: Naming where in the filter the problem is.
        """
        return parse_filter(raw, self.metadata_fields)

    def search(
        self,
        queries: np.ndarray,
        dim: int,
        k: int,
        rerank_dim: int | None = None,
        candidates: int = 10,
        where: Filter | SearchFilter | None = None,
        group: bool = False,
    ) -> StagedHits:
        """Top ``k`` rows per query, as :func:`staged_search` finds them in the version's collections.

        Raises:
            DimensionError: ``dim`` is not one of the loaded version's.
        """
        if dim not in self.base.indexes:
            raise DimensionError(f"dimension {dim} is not served; served: {sorted(self.base.indexes, reverse=True)}")
        selected = SearchFilter(where) if isinstance(where, Filter) else where
        grouping = self.doc_ids if group else None
        index, vectors = self.base.indexes[dim], self.base.vectors
        return staged_search(index, vectors, queries, dim, k, rerank_dim, candidates, None, grouping, selected)

    def doc_ids(self, rows: list[int]) -> list[str]:
        """The document id of each row (a row deleted since the search is a group of its own)."""
        found = self._documents.doc_ids(rows)
        return [doc if doc is not None else f"\0deleted row {row}" for doc, row in zip(found, rows, strict=True)]

    def documents(self, rows: Sequence[int]) -> list[Document | None]:
        """The passages at ``rows``; None for -1 and for a row deleted since."""
        return self._documents.get(rows)

    def matching_documents(self, parsed: Filter) -> list[str]:
        """The ids of the live documents whose metadata match ``parsed`` (a delete by filter), sorted."""
        index = self.base.indexes[min(self.base.indexes)]
        rows = index.matching_rows(parsed, self.next_row, self.consistency)
        return sorted({doc for doc in self._documents.doc_ids(rows) if doc is not None})

    @property
    def _documents(self) -> MilvusDocuments:
        return self.base.store
