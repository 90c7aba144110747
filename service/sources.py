"""The :class:`~index.stores.IndexStore` the settings name (``index.stores.open_store`` chooses the engine)."""

from __future__ import annotations

from index.stores import IndexStore, open_store
from service.settings import ServiceSettings


def index_source(settings: ServiceSettings) -> IndexStore:
    """The index the service serves: ``settings.index``, a folder or a Milvus locator."""
    return open_store(settings.locator(), timeout=settings.milvus_timeout_s, credentials=settings.milvus_credentials())


def check_index(settings: ServiceSettings) -> None:
    """Read the served index's current manifest: a wrong path, or an engine that does not answer, fails here.

    Raises:
        MrlError: The index is not there, or its engine does not answer.
    """
    source = index_source(settings)
    source.manifest(source.current())
