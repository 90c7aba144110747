"""Which :class:`~index.loaded.IndexSource` the settings name: an index folder (FAISS), or an index in Milvus."""

from __future__ import annotations

from index.loaded import FolderSource, IndexSource
from service.settings import ServiceSettings


def index_source(settings: ServiceSettings) -> IndexSource:
    """The index the service serves: ``settings.index``, a root of versions or one version folder, or the
    name of an index kept in the Milvus deployment at ``settings.milvus_uri``."""
    if settings.backend == "milvus":
        from index.milvus import MilvusBackend
        from index.milvus_store import MilvusIndexStore, MilvusSource

        backend = MilvusBackend(
            settings.milvus_uri,
            token=settings.milvus_token.get_secret_value() if settings.milvus_token else "",
            user=settings.milvus_user,
            password=settings.milvus_password.get_secret_value() if settings.milvus_password else "",
            timeout=settings.milvus_timeout_s,
        )
        return MilvusSource(MilvusIndexStore(backend, str(settings.index)))
    return FolderSource(settings.index)
