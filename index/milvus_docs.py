"""A version's documents in Milvus (``NAME_<tag>_docs``): how rows are laid out, and how a loaded version reads them.

A row (a document, or a passage of one) is stored as the JSON array ``[id, title, text, metadata]``
(a passage cut from a longer document adds ``parent, start, end``), cut into parts of at most
``PART_CHARS`` characters (a Milvus VARCHAR holds at most 65,535 bytes; the server counts bytes,
Milvus Lite characters); part ``p`` of row ``r`` has primary key ``r * MAX_PARTS + p``. Every part
carries the row's full vector, which two-stage search fetches by primary key ``r * MAX_PARTS``.

Versions built since live writes (:mod:`index.milvus_live`) also give every part its document's id
(``doc_id``), its passage's id (``passage_id``) and whether it opens its document (``first``: part 0
of the document's first passage), so that a writer finds a document's rows and counts documents with
one query each. Versions built before have none of these; they are read as before and not written.

Reads are at ``Session`` consistency (the writer's own writes at once). A row that a search found but
that is missing here is read again at ``Strong``: another process's writer inserts a passage's
document rows before its dim rows, but a replica may see the two collections at slightly different
times, so a hit can arrive before its document does; ``Strong`` waits for it (about 200 ms, and only
then). A row still missing was deleted since the search: no document (``None``), and for re-scoring a
zero vector, which scores 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.data import Document
from index.manifest import IndexFolderError
from index.milvus import CONSISTENCY, SEARCH_CONSISTENCY, VECTOR_FIELD, MilvusBackend, engine_errors, reloading

KEY_FIELD = "key"
DOC_FIELD = "doc"  # the JSON part
DOC_ROW_FIELD = "row"
DOC_ID_FIELD = "doc_id"  # the document's id (a passage's parent), on every part
PASSAGE_ID_FIELD = "passage_id"
FIRST_FIELD = "first"  # part 0 of its document's first passage: counting these counts documents
MAX_VARCHAR = 65_535  # bytes (server) or characters (Milvus Lite)
PART_CHARS = 16_383  # characters per record or document part: at most 4 bytes each in UTF-8, under MAX_VARCHAR
MAX_PARTS = 4096  # parts per document (about 64 MiB of text)
MAX_ID_CHARS = PART_CHARS  # a document or passage id (a VARCHAR field of its own)
FETCH_ROWS = 1000  # primary keys per query expression


def text_parts(text: str) -> list[str]:
    """``text`` in pieces of at most ``PART_CHARS`` characters (one empty piece for no text)."""
    return [text[start : start + PART_CHARS] for start in range(0, len(text), PART_CHARS)] or [""]


def passage_parts(document: Document) -> list[str]:
    """The JSON parts one row of ``document`` is stored as (more than ``MAX_PARTS``: too long to store)."""
    passage = [document.id, document.title, document.text, document.metadata]
    passage += [document.parent, document.start, document.end] if document.parent is not None else []
    return text_parts(json.dumps(passage))


def docs_schema(full_dim: int):
    """The schema of a docs collection as builds write it now (with document and passage ids)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(KEY_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(DOC_ROW_FIELD, DataType.INT64)
    schema.add_field(DOC_FIELD, DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field(DOC_ID_FIELD, DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field(PASSAGE_ID_FIELD, DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field(FIRST_FIELD, DataType.BOOL)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=full_dim)
    return schema


def part_rows(row: int, document: Document, parts: list[str], vector: Any, first: bool) -> list[dict[str, Any]]:
    """The docs collection's rows of row ``row`` (``parts`` from :func:`passage_parts`); ``first``: it opens
    its document."""
    return [
        {
            KEY_FIELD: row * MAX_PARTS + number,
            DOC_ROW_FIELD: row,
            DOC_FIELD: part,
            DOC_ID_FIELD: document.doc_id,
            PASSAGE_ID_FIELD: document.id,
            FIRST_FIELD: first and number == 0,
            VECTOR_FIELD: vector,
        }
        for number, part in enumerate(parts)
    ]


def decode_row(parts: list[tuple[int, str]]) -> Document:
    """One row's document from its ``(key, JSON part)`` pairs, in any order."""
    doc_id, title, text, metadata, *place = json.loads("".join(part for _, part in sorted(parts)))
    return Document(doc_id, text, title, metadata, *place)  # place: a passage's parent, start, end


class MilvusDocuments:
    """A version's documents in ``NAME_<tag>_docs``, read by row (the :class:`~index.store.DocumentStore` interface).

    ``writable``: the collection has the fields live writes need (document and passage ids).
    """

    def __init__(self, backend: MilvusBackend, collection: str, full_dim: int, count: int) -> None:
        self.backend = backend
        self.collection = collection
        self.full_dim = full_dim
        self.count = count
        with engine_errors(backend.uri, f"opening {collection!r}"):
            if not backend.client.has_collection(collection):
                raise IndexFolderError(f"Milvus collection {collection!r} does not exist at {backend.uri}")
            fields = {field["name"] for field in backend.client.describe_collection(collection)["fields"]}
            backend.client.load_collection(collection)
        self.writable = DOC_ID_FIELD in fields
        # A version no one writes to is complete once built: a row missing at Session is not there at all.
        self._consistencies = (SEARCH_CONSISTENCY, CONSISTENCY) if self.writable else (SEARCH_CONSISTENCY,)
        self.parts = backend.count(collection)
        self._closed = False

    def query(self, expression: str, fields: list[str], what: str, consistency: str = SEARCH_CONSISTENCY) -> list[dict]:
        if self._closed:
            raise IndexFolderError(f"{self.collection}: the document store is closed")
        client, backend = self.backend.client, self.backend
        with engine_errors(backend.uri, f"{what} in {self.collection!r}"):
            return reloading(
                client,
                self.collection,
                backend.timeout,
                lambda: client.query(
                    self.collection,
                    filter=expression,
                    output_fields=fields,
                    consistency_level=consistency,
                    timeout=backend.timeout,
                ),
            )

    def _by_key(self, keys: list[int], fields: list[str], what: str) -> dict[int, dict]:
        """The parts with these primary keys, by key: at ``Session``, then (writable) the ones missing at ``Strong``."""
        found: dict[int, dict] = {}
        for consistency in self._consistencies:
            wanted = sorted(set(keys) - found.keys())
            for start in range(0, len(wanted), FETCH_ROWS):
                chunk = wanted[start : start + FETCH_ROWS]
                for hit in self.query(f"{KEY_FIELD} in {chunk}", [KEY_FIELD, *fields], what, consistency):
                    found[int(hit[KEY_FIELD])] = hit
            if len(found) == len(set(keys)):
                break
        return found

    def get(self, rows: Sequence[int]) -> list[Document | None]:
        """Documents at ``rows``, in the same order; ``None`` for a row that does not exist."""
        wanted = sorted({int(r) for r in rows if r >= 0})
        pieces: dict[int, list[tuple[int, str]]] = {}
        for consistency in self._consistencies:
            missing = [row for row in wanted if row not in pieces]
            for start in range(0, len(missing), FETCH_ROWS):
                chunk = missing[start : start + FETCH_ROWS]
                fields = [KEY_FIELD, DOC_ROW_FIELD, DOC_FIELD]
                for hit in self.query(f"{DOC_ROW_FIELD} in {chunk}", fields, "reading", consistency):
                    pieces.setdefault(int(hit[DOC_ROW_FIELD]), []).append((int(hit[KEY_FIELD]), hit[DOC_FIELD]))
            if len(pieces) == len(wanted):
                break
        found = {row: decode_row(parts) for row, parts in pieces.items()}
        return [found.get(int(r)) for r in rows]

    def doc_ids(self, rows: Sequence[int]) -> list[str | None]:
        """The document id of each row (``None``: no such row), read from the ``doc_id`` field."""
        keys = [int(row) * MAX_PARTS for row in rows]
        found = self._by_key([key for key in keys if key >= 0], [DOC_ID_FIELD], "reading document ids")
        return [found[key][DOC_ID_FIELD] if key in found else None for key in keys]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Full vectors of ``rows`` (each row at most once, any order), in the order given.

        Raises:
            IndexFolderError: Rows that do not exist, in a version that live writes do not change.
        """
        keys = [int(r) * MAX_PARTS for r in rows]
        found = self._by_key(keys, [VECTOR_FIELD], "fetching vectors")
        missing = [k // MAX_PARTS for k in keys if k not in found]
        if missing and not self.writable:
            raise IndexFolderError(f"{self.collection}: no vectors for rows {missing[:5]}")
        zeros = np.zeros(self.full_dim, dtype=np.float32)  # a row deleted since the search scores 0
        vectors = [found[k][VECTOR_FIELD] if k in found else zeros for k in keys]
        return np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.full_dim)

    def stored_rows(self, below: int) -> np.ndarray:
        """Every row stored under ``below``, sorted, read at ``Strong`` (what a version written live holds now)."""
        rows: set[int] = set()
        for start in range(0, below, FETCH_ROWS):
            expression = f"{DOC_ROW_FIELD} >= {start} and {DOC_ROW_FIELD} < {start + FETCH_ROWS}"
            hits = self.query(expression, [DOC_ROW_FIELD], "listing rows", CONSISTENCY)
            rows.update(int(hit[DOC_ROW_FIELD]) for hit in hits)
        return np.asarray(sorted(rows), dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    def ids(self) -> set[str]:
        return {doc.doc_id for doc in self.get(range(len(self))) if doc is not None}

    def check_integrity(self) -> None:
        """Milvus checks its own storage; the part count is checked on open."""

    def close(self) -> None:
        self._closed = True


@dataclass
class MilvusVectors:
    """The full vectors of a version, read from Milvus row by row (what two-stage search re-scores with)."""

    documents: MilvusDocuments
    count: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.documents.full_dim)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return self.documents.vectors(rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        vectors = self.documents.vectors(np.arange(self.count))
        return vectors if dtype is None else vectors.astype(dtype)
