"""A living corpus over a FAISS folder index: upserts and deletes served at once, compacted into versions later.

:func:`open_live` takes the root's :class:`~index.wal.LiveLock` (one writable process per root), refuses
while another process writes a version of the root (it holds the :class:`~index.layout.WriterLock`), opens
``current`` as the base and replays the write-ahead log above the ``seq`` the base holds. Every write is
logged (and synced) before it is applied to the in-memory overlay (:mod:`index.overlay`): an upsert
tombstones every passage its documents had, in the base or the delta, and appends the new ones; a delete
tombstones them. :meth:`LiveIndex.compact` writes base and overlay out as a new version
(:mod:`index.compaction`) while writes go on, switches to it, re-applies the writes that arrived meanwhile
and trims the log. A crash at any point loses no acknowledged write: until the new version is current the
old one and the whole log are there; after, the log above its ``seq``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.data import Document
from core.errors import ConfigError, MrlError
from index.backends import Device
from index.compaction import applied_seq, write_compacted
from index.filters import Filter, SearchFilter
from index.folder_store import FolderStore
from index.layout import DOCS_FILE, WRITER_LOCK
from index.loaded import LoadedIndex
from index.locator import IndexLocator
from index.manifest import IndexFolderError, IndexManifest
from index.overlay import BaseCatalog, LiveView, Overlay
from index.search import StagedHits
from index.wal import (
    SERVER_ROLE,
    LiveLock,
    LiveLockHeld,
    WalRecord,
    WriteAheadLog,
    delete_record,
    upsert_record,
)

logger = logging.getLogger(__name__)


class VersionBeingWritten(LiveLockHeld):
    """Another process is writing a new version of the root (``mrl index add``, or a build or compaction
    publishing): writes taken over the version it replaces would be lost when it goes live."""


class InvalidWrite(MrlError, ValueError):
    """An upsert or delete that cannot be applied (bad vectors, a passage id owned by another document)."""


@dataclass(frozen=True)
class WriteResult:
    """What a write did: its log ``seq`` (None: nothing changed), the documents it wrote or deleted, passages
    written (upsert) or removed (delete), documents an upsert replaced, ids a delete did not find."""

    seq: int | None
    documents: list[str]
    passages: int
    replaced: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LiveCounts:
    """The live index at a glance (what ``/stats`` or a metrics gauge shows)."""

    version: str  # the base version
    documents: int  # live documents
    passages: int  # live passages
    unmerged_passages: int  # live passages of the delta (not yet in a version)
    tombstones: int  # dead rows (base and delta) a compaction drops
    wal_bytes: int
    last_seq: int
    applied_seq: int  # the seq the base version holds up to


class _BaseHold:
    """The base version and the views still searching it: closed by its last user once retired."""

    def __init__(self, loaded: LoadedIndex) -> None:
        self.loaded, self.users, self.retired = loaded, 0, False


@dataclass
class _Writes:
    """What writes need to know and searches do not (changed under the write lock only)."""

    catalog: BaseCatalog
    removed_base: set[str] = field(default_factory=set)  # base documents whose rows are dead
    delta_docs: dict[str, list[int]] = field(default_factory=dict)  # live delta rows per document
    delta_passage: dict[str, int] = field(default_factory=dict)  # live delta row per passage id


def checked_upsert(passages: list[Document], vectors: np.ndarray, full_dim: int) -> np.ndarray:
    """``vectors`` as float32, if ``passages`` and they make an upsert any live index can take.

    Raises:
        InvalidWrite: No passages, vectors of another shape or not finite, passage ids empty or repeated.
    """
    if not passages or not all(isinstance(passage, Document) for passage in passages):
        raise InvalidWrite("an upsert takes a non-empty list of passages (Document objects)")
    vectors = np.asarray(vectors, dtype=np.float32)
    expected = (len(passages), full_dim)
    if vectors.shape != expected:
        raise InvalidWrite(f"{len(passages)} passages need vectors of shape {expected}, got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise InvalidWrite("vectors hold NaN or infinite values")
    ids = [passage.id for passage in passages]
    if len(set(ids)) != len(ids) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidWrite("passage ids must be non-empty strings, each used once")
    return vectors


class ViewSearches:
    """One-call searches over a live index's :meth:`view` (a folder's :class:`LiveIndex`, Milvus's ``MilvusLive``)."""

    def view(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def search(
        self,
        queries: np.ndarray,
        dim: int,
        k: int,
        rerank_dim: int | None = None,
        candidates: int = 10,
        where: Filter | SearchFilter | None = None,
        group: bool = False,
    ) -> tuple[StagedHits, list[list[Document | None]]]:
        """The view's ``search`` on the current state, with each query's hits as passages."""
        with self.view() as view:
            hits = view.search(queries, dim, k, rerank_dim, candidates, where, group)
            return hits, [view.documents(rows) for rows in hits.rows]

    def documents(self, rows: Sequence[int]) -> list[Document | None]:
        """The passages at ``rows`` of the current state (see :meth:`view` for rows of an earlier search)."""
        with self.view() as view:
            return view.documents(rows)


class LiveIndex(ViewSearches):
    """A base version plus an overlay of logged writes; searches see one consistent state, writes are serialised.

    Build it with :func:`open_live`. Search and resolve rows within one :meth:`view` (row numbers change
    when a compaction switches the base); :meth:`search` and :meth:`documents` are that for one call each.
    """

    def __init__(
        self,
        store: FolderStore,
        base: LoadedIndex,
        wal: WriteAheadLog,
        lock: LiveLock,
        device: Device = "cpu",
        keep_versions: int = 3,
    ) -> None:
        self.store, self.wal, self.lock, self.device, self.keep_versions = store, wal, lock, device, keep_versions
        self._write_lock = threading.Lock()  # one write (or a compaction's switch) at a time
        self._compact_lock = threading.Lock()
        self._state_lock = threading.Lock()  # the (base, overlay) pair searches take
        self._search_lock = threading.Lock()  # around indexes that are not thread-safe (GPU)
        self._oldest_write: float | None = None
        self._install(base, read_catalog(base), applied_seq(base.manifest))

    # --- reading --------------------------------------------------------------------------
    @property
    def base(self) -> LoadedIndex:
        """The base version as it is now (for what it serves: dims, manifest; search through :meth:`view`)."""
        return self._hold.loaded

    @property
    def manifest(self) -> IndexManifest:
        """The base version's manifest."""
        return self._hold.loaded.manifest

    @property
    def applied_seq(self) -> int:
        return self._applied

    @contextmanager
    def view(self) -> Iterator[LiveView]:
        """The current state, its base kept open until the block ends even if a compaction switches meanwhile."""
        with self._state_lock:
            hold, overlay, catalog = self._hold, self._overlay, self._writes.catalog
            if hold.retired:
                raise IndexFolderError(f"{self.store.root}: the live index is closed")
            hold.users += 1
        try:
            thread_safe = all(index.thread_safe for index in hold.loaded.indexes.values())
            yield LiveView(hold.loaded, overlay, catalog, None if thread_safe else self._search_lock)
        finally:
            self._release(hold)

    def counts(self) -> LiveCounts:
        with self._write_lock:
            overlay, writes = self._overlay, self._writes
            base_rows = len(writes.catalog.doc_of_row)
            delta_live = overlay.count - int(overlay.delta_dead.sum())
            return LiveCounts(
                version=self.manifest.version,
                documents=len(writes.catalog.doc_rows) - len(writes.removed_base) + len(writes.delta_docs),
                passages=base_rows - int(overlay.base_dead.sum()) + delta_live,
                unmerged_passages=delta_live,
                tombstones=overlay.tombstones,
                wal_bytes=self.wal.size_bytes,
                last_seq=self.wal.last_seq,
                applied_seq=self._applied,
            )

    def unmerged(self) -> tuple[int, int]:
        """Live passages not yet in a version, and the log's size in bytes: cheap, for every write's answer."""
        overlay = self._overlay
        return overlay.count - int(overlay.delta_dead.sum()), self.wal.size_bytes

    def should_compact(self, max_unmerged: int, max_age_s: float) -> bool:
        """Whether enough is waiting: ``max_unmerged`` delta rows and tombstoned base rows, or a write older than
        ``max_age_s`` seconds not yet in a version."""
        overlay = self._overlay
        pending = overlay.count + int(overlay.base_dead.sum())
        if not pending:
            return False
        oldest = self._oldest_write
        return pending >= max_unmerged or (oldest is not None and time.monotonic() - oldest >= max_age_s)

    # --- writing --------------------------------------------------------------------------
    def upsert(self, passages: list[Document], vectors: np.ndarray) -> WriteResult:
        """Replace (or add) the documents of ``passages``: every passage they had is tombstoned, these appended.

        Args:
            passages: Every passage of each document written (chunked by the caller), in order.
            vectors: ``(len(passages), full_dim)`` vectors from the build's document encoder, at full dim.

        Raises:
            InvalidWrite: No passages, vectors of another shape or not finite, duplicate passage ids, or a passage
                id that belongs to another live document. IndexWriteError: the log cannot be written.
        """
        with self._write_lock:
            vectors = self._check_upsert(passages, vectors)
            seq = self.wal.append(upsert_record(passages, vectors))
            replaced = self._apply_upsert(passages, vectors)
            self._note_write()
            documents = list(dict.fromkeys(passage.doc_id for passage in passages))
            return WriteResult(seq, documents, len(passages), replaced=replaced)

    def delete(self, doc_ids: Sequence[str]) -> WriteResult:
        """Tombstone every passage of the documents ``doc_ids``; ids not live are reported, not an error.

        Raises:
            InvalidWrite: Ids that are not strings. IndexWriteError: the log cannot be written.
        """
        if isinstance(doc_ids, str) or not all(isinstance(doc, str) for doc in doc_ids):
            raise InvalidWrite("delete takes a list of document ids (strings)")
        wanted = list(dict.fromkeys(doc_ids))
        with self._write_lock:
            found = [doc for doc in wanted if self._is_live(doc)]
            missing = [doc for doc in wanted if doc not in set(found)]
            if not found:
                return WriteResult(None, [], 0, not_found=missing)
            seq = self.wal.append(delete_record(found))
            removed = self._apply_delete(found)
            self._note_write()
            return WriteResult(seq, found, removed, not_found=missing)

    def _check_upsert(self, passages: list[Document], vectors: np.ndarray) -> np.ndarray:
        vectors = checked_upsert(passages, vectors, self.manifest.model.full_dim)
        try:
            json.dumps([[passage.title, passage.text, passage.metadata] for passage in passages])
        except (TypeError, ValueError) as exc:
            raise InvalidWrite(f"passages must hold JSON values (metadata too): {exc}") from None
        documents = {passage.doc_id for passage in passages}
        for passage in passages:
            owner = self._owner(passage.id)
            if owner is not None and owner not in documents:
                raise InvalidWrite(f"passage id {passage.id!r} already belongs to document {owner!r}")
        return vectors

    def _owner(self, passage_id: str) -> str | None:
        """The live document holding a passage of this id, if any."""
        writes, overlay = self._writes, self._overlay
        row = writes.delta_passage.get(passage_id)
        if row is not None:
            return overlay.buffers.passages[row].doc_id
        row = writes.catalog.passage_row.get(passage_id)
        if row is not None and not overlay.base_dead[row]:
            return writes.catalog.doc_of_row[row]
        return None

    def _is_live(self, doc: str) -> bool:
        writes = self._writes
        return doc in writes.delta_docs or (doc in writes.catalog.doc_rows and doc not in writes.removed_base)

    def _kill(self, docs: list[str]) -> tuple[list[int], list[int], list[str]]:
        """Forget the live passages of ``docs``: the base and delta rows to tombstone, and the docs that had any."""
        writes, overlay = self._writes, self._overlay
        dead_base: list[int] = []
        dead_delta: list[int] = []
        had = []
        for doc in docs:
            before = len(dead_base) + len(dead_delta)
            if doc in writes.catalog.doc_rows and doc not in writes.removed_base:
                dead_base.extend(writes.catalog.doc_rows[doc])
                writes.removed_base.add(doc)
            for row in writes.delta_docs.pop(doc, []):
                dead_delta.append(row)
                writes.delta_passage.pop(overlay.buffers.passages[row].id, None)
            if len(dead_base) + len(dead_delta) > before:
                had.append(doc)
        return dead_base, dead_delta, had

    def _apply_upsert(self, passages: list[Document], vectors: np.ndarray) -> list[str]:
        dead_base, dead_delta, replaced = self._kill(list(dict.fromkeys(p.doc_id for p in passages)))
        start = self._overlay.count
        overlay = self._overlay.written(passages, vectors, dead_base, dead_delta)
        for row, passage in enumerate(passages, start=start):
            self._writes.delta_docs.setdefault(passage.doc_id, []).append(row)
            self._writes.delta_passage[passage.id] = row
        self._publish(overlay)
        return replaced

    def _apply_delete(self, docs: list[str]) -> int:
        dead_base, dead_delta, _ = self._kill(docs)
        self._publish(self._overlay.written([], np.zeros((0, self.manifest.model.full_dim)), dead_base, dead_delta))
        return len(dead_base) + len(dead_delta)

    def _apply(self, record: WalRecord) -> None:
        """Re-apply one logged write (replay: it was checked when it was written)."""
        if record.op == "upsert":
            self._apply_upsert(record.passages, record.vectors)
        else:
            self._apply_delete([doc for doc in record.doc_ids if self._is_live(doc)])
        self._note_write()

    def _note_write(self) -> None:
        if self._oldest_write is None:
            self._oldest_write = time.monotonic()

    def _publish(self, overlay: Overlay) -> None:
        with self._state_lock:
            self._overlay = overlay

    # --- compaction -----------------------------------------------------------------------
    def compact(self) -> str:
        """Write base and overlay out as a new version, switch to it, trim the log; returns the version's name.

        Writes go on while the version is built; those that arrive meanwhile are re-applied over the new base
        from the log. With nothing logged since the base, nothing is written and the base's name is returned.

        Raises:
            IndexFolderError: ``current`` moved under the live lock, or every document is deleted.
            IndexWriteError: A full disk or a read-only root (the live index goes on as it was).
        """
        with self._compact_lock, ExitStack() as pinned:
            with self._write_lock:
                seq = self.wal.last_seq
                if seq <= self._applied:
                    return self.manifest.version
                view = pinned.enter_context(self.view())  # the state at seq, its base kept open
            manifest = write_compacted(self.store, view, seq, self.keep_versions, self.device)
            fingerprint = self.manifest.model.fingerprint
            base = self.store.open(manifest.version, device=self.device, expected_fingerprint=fingerprint)
            catalog = read_catalog(base)
            with self._write_lock:
                old = self._hold
                self._install(base, catalog, seq)
                self._retire(old)
                for record in self.wal.records(after_seq=seq):  # the writes that arrived while it was built
                    self._apply(record)
                self.wal.trim(seq)
        logger.info("compacted %s into %s (write-ahead log up to seq %d)", old.loaded.location, base.location, seq)
        return manifest.version

    def _install(self, base: LoadedIndex, catalog: BaseCatalog, applied: int) -> None:
        """Serve ``base`` with an empty overlay (under the write lock, or before any other thread knows this)."""
        overlay = Overlay.empty(base.manifest.num_vectors, base.manifest.model.full_dim, base.dims)
        with self._state_lock:
            self._hold, self._overlay, self._writes = _BaseHold(base), overlay, _Writes(catalog)
        self._applied, self._oldest_write = applied, None

    def _retire(self, hold: _BaseHold) -> None:
        with self._state_lock:
            if hold.retired:
                return
            hold.retired = True
            idle = hold.users == 0
        if idle:
            hold.loaded.close()

    def _release(self, hold: _BaseHold) -> None:
        with self._state_lock:
            hold.users -= 1
            last = hold.retired and hold.users == 0
        if last:
            hold.loaded.close()

    def close(self) -> None:
        """Close the base (after its last search), the log and the live lock."""
        self._retire(self._hold)
        self.wal.close()
        self.lock.release()


def read_catalog(base: LoadedIndex) -> BaseCatalog:
    """Each base row's passage id and document, read from its ``docs.sqlite`` in one query (no texts loaded)."""
    if base.path is None:
        raise ConfigError("a live index serves FAISS folder versions only")
    connection = sqlite3.connect(f"file:{base.path / DOCS_FILE}?mode=ro", uri=True)
    try:
        columns = {column[1] for column in connection.execute("PRAGMA table_info(documents)")}
        parent = "parent" if "parent" in columns else "NULL"
        rows = connection.execute(f"SELECT id, {parent} FROM documents ORDER BY row").fetchall()
    except sqlite3.Error as exc:
        raise IndexFolderError(f"{base.path / DOCS_FILE}: unreadable ({exc})") from None
    finally:
        connection.close()
    return BaseCatalog.of(rows)


def open_live(
    root: Path,
    device: Device = "cpu",
    *,
    expected_fingerprint: str | None = None,
    keep_versions: int = 3,
    role: str = SERVER_ROLE,
) -> LiveIndex:
    """Open the index root ``root`` for writes: take its live lock, open ``current``, replay the log above it.

    Records the log holds at or below the version's applied ``seq`` (a compaction killed before its trim) are
    trimmed now. Close the result to release the lock.

    Raises:
        LiveLockHeld: Another process writes this root. VersionBeingWritten: another process is writing a new
            version of it (``mrl index add``, a build publishing). IndexFolderError: no index root there (a version
            folder is read-only), a corrupt version or log line. IndexWriteError: a read-only root.
    """
    store = FolderStore(IndexLocator.folder(root))
    if store.is_version_folder:
        raise IndexFolderError(f"{root}: a version folder is read-only; open its index root for writes")
    lock = LiveLock(root, role).acquire()
    try:
        check_no_version_writer(root)  # after the live lock: a writer that checks for it next is refused
        base = store.open(store.current(), device=device, expected_fingerprint=expected_fingerprint)
    except BaseException:
        lock.release()
        raise
    applied = applied_seq(base.manifest)
    wal = WriteAheadLog(root, floor_seq=applied)
    try:
        wal.remove_leftovers()
        live = LiveIndex(store, base, wal, lock, device, keep_versions)
        replayed = 0
        for record in wal.records(after_seq=applied):
            live._apply(record)
            replayed += 1
        first = wal.first_seq
        if first is not None and first <= applied:
            wal.trim(applied)  # a compaction was killed after publishing, before trimming: finish it
        if store.current() != base.location:  # a version went live while this one was opened
            raise VersionBeingWritten(
                f"{root}: a new version went live while {base.location} was opened for writes; try again"
            )
    except BaseException:
        base.close()
        wal.close()
        lock.release()
        raise
    if replayed:
        logger.info("%s: replayed %d writes above seq %d", root, replayed, applied)
    return live


def check_no_version_writer(root: Path) -> None:
    """Refuse to take writes over ``root`` while another process holds its :class:`~index.layout.WriterLock`.

    ``mrl index add`` holds it from reading ``current`` to publishing, a build while it publishes: a writable
    server that opened ``current`` now would take writes over a version about to be replaced, and those the
    version's publication left out would be lost at the next restart. Called with the live lock held, so a
    writer that checks for it under the writer lock (:func:`index.wal.check_not_live`) is refused in turn.

    Raises:
        VersionBeingWritten: The writer lock is held; the message names the holder where the system tells it.
    """
    try:
        fd = os.open(root / WRITER_LOCK, os.O_RDONLY)
    except OSError:  # no lock file: nothing has ever published here under the lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        raise VersionBeingWritten(
            f"{root}: {holder} is writing a new version of this index (it holds {WRITER_LOCK}): try again once it "
            "has finished"
        ) from None
    finally:
        os.close(fd)  # a probe: released at once (closing the only descriptor drops the lock)


