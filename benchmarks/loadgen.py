"""The HTTP client of the benchmarks' load generator: aiohttp, whose cost per request stays flat as more are in flight.

The client runs on the machine it measures, so whatever CPU it spends per request is taken from the server. httpx's
async connection pool spends more per request the more connections it holds: against a server that answers at once,
on 2 cores, it sent 1,103 req/s at 1 in flight, 653 at 16 and 355 at 64, where aiohttp sent 3,979, 13,623 and 9,088.
With httpx the benchmarks measured their own client at 16 and 64 in flight; with aiohttp they measure the server.

:class:`LoadClient` is the small part of a client the timed loops use: ``get`` and ``post`` that return the whole
:class:`Answer`, read before they return, so a request's time is the time to its whole answer.

While requests are timed, the client's garbage collector is off (:func:`collector_paused`). A benchmark process
holds a large heap (torch, the model, the data set), and a full collection of it stalls every request in flight:
with 1.1 million objects in the client, one collection took 276 ms during a cell of 1,000 requests at 16 in flight,
and that cell's p99 was 318 ms where the same cell measured again had 60 ms. That tail was the client's, not the
server's.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

# What a failed request raises: no connection, a broken one, a malformed answer, or none within the timeout.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, read whole."""

    status_code: int
    text: str

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return json.loads(self.text)


@contextmanager
def collector_paused() -> Iterator[None]:
    """This process's garbage collector off inside the block (after one collection), then as it was.

    Reference counting still frees what the requests leave; only cycles wait for the block to end.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def query_pairs(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``params`` as query pairs, the way httpx writes them: ``true``/``false``, ``""`` for None, a list repeated."""
    pairs = []
    for name, value in params.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, bool):
                text = "true" if item else "false"
            else:
                text = "" if item is None else str(item)
            pairs.append((name, text))
    return pairs


class LoadClient:
    """At most ``connections`` kept-alive connections to ``base``; each request times out after ``timeout_s``.

    Use it as an async context manager: the connections are closed on the way out.
    """

    def __init__(self, base: str, *, connections: int = 1, timeout_s: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadClient:
        connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Answer:
        """``GET base + path`` with ``params`` as its query."""
        return await self._request("GET", path, params=query_pairs(params or {}))

    async def post(self, path: str, json: Any) -> Answer:
        """``POST base + path`` with ``json`` as its body."""
        return await self._request("POST", path, json=json)

    async def _request(self, method: str, path: str, **options: Any) -> Answer:
        if self._session is None:
            raise RuntimeError("LoadClient is used outside its 'async with' block")
        async with self._session.request(method, self.base + path, **options) as response:
            body = await response.read()
        return Answer(response.status, body.decode("utf-8", errors="replace"))
