"""Opening an index version for search, checked from manifest to last file.

Either everything loads and agrees (manifest, vectors, documents, one FAISS index per
dimension, the model fingerprint), or :class:`IndexFolderError` says what is wrong; a
caller never gets a half-loaded index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.backends import Device, FaissIndex, backend_for
from index.layout import DOCS_FILE, PROBE_FILE, VECTORS_FILE, resolve_version
from index.manifest import IndexFolderError, IndexManifest
from index.params import IndexPlan
from index.store import DocumentStore


@dataclass
class LoadedIndex:
    """One index version, ready to search at any of its dimensions."""

    path: Path
    manifest: IndexManifest
    vectors: np.ndarray  # full dimension, memory-mapped
    store: DocumentStore
    indexes: dict[int, FaissIndex]

    @property
    def dims(self) -> list[int]:
        return list(self.manifest.dims)

    def probes(self) -> np.ndarray:
        return np.load(self.path / PROBE_FILE)

    def close(self) -> None:
        self.store.close()


def _check_files(folder: Path, manifest: IndexManifest) -> None:
    for name, size in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IndexFolderError(f"{path}: missing file listed in the manifest")
        if path.stat().st_size != size:
            raise IndexFolderError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {size} (corrupt or partial)"
            )


def open_index(
    path: Path, *, device: Device = "auto", expected_fingerprint: str | None = None, dims: list[int] | None = None
) -> LoadedIndex:
    """Load an index root (its ``current`` version) or a version folder.

    Args:
        path: Index root or version folder.
        device: Where FAISS searches: ``auto`` picks the GPU when there is one.
        expected_fingerprint: The serving model's fingerprint; a different one is refused.
        dims: Load only these dimensions (default: all).

    Raises:
        IndexFolderError: Missing or corrupt files, another model, or a dimension mismatch.
    """
    folder = resolve_version(path)
    manifest = IndexManifest.read(folder)
    if expected_fingerprint and manifest.model.fingerprint != expected_fingerprint:
        raise IndexFolderError(
            f"{folder}: built with model {manifest.model.name!r} ({manifest.model.fingerprint[:19]}…), "
            f"not the model being served ({expected_fingerprint[:19]}…); rebuild the index with this model"
        )
    wanted = dims or manifest.dims
    unknown = sorted(set(wanted) - set(manifest.dims))
    if unknown:
        raise IndexFolderError(f"{folder}: no index for dims {unknown} (this index has {manifest.dims})")
    _check_files(folder, manifest)
    try:
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
    except ValueError as exc:
        raise IndexFolderError(f"{folder / VECTORS_FILE}: unreadable ({exc})") from None
    if vectors.shape != (manifest.num_vectors, manifest.model.full_dim):
        raise IndexFolderError(
            f"{folder / VECTORS_FILE}: shape {vectors.shape}, expected "
            f"({manifest.num_vectors}, {manifest.model.full_dim})"
        )
    backend = backend_for(device)
    indexes = {}
    for dim in wanted:
        entry = manifest.indexes[dim]
        try:
            index = backend.load(folder / entry.file, IndexPlan(entry.factory, entry.search_params))
        except RuntimeError as exc:
            raise IndexFolderError(
                f"{folder / entry.file}: unreadable FAISS index ({str(exc).splitlines()[0]})"
            ) from None
        if (index.ntotal, index.dim) != (manifest.num_vectors, dim):
            raise IndexFolderError(
                f"{folder / entry.file}: {index.ntotal} vectors of dim {index.dim}, "
                f"expected {manifest.num_vectors} of dim {dim}"
            )
        indexes[dim] = index
    store = DocumentStore(folder / DOCS_FILE)
    if len(store) != manifest.num_vectors:
        raise IndexFolderError(f"{folder / DOCS_FILE}: {len(store)} documents, expected {manifest.num_vectors}")
    return LoadedIndex(folder, manifest, vectors, store, indexes)
