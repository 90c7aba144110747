"""The index store contract: where an index's versions live, and the one place an engine is chosen.

An index is a sequence of versions, one of them current. Every engine keeps them its own way
(a folder of version folders, collections and records in Milvus) behind one interface,
:class:`IndexStore`: the current version, a version's manifest, open a version with every check
(:func:`index.versions.check_openable`), begin a version and get its :class:`VersionWriter`,
publish (through the writer), prune (:func:`index.versions.prune_old_versions`), and leases
(taken by ``open``). Engines are registered by name in :data:`STORES`; :func:`open_store` picks
one from an :class:`~index.locator.IndexLocator`. A third engine is its store module, its
per-dimension backend (:mod:`index.backends`) and one line in :data:`STORES`.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.errors import ConfigError
from index.locator import IndexLocator, parse_locator

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

    def close(self) -> None:
        """Release the engine's connection."""


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
    module, _, attribute = STORES[locator.engine].partition(":")
    factory = importlib.import_module(module)
    for part in attribute.split("."):
        factory = getattr(factory, part)
    return factory(locator, timeout, credentials)


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
