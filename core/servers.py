"""Server processes for benchmarks and tests: a free loopback port, start, wait until ready, stop.

One harness for every HTTP server the project starts in a subprocess (``mrl serve``, the peer
systems of the benchmarks, the tests' servers): its output goes to a log file, readiness is
polled on one path, and it is always stopped (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from core.errors import MrlError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.25
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


class ServerError(MrlError, ValueError):
    """A server process did not become ready (one of ``mrl``'s known errors: it prints one line)."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def running_process(
    command: list[str],
    port: int,
    log_path: Path,
    ready_timeout_s: float,
    env: dict[str, str],
    ready_path: str = "/readyz",
) -> Iterator[str]:
    """Start any HTTP server ``command`` listening on loopback ``port``, wait until ``ready_path`` answers 200,
    yield its base URL; always stop it. Its output goes to ``log_path``.

    Raises:
        ServerError: The server exited or was not ready within ``ready_timeout_s``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://{LOOPBACK}:{port}"
            wait_until_ready(base, process, log_path, ready_timeout_s, ready_path)
            yield base
        finally:
            stop_server(process)


def wait_until_ready(
    base: str, process: subprocess.Popen, log_path: Path, timeout_s: float, path: str = "/readyz"
) -> None:
    """Poll ``path`` (``/readyz``) until it answers 200, the process exits, or ``timeout_s`` passes.

    Raises:
        ServerError: The process exited first, or the time ran out; the message names the log.
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:  # trust_env=False: no proxy, loopback only
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(
                    f"the server exited with code {process.returncode} before it was ready "
                    f"({failure_line(log_path)}; log: {log_path})"
                )
            try:
                if client.get(f"{base}{path}").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_INTERVAL_S)
    raise ServerError(f"the server was not ready after {timeout_s:.0f} s (log: {log_path})")


def stop_server(process: subprocess.Popen) -> int:
    """Terminate the server (SIGTERM, then SIGKILL after a grace period); return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM for %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
            process.kill()
    return process.wait(timeout=STOP_TIMEOUT_S)


def failure_line(path: Path) -> str:
    """The most telling line of a failed server's log: its last exception or error line, else its last line."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if EXCEPTION_LINE.match(line) or line.startswith("mrl: error:"):
            return line
    return lines[-1] if lines else "no output"
