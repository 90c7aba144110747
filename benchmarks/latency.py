"""End-to-end HTTP latency of the real server: ``mrl serve`` in a subprocess, loaded from 127.0.0.1.

For each encoder backend a fresh server process is started on a free loopback port and
awaited on ``/readyz``; then a bounded async load generator sends ``GET /search`` with real
query texts, one *cell* at a time (dim × concurrency, plus optional two-stage cells), a fixed
number of requests per cell after a short warm-up. Every loop is bounded in count and in
time, traffic never leaves the loopback interface, and the server is always terminated.

The client runs on the same machine as the server, so on a small CPU it competes with it;
the machine's CPU count and load average are recorded with every result.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import httpx
import numpy as np

from benchmarks import (
    ENCODERS,
    encoder_settings,
    format_ms,
    machine_info,
    markdown_row,
    read_query_texts,
    utc_now,
    write_report,
)
from benchmarks.args import DEFAULT_OUT, add_server_limits, int_list_argument, name_list_argument
from benchmarks.loadgen import TRANSPORT_ERRORS, Answer, LoadClient, collector_paused
from core.cli_args import add_output_argument, config_fields, dims_argument
from core.errors import ConfigError
from core.files import json_fields
from core.matryoshka import DimensionError
from core.servers import LOOPBACK, ServerError, free_port, running_process
from index.locator import LOCATOR_FORMS
from index.manifest import IndexManifest
from index.stores import current_manifest
from service.protocol import HttpProtocol

logger = logging.getLogger(__name__)

STAGE_TIMINGS = ("encode_ms", "search_ms", "rerank_ms", "total_ms")
ERROR_TEXT_CHARS = 200


@dataclass
class LatencyConfig:
    """What ``mrl bench latency`` can be told."""

    index: Path
    queries: Path
    dims: list[int] | None = None  # default: every dim of the index
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    requests: int = 200  # measured requests per cell
    warmup: int = 20  # unmeasured requests per cell (at least one per connection)
    encoders: list[str] = field(default_factory=lambda: ["torch", "onnx"])
    rerank: bool = False  # add cells dim=smallest, rerank_dim=full
    targets: list[str] = field(default_factory=list)  # e.g. "min_quality=0.98", "latency_budget_ms=10": plan cells
    k: int = 10
    device: str = "auto"
    encoder_threads: int | None = None
    onnx_cache: Path | None = None
    batch_max_wait_ms: float | None = None  # the server's micro-batch wait (default: the server's)
    shadow_fractions: list[float] | None = None  # a server per fraction (MRL_SHADOW_FRACTION); None: its default
    workers: list[int] | None = None  # a server per worker count (mrl serve --workers); None: one process
    http: list[str] | None = None  # a server per HTTP parser (mrl serve --http); None: the server's default
    in_process: bool = True  # also time the same encoder in this process, one query per call (the overhead goal)
    time_limit_s: float = 900.0  # no request is sent after this; later cells are recorded as cut short
    ready_timeout_s: float = 300.0  # per server start (an ONNX export happens on first use)
    request_timeout_s: float = 30.0
    out: Path | None = None


@dataclass(frozen=True)
class Cell:
    """One measured combination: dimension, two-stage re-scoring dimension (or none), concurrency."""

    dim: int
    concurrency: int
    rerank_dim: int | None = None
    target: str | None = None  # instead of dims: query parameters of a quality or latency target ("a=1&b=2")

    @property
    def label(self) -> str:
        if self.target:
            return f"{self.target}, concurrency {self.concurrency}"
        rerank = f"→{self.rerank_dim}" if self.rerank_dim else ""
        return f"dim {self.dim}{rerank}, concurrency {self.concurrency}"


@dataclass
class Outcome:
    """One request as the client saw it."""

    seconds: float
    timings: dict[str, float] | None  # the server's timings_ms; None for a failed request
    error: str | None = None


@dataclass
class CellResult:
    """Latency percentiles, throughput and the server's own stage timings of one cell."""

    encoder: str
    dim: int
    rerank_dim: int | None
    concurrency: int
    requested: int
    sent: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    throughput_rps: float
    wall_s: float
    server_ms: dict[str, float | None]
    first_error: str | None = None
    target: str | None = None
    plans: dict[str, int] | None = None  # the plans that answered (from each response), with their counts

    @property
    def cut_short(self) -> bool:
        return self.sent < self.requested


