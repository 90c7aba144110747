"""The :class:`~index.stores.IndexStore` the settings name (``index.stores.open_store`` chooses the engine)."""

from __future__ import annotations

from index.stores import IndexStore, open_store
from service.settings import ServiceSettings


def index_source(settings: ServiceSettings) -> IndexStore:
    """The index the service serves: ``settings.index``, a folder or a Milvus locator."""
    return open_store(settings.locator(), timeout=settings.milvus_timeout_s, credentials=settings.milvus_credentials())
