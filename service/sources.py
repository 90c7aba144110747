"""Which :class:`~index.loaded.IndexSource` the settings name: an index folder (FAISS) today."""

from __future__ import annotations

from index.loaded import FolderSource, IndexSource
from service.settings import ServiceSettings


def index_source(settings: ServiceSettings) -> IndexSource:
    """The index the service serves: ``settings.index``, a root of versions or one version folder."""
    return FolderSource(settings.index)
