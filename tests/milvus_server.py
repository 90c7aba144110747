"""Fixtures for the Milvus tests: a real standalone Milvus 2.3.5 server (:mod:`index.milvus_server`), and Milvus Lite.

The fixtures skip where ``milvus`` or ``pymilvus`` cannot be imported, except in CI
(``CI=true``), which must run them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from index.milvus_server import LocalMilvusServer, free_port, running_milvus_server

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
