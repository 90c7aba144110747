"""What a living index serves: a folder version (the base) seen through an overlay of writes not yet compacted.

The overlay holds the delta (passages upserted since the base, with their full vectors and each served dim's
truncated and normalised vectors, searched exactly) and the tombstones (rows of the base or of the delta that a
later upsert or delete replaced). Row numbers continue the base's: delta row ``i`` is
``base.manifest.num_vectors + i``.

An :class:`Overlay` is never changed once searches can see it: a write makes a new one (copy-on-write of the
small parts; the delta's vectors live in append-only buffers of which each overlay reads only its own prefix),
so a search sees every write before it whole, at every dim, and none after it. A :class:`LiveView` searches one
(base, overlay) pair through :func:`index.search.staged_search`, over a :class:`CombinedIndex` that answers the
base's FAISS index restricted to its live rows (before the scan, so tombstones never shorten a result list) and
the delta's exact scores, merged by score: two-stage re-scoring and grouping by document apply across both.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.data import Document
from core.matryoshka import DimensionError, truncate_normalize
from index.backends import MISSING_SCORE, VectorIndex
from index.filters import MIXED, Filter, MetadataTable, SearchFilter, metadata_fields, parse_filter
from index.loaded import LoadedIndex
from index.search import StagedHits, staged_search


@dataclass(frozen=True)
class BaseCatalog:
    """Who each base row is: its document id, and the rows of each document and of each passage id."""

    doc_of_row: list[str]
    doc_rows: dict[str, tuple[int, ...]]
    passage_row: dict[str, int]

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str | None]]) -> BaseCatalog:
        """From ``(passage id, parent)`` per row, in row order."""
        doc_of_row = [parent if parent is not None else passage for passage, parent in rows]
        doc_rows: dict[str, list[int]] = {}
        for row, doc in enumerate(doc_of_row):
            doc_rows.setdefault(doc, []).append(row)
        passage_row = {passage: row for row, (passage, _) in enumerate(rows)}
        return cls(doc_of_row, {doc: tuple(found) for doc, found in doc_rows.items()}, passage_row)


class DeltaBuffers:
    """The delta's rows, append-only: full vectors and each dim's reduced ones, grown by doubling.

    Rows are only ever written past every overlay's count, so overlays share these arrays; when they are
    full, the next overlay gets new, larger ones and older overlays keep reading theirs.
    """

    def __init__(self, full_dim: int, dims: Sequence[int], capacity: int = 64) -> None:
        self.full = np.zeros((capacity, full_dim), dtype=np.float32)
        self.reduced = {dim: np.zeros((capacity, dim), dtype=np.float32) for dim in dims}
        self.passages: list[Document] = []

    @property
    def capacity(self) -> int:
        return len(self.full)

    def extended(self, count: int, passages: list[Document], vectors: np.ndarray) -> DeltaBuffers:
        """These buffers (or larger copies of their first ``count`` rows) with ``passages`` written at ``count``."""
        target = self
        if count + len(passages) > self.capacity:
            target = DeltaBuffers(self.full.shape[1], list(self.reduced), max(2 * self.capacity, count + len(passages)))
            target.full[:count] = self.full[:count]
            for dim, reduced in self.reduced.items():
                target.reduced[dim][:count] = reduced[:count]
            target.passages = self.passages[:count]
        end = count + len(passages)
        target.full[count:end] = vectors
        for dim, reduced in target.reduced.items():
            reduced[count:end] = truncate_normalize(vectors, dim)
        del target.passages[count:]  # rows a failed write left behind
        target.passages.extend(passages)
        return target


@dataclass(frozen=True)
class Overlay:
    """One consistent state of the writes over a base: the delta's first ``count`` rows and the tombstones."""

    buffers: DeltaBuffers
    count: int
    base_dead: np.ndarray  # bool per base row
    delta_dead: np.ndarray  # bool per delta row (``count`` of them)
    base_live: np.ndarray | None  # the base rows not dead, sorted (None: all of them)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def empty(cls, base_rows: int, full_dim: int, dims: Sequence[int]) -> Overlay:
        return cls(DeltaBuffers(full_dim, dims), 0, np.zeros(base_rows, dtype=bool), np.zeros(0, dtype=bool), None)

    @property
    def passages(self) -> list[Document]:
        return self.buffers.passages[: self.count]

    @property
    def tombstones(self) -> int:
        return int(self.base_dead.sum() + self.delta_dead.sum())

    def written(self, passages: list[Document], vectors: np.ndarray, dead_base: list[int], dead_delta: list[int]):
        """A new overlay: ``dead_base`` and ``dead_delta`` rows tombstoned, then ``passages`` appended."""
        base_dead = self.base_dead
        if dead_base:
            base_dead = base_dead.copy()
            base_dead[dead_base] = True
        delta_dead = np.concatenate([self.delta_dead, np.zeros(len(passages), dtype=bool)])
        delta_dead[dead_delta] = True
        buffers = self.buffers.extended(self.count, passages, vectors) if passages else self.buffers
        live = np.flatnonzero(~base_dead) if dead_base else self.base_live
        count = self.count + len(passages)
        return replace(self, buffers=buffers, count=count, base_dead=base_dead, delta_dead=delta_dead, base_live=live)

    def live_rows(self, base_rows: int) -> SearchFilter | None:
        """Every live row (base, then delta after ``base_rows``) as a filter; None when no row is dead."""
        if self.base_live is None and not self.delta_dead.any():
            return None
        if "live" not in self._cache:
            base = self.base_live if self.base_live is not None else np.arange(base_rows)
            rows = np.concatenate([base, np.flatnonzero(~self.delta_dead) + base_rows]).astype(np.int64)
            self._cache["live"] = SearchFilter(AllRows(), rows)
        return self._cache["live"]

    def delta_table(self, fields: dict[str, str]) -> MetadataTable:
        """The delta rows' metadata as a filter table (built at the first filtered search of this overlay)."""
        table = self._cache.get("table")
        if table is None:
            table = self._cache["table"] = MetadataTable.build([p.metadata for p in self.passages], fields)
        return table

    def delta_fields(self) -> dict[str, str]:
        fields = self._cache.get("fields")
        if fields is None:
            fields = self._cache["fields"] = metadata_fields(p.metadata for p in self.passages)
        return fields


