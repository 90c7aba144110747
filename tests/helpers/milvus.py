"""Fixtures for the Milvus tests: a real standalone Milvus 2.3.5 server (:mod:`index.milvus_server`), and Milvus Lite.

The fixtures skip where ``milvus`` or ``pymilvus`` cannot be imported, except in CI
(``CI=true``), which must run them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.loaded import open_index
from index.milvus_server import LocalMilvusServer, free_port, running_milvus_server
from index.milvus_store import MilvusIndexStore
from index.search import staged_search
from tests.conftest import SAMPLE

__all__ = ["LocalMilvusServer", "free_port", "running_milvus_server"]  # for the tests that import them here


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_module(name: str, hint: str):
    """Import ``name``; skip the test without it, but fail in CI."""
    try:
        return __import__(name)
    except ImportError as exc:
        message = f"`{name}` cannot be imported ({exc}); install {hint}"
        if in_ci():
            pytest.fail(f"{message}, and CI must run this test")
        pytest.skip(message)


def require_milvus_server() -> None:
    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    require_module("milvus", "the `milvus` extra: pip install -e '.[milvus]'")


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMilvusServer]:
    """A real standalone Milvus 2.3.5 server on loopback, shared by the session's tests.

    A test may stop and start it (an outage); it must leave it running, on the same URI.
    """
    require_milvus_server()
    server = LocalMilvusServer(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop(keep_binary=False)


@pytest.fixture(scope="session")
def milvus_server_uri(milvus_server: LocalMilvusServer) -> str:
    """URI of the session's real Milvus server (``http://127.0.0.1:PORT``)."""
    return milvus_server.uri


@pytest.fixture(scope="module")
def milvus_lite_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a fresh Milvus Lite database (a ``.db`` path in a temporary folder), shared by a module's tests.

    Milvus Lite serves each database from a gRPC server on 127.0.0.1 inside this process; it is
    stopped afterwards.
    """
    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    require_module("milvus_lite", "the `milvus` extra: pip install -e '.[milvus]'")
    uri = str(tmp_path_factory.mktemp("milvus-lite") / "milvus.db")
    yield uri
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)


@pytest.fixture(scope="module")
def lite_backend(milvus_lite_uri: str):
    """A :class:`~index.milvus.MilvusBackend` on the module's Milvus Lite database; closed afterwards."""
    from index.milvus import MilvusBackend

    backend = MilvusBackend(milvus_lite_uri)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The nine keyword documents (``tests.helpers.service.write_data``) in a BEIR folder, once per module."""
    from tests.helpers.service import write_data

    return write_data(tmp_path_factory.mktemp("data"))


def assert_same_hits_as_faiss(
    store: MilvusIndexStore, version: str, faiss_index: Path, filters: list[dict] | None = None
) -> None:
    """``faiss_index`` (the bundled sample indexed with the real model in a FAISS folder: the session's
    ``sample_index``) gives the same hits as ``version`` of the sample in Milvus.

    Both are exact (Flat): the same rows, best first, at every dim and in two-stage search; and the same
    again under each of ``filters`` (FAISS selects the rows, Milvus evaluates the expression).
    """
    from core.data import load_queries
    from core.models import SentenceTransformerEncoder, load_model

    model = load_model(None)
    queries = SentenceTransformerEncoder(model, "default", 32, False).encode_queries(
        list(load_queries(SAMPLE / "queries.jsonl").values())
    )
    faiss, milvus = open_index(faiss_index), store.open(version)
    try:
        assert faiss.dims == milvus.dims and len(faiss.dims) >= 4
        assert all(entry.factory == "Flat" for entry in milvus.manifest.indexes.values())
        plans = [(dim, None) for dim in faiss.dims] + [(min(faiss.dims), max(faiss.dims))]
        for raw, (dim, rerank_dim) in [(None, plan) for plan in plans] + [(f, plans[-2]) for f in filters or []]:
            where_faiss, where_milvus = faiss.search_filter(raw), milvus.search_filter(raw)
            want = staged_search(faiss.indexes[dim], faiss.vectors, queries, dim, 10, rerank_dim, where=where_faiss)
            got = staged_search(milvus.indexes[dim], milvus.vectors, queries, dim, 10, rerank_dim, where=where_milvus)
            assert np.array_equal(got.rows, want.rows), (dim, rerank_dim)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            ids = [d and d.id for d in milvus.store.get(got.rows.ravel().tolist())]  # None: a padded row (-1)
            assert ids == [d and d.id for d in faiss.store.get(want.rows.ravel().tolist())]
            assert raw is None or (got.rows >= 0).sum() > 0, raw  # the filter leaves something to compare
    finally:
        faiss.close()
        milvus.close()
