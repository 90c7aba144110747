"""Opening an index version for search, checked from manifest to last file.

Either everything loads and agrees (manifest, vectors, documents, one FAISS index per
dimension, the model fingerprint), or :class:`IndexFolderError` says what is wrong; a
caller never gets a half-loaded index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.files import load_npy
from index.backends import Device, VectorIndex, backend_for, get_backend
from index.filters import MetadataTable, SearchFilter, parse_filter
from index.layout import DOCS_FILE, PROBE_FILE, VECTORS_FILE, VersionLease, resolve_version
from index.manifest import IndexFolderError, IndexManifest, file_checksum
from index.params import IndexPlan
from index.store import DocumentStore
from index.versions import DocumentCount, check_counts, check_openable


class Lease(Protocol):
    """A process's claim on a version, so that builds do not prune it (:class:`VersionLease`, or an engine's)."""

    def refresh(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class LoadedIndex:
    """One index version, ready to search at any of its dimensions.

    ``vectors`` and ``store`` are a folder's memory-mapped ``vectors.npy`` and SQLite documents, or
    an engine's equivalents (indexed by row arrays, ``get(rows)``); ``health``, where set, raises
    when the engine that holds the version cannot be reached. ``metadata`` is every row's filterable
    metadata, for the indexes that filter by row id (FAISS); an engine that filters itself has none.
    ``fields_source`` and ``rows_source``, where set, give the metadata fields and the rows as they are now,
    for a version that live writes change in place (Milvus, :mod:`index.milvus_live`); a None field: the
    manifest's.
    """

    path: Path | None  # the version folder; None for a version kept in an engine
    manifest: IndexManifest
    vectors: Any  # (num_vectors, full_dim) full vectors: np.ndarray (memory-mapped) or an engine's reader
    store: DocumentStore | Any
    indexes: dict[int, VectorIndex]
    probe_queries: np.ndarray | None = None
    lease: Lease | None = None
    location: str = ""  # the version's name, as its store's current() names it
    health: Callable[[], None] | None = None
    metadata: MetadataTable | None = None
    fields_source: Callable[[], dict[str, str] | None] | None = None
    rows_source: Callable[[], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not self.location:
            self.location = self.manifest.version

    @property
    def dims(self) -> list[int]:
        return list(self.manifest.dims)

    @property
    def metadata_fields(self) -> dict[str, str]:
        """Each metadata field's type (:func:`index.filters.metadata_fields`): the manifest's, or for a folder
        built before filters, read from its documents; for a version written in place, as writes left them."""
        fields = self.fields_source() if self.fields_source is not None else None
        if fields is not None:
            return dict(fields)
        if self.manifest.metadata_fields or self.metadata is None:
            return dict(self.manifest.metadata_fields)
        return dict(self.metadata.fields)

    def rows(self) -> np.ndarray:
        """Every row the version holds, sorted: ``0 .. num_vectors - 1``, or those a version written live holds now
        (what ``mrl index add`` carries into the next version)."""
        if self.rows_source is not None:
            return self.rows_source()
        return np.arange(self.manifest.num_vectors)

    def search_filter(self, raw: Any) -> SearchFilter | None:
        """A request's filter, checked against this version's fields, ready for ``search(..., where=)``
        (for FAISS with the rows it allows); None for no filter.

        Raises:
            FilterError: Naming where in the filter the problem is.
        """
        parsed = parse_filter(raw, self.metadata_fields)
        return None if parsed is None else SearchFilter.over(parsed, self.metadata)

    def probes(self) -> np.ndarray:
        if self.probe_queries is None:
            raise IndexFolderError(f"{self.path or self.location}: has no {PROBE_FILE}")
        return self.probe_queries

    def check_health(self) -> None:
        """Raises (:class:`~index.backends.EngineUnavailable`) if the engine holding the version cannot be reached."""
        if self.health is not None:
            self.health()

    def close(self) -> None:
        self.store.close()
        for index in self.indexes.values():
            index.close()
        if self.lease is not None:
            self.lease.release()


def _check_files(folder: Path, manifest: IndexManifest) -> None:
    """Every listed file exists with its recorded size and, where the manifest has one, checksum."""
    for name, size in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IndexFolderError(f"{path}: missing file listed in the manifest")
        if path.stat().st_size != size:
            raise IndexFolderError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {size} (corrupt or partial)"
            )
        expected = manifest.checksums.get(name)
        if expected is not None and file_checksum(path) != expected:
            raise IndexFolderError(f"{path}: contents differ from the manifest's checksum (corrupt)")


def open_index(
    path: Path,
    *,
    device: Device = "auto",
    expected_fingerprint: str | None = None,
    dims: list[int] | None = None,
    lease: bool = True,
) -> LoadedIndex:
    """Load an index root (its ``current`` version) or a version folder, verifying every file.

    Every file is checked against the manifest (size, and checksum where the manifest records
    them), the document store passes SQLite's integrity check and holds as many rows as the
    manifest says, and every FAISS index has the recorded count and dimension. Everything is
    read or opened before this returns, so later deletion of the folder does not affect it.

    Args:
        path: Index root or version folder.
        device: Where FAISS searches: ``auto`` picks the GPU when there is one.
        expected_fingerprint: The serving model's fingerprint; a different one is refused.
        dims: Load only these dimensions (default: all).
        lease: Record that this process holds the version, so that builds do not prune it until
            :meth:`LoadedIndex.close`.

    Raises:
        IndexFolderError: Missing or corrupt files, another model, or a dimension mismatch.
    """
    folder = resolve_version(path)
    manifest = IndexManifest.read(folder)
    wanted = check_openable(manifest, str(folder), expected_fingerprint, dims)
    held = VersionLease(folder) if lease else None  # before reading, so a build cannot prune it meanwhile
    try:
        _check_files(folder, manifest)
        vectors = _open_vectors(folder, manifest)
        indexes = {dim: _open_dim(folder, manifest, dim, device) for dim in wanted}
        probes = load_npy(folder / PROBE_FILE) if (folder / PROBE_FILE).is_file() else None
        store = _open_store(folder, manifest)
        metadata = _read_metadata(folder, store, manifest)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return LoadedIndex(folder, manifest, vectors, store, indexes, probes, held, metadata=metadata)


def _open_vectors(folder: Path, manifest: IndexManifest) -> np.ndarray:
    try:
        vectors = load_npy(folder / VECTORS_FILE, mmap_mode="r")
    except ValueError as exc:
        raise IndexFolderError(f"{folder / VECTORS_FILE}: unreadable ({exc})") from None
    if vectors.shape != (manifest.num_vectors, manifest.model.full_dim):
        raise IndexFolderError(
            f"{folder / VECTORS_FILE}: shape {vectors.shape}, expected "
            f"({manifest.num_vectors}, {manifest.model.full_dim})"
        )
    return vectors


def _open_dim(folder: Path, manifest: IndexManifest, dim: int, device: Device) -> VectorIndex:
    entry = manifest.indexes[dim]
    # Any FAISS backend reads any FAISS file: the device picks one. Another engine opens its own.
    backend = backend_for(device) if entry.backend.startswith("faiss") else get_backend(entry.backend)
    try:
        index = backend.open(folder / entry.file, IndexPlan(entry.factory, entry.search_params))
    except RuntimeError as exc:
        raise IndexFolderError(f"{folder / entry.file}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None
    check_counts(manifest, {dim: (f"{folder / entry.file}:", index.ntotal, index.dim)})
    return index


def _read_metadata(folder: Path, store: DocumentStore, manifest: IndexManifest) -> MetadataTable:
    """Every row's filterable metadata as a table, read once at open (the store is closed if that fails)."""
    try:
        return MetadataTable.build(store.metadatas(), manifest.metadata_fields or None)
    except ValueError as exc:
        store.close()
        raise IndexFolderError(f"{folder}/{DOCS_FILE}: unreadable metadata ({exc})") from None
    except BaseException:
        store.close()
        raise


def _open_store(folder: Path, manifest: IndexManifest) -> DocumentStore:
    try:
        store = DocumentStore(folder / DOCS_FILE)
    except IndexFolderError as exc:
        raise IndexFolderError(f"{folder}/{exc}") from None
    try:
        store.check_integrity()
        check_counts(manifest, documents=DocumentCount(f"{DOCS_FILE}:", len(store), manifest.num_vectors))
    except IndexFolderError as exc:
        store.close()
        raise IndexFolderError(f"{folder}/{exc}") from None
    return store
