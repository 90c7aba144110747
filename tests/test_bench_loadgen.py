"""The load generator's client (benchmarks.loadgen) against a real HTTP server on loopback (aiohttp's own)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.latency import drive, timed_get, timed_post
from benchmarks.loadgen import TRANSPORT_ERRORS, Answer, LoadClient, collector_paused, query_pairs


def serve(app: web.Application, body: Callable[[LoadClient], Awaitable[Any]], **client: Any) -> Any:
    """Run ``body`` with a client of ``app`` served on a free loopback port."""

    async def main() -> Any:
        async with TestServer(app, host="127.0.0.1") as server:
            async with LoadClient(str(server.make_url("")), **client) as http:
                return await body(http)

    return asyncio.run(main())


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        payload = await request.json() if request.can_read_body else None
        return web.json_response({"query": list(request.query.items()), "body": payload, "method": request.method})

    async def fails(request: web.Request) -> web.Response:
        return web.json_response({"error": "overloaded"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/fails", fails)
    return app


def test_query_pairs_are_written_as_httpx_writes_them():
    assert query_pairs({"q": "fever", "k": 10, "exact": True, "debug": False, "filter": None}) == [
        ("q", "fever"),
        ("k", "10"),
        ("exact", "true"),
        ("debug", "false"),
        ("filter", ""),
    ]
    assert query_pairs({"id": ["a", "b"], "dim": (64,)}) == [("id", "a"), ("id", "b"), ("dim", "64")]


def test_get_and_post_return_the_whole_answer():
    async def body(http: LoadClient) -> tuple[Answer, Answer, Answer]:
        got = await http.get("/echo", {"q": "héart attack", "k": 10, "exact": True})
        posted = await http.post("/echo", {"input": ["a"], "dimensions": 64})
        return got, posted, await http.get("/fails")

    got, posted, failed = serve(echo_app(), body)
    assert got.status_code == 200 and got.json()["query"] == [["q", "héart attack"], ["k", "10"], ["exact", "true"]]
    assert posted.json() == {"query": [], "body": {"input": ["a"], "dimensions": 64}, "method": "POST"}
    assert failed.status_code == 503 and json.loads(failed.text) == {"error": "overloaded"}


def test_failures_are_outcomes_with_their_reason_not_exceptions():
    async def body(http: LoadClient):
        answered = await timed_post(http, "/echo", {"x": 1}, lambda answer: {"n": len(answer.json())}, "n")
        refused = await timed_get(http, "/fails", {}, lambda answer: None, "anything")
        unread = await timed_get(http, "/echo", {}, lambda answer: answer.json()["missing"], "missing")
        return answered, refused, unread

    answered, refused, unread = serve(echo_app(), body)
    assert answered.error is None and answered.timings == {"n": 3} and answered.seconds > 0
    assert refused.error.startswith("HTTP 503") and refused.timings is None
    assert unread.error.startswith("HTTP 200 without missing")


def test_no_server_is_a_transport_error_and_an_outcome():
    async def main():
        async with TestServer(echo_app(), host="127.0.0.1") as server:
            base = str(server.make_url(""))
        async with LoadClient(base, timeout_s=5) as http:  # the server is gone: its port refuses
            with pytest.raises(TRANSPORT_ERRORS):
                await http.get("/echo")
            return await timed_get(http, "/echo", {}, lambda answer: None, "")

    outcome = asyncio.run(main())
    assert outcome.timings is None and outcome.error.startswith("ClientConnectorError")


def test_drive_keeps_at_most_its_concurrency_in_flight_over_that_many_connections():
    in_flight, peak, peers = 0, 0, set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        peers.add(request.transport.get_extra_info("peername"))
        await asyncio.sleep(0.01)
        in_flight -= 1
        return web.json_response({"timings_ms": {"total_ms": 10}})

    app = web.Application()
    app.router.add_get("/search", slow)

    async def body(http: LoadClient):
        return await drive(http, lambda number: {"q": str(number)}, 40, 4, float("inf"))

    outcomes = serve(app, body, connections=4)
    assert len(outcomes) == 40 and all(outcome.error is None for outcome in outcomes)
    assert peak == 4 and len(peers) == 4  # kept alive: four connections for forty requests


def test_the_timed_requests_run_with_the_clients_collector_off_and_it_is_on_again_after():
    """A full collection of the benchmark's heap stalls every request in flight: not while they are timed."""
    from types import SimpleNamespace

    from benchmarks.latency import Cell, time_cell

    collecting: list[bool] = []

    async def slow(request: web.Request) -> web.Response:
        return web.json_response({"timings_ms": {"total_ms": 1}})

    app = web.Application()
    app.router.add_get("/search", slow)

    async def send(client: LoadClient, params: dict[str, Any]):
        collecting.append(gc.isenabled())
        return await timed_get(client, "/search", params, lambda answer: answer.json()["timings_ms"], "timings_ms")

    async def main():
        async with TestServer(app, host="127.0.0.1") as server:
            config = SimpleNamespace(requests=12, warmup=3, request_timeout_s=5)
            cell = Cell(64, 2)
            return await time_cell(
                str(server.make_url("")),
                "echo",
                cell,
                lambda offset: lambda number: {"q": str(number)},
                config,
                float("inf"),
                send,
            )

    assert gc.isenabled()
    result = asyncio.run(main())
    assert result.errors == 0 and len(collecting) == 15
    assert collecting[:3] == [True] * 3 and collecting[3:] == [False] * 12  # warm-up collected as usual
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_a_client_outside_its_block_is_refused():
    with pytest.raises(RuntimeError, match="outside its 'async with' block"):
        asyncio.run(LoadClient("http://127.0.0.1:9").get("/"))


def test_the_client_overhead_benchmark_prints_both_clients(capsys):
    from benchmarks import client_overhead

    assert client_overhead.main(["--requests", "40", "--concurrency", "1,4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| httpx") or "aiohttp" in line]
    assert len(rows) == 2
    for row in rows:
        rates = [float(cell.replace(",", "")) for cell in row.strip("| ").split(" | ")[1:]]
        assert len(rates) == 2 and all(rate > 0 for rate in rates)
