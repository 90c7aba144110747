"""What the load generator's HTTP client costs: httpx and aiohttp against a server that answers at once.

    python -m benchmarks.client_overhead [--requests 3000] [--concurrency 1,16,64]

A raw ASGI app under uvicorn (httptools), in a process of its own, answers every ``GET`` with a small JSON body
at once, so the req/s each client reaches is bounded by the client's own cost per request, on the same cores as the
server: the reason ``benchmarks/loadgen.py`` uses aiohttp. Prints a Markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx

from benchmarks.loadgen import LoadClient
from core.servers import LOOPBACK, free_port, running_process

BODY = b'{"results": [], "timings_ms": {"total_ms": 0.1}}'


async def answer_at_once(scope, receive, send) -> None:
    """The server under test: no work, one small JSON answer."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})


@contextlib.contextmanager
def serving() -> Iterator[str]:
    """``answer_at_once`` under uvicorn in its own process on a free loopback port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "benchmarks.client_overhead:answer_at_once", "--port", str(port)]
    command += ["--host", LOOPBACK, "--http", "httptools", "--log-level", "warning", "--no-access-log"]
    command += ["--lifespan", "off"]
    with tempfile.TemporaryDirectory() as scratch:
        with running_process(command, port, Path(scratch) / "server.log", 60, dict(os.environ), ready_path="/") as base:
            yield base


async def _rate(get: Callable[[int], Awaitable[object]], requests: int, concurrency: int) -> float:
    numbers = iter(range(requests))

    async def worker() -> None:
        for number in numbers:
            await get(number)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def httpx_rate(base: str, requests: int, concurrency: int) -> float:
    """req/s through one ``httpx.AsyncClient`` with ``concurrency`` pooled connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, trust_env=False) as client:

        async def get(number: int) -> object:
            return (await client.get("/search", params={"q": str(number), "dim": 64})).json()

        return await _rate(get, requests, concurrency)


async def aiohttp_rate(base: str, requests: int, concurrency: int) -> float:
    """req/s through the load generator's own client (:class:`benchmarks.loadgen.LoadClient`)."""
    async with LoadClient(base, connections=concurrency) as client:

        async def get(number: int) -> object:
            return (await client.get("/search", {"q": str(number), "dim": 64})).json()

        return await _rate(get, requests, concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per cell (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,16,64", help="requests in flight (default: %(default)s)")
    args = parser.parse_args(argv)
    levels = [int(part) for part in args.concurrency.split(",") if part]
    print("| client | " + " | ".join(f"{level} in flight, req/s" for level in levels) + " |")
    print("| --- |" + " ---: |" * len(levels))
    with serving() as base:
        for name, rate in (("httpx", httpx_rate), ("aiohttp (benchmarks/loadgen.py)", aiohttp_rate)):
            rates = [asyncio.run(rate(base, args.requests, level)) for level in levels]
            print(f"| {name} | " + " | ".join(f"{value:,.0f}" for value in rates) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