def _lock_holder(stat: os.stat_result) -> str:
    """Who holds a ``flock`` on the file of ``stat``, as Linux's ``/proc/locks`` tells it: the ``mrl index``
    command and its pid, a pid, or "another process" where the system does not say."""
    device = (os.major(stat.st_dev), os.minor(stat.st_dev))
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2148177 0 EOF" ("->" lines wait for it)
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or not fields[4].isdigit():
            continue
        major, minor, inode = fields[5].split(":") if fields[5].count(":") == 2 else ("", "", "")
        if inode.isdigit() and int(inode) == stat.st_ino and (int(major, 16), int(minor, 16)) == device:
            return _command_of(int(fields[4]))
    return "another process"


def _command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"a process (pid {pid})"
    for start in range(len(argv) - 1):
        if argv[start] == "index" and argv[start + 1] in ("build", "add", "compact"):
            return f"mrl index {argv[start + 1]} (pid {pid})"
    return f"a process (pid {pid})"


def compact_index(root: Path, device: Device = "cpu", keep_versions: int = 3) -> tuple[str, dict | None]:
    """``mrl index compact``: replay the log of ``root`` and merge it into a new version.

    Returns:
        Where the new version is and its history entry (None when the log held nothing to merge).

    Raises:
        LiveLockHeld: A writable server holds the root (write through it; it compacts on its own).
    """
    live = open_live(root, device, keep_versions=keep_versions, role="mrl index compact")
    try:
        before = live.manifest.version
        version = live.compact()
        if version == before:
            return live.store.where(version), None
        return live.store.where(version), live.manifest.history[-1]
    finally:
        live.close()


def describe_compaction(where: str, event: dict | None) -> str:
    """What ``mrl index compact`` prints."""
    if event is None:
        return f"nothing to compact: {where} holds every logged write"
    return (
        f"merged {event['compacted']} passages and dropped {event['dropped']} dead rows "
        f"(write-ahead log up to seq {event['wal_seq']}) -> {where}"
    )
