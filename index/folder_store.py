"""The folder store: an index's versions as folders of FAISS files (:mod:`index.layout`), one of them ``current``.

:class:`FolderStore` is the :class:`~index.stores.IndexStore` of a folder locator: an index root
(``current`` and ``versions/``), or one version folder on its own (read-only: it is its one version).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from core.data import Document
from core.files import write_json_atomic
from index.backends import Device, IndexBackend, VectorIndex, backend_for
from index.layout import (
    DOCS_FILE,
    PROBE_FILE,
    VECTORS_FILE,
    VERSIONS,
    WriterLock,
    index_file,
    prune_versions,
    publish_version,
    resolve_version,
    staging_version,
    writing,
)
from index.loaded import LoadedIndex, open_index
from index.locator import IndexLocator
from index.manifest import MANIFEST_FILE, IndexFolderError, IndexManifest, folder_files
from index.params import IndexPlan
from index.store import write_documents
from index.wal import WriteAheadLog, check_not_live


class FolderStore:
    """The versions under an index root (or the one version a version folder is)."""

    def __init__(self, locator: IndexLocator) -> None:
        self.locator = locator
        self.root = Path(locator.path)
        self._held: WriterLock | None = None

    @classmethod
    def at(cls, locator: IndexLocator, timeout: float | None = None, credentials: dict | None = None) -> FolderStore:
        return cls(locator)  # a folder has no timeout and no credentials

    @property
    def is_version_folder(self) -> bool:
        return (self.root / MANIFEST_FILE).is_file()

    def folder(self, version: str) -> Path:
        """Where version ``version`` lives."""
        return self.root if self.is_version_folder else self.root / VERSIONS / version

    # --- reading -------------------------------------------------------------------------
    def current(self) -> str:
        return resolve_version(self.root).name

    def manifest(self, version: str) -> IndexManifest:
        return IndexManifest.read(self.folder(version))

    def open(
        self,
        version: str,
        *,
        device: Device = "auto",
        expected_fingerprint: str | None = None,
        dims: list[int] | None = None,
        lease: bool = True,
    ) -> LoadedIndex:
        loaded = open_index(
            self.folder(version), device=device, expected_fingerprint=expected_fingerprint, dims=dims, lease=lease
        )
        loaded.location = version
        return loaded

    def versions(self) -> dict[str, str]:
        if self.is_version_folder:
            return {self.root.name: "live"}
        folders = (self.root / VERSIONS).iterdir() if (self.root / VERSIONS).is_dir() else []
        return {p.name: "building" if p.name.startswith(".") else "live" for p in folders if p.is_dir()}

    def where(self, version: str) -> str:
        return str(self.folder(version))

    # --- writing -------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.is_version_folder:
            raise IndexFolderError(f"{self.root}: a version folder is read-only; write to its index root")

    def prepare(self) -> None:
        self._writable()

    def begin(self, version: str, keep_versions: int, *, device: Device = "auto") -> FolderWriter:
        self._writable()
        return FolderWriter(self, backend_for(device), version, keep_versions)

    @contextmanager
    def writing(self) -> Iterator[WriterLock]:
        """The root's :class:`~index.layout.WriterLock`, held until the block ends; a writer begun meanwhile
        publishes under it."""
        self._writable()
        resolve_version(self.root)  # no index there: say so before creating its lock file
        with WriterLock(self.root) as lock:
            self._held = lock
            try:
                yield lock
            finally:
                self._held = None

    @property
    def writing_now(self) -> bool:
        """Whether :meth:`writing` holds the root's lock (in this process) now."""
        return self._held is not None

    @contextmanager
    def locked(self) -> Iterator[WriterLock]:
        """The lock held by :meth:`writing`, or the root's lock for just this block."""
        if self._held is not None:
            yield self._held
            return
        with WriterLock(self.root) as lock:
            yield lock

    def prune(self, keep: int) -> list[str]:
        self._writable()
        before = set(self.versions())
        with self.locked() as lock:
            prune_versions(lock, keep)
        return sorted(before - set(self.versions()))

    def close(self) -> None:
        """Nothing to release: a folder has no connection."""

    # --- what differs from other engines (index.stores) -----------------------------------
    def check_no_live_writer(self) -> None:
        """Refuse while a writable server holds the root: a version published under it is lost at its next
        compaction (:func:`index.wal.check_not_live`)."""
        check_not_live(self.root)

    def cache_dir(self) -> Path:
        """``ROOT/.encode-cache``: the index's own, removed whole after a build."""
        return self.root / ".encode-cache"

    def open_live(self, opener: Callable[..., Any], *, device: Device, keep_versions: int, role: str) -> Any:
        """The root opened for writes (``opener`` is :func:`index.live.open_live`): its live lock taken, the log
        replayed."""
        return opener(self.root, device, keep_versions=keep_versions, role=role)

    def info_lines(self, manifest: IndexManifest) -> list[str]:
        """The writes a writable server logged above ``manifest``'s version (none for a version folder)."""
        return [] if self.is_version_folder else [unmerged_line(self.root, manifest)]