def merged_fields(base: dict[str, str], delta: dict[str, str]) -> dict[str, str]:
    """The metadata fields of base and delta together: a field of two kinds is ``mixed`` (not filterable)."""
    merged = dict(base)
    for name, kind in delta.items():
        merged[name] = kind if merged.get(name, kind) == kind else MIXED
    return dict(sorted(merged.items()))


class AllRows(Filter):
    """No condition: what a :class:`SearchFilter` carries when it only leaves tombstoned rows out."""

    depth = 0
    conditions = 0

    def mask(self, table: MetadataTable) -> np.ndarray:
        return np.ones(len(table), dtype=bool)

    def _expression(self, json_field: str) -> str:
        raise NotImplementedError("only FAISS folder indexes are served live")


@dataclass(frozen=True)
class LiveView:
    """One base and one overlay, searched together; row numbers mean what they mean in this view only."""

    base: LoadedIndex
    overlay: Overlay
    catalog: BaseCatalog
    search_lock: AbstractContextManager | None = None

    @property
    def base_rows(self) -> int:
        return self.base.manifest.num_vectors

    @property
    def dims(self) -> list[int]:
        return self.base.dims

    @property
    def metadata_fields(self) -> dict[str, str]:
        """Each metadata field's kind over the live rows' documents (base and delta)."""
        return merged_fields(self.base.metadata_fields, self.overlay.delta_fields())

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
        """Top ``k`` live rows per query, as :func:`staged_search` finds them over base and delta together.

        Args:
            queries: ``(n, full_dim)`` query vectors, unnormalised.
            dim: A dim the base has an index for. rerank_dim: Re-score the shortlist at this dim (two-stage).
            candidates: The shortlist holds ``k * candidates`` rows. where: Only rows whose metadata it allows.
            group: The best passage of each of ``k`` documents.

        Raises:
            DimensionError: ``dim`` is not one of the base's.
        """
        if dim not in self.base.indexes:
            raise DimensionError(f"dimension {dim} is not served; served: {sorted(self.base.indexes, reverse=True)}")
        combined = CombinedIndex(self.base.indexes[dim], self.overlay, dim, self.base_rows)
        return staged_search(
            combined,
            CombinedVectors(self.base.vectors, self.overlay, self.base_rows),
            queries,
            dim,
            k,
            rerank_dim,
            candidates,
            self.search_lock,
            self.doc_ids if group else None,
            self._allowed(where.filter if isinstance(where, SearchFilter) else where),
        )

    def _allowed(self, parsed: Filter | None) -> SearchFilter | None:
        """The rows a search may return: live, and allowed by ``parsed``; None when that is every row."""
        overlay = self.overlay
        if parsed is None:
            return overlay.live_rows(self.base_rows)
        base_ok = parsed.mask(self.base.metadata) & ~overlay.base_dead
        delta_ok = parsed.mask(overlay.delta_table(self.metadata_fields)) & ~overlay.delta_dead
        rows = np.concatenate([np.flatnonzero(base_ok), np.flatnonzero(delta_ok) + self.base_rows])
        return SearchFilter(parsed, rows.astype(np.int64))

    def matching_documents(self, parsed: Filter) -> list[str]:
        """The ids of the live documents whose metadata match ``parsed`` (a delete by filter), sorted."""
        allowed = self._allowed(parsed)
        rows = [] if allowed is None or allowed.rows is None else [int(row) for row in allowed.rows]
        return sorted(set(self.doc_ids(rows)))

    def doc_ids(self, rows: list[int]) -> list[str]:
        """The document id of each row (for grouping hits by document)."""
        passages = self.overlay.buffers.passages
        n = self.base_rows
        return [self.catalog.doc_of_row[row] if row < n else passages[row - n].doc_id for row in rows]

    def documents(self, rows: Sequence[int]) -> list[Document | None]:
        """The passages at ``rows`` (base rows from the base's store, delta rows from memory); None for -1."""
        n, count = self.base_rows, self.overlay.count
        base = [int(row) for row in rows if 0 <= row < n]
        found = dict(zip(base, self.base.store.get(base), strict=True)) if base else {}
        passages = self.overlay.buffers.passages
        return [found.get(int(row)) if row < n else passages[row - n] if row < n + count else None for row in rows]