# --- configuration ------------------------------------------------------------------------


def check_config(config: LatencyConfig, manifest: IndexManifest) -> list[int]:
    """Validate ``config`` against the index before any server starts; return the dims to measure.

    Raises:
        ConfigError: A count or limit that is not positive, an unknown encoder, or two-stage cells
            asked for without a dim below the full one. DimensionError: A dim the index does not have.
    """
    positive = {"--requests": config.requests, "--k": config.k, "--time-limit": config.time_limit_s}
    positive |= {"--ready-timeout": config.ready_timeout_s, "--request-timeout": config.request_timeout_s}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {config.warmup}")
    if not config.concurrency or min(config.concurrency) < 1:
        raise ConfigError(f"--concurrency must list positive numbers, got {config.concurrency}")
    unknown = [name for name in config.encoders if name not in ENCODERS]
    if unknown or not config.encoders:
        raise ConfigError(f"unknown encoders {unknown} (choose from {', '.join(ENCODERS)})")
    dims = sorted(set(config.dims or manifest.dims), reverse=True)
    missing = [d for d in dims if d not in manifest.dims]
    if missing:
        raise DimensionError(f"dims {missing} are not in the index (it has {manifest.dims})")
    for target in config.targets:
        target_params(target)  # raises ConfigError for a malformed one
    if config.workers is not None and (not config.workers or not all(1 <= count <= 64 for count in config.workers)):
        raise ConfigError(f"--workers must list counts from 1 to 64, got {config.workers}")
    parsers = get_args(HttpProtocol)
    if config.http is not None and (not config.http or any(name not in parsers for name in config.http)):
        raise ConfigError(f"--http must list parsers from {', '.join(parsers)}, got {config.http}")
    if config.rerank and min(dims) >= manifest.model.full_dim:
        raise ConfigError(f"--rerank needs a dim below the full dimension {manifest.model.full_dim} in --dims")
    return dims


TARGETS = ("min_quality", "latency_budget_ms")


def plan_cells(
    dims: list[int], concurrency: list[int], rerank_dim: int | None = None, targets: list[str] | None = None
) -> list[Cell]:
    """Every dim at every concurrency; (with ``rerank_dim``) the smallest dim re-scored there; then each target."""
    cells = [Cell(dim, level) for dim in dims for level in concurrency]
    if rerank_dim is not None:
        cells += [Cell(min(dims), level, rerank_dim) for level in concurrency]
    cells += [Cell(0, level, target=target) for target in targets or [] for level in concurrency]
    return cells


def target_params(target: str) -> dict[str, float]:
    """``min_quality=0.98+latency_budget_ms=20`` → its query parameters.

    Raises:
        ConfigError: An unknown name or a value that is not a positive number.
    """
    params = {}
    for part in target.split("+"):
        name, _, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name not in TARGETS or number <= 0:
            raise ConfigError(
                f"--targets takes {' or '.join(n + '=NUMBER' for n in TARGETS)} (joined by +), got {part!r}"
            )
        params[name] = number
    return params


# --- the server process -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerVariant:
    """Server settings measured side by side (each in its own server): ``None`` leaves the server's default."""

    shadow_fraction: float | None = None
    workers: int | None = None
    http: str | None = None

    def label(self, encoder: str) -> str:
        parts = [encoder]
        if self.shadow_fraction is not None:
            parts.append(f"shadow={self.shadow_fraction:g}")
        if self.workers is not None:
            parts.append(f"workers={self.workers}")
        if self.http is not None:
            parts.append(f"http={self.http}")
        return " ".join(parts)


def server_variants(config: LatencyConfig) -> list[ServerVariant]:
    """Every combination of the asked-for shadow fractions, worker counts and HTTP parsers."""
    return [
        ServerVariant(fraction, workers, http)
        for fraction in config.shadow_fractions or [None]
        for workers in config.workers or [None]
        for http in config.http or [None]
    ]


