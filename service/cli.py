"""``mrl serve``: argument parsing only; flags override ``MRL_*`` environment variables."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an index over HTTP (search, embeddings, metrics), or a model alone (embeddings)",
        description="Serve GET/POST /search, POST /v1/embeddings, /dims, /healthz, /readyz, /metrics over an "
        "index (--index LOCATOR); or, with --model MODEL and no index, the model alone: /v1/embeddings and "
        "/v1/models at its Matryoshka dims, no search. "
        "Every flag is also an MRL_* environment variable (e.g. MRL_INDEX, MRL_API_KEY); flags win. "
        "Milvus credentials come from the environment only (MRL_MILVUS_TOKEN, or MRL_MILVUS_USER and "
        "MRL_MILVUS_PASSWORD).",
    )
    add_setting_flags(p)
    p.set_defaults(handler=run_serve)


def add_setting_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per field of :class:`~service.settings.ServiceSettings`, generated from the field itself.

    ``--max-k`` for ``max_k``: its type (choices for a Literal, on/off for a bool), its help from the
    field's description, its default and its ``MRL_*`` variable from the model, so a new setting is one
    field and its flag cannot drift from it. Fields marked ``cli=False`` (credentials) are environment only.
    Every flag defaults to None (not given): the environment or the field's default applies.

    Returns:
        The names of the settings that have a flag.
    """
    from service.settings import ServiceSettings, setting_flag_types

    names = []
    for name, field in ServiceSettings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            continue
        kind, choices = setting_flag_types(field.annotation)
        described = field.description or name
        said = field.is_required() or "default" in described  # a description may say its default in words
        default = "" if said else f" (default: {_shown(name, field.get_default())})"
        help_text = f"{described}{default} [MRL_{name.upper()}]"
        options: dict[str, Any] = {"default": None, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=kind, choices=choices, metavar=name.upper() if choices is None else None)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **options)
        names.append(name)
    return names


def _shown(name: str, value: Any) -> str:
    """A default as the help text shows it: bytes in KiB or MiB, None as 'none', booleans as on/off."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if name.endswith("_bytes") and value >= 1 << 10:
        return f"{value >> 20} MiB" if value % (1 << 20) == 0 else f"{value >> 10} KiB"
    return str(value)


class ServeError(ConfigError):
    """``mrl serve`` cannot start: bad settings, or an index or model it cannot load (one line, exit 2)."""


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServiceSettings from the environment, overridden by the flags that were given.

    Raises:
        ConfigError: For invalid or missing settings, in one line.
    """
    from service.settings import ServiceSettings, load_settings

    given = {name: value for name in ServiceSettings.model_fields if (value := getattr(args, name, None)) is not None}
    return load_settings(**given)


def run_serve(args: argparse.Namespace) -> int:
    """Load the index and model (or the model alone), listen, then serve; a failure to load or to listen is one
    line and exit code 2. With ``--workers N`` (N > 1), N processes serve on one port (:mod:`service.workers`).

    Raises:
        ServeError: Settings, index, model or address that do not work.
    """
    import asyncio

    settings = settings_from_args(args)
    # `mrl` set the root logger to INFO (DEBUG with -v): the service's own loggers (its access log
    # included) follow --log-level too, not only uvicorn's; forked workers inherit the level.
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(settings.log_level.upper())
    if settings.log_format == "json":
        from service.logs import use_json_logs

        use_json_logs()
    if settings.deprecated_spelling:
        print(f"mrl: warning: {settings.deprecated_spelling}", file=sys.stderr)
    if settings.workers > 1:
        from service.workers import serve_workers

        logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")
        return serve_workers(settings, listening_sockets, serve)
    asyncio.run(serve(settings))
    return 0


