"""The index store contract: where an index's versions live, and the one place an engine is chosen.

An index is a sequence of versions, one of them current. Every engine keeps them its own way
(a folder of version folders, collections and records in Milvus) behind one interface,
:class:`IndexStore`: the current version, a version's manifest, open a version with every check
(:func:`index.versions.check_openable`), begin a version and get its :class:`VersionWriter`,
publish (through the writer), prune (:func:`index.versions.prune_old_versions`), and leases
(taken by ``open``). Engines are registered by name in :data:`STORES`; :func:`open_store` picks
one from an :class:`~index.locator.IndexLocator`. A third engine is its store module, its
per-dimension backend (:mod:`index.backends`) and one line in :data:`STORES`, one in :data:`index.locator.LOCATORS`
(its locator schemes; the code that reads them lives in its store module), and one in
:data:`LIVE_WRITERS` if it takes writes while it serves. Nothing outside these modules and the
engine's own asks which engine an index is in: what differs is a method of its store.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import ConfigError
from index.locator import IndexLocator, parse_locator
from index.wal import SERVER_ROLE

if TYPE_CHECKING:
    import numpy as np

    from core.data import Document
    from index.backends import Device, VectorIndex
    from index.loaded import LoadedIndex
    from index.manifest import IndexManifest
    from index.params import IndexPlan

# Engine name -> "module:callable" building its store from (locator, timeout, credentials); imported on use,
# so that serving a folder never imports a Milvus client.
STORES = {
    "faiss": "index.folder_store:FolderStore.at",
    "milvus": "index.milvus_store:MilvusIndexStore.at",
}
# Engine name -> "module:callable" that opens its index for writes by one process (mrl serve --writable, mrl index
# compact), called by its store (IndexStore.open_live); named, not imported there, as these modules import the store.
LIVE_WRITERS = {
    "faiss": "index.live:open_live",
    "milvus": "index.milvus_live:open_milvus_live",
}


class VersionWriter(Protocol):
    """Where a new index version is written, and how it goes live."""

    version: str

    def write_corpus(self, documents: list[Document], vectors: np.ndarray, probes: np.ndarray) -> None:
        """The documents, their full vectors and the recall probes."""

    def build(self, dim: int, vectors: np.ndarray, plan: IndexPlan) -> VectorIndex:
        """Dim ``dim``'s index of ``vectors`` (truncated and normalised)."""

    def keep(self, index: VectorIndex, dim: int) -> tuple[str, int]:
        """Store ``index`` with the version: ``(what the manifest names it by, its size in bytes)``."""

    def files(self) -> tuple[dict[str, int], dict[str, str]]:
        """The version's files and their checksums, for the manifest (none for an engine)."""

    def publish(self, manifest: IndexManifest) -> Path | str:
        """Make the version live (one atomic step), prune old ones; returns where it is: a folder, or for an
        engine the locator and the version."""

    def abort(self) -> None:
        """Remove what this build wrote; nothing of it goes live."""


class IndexStore(Protocol):
    """One index's versions in one engine; what the builder, ``mrl index`` and the service use."""

    locator: IndexLocator

    def current(self) -> str:
        """The live version's name.

        Raises:
            IndexFolderError: No index there, or no live version. EngineUnavailable: the engine does not answer.
        """

    def manifest(self, version: str) -> IndexManifest:
        """Version ``version``'s manifest (a complete version only)."""

    def open(
        self,
        version: str,
        *,
        device: Device = "auto",
        expected_fingerprint: str | None = None,
        dims: list[int] | None = None,
        lease: bool = True,
    ) -> LoadedIndex:
        """Version ``version``, every part checked against its manifest, with a lease on it (unless ``lease=False``)."""

    def prepare(self) -> None:
        """Make sure versions can be written here, before a build spends time encoding.

        Raises:
            IndexFolderError: A place that cannot take versions. EngineUnavailable: the engine does not answer.
        """

    def begin(self, version: str, keep_versions: int, *, device: Device = "auto") -> VersionWriter:
        """Start writing version ``version``; its writer publishes it and prunes all but ``keep_versions``."""

    def versions(self) -> dict[str, str]:
        """Every version's state (``live``, ``building``, …), by name."""

    def prune(self, keep: int) -> list[str]:
        """Drop all but the newest ``keep`` live versions, never the current or a leased one; returns those dropped."""

    def writing(self) -> AbstractContextManager[object]:
        """Exclusive right to read ``current`` and publish after it (``mrl index add``): other writers wait."""

    def where(self, version: str) -> str:
        """Version ``version`` as people read it (a folder, or the locator and the version)."""

    def check_no_live_writer(self) -> None:
        """Refuse to write a new version while a writable server writes into this index (its writes would be lost).

        Raises:
            MrlError: One line naming the index and the process that writes it.
        """

    def cache_dir(self) -> Path | None:
        """The index's own encode cache, which a build removes whole once it has published; None: the user's
        shared cache, of which a build removes only its own entry."""

    def open_live(
        self, opener: Callable[..., LiveWriter], *, device: Device, keep_versions: int, role: str
    ) -> LiveWriter:
        """The current version opened for writes through ``opener``, the engine's entry in :data:`LIVE_WRITERS`
        (use :func:`open_live`, which passes it)."""

    def info_lines(self, manifest: IndexManifest) -> list[str]:
        """What ``mrl index info`` prints of this index beyond the manifest (e.g. writes not yet merged)."""

    def close(self) -> None:
        """Release the engine's connection."""


