"""A live server for tests that need real sockets: the app under uvicorn in a thread, as ``mrl serve`` runs it.

Same sockets (:func:`service.cli.listening_sockets`), same uvicorn settings and protocol
(:func:`service.cli.uvicorn_config`), with the keyword encoder of ``tests.helpers.service``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.cli import listening_sockets, uvicorn_config
from service.settings import ServiceSettings
from tests.helpers.service import ServiceKeywordEncoder, keyword_loader

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LiveServer:
    """A running server: uvicorn's ``Server`` (``should_exit = True`` starts its shutdown), the app, its address."""

    server: uvicorn.Server
    app: FastAPI
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def live_server(settings: ServiceSettings, encoder: ServiceKeywordEncoder | None = None) -> Iterator[LiveServer]:
    """Serve ``settings`` (port 0: a free port) with the keyword encoder until the block ends, then stop."""
    app = create_app(settings, encoder_loader=keyword_loader(encoder or ServiceKeywordEncoder()))
    sockets = listening_sockets(settings.host, settings.port)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            for sock in sockets:
                sock.close()
            pytest.fail("the server did not start; its log above says why")
        time.sleep(0.02)
    host, port = sockets[0].getsockname()[:2]
    try:
        yield LiveServer(server, app, host, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_ready(base: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll /readyz until the server has loaded; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout} s:\n{log.read_text()}")
