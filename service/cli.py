"""``mrl serve``: argument parsing only; flags override ``MRL_*`` environment variables."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from pathlib import Path
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

# Flags whose value goes straight into ServiceSettings under the same name (None = not given).
SETTING_FLAGS = (
    "index",
    "backend",
    "milvus_uri",
    "milvus_timeout_s",
    "model",
    "host",
    "port",
    "default_dim",
    "encoder",
    "onnx_quantize",
    "onnx_cache",
    "encoder_threads",
    "device",
    "api_key",
    "max_k",
    "max_query_chars",
    "max_batch_queries",
    "max_in_flight",
    "batch_max_size",
    "batch_max_wait_ms",
    "batch_max_tokens",
    "query_cache_size",
    "snippet_chars",
    "load_in_background",
    "log_level",
    "public_docs",
    "max_body_bytes",
    "body_timeout_s",
    "header_timeout_s",
    "keep_alive_s",
    "max_header_bytes",
    "shutdown_timeout_s",
    "log_queries",
)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an index over HTTP (search, embeddings, metrics)",
        description="Serve GET/POST /search, POST /v1/embeddings, /dims, /healthz, /readyz, /metrics. "
        "Every flag can also be set as an MRL_* environment variable (e.g. MRL_INDEX, MRL_API_KEY); flags win.",
    )
    p.add_argument(
        "--index",
        type=Path,
        default=None,
        help="index root (serves `current`) or version folder; with --backend milvus the index's name [MRL_INDEX]",
    )
    p.add_argument(
        "--backend", choices=["faiss", "milvus"], default=None, help="where the index lives (default: faiss)"
    )
    p.add_argument(
        "--milvus-uri",
        default=None,
        help="Milvus: a .db file or http://host:19530; credentials from MRL_MILVUS_TOKEN or "
        "MRL_MILVUS_USER and MRL_MILVUS_PASSWORD [MRL_MILVUS_URI]",
    )
    p.add_argument("--milvus-timeout-s", type=float, default=None, help="Milvus: seconds per call, else 503 (5)")
    p.add_argument("--model", default=None, help="model folder or hub name (default: the one in the manifest)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: 8000)")
    p.add_argument("--default-dim", type=int, default=None, help="dim of requests that name none (default: largest)")
    p.add_argument("--encoder", choices=["torch", "onnx"], default=None, help="query encoder backend (default: torch)")
    p.add_argument("--onnx-quantize", action="store_true", default=None, help="ONNX: int8 dynamic quantisation")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: ~/.cache/mrl/onnx)")
    p.add_argument("--encoder-threads", type=int, default=None, help="CPU threads for the encoder")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default=None, help="encoder and FAISS (default: auto)")
    p.add_argument("--api-key", default=None, help="require X-API-Key (prefer MRL_API_KEY: flags show in `ps`)")
    p.add_argument("--max-k", type=int, default=None, help="largest k a request may ask for (default: 100)")
    p.add_argument("--max-query-chars", type=int, default=None, help="longest query in characters (default: 2000)")
    p.add_argument("--max-batch-queries", type=int, default=None, help="most queries per request (default: 64)")
    p.add_argument("--max-in-flight", type=int, default=None, help="requests in flight before 429 (default: 256)")
    p.add_argument("--batch-max-size", type=int, default=None, help="texts per encoder micro-batch (default: 32)")
    p.add_argument("--batch-max-wait-ms", type=float, default=None, help="micro-batch wait in ms (default: 0, none)")
    p.add_argument("--query-cache-size", type=int, default=None, help="query embeddings cached (default: 0, no cache)")
    p.add_argument(
        "--batch-max-tokens", type=int, default=None, help="estimated tokens per encoder call (default: 2048)"
    )
    p.add_argument("--snippet-chars", type=int, default=None, help="cut hit texts to this length; 0: whole")
    p.add_argument(
        "--load-in-background", action="store_true", default=None, help="listen at once; readyz 503 until loaded"
    )
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None)
    p.add_argument(
        "--public-docs", action="store_true", default=None, help="with an API key: /docs and /openapi.json without it"
    )
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body, else 413 (default: 2 MiB)")
    p.add_argument("--body-timeout-s", type=float, default=None, help="time to send a request body, else 408 (30)")
    p.add_argument("--header-timeout-s", type=float, default=None, help="time to send a request head, else 408 (10)")
    p.add_argument("--keep-alive-s", type=float, default=None, help="idle keep-alive connections close after (5)")
    p.add_argument("--max-header-bytes", type=int, default=None, help="request line + headers, else 400 (64 KiB)")
    p.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=None,
        help="after SIGTERM, requests still running this long are answered 503 and the server exits (20)",
    )
    p.add_argument(
        "--log-queries", action="store_true", default=None, help="access log with query strings (they hold the text)"
    )
    p.set_defaults(handler=run_serve)


class ServeError(ConfigError):
    """``mrl serve`` cannot start: bad settings, or an index or model it cannot load (one line, exit 2)."""


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServiceSettings from the environment, overridden by the flags that were given.

    Raises:
        ConfigError: For invalid or missing settings, in one line.
    """
    from service.settings import load_settings

    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    return load_settings(**given)