def server_command(config: LatencyConfig, encoder: str, port: int, variant: ServerVariant | None = None) -> list[str]:
    """``python -m mrl serve`` for ``encoder``, bound to the loopback interface only."""
    variant = variant or ServerVariant()
    command = [sys.executable, "-m", "mrl", "serve", "--index", str(config.index), "--host", LOOPBACK]
    if variant.shadow_fraction is not None:
        command += ["--shadow-fraction", f"{variant.shadow_fraction:g}"]
    if variant.workers is not None:
        command += ["--workers", str(variant.workers)]
    if variant.http is not None:
        command += ["--http", variant.http]
    command += ["--port", str(port)]
    for name, value in encoder_settings(encoder).items():  # --encoder onnx, --onnx-quantize, ...
        flag = "--" + name.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    command += ["--device", config.device, "--log-level", "warning"]  # no access log: it would cost CPU
    if config.onnx_cache is not None:
        command += ["--onnx-cache", str(config.onnx_cache)]
    if config.encoder_threads is not None:
        command += ["--encoder-threads", str(config.encoder_threads)]
    if config.batch_max_wait_ms is not None:
        command += ["--batch-max-wait-ms", str(config.batch_max_wait_ms)]
    return command


def server_environment() -> dict[str, str]:
    """This process's environment without ``MRL_*``: the flags alone configure the benchmarked server."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MRL_")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@contextmanager
def running_server(
    config: LatencyConfig, encoder: str, log_path: Path, variant: ServerVariant | None = None
) -> Iterator[str]:
    """Start ``mrl serve`` for ``encoder``, wait until it is ready, yield its base URL; always stop it.

    Raises:
        ServerError: The server exited or was not ready within ``config.ready_timeout_s``.
    """
    port = free_port()
    command = server_command(config, encoder, port, variant)
    with running_process(command, port, log_path, config.ready_timeout_s, server_environment()) as base:
        yield base


def server_info(base: str, timeout_s: float) -> dict[str, Any]:
    """What the server says it serves (``GET /dims``), without the per-dim list."""
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        response = client.get(f"{base}/dims")
        response.raise_for_status()
        body = response.json()
    return {key: body[key] for key in ("model", "index_version", "encoder", "full_dim", "num_vectors")}


# --- load generation ------------------------------------------------------------------------


def search_params(cell: Cell, queries: list[str], k: int, offset: int) -> Callable[[int], dict[str, Any]]:
    """Request number -> query string parameters; the query texts are used in order, cycling."""

    def params(number: int) -> dict[str, Any]:
        values: dict[str, Any] = {"q": queries[(offset + number) % len(queries)], "k": k}
        if cell.target:
            return values | target_params(cell.target)
        values["dim"] = cell.dim
        if cell.rerank_dim is not None:
            values["rerank_dim"] = cell.rerank_dim
        return values

    return params


async def timed_get(
    client: LoadClient,
    path: str,
    params: dict[str, Any],
    read: Callable[[Answer], dict | None],
    expected: str,
) -> Outcome:
    """One timed ``GET``: a transport error, a non-200 answer or one without ``expected`` fails.

    The time is to the whole answer; ``read`` then parses it (not timed) into the server's stage
    timings, or ``None``, raising ``ValueError``, ``KeyError``, ``IndexError`` or ``TypeError``
    when the answer lacks what the caller expects.
    """
    return await _timed(lambda: client.get(path, params=params), read, expected)


async def timed_post(
    client: LoadClient,
    path: str,
    body: dict[str, Any],
    read: Callable[[Answer], dict | None],
    expected: str,
) -> Outcome:
    """One timed ``POST`` of the JSON ``body``, judged and read exactly as :func:`timed_get` judges a ``GET``."""
    return await _timed(lambda: client.post(path, json=body), read, expected)


async def _timed(
    request: Callable[[], Awaitable[Answer]], read: Callable[[Answer], dict | None], expected: str
) -> Outcome:
    started = time.perf_counter()
    try:
        response = await request()
    except TRANSPORT_ERRORS as exc:
        return Outcome(time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS])
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return Outcome(seconds, None, f"HTTP {response.status_code}: {response.text[:ERROR_TEXT_CHARS]}")
    try:
        return Outcome(seconds, read(response))
    except (ValueError, KeyError, IndexError, TypeError):
        return Outcome(seconds, None, f"HTTP 200 without {expected}: {response.text[:ERROR_TEXT_CHARS]}")


def _our_timings(response: Answer) -> dict:
    body = response.json()
    plan = (body.get("plan") or {}).get("key")
    return dict(body["timings_ms"]) | ({"plan": plan} if plan else {})


async def send_one(client: LoadClient, params: dict[str, Any]) -> Outcome:
    """One ``GET /search`` of ``mrl serve``; an answer without ``timings_ms`` is a failure."""
    return await timed_get(client, "/search", params, _our_timings, "timings_ms")


async def drive(
    client: LoadClient,
    params: Callable[[int], dict[str, Any]],
    count: int,
    concurrency: int,
    deadline: float,
    send: Callable[[LoadClient, dict[str, Any]], Awaitable[Outcome]] = send_one,
) -> list[Outcome]:
    """Send ``count`` requests with ``concurrency`` in flight; none is started after ``deadline`` (monotonic).

    ``send`` makes one request (default: ``GET /search`` of ``mrl serve``); other servers bring their own.
    """
    numbers = iter(range(count))  # shared by the workers: the event loop runs one at a time
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for number in numbers:
            if time.monotonic() >= deadline:
                return
            outcomes.append(await send(client, params(number)))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return outcomes


async def time_cell(
    base: str,
    label: str,
    cell: Cell,
    params_from: Callable[[int], Callable[[int], dict[str, Any]]],
    config: LatencyConfig | Any,
    deadline: float,
    send: Callable[..., Any] = send_one,
) -> CellResult:
    """Warm up (at least one request per connection), then time ``config.requests`` requests.

    ``params_from(offset)`` gives the query parameters of request ``number``; ``config`` needs
    ``requests``, ``warmup`` and ``request_timeout_s`` (the latency and the peers benchmark share this).
    """
    warmup = max(config.warmup, cell.concurrency) if config.warmup else 0
    async with LoadClient(base, connections=cell.concurrency, timeout_s=config.request_timeout_s) as client:
        await drive(client, params_from(0), warmup, cell.concurrency, deadline, send)
        with collector_paused():  # a collection of the client's heap would stall the requests in flight
            started = time.perf_counter()
            outcomes = await drive(client, params_from(warmup), config.requests, cell.concurrency, deadline, send)
            wall = time.perf_counter() - started
    return summarize(label, cell, config.requests, outcomes, wall)


async def time_cells(
    label: str, cells: list[Cell], measure: Callable[[Cell], Awaitable[CellResult]]
) -> list[CellResult]:
    """Every cell in turn against one server, logging each result."""
    results = []
    for cell in cells:
        result = await measure(cell)
        logger.info("%s %s: p50 %s ms, %.1f req/s", label, cell.label, format_ms(result.p50_ms), result.throughput_rps)
        results.append(result)
    return results


async def measure_cells(
    base: str, encoder: str, cells: list[Cell], queries: list[str], config: LatencyConfig, deadline: float
) -> list[CellResult]:
    """Every cell in turn against one ``mrl serve``."""

    def measure(cell: Cell) -> Awaitable[CellResult]:
        params_from = lambda offset: search_params(cell, queries, config.k, offset)  # noqa: E731
        return time_cell(base, encoder, cell, params_from, config, deadline)

    return await time_cells(encoder, cells, measure)


def summarize(encoder: str, cell: Cell, requested: int, outcomes: list[Outcome], wall_s: float) -> CellResult:
    """Percentiles over the successful requests; throughput = successful requests per second of wall time.

    The server's stage timings are averaged over the successful requests that reported any (``None`` when
    none did, as for a server that does not report them).
    """
    ok = [outcome for outcome in outcomes if outcome.error is None]
    latencies = np.array([outcome.seconds * 1000 for outcome in ok])
    p50, p95, p99 = (_round(v) for v in np.percentile(latencies, [50, 95, 99])) if len(ok) else (None, None, None)
    timed = [outcome.timings for outcome in ok if outcome.timings]
    server = {
        name: _round(float(np.mean([t.get(name, 0.0) for t in timed]))) if timed else None for name in STAGE_TIMINGS
    }
    errors = [outcome.error for outcome in outcomes if outcome.error is not None]
    plans: dict[str, int] = {}
    for timing in timed:
        if "plan" in timing:
            plans[timing["plan"]] = plans.get(timing["plan"], 0) + 1
    return CellResult(
        encoder=encoder,
        dim=cell.dim,
        rerank_dim=cell.rerank_dim,
        concurrency=cell.concurrency,
        requested=requested,
        sent=len(outcomes),
        errors=len(errors),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=_round(float(latencies.mean())) if len(ok) else None,
        throughput_rps=round(len(ok) / wall_s, 2) if wall_s > 0 else 0.0,
        wall_s=round(wall_s, 3),
        server_ms=server,
        first_error=errors[0] if errors else None,
        target=cell.target,
        plans=plans if cell.target else None,
    )


def _round(value: float) -> float:
    return round(float(value), 3)


# --- the whole run ------------------------------------------------------------------------


def run_latency(config: LatencyConfig) -> dict[str, Any]:
    """Measure every cell for every encoder backend, each against its own fresh server process.

    Returns:
        The report: settings, machine, what each server served, and one entry per measured cell.
        Written as ``latency.json`` and ``latency.md`` into ``config.out`` when it is set.

    Raises:
        IndexFolderError: No index at ``config.index``. DataError: Bad queries file.
        ConfigError, DimensionError: Invalid settings. ServerError: A server did not start.
    """
    manifest = current_manifest(config.index)
    dims = check_config(config, manifest)
    queries = read_query_texts(config.queries)
    cells = plan_cells(dims, config.concurrency, manifest.model.full_dim if config.rerank else None, config.targets)
    logs = config.out or Path(tempfile.mkdtemp(prefix="mrl-bench-latency-"))  # server logs
    started_at, started = utc_now(), time.monotonic()
    deadline = started + config.time_limit_s
    servers: dict[str, Any] = {}
    results: list[CellResult] = []
    in_process: dict[str, dict[str, Any]] = {}
    for encoder in config.encoders:
        if time.monotonic() >= deadline:
            logger.warning("time limit reached; %s not measured", encoder)
            continue
        if config.in_process:  # before its server starts: nothing else runs meanwhile
            in_process[encoder] = in_process_timing(config, encoder, manifest, queries)
        for variant in server_variants(config):  # e.g. sampling on and off, 1 and 2 workers: side by side
            label = variant.label(encoder)
            log = logs / f"latency-server-{label.replace(' ', '-')}.log"
            with running_server(config, encoder, log, variant) as base:
                if variant.workers is not None and variant.workers > 1:
                    wait_for_workers(base, variant.workers, config.ready_timeout_s)
                servers[label] = {"url": base, **server_info(base, config.request_timeout_s)}
                servers[label]["healthz_p50_ms"] = asyncio.run(http_floor(base, config))
                results += asyncio.run(measure_cells(base, label, cells, queries, config, deadline))
    report = {
        "benchmark": "latency",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 2),
        "settings": _settings_dict(config, dims, len(queries)),
        "machine": machine_info(),
        "servers": servers,
        "in_process": in_process,
        "results": [{**asdict(result), "cut_short": result.cut_short} for result in results],
    }
    if config.out is not None:
        write_latency_report(report, config.out)
    return report


IN_PROCESS_TEXTS = 300  # query texts encoded one per call in this process (at most)
CEILING_BATCH = 16  # the in-process ceiling a server at 16 in flight is held against: batches of 16 queries
FLOOR_REQUESTS = 200  # GET /healthz requests that time the HTTP round trip with no work behind it


def in_process_timing(config: LatencyConfig, encoder: str, manifest: IndexManifest, queries: list[str]) -> dict:
    """p50/p95 of one query per ``encode_queries`` call, the encoder loaded exactly as its server loads it."""
    from benchmarks.encoders import EncodersConfig, measure_cell, open_encoder, service_settings

    measured = EncodersConfig(config.queries, index=config.index, device=config.device, onnx_cache=config.onnx_cache)
    settings = service_settings(measured, encoder, config.encoder_threads)
    loaded = open_encoder(settings, manifest)
    texts = queries[: min(IN_PROCESS_TEXTS, config.requests)]
    result, _ = measure_cell(loaded.encoder, encoder, texts, batch_size=1, warmup=min(20, len(texts)))
    batched, _ = measure_cell(loaded.encoder, encoder, texts, batch_size=CEILING_BATCH, warmup=2)
    logger.info(
        "%s in this process: p50 %s ms per query, %.1f queries/s one at a time, %.1f in batches of %d",
        encoder, format_ms(result.p50_ms), result.queries_per_s, batched.queries_per_s, CEILING_BATCH,
    )  # fmt: skip
    return {
        "texts": len(texts),
        "p50_ms": result.p50_ms,
        "p95_ms": result.p95_ms,
        "queries_per_s": result.queries_per_s,
        f"batch_{CEILING_BATCH}_queries_per_s": batched.queries_per_s,
    }


def wait_for_workers(base: str, workers: int, timeout_s: float) -> None:
    """Wait until every worker of a ``--workers`` server serves (its ``mrl_serving_info`` series, one per pid).

    Raises:
        ServerError: Not all of them within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            lines = client.get("/metrics").text.splitlines()
            if sum(line.startswith("mrl_serving_info{") and line.endswith(" 1.0") for line in lines) >= workers:
                return
            time.sleep(0.25)
    raise ServerError(f"{base}: not all {workers} workers were serving within {timeout_s:g}s")


