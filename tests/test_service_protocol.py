"""The service at the socket: binding its port, framing request bodies, and its shutdown deadline.

Each test runs a real uvicorn server (``tests.helpers.servers``) or ``mrl serve`` itself over a keyword
index, and talks to it over real sockets: these are faults the in-process TestClient never sees.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import service.app
from core.errors import ConfigError
from mrl.cli import build_parser, main
from service.cli import ServeError, listening_sockets, settings_from_args, uvicorn_config
from service.settings import ServiceSettings
from tests.helpers.servers import LiveServer, live_server
from tests.helpers.service import ServiceKeywordEncoder, build_keyword_index, keyword_loader, write_data

SEARCH_BODY = b'{"query": "fever", "k": 1}'


@pytest.fixture(scope="module")
def keyword_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("protocol") / "index"
    build_keyword_index(write_data(root.parent / "data"), root)
    return root


def local_settings(root: Path, **overrides: object) -> ServiceSettings:
    """Settings for a server on a free loopback port, quiet unless something goes wrong."""
    values: dict = {"index": root, "device": "cpu", "host": "127.0.0.1", "port": 0, "log_level": "warning"}
    return ServiceSettings(**{**values, **overrides})


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(keyword_index: Path, request: pytest.FixtureRequest):
    """A server with each HTTP protocol: every socket-level test below runs on both parsers."""
    limits = {"keep_alive_s": 1, "header_timeout_s": 1, "max_header_bytes": 8192}
    settings = local_settings(keyword_index, http=request.param, **limits)
    with live_server(settings) as running:
        yield running


def exchange(server: LiveServer, request: bytes) -> bytes:
    """Send ``request`` as raw bytes; everything the server sends until it closes the connection."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(request)
        received = []
        while chunk := sock.recv(65536):
            received.append(chunk)
    return b"".join(received)


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def answered(server: LiveServer, endpoint: str) -> float:
    """Requests to ``endpoint`` (a route template) the server has answered, whatever their status."""
    requests = server.app.state.service.metrics.requests
    return sum(
        sample.value
        for metric in requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["endpoint"] == endpoint
    )


def counted(server: LiveServer, metric_name: str, **labels: str) -> float:
    value = server.app.state.service.metrics.registry.get_sample_value(metric_name, labels)
    return value or 0.0


def clear_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("MRL_")]:
        monkeypatch.delenv(name)


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


# --- a taken port ---------------------------------------------------------------------------


def test_a_taken_port_is_one_line_and_exit_code_2(keyword_index: Path, monkeypatch, capsys):
    clear_service_environment(monkeypatch)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # main sets it when unset
    loader = keyword_loader(ServiceKeywordEncoder())
    monkeypatch.setattr(service.app, "create_app", functools.partial(service.app.create_app, encoder_loader=loader))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--index", str(keyword_index), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
        code = main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("mrl: error: cannot serve:")
    assert f"port {port} on 127.0.0.1 is taken" in lines[0]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_host_is_bound_and_its_taken_port_is_refused():
    sockets = listening_sockets("::1", 0)
    try:
        assert [sock.family for sock in sockets] == [socket.AF_INET6]
        port = sockets[0].getsockname()[1]
        with socket.create_connection(("::1", port), timeout=5):
            pass  # it listens
        with pytest.raises(ServeError, match=rf"^cannot serve: port {port} on ::1 is taken \("):
            listening_sockets("::1", port)
    finally:
        for sock in sockets:
            sock.close()


# --- Content-Length with Transfer-Encoding --------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"transfer-encoding: chunked\r\ncontent-length: 40\r\n",
    ],
)
def test_both_body_lengths_is_400_and_close_and_nothing_after_it_runs(server: LiveServer, framing: bytes):
    searches, reloads = answered(server, "/search"), answered(server, "/admin/reload")
    smuggled = b"POST /admin/reload HTTP/1.1\r\nHost: service\r\nContent-Length: 0\r\n\r\n"
    request = (
        b"POST /search HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n"
        + chunked(SEARCH_BODY)
        + smuggled
    )

    response = exchange(server, request)  # returns once the server has closed the connection

    assert response.count(b"HTTP/1.1 ") == 1, response
    status, body = status_and_json(response)
    assert status == 400
    assert body == {
        "error": {
            "type": "bad_request",
            "message": "a request may not carry both Content-Length and Transfer-Encoding",
        }
    }
    assert answered(server, "/search") == searches  # refused before the app saw it
    assert answered(server, "/admin/reload") == reloads
    assert counted(server, "mrl_index_reloads_total", outcome="unchanged") == 0


def test_a_chunked_body_is_answered(server: LiveServer):
    response = exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(SEARCH_BODY),
    )
    status, body = status_and_json(response)
    assert status == 200
    assert body["results"][0]["hits"][0]["id"] == "d0"


def test_a_content_length_body_is_answered(server: LiveServer):
    response = exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: service\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(SEARCH_BODY)}\r\nConnection: close\r\n\r\n".encode()
        + SEARCH_BODY,
    )
    status, body = status_and_json(response)
    assert status == 200
    assert body["results"][0]["hits"][0]["id"] == "d0"


def test_other_malformed_requests_keep_the_generic_400(server: LiveServer):
    status, body = status_and_json(exchange(server, b"GET /healthz HTTP/1.1\r\nbroken header\r\n\r\n"))
    assert status == 400
    assert body["error"]["type"] == "bad_request"
    assert body["error"]["message"].startswith("malformed HTTP request")