class CombinedIndex:
    """A :class:`~index.backends.VectorIndex` over base and delta rows at one dim, for :func:`staged_search`."""

    backend = "live"

    def __init__(self, base: VectorIndex, overlay: Overlay, dim: int, base_rows: int) -> None:
        self.base, self.base_rows, self._dim = base, base_rows, dim
        self.delta = overlay.buffers.reduced[dim][: overlay.count]

    @property
    def thread_safe(self) -> bool:
        return self.base.thread_safe

    @property
    def ntotal(self) -> int:
        return self.base_rows + len(self.delta)

    @property
    def dim(self) -> int:
        return self._dim

    def search(self, queries: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` over both sides by inner product; ``where`` (rows of both) restricts each side before its scan."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, max(self.ntotal, 1))
        allowed = None if where is None else where.allowed(self.ntotal)
        base_scores, base_rows = self._search_base(queries, k, where, allowed)
        delta_allowed = None if allowed is None else allowed[allowed >= self.base_rows] - self.base_rows
        delta_scores, delta_rows = exact_top_k(self.delta, queries, k, delta_allowed)
        return merge_hits((base_scores, base_rows), (delta_scores, delta_rows + self.base_rows * (delta_rows >= 0)), k)

    def _search_base(self, queries: np.ndarray, k: int, where: SearchFilter | None, allowed: np.ndarray | None):
        if allowed is None:
            return self.base.search(queries, k)
        rows = allowed[allowed < self.base_rows]
        if not len(rows):
            return _missing(len(queries), 0)
        if len(rows) == self.base_rows:
            return self.base.search(queries, k)
        return self.base.search(queries, k, where=SearchFilter(where.filter, rows))

    def add(self, vectors: np.ndarray) -> None:
        raise NotImplementedError("a live view is written through LiveIndex.upsert")

    def save(self, path) -> None:
        raise NotImplementedError("a live view is saved by LiveIndex.compact")

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "delta_rows": len(self.delta)}

    def close(self) -> None:
        """Nothing of its own: the base index belongs to the base version."""


class CombinedVectors:
    """Full vectors by row over base (memory-mapped) and delta, for re-scoring: indexed by sorted row arrays."""

    def __init__(self, base_vectors: Any, overlay: Overlay, base_rows: int) -> None:
        self.base, self.delta, self.base_rows = base_vectors, overlay.buffers.full[: overlay.count], base_rows

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        split = rows < self.base_rows
        return np.concatenate(
            [np.asarray(self.base[rows[split]], dtype=np.float32), self.delta[rows[~split] - self.base_rows]]
        )


def exact_top_k(
    matrix: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` rows of ``matrix`` (unit rows) by inner product, among ``allowed`` rows (None: all)."""
    ids = np.arange(len(matrix)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    if not len(ids):
        return _missing(len(queries), 0)
    scores = queries @ (matrix if allowed is None else matrix[ids]).T
    width = min(k, len(ids))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), ids[order]


def merge_hits(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], k: int):
    """The best ``k`` of two hit lists per query, best first (ties: ``first``'s before ``second``'s); -1 pads."""
    padding = _missing(len(first[1]), k)
    scores = np.concatenate([first[0], second[0], padding[0]], axis=1).astype(np.float32)
    rows = np.concatenate([first[1], second[1], padding[1]], axis=1).astype(np.int64)
    ranked = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    best_rows = np.take_along_axis(rows, order, axis=1)
    best_scores = np.where(best_rows >= 0, np.take_along_axis(scores, order, axis=1), MISSING_SCORE)
    return best_scores.astype(np.float32), best_rows


def _missing(queries: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((queries, width), MISSING_SCORE, dtype=np.float32), np.full((queries, width), -1, dtype=np.int64)