async def http_floor(base: str, config: LatencyConfig) -> float | None:
    """p50 of ``GET /healthz`` at one in flight: the client, HTTP and framework share of every request."""

    async def send(client: LoadClient, params: dict[str, Any]) -> Outcome:
        return await timed_get(client, "/healthz", params, lambda response: None, "")

    async with LoadClient(base, timeout_s=config.request_timeout_s) as client:
        await drive(client, lambda number: {}, 20, 1, float("inf"), send)
        outcomes = await drive(client, lambda number: {}, FLOOR_REQUESTS, 1, float("inf"), send)
    ok = [outcome.seconds * 1000 for outcome in outcomes if outcome.error is None]
    return _round(float(np.percentile(ok, 50))) if ok else None


def _settings_dict(config: LatencyConfig, dims: list[int], num_queries: int) -> dict[str, Any]:
    settings = json_fields(config)
    return {**settings, "dims": dims, "num_query_texts": num_queries, "endpoint": "GET /search", "host": LOOPBACK}


def write_latency_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``latency.json`` and ``latency.md`` in ``folder``, each written atomically."""
    return write_report(report, folder, "latency", latency_markdown)


def _dim_cell(row: dict[str, Any]) -> str:
    """The dim, or for a target cell the target and the plans that answered it (most used first)."""
    if not row.get("target"):
        return str(row["dim"])
    plans = sorted((row.get("plans") or {}).items(), key=lambda item: -item[1])
    chosen = ", ".join(f"{key} ({count})" for key, count in plans) or "–"
    return f"{row['target']} → {chosen}"


def latency_markdown(report: dict[str, Any]) -> str:
    """The report as a title, one paragraph of context and one table row per cell."""
    settings, machine = report["settings"], report["machine"]
    header = ["encoder", "dim", "rerank", "conc.", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s"]
    header += ["server encode ms", "server search ms", "server rerank ms", "server total ms", "p50 ÷ in-process"]
    header += ["req/s ÷ ceiling"]
    lines = [markdown_row(header), markdown_row(["---", *["---:"] * (len(header) - 1)])]
    in_process = report.get("in_process") or {}
    for row in report["results"]:
        timing = in_process.get(row["encoder"].split(" ")[0]) or {}
        reference = timing.get("p50_ms")
        single = reference and row["p50_ms"] and row["concurrency"] == 1
        overhead = f"{row['p50_ms'] / reference:.2f}×" if single else "–"
        ceiling = timing.get(f"batch_{CEILING_BATCH}_queries_per_s")
        of_ceiling = f"{row['throughput_rps'] / ceiling:.0%}" if ceiling else "–"
        requests = f"{row['sent']} of {row['requested']}" if row["cut_short"] else str(row["sent"])
        server = row["server_ms"]
        lines.append(
            markdown_row(
                [
                    row["encoder"],
                    _dim_cell(row),
                    f"→{row['rerank_dim']}" if row["rerank_dim"] else "–",
                    str(row["concurrency"]),
                    requests,
                    str(row["errors"]),
                    *(format_ms(row[name]) for name in ("p50_ms", "p95_ms", "p99_ms")),
                    f"{row['throughput_rps']:.1f}",
                    format_ms(server["encode_ms"]),
                    format_ms(server["search_ms"]),
                    format_ms(server["rerank_ms"]) if row["rerank_dim"] else "–",
                    format_ms(server["total_ms"]),
                    overhead,
                    of_ceiling,
                ]
            )
        )
    for encoder, timing in in_process.items():
        floors = [server.get("healthz_p50_ms") for name, server in report["servers"].items()
                  if name.split(" ")[0] == encoder]  # fmt: skip
        floor = floors[0] if floors else None
        lines.append("")
        ceiling = timing.get(f"batch_{CEILING_BATCH}_queries_per_s")
        batched = f", {ceiling:.1f} queries/s in batches of {CEILING_BATCH} (the ceiling)" if ceiling else ""
        lines.append(
            f"- {encoder}: in this process, one query per call, p50 {format_ms(timing['p50_ms'])} ms "
            f"({timing['texts']} texts){batched}; the server's `GET /healthz` p50 {format_ms(floor)} ms (HTTP "
            "round trip)."
        )
    context = (
        f"Index `{settings['index']}`, {settings['num_query_texts']} query texts from `{settings['queries']}`, "
        f"`GET /search` with k={settings['k']}; {settings['requests']} measured requests per cell after "
        f"{settings['warmup']} warm-up ones. Client and server share one machine: {machine['cpus_usable']} CPUs, "
        f"load average {machine['load_average_1m']} at the start, GPU {machine['gpu'] or 'none'}."
    )
    return "\n".join(["# Search latency over HTTP", "", context, "", *lines]) + "\n"


# --- command line -------------------------------------------------------------------------


def add_latency_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "latency",
        help="end-to-end GET /search latency of a real server process",
        description="Start `mrl serve` on a free 127.0.0.1 port for each encoder backend, send a fixed number of "
        "GET /search requests per (dim, concurrency) after a warm-up, and report p50/p95/p99 latency, throughput, "
        "errors and the server's own stage timings.",
    )
    p.add_argument("--index", required=True, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    p.add_argument("--queries", type=Path, required=True, help="BEIR folder (its queries.jsonl) or a queries .jsonl")
    p.add_argument("--dims", type=dims_argument, default=None, help="dims to measure (default: every dim of the index)")
    p.add_argument(
        "--concurrency", type=int_list_argument, default=[1, 4, 16, 64], help="requests in flight (default: 1,4,16,64)"
    )
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per cell (default: %(default)s)")
    p.add_argument(
        "--encoders",
        type=name_list_argument,
        default=["torch", "onnx"],
        help="backends, each in its own server: torch, onnx, onnx-int8 (default: torch,onnx)",
    )
    p.add_argument("--rerank", action="store_true", help="add two-stage cells: smallest dim, rerank_dim = full")
    p.add_argument(
        "--targets",
        type=lambda text: [part for part in text.split(",") if part],
        default=[],
        help="target cells instead of dims, comma-separated: min_quality=0.98, latency_budget_ms=10, or both joined "
        "by + (the index needs measured plans: mrl index build --eval-data)",
    )
    p.add_argument("--k", type=int, default=10, help="hits per request (default: %(default)s)")
    p.add_argument(
        "--shadow-fractions",
        type=lambda text: [float(part) for part in text.split(",") if part],
        default=None,
        help="a server per live-quality sampling fraction, side by side, e.g. 0,0.02 (default: the server's)",
    )
    p.add_argument(
        "--workers",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=None,
        help="a server per worker count (mrl serve --workers), side by side, e.g. 1,2 (default: one process)",
    )
    p.add_argument(
        "--http",
        type=name_list_argument,
        default=None,
        help="a server per HTTP parser (mrl serve --http), side by side: httptools,h11 (default: the server's)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="server device (default: auto)")
    p.add_argument("--encoder-threads", type=int, default=None, help="server's encoder CPU threads")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: the server's)")
    p.add_argument(
        "--batch-max-wait-ms", type=float, default=None, help="server's micro-batch wait in ms (default: the server's)"
    )
    p.add_argument(
        "--no-in-process",
        dest="in_process",
        action="store_false",
        help="skip timing each encoder in the benchmark's own process (the p50 ÷ in-process column)",
    )
    add_server_limits(p, time_limit_s=900.0)
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_latency_command)


def run_latency_command(args: argparse.Namespace) -> int:
    report = run_latency(LatencyConfig(**config_fields(args)))
    print(latency_markdown(report), end="")
    print(f"wrote {args.out / 'latency.json'}, {args.out / 'latency.md'}")
    return 0