def test_a_huge_url_or_header_is_400_in_the_json_body(server: LiveServer):
    for request in (
        # h11 checks its limit only while a head is incomplete: a whole head read at once passes it, so these
        # are larger than a read (asyncio reads up to 256 KiB); httptools counts every head it parses
        b"GET /search?q=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 100_000 + b"\r\n",  # many small ones
    ):
        status, body = status_and_json(exchange(server, request))
        assert (status, body["error"]["type"]) == (400, "bad_request")
        assert "8192 bytes" in body["error"]["message"]


def test_a_head_just_within_the_limit_is_answered(server: LiveServer):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 7_000 + b"\r\nConnection: close\r\n\r\n"
    assert exchange(server, request).startswith(b"HTTP/1.1 200 ")


def test_an_endless_header_is_refused_before_it_ends(server: LiveServer):
    """Without a blank line the head never completes: it is refused once more than the limit has arrived."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(20):
                sock.sendall(b"a" * 1024)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    if received:  # the answer can be lost to a reset when the client is still sending
        status, body = status_and_json(received)
        assert (status, body["error"]["type"]) == (400, "bad_request")


def test_a_client_that_sends_nothing_gets_408_after_the_head_deadline(server: LiveServer):
    started = time.monotonic()
    status, body = status_and_json(exchange(server, b""))
    assert (status, body["error"]["type"]) == (408, "request_timeout")
    assert 0.8 < time.monotonic() - started < 5


def test_a_head_sent_a_byte_at_a_time_is_closed_at_the_deadline(server: LiveServer):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        try:
            for byte in request[:-4]:  # never the blank line that ends the head
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(65536)
    assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_kept_alive_connection_serves_again_then_times_out_its_next_head(server: LiveServer):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):  # the head and the body may come in separate reads
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    # keep-alive (1 s) then the head deadline (1 s): uvicorn's keep-alive timer closes it quietly first
    assert time.monotonic() - started < 5
    assert received in (b"",) or received.startswith(b"HTTP/1.1 408 ")


def test_pipelined_requests_are_answered_in_order(server: LiveServer):
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response = exchange(server, one + one + last)
    assert response.count(b"HTTP/1.1 200 ") == 3


def test_auto_is_httptools_and_h11_can_be_asked_for():
    from service.protocol import GuardedH11Protocol, GuardedHttpToolsProtocol, protocol_class

    assert protocol_class("auto", 1.0, 8192).func is GuardedHttpToolsProtocol
    assert protocol_class("h11", 1.0, 8192).func is GuardedH11Protocol


# --- the shutdown deadline ------------------------------------------------------------------


def test_the_shutdown_deadline_is_a_setting_that_uvicorn_gets(monkeypatch):
    clear_service_environment(monkeypatch)
    assert ServiceSettings(index="idx").shutdown_timeout_s == 20  # under Kubernetes' default grace of 30 s
    monkeypatch.setenv("MRL_SHUTDOWN_TIMEOUT_S", "7")
    assert settings_from_args(build_parser().parse_args(["serve", "--index", "idx"])).shutdown_timeout_s == 7
    settings = settings_from_args(build_parser().parse_args(["serve", "--index", "idx", "--shutdown-timeout-s", "3"]))
    assert settings.shutdown_timeout_s == 3
    assert uvicorn_config(object(), settings).timeout_graceful_shutdown == 3
    with pytest.raises(ConfigError, match="shutdown_timeout_s"):
        settings_from_args(build_parser().parse_args(["serve", "--index", "idx", "--shutdown-timeout-s", "0"]))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def wait_until_refused(server: LiveServer, seconds: float = 5.0) -> None:
    """Return once the server no longer accepts connections: its shutdown has begun."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((server.host, server.port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.05)
    pytest.fail("the server kept accepting connections")


def test_a_request_running_at_the_shutdown_deadline_is_503_not_500(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    uvicorn_log = Records()
    with live_server(local_settings(keyword_index, shutdown_timeout_s=1), encoder) as server:
        logging.getLogger("uvicorn.error").addHandler(uvicorn_log)  # after uvicorn has configured its loggers
        try:
            with ThreadPoolExecutor(1) as client:
                encoder.hold_next_call()
                answer = client.submit(httpx.get, f"{server.url}/search", params={"q": "fever"}, timeout=8)
                assert encoder.entered.wait(5)
                stopping = time.monotonic()
                server.server.should_exit = True
                response = answer.result()
                waited = time.monotonic() - stopping
        finally:
            encoder.release.set()
            logging.getLogger("uvicorn.error").removeHandler(uvicorn_log)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": {
            "type": "not_ready",
            "message": "the server is shutting down and did not finish this request; retry it",
        }
    }
    assert 0.9 < waited < 4
    assert not [message for message in uvicorn_log.messages if "Exception in ASGI application" in message]
    assert counted(server, "mrl_requests_total", endpoint="/search", status="5xx") == 1
    assert counted(server, "mrl_failures_total", type="not_ready") == 1


def test_a_request_that_ends_before_the_deadline_is_answered_during_shutdown(keyword_index: Path):
    encoder = ServiceKeywordEncoder()
    with live_server(local_settings(keyword_index, shutdown_timeout_s=10), encoder) as server:
        try:
            with ThreadPoolExecutor(1) as client:
                encoder.hold_next_call()
                answer = client.submit(httpx.get, f"{server.url}/search", params={"q": "fever"}, timeout=8)
                assert encoder.entered.wait(5)
                server.server.should_exit = True
                wait_until_refused(server)
                encoder.release.set()
                response = answer.result()
        finally:
            encoder.release.set()

    assert response.status_code == 200
    assert response.json()["results"][0]["hits"][0]["id"] == "d0"
