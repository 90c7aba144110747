"""Servers for tests that need real sockets, and ``mrl`` commands that must fail in one line.

- :func:`live_server`: the app under uvicorn in a thread, as ``mrl serve`` runs it: same sockets
  (:func:`service.cli.listening_sockets`), same uvicorn settings and protocol
  (:func:`service.cli.uvicorn_config`), with the keyword encoder of ``tests.helpers.service``.
- :class:`ServeProcess` and :func:`serve_process`: ``mrl serve`` itself (or another command that
  serves the app) in a subprocess on a free loopback port, on the harness of :mod:`core.servers`
  (free port, wait until ready, stop), its output in a log file.
- :func:`mrl_in_process` and :func:`assert_one_line_error`: an ``mrl`` command run in this process
  (no second import of torch), and the check that it failed as a process would: one ``mrl: error:``
  line, exit code 2, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from core.servers import LOOPBACK, ServerError, free_port, stop_server, wait_until_ready
from service.app import create_app
from service.cli import listening_sockets, uvicorn_config
from service.settings import ServiceSettings
from tests.helpers.service import ServiceKeywordEncoder, keyword_loader

START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 180.0  # a loaded machine may take a while to import torch and load the real model
REPO = Path(__file__).resolve().parents[2]
MRL_SERVE = (sys.executable, "-m", "mrl", "serve")


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


def wait_for_ready(base: str, server: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll /readyz until the server has loaded (:func:`core.servers.wait_until_ready`); fail with its log if it
    exits first or is not ready within ``timeout`` s. :class:`ServeProcess` does this for the servers it starts."""
    try:
        wait_until_ready(base, server, log, timeout)
    except ServerError as exc:
        pytest.fail(f"{exc}\n{log.read_text(encoding='utf-8', errors='replace')}")


# --- `mrl serve` in a subprocess --------------------------------------------------------------------


def serve_env(**settings: object) -> dict[str, str]:
    """This process's environment without its ``MRL_*`` variables, the hub offline, and each of ``settings``
    as ``MRL_<NAME>`` (``index=root`` is ``MRL_INDEX``)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MRL_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update({f"MRL_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class ServeProcess:
    """``mrl serve`` in a subprocess on a free loopback port (``MRL_PORT``), configured by ``MRL_*`` variables.

    Started at once; :meth:`wait_ready` waits for ``/readyz`` (so that several load side by side),
    :meth:`stop` stops it (SIGTERM, then SIGKILL) and returns its exit code. Its output goes to ``log``.

    Args:
        log: The file its stdout and stderr go to.
        command: What to run instead of ``mrl serve`` (e.g. uvicorn with the app factory); ``{port}`` in an
            argument is replaced by the port.
        settings: Service settings, as ``MRL_<NAME>`` variables (``index=root``, ``api_key="k"``).
    """

    def __init__(self, log: Path, command: Sequence[str] = MRL_SERVE, **settings: object) -> None:
        self.port = free_port()
        self.base = f"http://{LOOPBACK}:{self.port}"
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [part.format(port=self.port) for part in command]
        env = serve_env(port=self.port, **settings)
        with log.open("w", encoding="utf-8") as output:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServeProcess:
        """Return once ``/readyz`` answers 200; stop it and fail the test, with its log, if it exits or times out."""
        try:
            wait_for_ready(self.base, self.process, self.log, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def get(self, path: str, timeout: float = 30.0, **params: object) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", params=params, timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """Stop it (SIGTERM, then SIGKILL after a grace period); its exit code."""
        return stop_server(self.process)


@contextmanager
def serve_process(
    log: Path, command: Sequence[str] = MRL_SERVE, ready_timeout_s: float = READY_TIMEOUT_S, **settings: object
) -> Iterator[ServeProcess]:
    """A :class:`ServeProcess`, ready, until the block ends; then stopped."""
    server = ServeProcess(log, command, **settings)
    try:
        yield server.wait_ready(ready_timeout_s)
    finally:
        server.stop()


# --- `mrl` commands that must fail in one line --------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    """How an ``mrl`` command ended: its exit code, what it wrote to stderr, and its log records."""

    code: int
    stderr: str
    log: str = ""


def mrl_in_process(
    argv: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Exit:
    """``mrl.cli.main(argv)`` in this process, as ``python -m mrl`` runs it, with no ``MRL_*`` variable set.

    What a process exit would show is checked here: the exit code is what ``main`` returns, stderr is what
    it printed, the log is every record logged meanwhile (with tracebacks), and no thread it started is
    left running (a process would not exit). ``mrl serve`` must fail before it listens: a server that
    would start fails the test instead of serving forever.
    """
    import service.cli
    from mrl.cli import main

    def listen(*args: object, **kwargs: object) -> None:
        pytest.fail("mrl serve loaded its index and model and was about to listen; it should have failed")

    for name in [name for name in os.environ if name.startswith("MRL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(service.cli, "listening_sockets", listen)
    capsys.readouterr()
    before = set(threading.enumerate())
    with caplog.at_level("INFO"):
        code = main(argv)
    left = [thread.name for thread in threading.enumerate() if thread not in before and not thread.daemon]
    assert not left, f"threads still running after mrl {argv[0]} returned: {left}"
    return Exit(code, capsys.readouterr().err, caplog.text)


def assert_one_line_error(result: Exit, expected: str) -> None:
    """``result`` is exit code 2 with one ``mrl: error:`` line that says ``expected``, and no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrl: error:")]
    shown = result.stderr + result.log
    assert result.code == 2, shown
    assert len(errors) == 1 and expected in errors[0], shown
    assert "Traceback" not in shown, shown
