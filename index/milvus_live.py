"""A living corpus on Milvus: upserts and deletes written into the current version's own collections.

:func:`open_milvus_live` takes the version a server opened (``store.open(store.current())``) and makes
that process the index's one writer. Every write goes straight into the version's collections, so every
replica serving the version searches it without a reload, and there is nothing to compact (Milvus merges
its segments itself): :class:`MilvusLive` has :class:`~index.live.LiveIndex`'s interface, with
:meth:`~MilvusLive.should_compact` always False and :meth:`~MilvusLive.compact` a no-op.

One writer. A ``writer`` record in ``NAME_meta`` names it (``host~pid~tag``, its role, a heartbeat every
``WRITER_BEAT_S`` seconds). A second writer, and a build (``MilvusIndexStore.begin``), is refused with
:class:`~index.milvus_store.MilvusWriterHeld` while that process runs (same host: by pid and its start
time; another host: until ``WRITER_TTL_S`` after its last heartbeat); a crashed writer's record is taken
over. Milvus has no compare-and-set: the record is written and read back, and every write checks it again,
so of two writers started in the same instant the one overwritten stops at its next write.

Rows. New passages get row ids from ``next_row`` in the version record, written before any row is, so a
crash never reuses an id. An upsert writes, in this order: the version record (``next_row``, the merged
metadata fields, and the write as ``pending``); the passages into the docs collection; their vectors
(truncated and normalised per dim) and metadata into every dim collection; then it deletes the replaced
documents' old rows from every dim collection, and last from the docs collection. A delete removes dim
rows first, then docs rows. So a search never finds a row whose passage is not stored, and two-stage
re-scoring, which fetches each row's full vector by row id, never scores one version of a passage with
the vector of another (ids are never reused). Between the dim inserts and the deletes (milliseconds), a
search may return passages of both the old and the new version of a replaced document, each whole.

Crashes. A write killed midway leaves its ``pending`` entry; the next writer (or the next write) finishes
it first: if every docs row of it is stored, its dim rows are written again (upserts: idempotent) and
the documents' older rows deleted; if not, its rows are deleted and the old documents stay. A killed
delete left some dim rows deleted and every docs row: deleting again completes it.

Durability. A write returns after Milvus acknowledged every insert and delete: Milvus has then logged
them (in its message queue, RocksMQ in a standalone server, Pulsar or Kafka in a cluster), and replays
that log after a crash; nothing is flushed per write (a flush seals a small segment each time). Milvus
Lite kept acknowledged inserts and deletes across a SIGKILL of its process, unflushed, in our trial.

Consistency. Searches and reads run at ``Session``: this process sees its own writes as soon as a write
returns. pymilvus keeps the last write's timestamp per collection (for every client in the process) and
the server waits for it; a 2.3.5 server answers a delete without one, so each write ends by recording the
timestamp of its last version-record write for every collection it touched (:func:`index.milvus.session_after`).
The first search after a write therefore waits for the server's next time tick (about 200 ms on 2.3.5).
Another process has not written those collections, so its ``Session`` reads are ``Eventually``: on a 2.3.5
standalone server, a write (insert or delete) showed up there 0.19 to 0.55 s after it returned (the time
tick is 200 ms); ``tests/test_milvus_live.py`` asserts it under ``REPLICA_LAG_S``. Milvus bounds none of
this at ``Session``; ``Bounded`` would bound it by ``common.gracefulTime`` (5 s by default) and ``Strong``
sees everything, at a wait for the next time tick on every search (about 200 ms each). A replica may see
a dim row before its docs row (two collections, two channels): its document reads retry the missing rows
at ``Strong`` (:mod:`index.milvus_docs`). Metadata fields that written documents bring are kept in the
version record; a replica re-reads it every ``RECORD_TTL_S`` seconds (:class:`~index.milvus_store.VersionWatch`),
so its filters accept them within that plus the lag above.

The version's manifest keeps the build's ``num_vectors`` and ``chunking``; :meth:`MilvusLive.counts`
counts the live documents and passages. Versions built before live writes (no ``doc_id`` field in their
docs collection) are refused for writing: rebuild them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.data import Document
from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from index.backends import EngineUnavailable
from index.filters import Filter, metadata_fields, milvus_string, parse_filter
from index.live import InvalidWrite, LiveCounts, ViewSearches, WriteResult, checked_upsert
from index.loaded import LoadedIndex
from index.manifest import IndexFolderError, IndexManifest
from index.milvus import (
    CONSISTENCY,
    INSERT_BYTES,
    SEARCH_CONSISTENCY,
    VECTOR_FIELD,
    MilvusIndex,
    engine_errors,
    session_after,
)
from index.milvus_docs import (
    DOC_FIELD,
    DOC_ID_FIELD,
    DOC_ROW_FIELD,
    FETCH_ROWS,
    FIRST_FIELD,
    KEY_FIELD,
    MAX_ID_CHARS,
    MAX_PARTS,
    PART_CHARS,
    PASSAGE_ID_FIELD,
    MilvusDocuments,
    decode_row,
    part_rows,
    passage_parts,
)
from index.milvus_store import BUILDING, WRITER_KEY, MilvusIndexStore, MilvusWriterHeld, WriterRecord
from index.milvus_view import MilvusLiveView
from index.overlay import merged_fields
from index.params import IndexPlan
from index.wal import SERVER_ROLE

logger = logging.getLogger(__name__)

WRITER_BEAT_S = 10.0  # the writer record's heartbeat (WRITER_TTL_S, for another host, is several of these)
INSERT_PARTS = 1000  # docs rows per insert call (and at most INSERT_BYTES of them)


@dataclass
class _Found:
    """What the docs collection holds of some documents: their parts' keys and rows, and who owns some passages."""

    keys: dict[str, list[int]] = field(default_factory=dict)
    rows: dict[str, set[int]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # passage id -> its document

    def all_rows(self) -> list[int]:
        return sorted(set().union(*self.rows.values())) if self.rows else []

    def all_keys(self) -> list[int]:
        return sorted(key for keys in self.keys.values() for key in keys)


class MilvusLive(ViewSearches):
    """The one writer of an index in Milvus, writing into its current version; searches see every write.

    Build it with :func:`open_milvus_live`; it owns the loaded version from then on (:meth:`close` closes it).
    """

    def __init__(self, store: MilvusIndexStore, loaded: LoadedIndex, writer: WriterRecord, record: dict) -> None:
        self.store, self.loaded, self.version = store, loaded, loaded.location
        manifest = loaded.manifest
        self._writer, self._record = writer, dict(record)
        self._next_row = int(record.get("next_row", manifest.num_vectors))
        self._seq = int(record.get("seq", 0))
        self._fields = dict(record.get("metadata_fields") or manifest.metadata_fields)
        self._docs: MilvusDocuments = loaded.store
        # What the served version reports (row bound, fields) follows this writer at once, not its record's re-reads.
        for index in loaded.indexes.values():
            index.grows_with(lambda: self._next_row)
        loaded.fields_source = lambda: self._fields
        backend = store.backend
        self._dims = {  # every dim of the version, loaded here or not: replicas may serve the others
            dim: MilvusIndex(backend.client, entry.file, plan_of(entry), dim, 0, backend.uri, backend.timeout)
            for dim, entry in manifest.indexes.items()
        }
        self._mutated: set[str] = set()  # collections this process wrote: Session reads of them see everything
        self._write_lock = threading.Lock()  # one write (or heartbeat) at a time
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._lost: str | None = None  # why this process may no longer write
        self._closed = False

    # --- reading --------------------------------------------------------------------------
    @property
    def base(self) -> LoadedIndex:
        """The served version (for what it serves: dims, manifest; search through :meth:`view`)."""
        return self.loaded

    @property
    def manifest(self) -> IndexManifest:
        return self.loaded.manifest

    @property
    def dims(self) -> list[int]:
        return self.loaded.dims

    @property
    def metadata_fields(self) -> dict[str, str]:
        """The build's metadata fields with those of every written document."""
        return dict(self._fields)

    def parse_filter(self, raw: Any) -> Filter | None:
        return parse_filter(raw, self._fields)

    @contextmanager
    def view(self) -> Iterator[MilvusLiveView]:
        """The version as it is now (Milvus versions the rows itself: nothing is pinned)."""
        if self._closed:
            raise IndexFolderError(f"{self.store.label}: the live index is closed")
        smallest = self._dims[min(self.loaded.indexes)].collection
        yield MilvusLiveView(self.loaded, dict(self._fields), self._next_row, self._consistency(smallest))

    def unmerged(self) -> tuple[int, int]:
        """Nothing waits for a compaction in Milvus, and there is no log of our own: ``(0, 0)``."""
        return 0, 0

    def counts(self) -> LiveCounts:
        """Live documents and passages, counted at ``Strong``; nothing is ever unmerged, tombstoned or logged here."""
        hits = self._docs.query(f"{FIRST_FIELD} == true", ["count(*)"], "counting documents", CONSISTENCY)
        passages = self.store.backend.count(self.loaded.indexes[min(self.loaded.indexes)].collection)  # a loaded one
        documents = int(hits[0]["count(*)"])
        return LiveCounts(self.version, documents, passages, 0, 0, 0, self._seq, self._seq)

    def should_compact(self, max_unmerged: int, max_age_s: float) -> bool:
        """Never: Milvus compacts its segments itself."""
        return False

    def compact(self) -> str:
        """Nothing to fold: the writes are in the version. Returns its name."""
        return self.version

    # --- writing --------------------------------------------------------------------------
    def upsert(self, passages: list[Document], vectors: np.ndarray) -> WriteResult:
        """Replace (or add) the documents of ``passages``: their new rows are written, then every older one deleted.

        Args:
            passages: Every passage of each document written (chunked by the caller), in order.
            vectors: ``(len(passages), full_dim)`` vectors from the build's document encoder, at full dim.

        Raises:
            InvalidWrite: No passages, vectors of another shape or not finite, duplicate passage ids, a passage id
                that belongs to another document, or a passage too long to store. MilvusWriterHeld: Another
                process has taken the writes over. EngineUnavailable: Milvus did not take the write (the next
                write, or the next writer, finishes or undoes what it left).
        """
        with self._write_lock:
            self._check_writable()
            vectors, parts = self._checked(passages, vectors)
            self._finish_pending()
            docs = list(dict.fromkeys(passage.doc_id for passage in passages))
            found = self._find(docs, [passage.id for passage in passages])
            for passage in passages:
                owner = found.owners.get(passage.id)
                if owner is not None and owner not in docs:
                    raise InvalidWrite(f"passage id {passage.id!r} already belongs to document {owner!r}")
            start, end = self._next_row, self._next_row + len(passages)
            fields = merged_fields(self._fields, metadata_fields(passage.metadata for passage in passages))
            pending = {"rows": [start, end], "parts": sum(len(p) for p in parts)}
            self._put_record(next_row=end, metadata_fields=fields, pending=pending)  # before any row
            self._next_row, self._fields = end, fields
            rows = list(range(start, end))
            self._insert_docs(rows, passages, parts, vectors)
            metadata = [passage.metadata for passage in passages]
            for dim, index in self._dims.items():
                index.put(rows, truncate_normalize(vectors, dim), metadata)
                self._mutated.add(index.collection)
            self._remove(found)
            self._seq += 1
            self._put_record(pending=None, seq=self._seq)
            self._settle()
            return WriteResult(self._seq, docs, len(passages), replaced=[doc for doc in docs if doc in found.rows])

    def delete(self, doc_ids: Sequence[str]) -> WriteResult:
        """Delete every passage of the documents ``doc_ids``; ids not found are reported, not an error.

        Raises:
            InvalidWrite: Ids that are not strings. MilvusWriterHeld, EngineUnavailable: as for :meth:`upsert`.
        """
        if isinstance(doc_ids, str) or not all(isinstance(doc, str) for doc in doc_ids):
            raise InvalidWrite("delete takes a list of document ids (strings)")
        wanted = list(dict.fromkeys(doc_ids))
        with self._write_lock:
            self._check_writable()
            self._finish_pending()
            found = self._find(wanted, [])
            present = [doc for doc in wanted if doc in found.rows]
            missing = [doc for doc in wanted if doc not in found.rows]
            if not present:
                return WriteResult(None, [], 0, not_found=missing)
            self._remove(found)
            self._seq += 1
            self._put_record(seq=self._seq)
            self._settle()
            return WriteResult(self._seq, present, len(found.all_rows()), not_found=missing)

    def _checked(self, passages: list[Document], vectors: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
        """``vectors`` as float32 and each passage's stored parts, if the upsert can be written."""
        vectors = checked_upsert(passages, vectors, self.manifest.model.full_dim)
        ids = [passage.id for passage in passages]
        if not all(isinstance(p.doc_id, str) and p.doc_id and len(p.doc_id) <= MAX_ID_CHARS for p in passages):
            raise InvalidWrite(f"document ids must be non-empty strings of at most {MAX_ID_CHARS} characters")
        if any(len(i) > MAX_ID_CHARS for i in ids):
            raise InvalidWrite(f"passage ids must be at most {MAX_ID_CHARS} characters")
        try:
            parts = [passage_parts(passage) for passage in passages]
        except (TypeError, ValueError) as exc:
            raise InvalidWrite(f"passages must hold JSON values (metadata too): {exc}") from None
        for passage, pieces in zip(passages, parts, strict=True):
            if len(pieces) > MAX_PARTS:
                raise InvalidWrite(f"passage {passage.id!r} is longer than {MAX_PARTS * PART_CHARS} characters")
        return vectors, parts

    def _find(self, docs: list[str], passage_ids: list[str]) -> _Found:
        """The stored parts of documents ``docs``, and the owners of the passage ids ``passage_ids`` (if stored)."""
        found = _Found()
        consistency = self._consistency(self._docs.collection)  # a writer before this one: Strong sees its rows
        output = [KEY_FIELD, DOC_ROW_FIELD, DOC_ID_FIELD, PASSAGE_ID_FIELD]
        for name, values in ((DOC_ID_FIELD, docs), (PASSAGE_ID_FIELD, passage_ids)):
            for start in range(0, len(values), FETCH_ROWS):
                listed = ", ".join(milvus_string(value) for value in values[start : start + FETCH_ROWS])
                for hit in self._docs.query(f"{name} in [{listed}]", output, "finding documents", consistency):
                    found.owners[hit[PASSAGE_ID_FIELD]] = hit[DOC_ID_FIELD]
                    if hit[DOC_ID_FIELD] in docs:
                        found.keys.setdefault(hit[DOC_ID_FIELD], []).append(int(hit[KEY_FIELD]))
                        found.rows.setdefault(hit[DOC_ID_FIELD], set()).add(int(hit[DOC_ROW_FIELD]))
        for doc, keys in found.keys.items():
            found.keys[doc] = sorted(set(keys))
        return found

    def _insert_docs(
        self, rows: list[int], passages: list[Document], parts: list[list[str]], vectors: np.ndarray
    ) -> None:
        seen: set[str] = set()
        batch: list[dict] = []
        size = 0
        client, collection = self.store.backend.client, self._docs.collection
        for row, passage, pieces, vector in zip(rows, passages, parts, vectors, strict=True):
            for entity in part_rows(row, passage, pieces, vector, first=passage.doc_id not in seen):
                batch.append(entity)
                size += 4 * (len(entity[DOC_FIELD]) + len(vector))
                if len(batch) >= INSERT_PARTS or size >= INSERT_BYTES:
                    self._insert(client, collection, batch)
                    batch, size = [], 0
            seen.add(passage.doc_id)
        self._insert(client, collection, batch)

    def _insert(self, client, collection: str, entities: list[dict]) -> None:
        if entities:
            with engine_errors(self.store.backend.uri, f"inserting into {collection!r}"):
                client.insert(collection, entities, timeout=self.store.backend.timeout)
            self._mutated.add(collection)

    def _remove(self, found: _Found) -> None:
        """Delete documents' rows: from every dim collection first, then from the docs collection."""
        rows, keys = found.all_rows(), found.all_keys()
        if not rows:
            return
        for index in self._dims.values():
            index.remove(rows)
            self._mutated.add(index.collection)
        backend, collection = self.store.backend, self._docs.collection
        for start in range(0, len(keys), FETCH_ROWS):
            chunk = keys[start : start + FETCH_ROWS]
            with engine_errors(backend.uri, f"deleting from {collection!r}"):
                backend.client.delete(collection, filter=f"{KEY_FIELD} in {chunk}", timeout=backend.timeout)
        self._mutated.add(collection)

    def _finish_pending(self) -> None:
        """Complete, or undo, an upsert that a killed writer (or a failed write) left half done."""
        pending = self._record.get("pending")
        if not pending:
            return
        start, end = pending["rows"]
        pieces: dict[int, list[tuple[int, str]]] = {}
        vectors: dict[int, Any] = {}
        output = [KEY_FIELD, DOC_ROW_FIELD, DOC_FIELD, VECTOR_FIELD]
        for first in range(start, end, FETCH_ROWS):
            expression = f"{DOC_ROW_FIELD} >= {first} and {DOC_ROW_FIELD} < {min(end, first + FETCH_ROWS)}"
            for hit in self._docs.query(expression, output, "recovering a write", CONSISTENCY):
                pieces.setdefault(int(hit[DOC_ROW_FIELD]), []).append((int(hit[KEY_FIELD]), hit[DOC_FIELD]))
                vectors[int(hit[DOC_ROW_FIELD])] = hit[VECTOR_FIELD]
        stored = sum(len(parts) for parts in pieces.values())
        if stored < pending["parts"]:  # not every passage is stored: undo it, the old documents stay
            keys = sorted(key for parts in pieces.values() for key, _ in parts)
            self._remove(_Found(keys={"": keys}, rows={"": set(range(start, end))}))
            logger.warning("%s: undid an unfinished upsert (rows %d to %d)", self.store.label, start, end - 1)
        else:  # every passage is stored: write its dim rows again and delete what it replaced
            rows = sorted(pieces)
            documents = [decode_row(pieces[row]) for row in rows]
            full = np.asarray([vectors[row] for row in rows], dtype=np.float32)
            for dim, index in self._dims.items():
                index.put(rows, truncate_normalize(full, dim), [d.metadata for d in documents], replace=True)
                self._mutated.add(index.collection)
            older = self._find(sorted({document.doc_id for document in documents}), [])
            for doc in older.rows:
                older.rows[doc] = {row for row in older.rows[doc] if not start <= row < end}
                older.keys[doc] = [key for key in older.keys[doc] if not start <= key // MAX_PARTS < end]
            self._remove(older)
            logger.warning("%s: finished an upsert a writer left (rows %d to %d)", self.store.label, start, end - 1)
        self._put_record(pending=None)
        self._settle()

    # --- the writer record ----------------------------------------------------------------
    def _consistency(self, collection: str) -> str:
        return SEARCH_CONSISTENCY if collection in self._mutated else CONSISTENCY

    def _put_record(self, **changes: Any) -> None:
        """Write the version record with ``changes`` (None removes a key), and the writer's heartbeat with it."""
        record = {key: value for key, value in {**self._record, **changes}.items() if value is not None}
        beat = replace(self._writer, at=time.time())
        self.store._put({f"version/{self.version}": json.dumps(record), WRITER_KEY: beat.to_json()})
        self._record, self._writer = record, beat

    def _settle(self) -> None:
        """After a write's last record: this process's searches see its deletes too (see :func:`session_after`)."""
        session_after(self.store.backend.client, self.store.meta, self._mutated)

    def _check_writable(self) -> None:
        """Raises unless this process still holds the writer record (read at Session: its own writes, at once)."""
        if self._closed:
            raise IndexFolderError(f"{self.store.label}: the live index is closed")
        if self._lost is None:
            holder = WriterRecord.parse(self.store._get(WRITER_KEY, SEARCH_CONSISTENCY))
            if holder is None or holder.holder != self._writer.holder:
                gone = f"{self.store.label}: this process's writer record is gone; reopen it to write"
                self._lost = holder.held_message(self.store.label) if holder is not None else gone
        if self._lost is not None:
            raise MilvusWriterHeld(self._lost)

    def _heartbeats(self) -> None:
        while not self._stop.wait(WRITER_BEAT_S):
            with self._write_lock:
                if self._closed or self._lost is not None:
                    return
                try:
                    self._check_writable()
                    beat = replace(self._writer, at=time.time())
                    self.store._put({WRITER_KEY: beat.to_json()})
                    self._writer = beat
                except MilvusWriterHeld as exc:
                    logger.error("stopped writing: %s", exc)
                    return
                except EngineUnavailable as exc:  # the next beat tries again
                    logger.warning("cannot refresh the writer record of %s: %s", self.store.label, exc)

    def close(self) -> None:
        """Stop the heartbeat, give up the writer record (if still this process's) and close the version."""
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            try:
                holder = WriterRecord.parse(self.store._get(WRITER_KEY))
                if holder is not None and holder.holder == self._writer.holder:
                    self.store._delete([WRITER_KEY])
            except EngineUnavailable as exc:  # it goes stale: the next writer takes it over
                logger.warning("cannot release the writer record of %s: %s", self.store.label, exc)
            self.loaded.close()


def plan_of(entry: Any) -> IndexPlan:
    """A manifest entry's index plan (what a dim collection is searched with)."""
    return IndexPlan(entry.factory, entry.search_params)


def open_milvus_live(store: MilvusIndexStore, loaded: LoadedIndex, role: str = SERVER_ROLE) -> MilvusLive:
    """Make this process the writer of ``store``'s index, writing into ``loaded`` (its current version, opened
    through ``store``); an upsert a killed writer left half done is finished or undone first.

    Args:
        store: The index in Milvus.
        loaded: ``store.open(store.current(), ...)``; the result owns it (closing it closes this).
        role: What the writer is, as a refused second writer's message names it.

    Raises:
        MilvusWriterHeld: Another live process writes the index, or builds a version of it.
        IndexFolderError: ``loaded`` is not the current version, or was built before live writes (rebuild it).
        ConfigError: ``loaded`` is not in Milvus.
    """
    version = loaded.location
    if not isinstance(loaded.store, MilvusDocuments):
        raise ConfigError("open_milvus_live takes a version opened from Milvus (a folder index: index.live.open_live)")
    if not loaded.store.writable:
        raise IndexFolderError(
            f"{store.label}: version {version} was built before live writes (its documents have no "
            f"{DOC_ID_FIELD!r} field); rebuild the index to write to it"
        )
    writer = _claim(store, version, role)
    try:
        building = [v for v, r in store._records().items() if r["state"] == BUILDING and not store._abandoned(r)]
        if building:  # it would become current without the writes made meanwhile
            raise MilvusWriterHeld(f"{store.label}: version {building[0]} is being built; write once it is live")
        current = store.current()
        if current != version:
            raise IndexFolderError(f"{store.label}: version {version} is not current ({current} is); reload first")
        live = MilvusLive(store, loaded, writer, store._record(version) or {})
        with live._write_lock:
            live._finish_pending()
    except BaseException:
        store._delete([WRITER_KEY])
        raise
    live._beats = threading.Thread(target=live._heartbeats, name="mrl-milvus-writer", daemon=True)
    live._beats.start()
    return live


def _claim(store: MilvusIndexStore, version: str, role: str) -> WriterRecord:
    """Write this process's writer record, unless a live one is there; read it back (the last writer wins)."""
    held = store.writer()
    if held is not None:
        raise MilvusWriterHeld(held.held_message(store.label))
    mine = WriterRecord.mine(version, role)
    store._put({WRITER_KEY: mine.to_json()})
    back = WriterRecord.parse(store._get(WRITER_KEY))
    if back is None or back.holder != mine.holder:
        raise MilvusWriterHeld((back or mine).held_message(store.label))
    return mine