def run_serve(args: argparse.Namespace) -> int:
    """Load the index and model, listen, then serve; a failure to load or to listen is one line and exit code 2.

    Raises:
        ServeError: Settings, index, model or address that do not work.
    """
    import asyncio

    settings = settings_from_args(args)
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: Any) -> None:
    import uvicorn

    from core.matryoshka import DimensionError
    from core.models import ModelError
    from index.manifest import IndexFolderError
    from service.app import create_app, open_searcher
    from service.engine import ConfigurationError
    from service.sources import index_source

    app = create_app(settings)
    if settings.load_in_background:
        try:
            source = index_source(settings)
            source.manifest(source.current())  # a wrong path still fails here, in one line
        except IndexFolderError as exc:
            raise ServeError(f"cannot serve: {exc}") from None
    else:
        try:
            await open_searcher(app)  # before listening, so that a bad index or model ends here in one line
        except (IndexFolderError, ModelError, ConfigurationError, DimensionError) as exc:
            raise ServeError(f"cannot serve: {exc}") from None
    try:
        sockets = listening_sockets(settings.host, settings.port)  # after loading: no connection waits on a load
    except ServeError:
        state = app.state.service  # the lifespan never runs now: release the encoder thread and index lease here
        searcher, state.searcher = state.searcher, None
        if searcher is not None:
            await searcher.close()
        raise
    for sock in sockets:
        logger.info("listening on %s", _url(sock.getsockname()))
    await uvicorn.Server(uvicorn_config(app, settings)).serve(sockets=sockets)


def listening_sockets(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Sockets listening on ``host:port``, one per address the host resolves to, as uvicorn would bind them.

    Bound here rather than by uvicorn, because uvicorn logs a port it cannot bind and calls
    ``sys.exit(3)`` itself; here it is a :class:`ServeError`, one line and exit code 2.

    Args:
        host: A name or an IPv4 or IPv6 address; ``""`` is every interface.
        port: The port; 0 lets the OS pick a free one.
        backlog: Connections the OS queues before the server accepts them (uvicorn's default).

    Raises:
        ServeError: The host does not resolve, or an address cannot be bound (the port is taken, a
            privileged port, an address this machine does not have).
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot serve: host {host!r} does not resolve ({exc.strerror})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):  # without repeats, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
            if family == socket.AF_INET6:  # as asyncio's create_server: an IPv4 address gets a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)  # here too: with SO_REUSEADDR, Linux may let a bind pass and fail only the listen
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"cannot serve: port {port} on {host} is taken ({reason})") from None
        raise ServeError(f"cannot serve: cannot listen on port {port} on {host} ({reason})") from None
    return sockets


def _url(address: tuple) -> str:
    host, port = address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app: Any, settings: Any) -> Any:
    """uvicorn's settings for the service: its protocol and limits (deploy/README.md says what they do)."""
    import functools

    import uvicorn

    from service.protocol import GuardedH11Protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the service writes its own, without query strings (service.edge)
        http=functools.partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # then service.edge answers what still runs 503
        lifespan="on",
    )
