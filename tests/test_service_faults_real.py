"""Faults that live in a server process: a real ``mrl serve`` with the real model over the bundled sample.

Pruning under a live server, a corrupt version on reload, slow and oversized clients at the
socket, the embeddings endpoint under concurrent load, and a bounded soak (64 in flight with a
build and a reload in the middle) whose every answer is 200 or the documented 429 and whose
request counters equal what was sent. One server process serves a copy of the session's sample
index (``sample_index``); builds into it reuse the session's encode cache, so they take about a
second.

Start-up failures run ``mrl serve`` in this process (one line, exit code 2, no traceback, no
thread left behind), over a keyword index; an oversized unauthenticated body goes to the app
under uvicorn in a thread with the keyword encoder (``tests.helpers.servers.live_server``): what
they check is the edge and the files, not the model.

The soak runs ``SOAK_SECONDS`` (20 s); ``MRL_SOAK_SECONDS=60`` lengthens it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import service.app
from index.layout import VERSIONS, resolve_version
from service.settings import ServiceSettings
from tests.conftest import scramble
from tests.helpers.sample import JUDGED, build_sample, copy_index
from tests.helpers.servers import ServeProcess, assert_one_line_error, live_server, mrl_in_process, serve_process
from tests.helpers.service import ServiceKeywordEncoder, build_keyword_index, keyword_loader, write_data

pytestmark = pytest.mark.slow

QUERY = JUDGED[0][0]
SOAK_SECONDS = float(os.environ.get("MRL_SOAK_SECONDS", "20"))
SOAK_IN_FLIGHT = 64
EMBEDDING_LOAD_SECONDS = 6


@pytest.fixture(scope="module")
def root(sample_index: Path, tmp_path_factory) -> Path:
    """A copy of the session's sample index: the tests build into it and prune it."""
    return copy_index(sample_index, tmp_path_factory.mktemp("faults") / "index")


@pytest.fixture(scope="module")
def build(encode_cache: Path):
    """``build(root, keep=3)``: the sample built again into ``root`` (the encode cache: about a second)."""

    def build(root: Path, keep: int = 3) -> Path:
        folder, _ = build_sample(root, encode_cache, keep_versions=keep)
        return folder

    return build


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    settings = {"header_timeout_s": 1, "keep_alive_s": 1, "max_body_bytes": 65536}
    with serve_process(log, index=root, device="cpu", **settings) as server:
        yield server


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


def test_builds_do_not_prune_the_version_a_live_server_serves(server: ServeProcess, root: Path, build):
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


def test_a_corrupt_new_version_is_a_counted_409(server: ServeProcess, root: Path, build):
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


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory) -> Path:
    """An index built by the real builder with the keyword encoder as its model (its manifest names ``keywords``)."""
    folder = tmp_path_factory.mktemp("keywords")
    return build_keyword_index(write_data(folder / "data"), folder / "index")


@pytest.mark.parametrize("fault", ["corrupt store", "other model", "missing model"])
def test_start_up_failures_are_one_line_and_exit_2(
    keyword_index: Path, tmp_path: Path, fault: str, capsys, caplog, monkeypatch
):
    version = shutil.copytree(keyword_index, tmp_path / "version")
    flags: list[str] = []
    if fault == "missing model":  # the real model loader, told to load a folder that is not there
        flags = ["--model", str(tmp_path / "no-such-model")]
        expected = "no-such-model"
    else:  # the keyword encoder is the model being served
        loader = keyword_loader(ServiceKeywordEncoder())
        monkeypatch.setattr(service.app, "create_app", functools.partial(service.app.create_app, encoder_loader=loader))
    if fault == "corrupt store":
        scramble(version / "docs.sqlite")
        expected = "docs.sqlite"
    elif fault == "other model":
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["model"]["fingerprint"] = "sha256:" + "0" * 64
        (version / "manifest.json").write_text(json.dumps(manifest))
        expected = "not the model being served"
    argv = ["serve", "--index", str(version), "--device", "cpu", *flags]
    assert_one_line_error(mrl_in_process(argv, capsys, caplog, monkeypatch), expected)


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


def test_a_huge_url_or_header_gets_the_json_error_body(server: ServeProcess):
    for request in (
        b"GET /search?q=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    ):
        raw, _ = raw_exchange(server.port, request)
        status, error = json_error(raw)
        assert (status, error["type"]) == (400, "bad_request") and "65536 bytes" in error["message"]


def test_a_client_that_sends_nothing_is_closed_after_the_header_timeout(server: ServeProcess):
    raw, seconds = raw_exchange(server.port, b"")
    status, error = json_error(raw)
    assert (status, error["type"]) == (408, "request_timeout") and 0.8 < seconds < 5


def test_a_client_that_sends_its_head_a_byte_at_a_time_is_closed(server: ServeProcess):
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


def test_an_oversized_unauthenticated_body_costs_nothing(keyword_index: Path):
    local = {"device": "cpu", "host": "127.0.0.1", "port": 0, "log_level": "warning"}
    with live_server(ServiceSettings(index=keyword_index, api_key="k", max_body_bytes=65536, **local)) as server:
        body = b'{"query": "' + b"a" * 50_000_000 + b'"}'
        response = httpx.post(f"{server.url}/search", content=body, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
        keyed = httpx.post(f"{server.url}/search", content=body, headers={"X-API-Key": "k"}, timeout=60)
        assert keyed.status_code == 413 and keyed.json()["error"]["type"] == "payload_too_large"


# --- 16. the embeddings endpoint under concurrent load -------------------------------------------


def test_concurrent_embeddings_never_fail(server: ServeProcess):
    texts = [("fever and cough " * n).strip() for n in (1, 3, 9, 27, 60)]
    failures: list[str] = []
    deadline = time.monotonic() + EMBEDDING_LOAD_SECONDS
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


def test_soak_with_a_build_and_a_reload_in_the_middle(server: ServeProcess, root: Path, build):
    """``SOAK_SECONDS`` at 64 in flight; a build and a reload a third of the way; every answer 200 or 429;
    counters match."""
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