async def serve(
    settings: Any, sockets: list[socket.socket] | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    """Load, then serve ``settings`` until a signal to stop.

    Args:
        settings: The service settings.
        sockets: Listening sockets to serve on (a worker's, inherited); ``None`` binds the settings' address
            once the index and model are loaded.
        on_ready: Called once the server answers (a worker tells its supervisor).

    Raises:
        ServeError: The index or model cannot be loaded, or the address cannot be bound.
    """
    import uvicorn

    from core.errors import MrlError
    from service.app import create_app, open_searcher
    from service.sources import check_index

    app = create_app(settings)
    if settings.load_in_background and settings.serves_search:
        try:
            check_index(settings)  # a wrong path still fails here, in one line
        except MrlError as exc:  # a missing index, or its engine does not answer
            raise ServeError(f"cannot serve: {exc}") from None
    else:
        try:
            await open_searcher(app)  # before listening, so that a bad index or model ends here in one line
        except MrlError as exc:  # a bad index or model, an engine that does not answer, a wrong dimension
            raise ServeError(f"cannot serve: {exc}") from None
    if sockets is None:
        try:
            sockets = listening_sockets(settings.host, settings.port)  # after loading: no connection waits on it
        except ServeError:
            await app.state.service.close()  # the lifespan never runs now: release the encoder and index lease
            raise
        for sock in sockets:
            logger.info("listening on %s", _url(sock.getsockname()))
    server = uvicorn.Server(uvicorn_config(app, settings))
    watchers = [asyncio.create_task(_reload_on_sighup(app)), asyncio.create_task(freeze_when_loaded(app.state.service))]
    if on_ready is not None:
        watchers.append(asyncio.create_task(_when_started(server, on_ready)))
    try:
        await server.serve(sockets=sockets)
    finally:
        for task in watchers:
            task.cancel()


async def freeze_when_loaded(state: Any, poll_s: float = 0.05) -> None:
    """Once the model and index are loaded, move every object the process holds out of the garbage collector's reach.

    A full collection visits every object it tracks, and with torch, the model and the index loaded that is
    hundreds of thousands of objects. On 2 cores one took 301 ms in the middle of a run at 16 requests in
    flight, and every request in flight waited for it: p99 333 ms against a p50 of 46 ms. Frozen objects
    (``gc.freeze``) are skipped by every later collection, which then visits only what serving made since.
    What is frozen is still freed by reference counting; only cycles among it stay, as the loaded model
    does anyway. An index version loaded later by a reload is not frozen.
    """
    while state.embedder is None and state.load_error is None:
        await asyncio.sleep(poll_s)
    if state.load_error is None:
        gc.collect()
        gc.freeze()
        logger.info("froze %d objects loaded at start-up: the garbage collector skips them", gc.get_freeze_count())


async def _when_started(server: Any, on_ready: Callable[[], None]) -> None:
    while not server.started:
        await asyncio.sleep(0.02)
    on_ready()


async def _reload_on_sighup(app: Any) -> None:
    """SIGHUP reloads the index, as POST /admin/reload does (the supervisor of --workers sends it to all)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGHUP, wake.set)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals here
        return
    try:
        while True:
            await wake.wait()
            wake.clear()
            searcher = app.state.service.searcher
            if searcher is None:
                continue
            try:
                outcome = await searcher.reload()
                logger.info("SIGHUP: reload %s", "changed the version" if outcome.changed else "found nothing new")
            except Exception as exc:  # the old version serves on; the reload metrics count it
                logger.warning("SIGHUP: reload failed: %s", exc)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


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
    """uvicorn's settings for the service: its protocol and limits (docs/deployment.md says what they do)."""
    import uvicorn

    from service.protocol import protocol_class

    try:
        http = protocol_class(settings.http, settings.header_timeout_s, settings.max_header_bytes)
    except ValueError as exc:
        raise ServeError(f"cannot serve: {exc}") from None
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the service writes its own, without query strings (service.edge)
        http=http,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # then service.edge answers what still runs 503
        lifespan="on",
        # JSON logs: uvicorn's loggers are left to propagate to the root logger, whose handlers write JSON.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