class LiveWriter(Protocol):
    """An index open for writes by one process (:class:`index.live.LiveIndex`, :class:`index.milvus_live.MilvusLive`),
    as :func:`open_live` gives it; the service's write path (:mod:`service.writes`) uses the rest of it."""

    manifest: IndexManifest

    def compact(self) -> str:
        """Fold the writes not yet in a version into a new one (if the engine keeps them apart); its name."""

    def close(self) -> None:
        """Release the index and this process's right to write it."""


def open_store(
    locator: IndexLocator, *, timeout: float | None = None, credentials: dict[str, str] | None = None
) -> IndexStore:
    """The store of the index ``locator`` names: the one place an engine is chosen.

    Args:
        locator: Where the index is.
        timeout: An engine's seconds per call (a folder has none).
        credentials: An engine's ``token``, ``user``, ``password`` (default: from ``MRL_MILVUS_*``).

    Raises:
        ConfigError: An engine with no registered store.
    """
    if locator.engine not in STORES:
        raise ConfigError(f"no index store for engine {locator.engine!r}; known: {', '.join(sorted(STORES))}")
    return _named(STORES[locator.engine])(locator, timeout, credentials)


def open_live(
    store: IndexStore, *, device: Device = "auto", keep_versions: int = 3, role: str = SERVER_ROLE
) -> LiveWriter:
    """``store``'s current version opened for writes by this process; close it to let another writer in.

    Args:
        store: The index.
        device: Where its indexes are searched.
        keep_versions: Versions a compaction keeps (an engine that writes into its version makes none).
        role: What this writer is, as a refused second writer is told.

    Raises:
        ConfigError: An engine that takes no writes. MrlError: Another process writes the index (one line
            naming it), or this place takes no writes (a version folder, a version built before live writes).
    """
    if store.locator.engine not in LIVE_WRITERS:
        raise ConfigError(f"{store.locator}: an index in {store.locator.engine} takes no writes")
    opener = _named(LIVE_WRITERS[store.locator.engine])
    return store.open_live(opener, device=device, keep_versions=keep_versions, role=role)


def compact(store: IndexStore, *, device: Device = "cpu", keep_versions: int = 3) -> tuple[str, dict | None]:
    """``mrl index compact``: fold the writes ``store`` holds apart from its version into a new version.

    Returns:
        Where the current version is, and the new version's history entry (None: there was nothing to fold,
        as always for an engine that writes into its version).

    Raises:
        MrlError: A writable server holds the index (write through it; it compacts on its own).
    """
    live = open_live(store, device=device, keep_versions=keep_versions, role="mrl index compact")
    try:
        before = live.manifest.version
        version = live.compact()
        return store.where(version), (None if version == before else live.manifest.history[-1])
    finally:
        live.close()


def _named(reference: str) -> Any:
    """The object ``"module:attribute.attribute"`` names, its module imported now."""
    module, _, attribute = reference.partition(":")
    found = importlib.import_module(module)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def current_manifest(index: IndexLocator | Path | str) -> IndexManifest:
    """The manifest of the live version of ``index`` (a locator, or its text; a path is a folder).

    Raises:
        IndexFolderError: No index there. EngineUnavailable: its engine does not answer.
    """
    store = open_store(index if isinstance(index, IndexLocator) else parse_locator(str(index)))
    try:
        return store.manifest(store.current())
    finally:
        store.close()
