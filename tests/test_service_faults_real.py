"""Faults that live in a server process: a real ``mrl serve`` with the real model over the bundled sample.

Pruning under a live server, a corrupt version on reload, start-up failures, slow and
oversized clients at the socket, the embeddings endpoint under concurrent load, and a
bounded soak (64 in flight with a build and a reload in the middle) whose every answer is
200 or the documented 429 and whose request counters equal what was sent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.servers import free_port
from index.build import BuildConfig, build_index
from index.layout import VERSIONS, resolve_version
from tests.conftest import REPO, SAMPLE, scramble
from tests.helpers.sample import JUDGED
from tests.helpers.servers import wait_for_ready

pytestmark = pytest.mark.slow

QUERY = JUDGED[0][0]
SOAK_SECONDS = float(os.environ.get("MRL_SOAK_SECONDS", "60"))
SOAK_IN_FLIGHT = 64


def build(root: Path, keep: int = 3) -> Path:
    folder, _ = build_index(BuildConfig(data=SAMPLE, output=root, device="cpu", progress=False, keep_versions=keep))
    return folder


def serve_env(root: Path, port: int, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "MRL_INDEX": str(root),
        "MRL_PORT": str(port),
        "MRL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        **{f"MRL_{name.upper()}": value for name, value in settings.items()},
    }


class Server:
    """``mrl serve`` in a subprocess, its log in a file."""

    def __init__(self, root: Path, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("w")
        command = [sys.executable, "-m", "mrl", "serve"]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=serve_env(root, self.port, **settings),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        wait_for_ready(self.base, self.process, log)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self._log_file.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "index"
    build(root)
    return root


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory) -> Iterator[Server]:
    server = Server(
        root,
        tmp_path_factory.mktemp("log") / "server.log",
        header_timeout_s="1",
        keep_alive_s="1",
        max_body_bytes="65536",
    )
    yield server
    server.stop()


def search_statuses(base: str, requests: int, in_flight: int) -> Counter:
    def one(_: int) -> int:
        return httpx.get(f"{base}/search", params={"q": QUERY, "dim": 64, "k": 3}, timeout=60).status_code

    with ThreadPoolExecutor(in_flight) as pool:
        return Counter(pool.map(one, range(requests)))


def metric_value(base: str, prefix: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- 1. pruning never deletes what a live server serves ---------------------------------------


def test_builds_do_not_prune_the_version_a_live_server_serves(server: Server, root: Path):
    served = httpx.get(f"{server.base}/readyz").json()["index_version"]
    for _ in range(2):  # two newer builds, each keeping only itself
        build(root, keep=1)
    assert (root / VERSIONS / served).is_dir()
    assert httpx.get(f"{server.base}/readyz").json()["index_version"] == served
    assert search_statuses(server.base, 10, 1) == Counter({200: 10})
    assert search_statuses(server.base, 64, 64) == Counter({200: 64})
    newest = resolve_version(root).name
    assert httpx.post(f"{server.base}/admin/reload").json()["version"] == newest
    build(root, keep=1)  # the old version is released now: pruned; the newest stays, it is served
    assert not (root / VERSIONS / served).exists() and (root / VERSIONS / newest).is_dir()
    assert search_statuses(server.base, 10, 4) == Counter({200: 10})


# --- 2. a corrupt version is refused on reload, counted, and the old one serves on ------------


def test_a_corrupt_new_version_is_a_counted_409(server: Server, root: Path):
    before = httpx.get(f"{server.base}/readyz").json()["index_version"]
    failed = metric_value(server.base, 'mrl_index_reloads_total{outcome="failed"}')
    new = build(root)
    scramble(new / "docs.sqlite")
    response = httpx.post(f"{server.base}/admin/reload")
    assert response.status_code == 409 and response.json()["error"]["type"] == "reload_failed"
    assert "docs.sqlite" in response.json()["error"]["message"] and str(root) not in response.text
    assert metric_value(server.base, 'mrl_index_reloads_total{outcome="failed"}') == failed + 1
    assert httpx.get(f"{server.base}/readyz").json()["index_version"] == before
    assert search_statuses(server.base, 5, 1) == Counter({200: 5})
    build(root)  # a good version again, for the tests after this one
    assert httpx.post(f"{server.base}/admin/reload").json()["changed"] is True


# --- 4. start-up failures are one line and exit code 2 -----------------------------------------


def run_serve(root: Path, *flags: str) -> subprocess.CompletedProcess:
    env = serve_env(root, free_port())
    command = [sys.executable, "-m", "mrl", "serve", *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def copy_version(root: Path, target: Path) -> Path:
    shutil.copytree(resolve_version(root), target)
    return target


@pytest.mark.parametrize("fault", ["corrupt store", "other model", "missing model"])
def test_start_up_failures_are_one_line_and_exit_2(root: Path, tmp_path: Path, fault: str):
    version = copy_version(root, tmp_path / "version")
    flags: list[str] = []
    if fault == "corrupt store":
        scramble(version / "docs.sqlite")
        expected = "docs.sqlite"
    elif fault == "other model":
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["model"]["fingerprint"] = "sha256:" + "0" * 64
        (version / "manifest.json").write_text(json.dumps(manifest))
        expected = "not the model being served"
    else:
        flags = ["--model", str(tmp_path / "no-such-model")]
        expected = "no-such-model"
    result = run_serve(version, *flags)
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrl: error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# --- 3, 7, 15. the socket: oversized requests, slow clients ------------------------------------


def raw_exchange(port: int, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; (what came back, seconds until it closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks), time.monotonic() - started


def json_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), raw[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_huge_url_or_header_gets_the_json_error_body(server: Server):
    for request in (
        b"GET /search?q=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    ):
        raw, _ = raw_exchange(server.port, request)
        status, error = json_error(raw)
        assert (status, error["type"]) == (400, "bad_request") and "65536 bytes" in error["message"]


def test_a_client_that_sends_nothing_is_closed_after_the_header_timeout(server: Server):
    raw, seconds = raw_exchange(server.port, b"")
    status, error = json_error(raw)
    assert (status, error["type"]) == (408, "request_timeout") and 0.8 < seconds < 5


def test_a_client_that_sends_its_head_a_byte_at_a_time_is_closed(server: Server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    started = time.monotonic()
    closed_after = None
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for byte in request[:-4]:  # never the blank line that ends the head
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.1)
        else:
            closed_after = time.monotonic() - started if sock.recv(65536) is not None else None
    assert closed_after is not None and closed_after < 5


def test_an_oversized_unauthenticated_body_costs_nothing(root: Path, tmp_path: Path):
    server = Server(root, tmp_path / "keyed.log", api_key="k", max_body_bytes="65536")
    try:
        body = b'{"query": "' + b"a" * 50_000_000 + b'"}'
        response = httpx.post(f"{server.base}/search", content=body, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
        keyed = httpx.post(f"{server.base}/search", content=body, headers={"X-API-Key": "k"}, timeout=60)
        assert keyed.status_code == 413 and keyed.json()["error"]["type"] == "payload_too_large"
    finally:
        server.stop()


# --- 16. the embeddings endpoint under concurrent load -------------------------------------------


def test_concurrent_embeddings_never_fail(server: Server):
    texts = [("fever and cough " * n).strip() for n in (1, 3, 9, 27, 60)]
    failures: list[str] = []
    deadline = time.monotonic() + 15
    counts: Counter = Counter()

    def client(number: int) -> None:
        with httpx.Client(base_url=server.base, timeout=60) as http:
            while time.monotonic() < deadline:
                batch = texts[number % 5 :] + texts[: number % 3]
                response = http.post("/v1/embeddings", json={"input": batch, "dimensions": 64})
                counts[response.status_code] += 1
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts[200] > 16 and not failures, (counts, failures[:3])


# --- the soak -------------------------------------------------------------------------------------


def test_soak_with_a_build_and_a_reload_in_the_middle(server: Server, root: Path):
    """60 s at 64 in flight; a build and a reload halfway; every answer 200 or 429; counters match."""
    counted = metric_value(server.base, 'mrl_requests_total{endpoint="/search"')
    statuses: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SOAK_SECONDS

    def client() -> None:
        with httpx.Client(base_url=server.base, timeout=60) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status = http.get("/search", params={"q": QUERY, "dim": 64, "k": 5}).status_code
                with lock:
                    statuses[status] += 1
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(SOAK_IN_FLIGHT)]
    for thread in threads:
        thread.start()
    time.sleep(SOAK_SECONDS / 3)
    build(root)
    reload = httpx.post(f"{server.base}/admin/reload", timeout=120)
    for thread in threads:
        thread.join()
    sent = sum(statuses.values())
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(
        f"soak: {sent} requests in {SOAK_SECONDS:.0f} s, statuses {dict(statuses)}, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    assert reload.status_code == 200 and reload.json()["changed"] is True
    assert set(statuses) <= {200, 429} and statuses[200] > 0, statuses
    assert metric_value(server.base, 'mrl_requests_total{endpoint="/search"') - counted == sent