class FolderWriter:
    """A version folder of the store's root: staged in ``versions/.building-*``, renamed into place, ``current``
    moved."""

    def __init__(self, store: FolderStore, backend: IndexBackend, version: str, keep_versions: int) -> None:
        self.store, self.backend, self.version, self.keep_versions = store, backend, version, keep_versions
        with writing(store.root):
            self.staging = staging_version(store.root)

    def write_corpus(self, documents: list[Document], vectors: np.ndarray, probes: np.ndarray) -> None:
        with writing(self.staging):
            np.save(self.staging / VECTORS_FILE, vectors)
            np.save(self.staging / PROBE_FILE, probes)
        with writing(self.staging / DOCS_FILE):
            write_documents(self.staging / DOCS_FILE, documents)

    def build(self, dim: int, vectors: np.ndarray, plan: IndexPlan) -> VectorIndex:
        return self.backend.build(vectors, plan)

    def keep(self, index: VectorIndex, dim: int) -> tuple[str, int]:
        return save_to_folder(index, dim, self.staging)

    def files(self) -> tuple[dict[str, int], dict[str, str]]:
        return folder_files(self.staging)

    def publish(self, manifest: IndexManifest) -> Path:
        """Write the manifest, then rename the version into place and point ``current`` at it; returns its folder."""
        with writing(self.staging):
            write_json_atomic(self.staging / MANIFEST_FILE, manifest.to_dict())
        taken_already = self.store.writing_now  # add and compaction: checked when they took the lock
        with self.store.locked() as lock:
            if not taken_already:
                # A full build takes the lock only now: a writable server may have started while it encoded,
                # and would lose its acknowledged writes to this version at its next restart. One refuses.
                self.store.check_no_live_writer()
            return publish_version(lock, self.staging, manifest.version, self.keep_versions)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def save_to_folder(index: VectorIndex, dim: int, folder: Path) -> tuple[str, int]:
    with writing(folder / index_file(dim)):
        index.save(folder / index_file(dim))
    return index_file(dim), (folder / index_file(dim)).stat().st_size


def unmerged_line(root: Path, manifest: IndexManifest) -> str:
    """What a writable server wrote that is not yet in ``manifest``'s version: its log above the version's seq."""
    from index.compaction import applied_seq

    applied = applied_seq(manifest)
    wal = WriteAheadLog(root, floor_seq=applied)  # only read: no file is kept open
    pending = list(wal.records(applied))
    if not pending:
        return "writes    none unmerged (the write-ahead log holds nothing above this version)"
    passages = sum(len(record.passages) for record in pending if record.op == "upsert")
    deletes = sum(len(record.doc_ids) for record in pending if record.op == "delete")
    return (
        f"writes    {len(pending)} logged writes not yet compacted ({passages} passages written, {deletes} deletes; "
        f"log {wal.size_bytes / (1 << 20):.2f} MiB): mrl index compact, or the writable server, folds them in"
    )
