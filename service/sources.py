"""The :class:`~index.loaded.IndexSource` the settings name (``index.locator`` chooses the engine)."""

from __future__ import annotations

from index.loaded import IndexSource
from index.locator import open_source
from service.settings import ServiceSettings


def index_source(settings: ServiceSettings) -> IndexSource:
    """The index the service serves: ``settings.index``, a folder or a Milvus locator."""
    return open_source(
        settings.locator(), timeout=settings.milvus_timeout_s, credentials=settings.milvus_credentials()
    )
