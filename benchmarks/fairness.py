"""Head-of-line blocking: does a one-query search wait behind large embedding requests?

``mrl serve`` runs in a subprocess on a free loopback port. First the large requests run alone
(``--large`` concurrent ``POST /v1/embeddings``, each ``--texts`` texts of ``--chars``
characters: the service's largest by default), to time them; then they run again while one
client sends ``GET /search`` of one query, one after another, until the large ones are done.
The report gives the searches' p50, p95 and maximum, and how much the large requests' own
times grew next to the searches. Every loop is bounded, and the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import format_ms, machine_info, markdown_row, utc_now, write_report
from benchmarks.args import DEFAULT_OUT, add_server_limits
from benchmarks.latency import server_environment
from core.cli_args import add_output_argument, check_positive, config_fields
from core.errors import ConfigError
from core.servers import LOOPBACK, free_port, running_process
from index.locator import LOCATOR_FORMS
from index.stores import current_manifest

logger = logging.getLogger(__name__)

FILLER = "Gout is a form of inflammatory arthritis that develops in people with high uric acid in the blood. "
QUERY = "sudden painful swollen big toe joint at night"


@dataclass
class FairnessConfig:
    """What ``mrl bench fairness`` can be told."""

    index: Path
    large: int = 4  # concurrent large embedding requests
    texts: int = 64  # texts per large request (the service's max_batch_queries by default)
    chars: int = 1990  # characters per text (under the service's max_query_chars of 2000)
    dim: int | None = None  # the searches' dim (default: the server's default)
    device: str = "cpu"
    server_args: list[str] | None = None  # extra `mrl serve` flags, e.g. ["--batch-max-tokens", "4096"]
    time_limit_s: float = 600.0
    ready_timeout_s: float = 300.0
    out: Path | None = None


def large_texts(number: int, config: FairnessConfig) -> list[str]:
    """``config.texts`` distinct texts of exactly ``config.chars`` characters (distinct: no cache can help)."""
    body = FILLER * (config.chars // len(FILLER) + 1)
    return [f"{number}-{i} {body}"[: config.chars] for i in range(config.texts)]


async def _large(client: httpx.AsyncClient, base: str, texts: list[str]) -> float:
    started = time.perf_counter()
    response = await client.post(f"{base}/v1/embeddings", json={"input": texts})
    if response.status_code != 200:
        raise ConfigError(f"the server refused a large request: {response.status_code} {response.text[:200]}")
    return time.perf_counter() - started


async def _scenario(base: str, config: FairnessConfig, with_searches: bool) -> tuple[list[float], list[float]]:
    """The large requests' seconds, and (with searches) each search's seconds meanwhile."""
    deadline = time.monotonic() + config.time_limit_s
    params: dict[str, Any] = {"q": QUERY, "k": 10, **({"dim": config.dim} if config.dim else {})}
    async with httpx.AsyncClient(timeout=config.time_limit_s, trust_env=False) as client:
        (await client.get(f"{base}/search", params=params)).raise_for_status()  # warm
        large = [asyncio.create_task(_large(client, base, large_texts(n, config))) for n in range(config.large)]
        searches: list[float] = []
        await asyncio.sleep(0.2)  # the large requests are queued first
        while with_searches and not all(task.done() for task in large) and time.monotonic() < deadline:
            started = time.perf_counter()
            response = await client.get(f"{base}/search", params=params)
            response.raise_for_status()
            searches.append(time.perf_counter() - started)
        return list(await asyncio.gather(*large)), searches


def run_fairness(config: FairnessConfig) -> dict[str, Any]:
    """Start the server, run both scenarios, return the report.

    Raises:
        ConfigError: An index that is not there, or a server that refuses the large requests.
    """
    current_manifest(config.index)  # no index there, or its engine does not answer: one line, here
    port = free_port()
    command = [sys.executable, "-m", "mrl", "serve", "--index", str(config.index), "--host", LOOPBACK]
    command += ["--port", str(port), "--device", config.device, "--log-level", "warning"]
    command += ["--max-body-bytes", str(max(2 << 20, 4 * config.texts * config.chars))]
    command += list(config.server_args or [])
    log = (config.out or DEFAULT_OUT) / "fairness-server.log"
    started_at = utc_now()
    with running_process(command, port, log, config.ready_timeout_s, server_environment()) as base:
        logger.info("large requests alone: %d × %d texts of %d characters", config.large, config.texts, config.chars)
        alone, _ = asyncio.run(_scenario(base, config, with_searches=False))
        logger.info("again, with one-query searches meanwhile")
        together, searches = asyncio.run(_scenario(base, config, with_searches=True))
    ms = np.asarray(searches) * 1000
    alone, together = [round(s, 3) for s in alone], [round(s, 3) for s in together]
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": machine_info(),
        "started_at": started_at,
        "large_alone_s": alone,
        "large_with_searches_s": together,
        "large_growth": round(max(together) / max(alone) - 1, 4),
        "searches": len(searches),
        "search_p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "search_p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "search_max_ms": round(float(ms.max()), 1) if len(ms) else None,
    }


def fairness_markdown(report: dict[str, Any]) -> str:
    settings, machine = report["settings"], report["machine"]
    head = ["large requests", "alone s", "with searches s", "growth of the last", "searches", "p50", "p95", "max"]
    row = [
        f"{settings['large']} × {settings['texts']} × {settings['chars']} chars",
        f"{min(report['large_alone_s']):.1f}–{max(report['large_alone_s']):.1f}",
        f"{min(report['large_with_searches_s']):.1f}–{max(report['large_with_searches_s']):.1f}",
        f"{100 * report['large_growth']:+.1f}%",
        str(report["searches"]),
        *(format_ms(report[key]) for key in ("search_p50_ms", "search_p95_ms", "search_max_ms")),
    ]
    return (
        "# Head-of-line blocking: one-query searches during large embedding requests\n\n"
        f"Server flags: {settings['server_args'] or 'defaults'}; {machine.get('cpus_usable')} usable CPUs, "
        f"load {machine.get('load_average_1m')} at the start.\n\n"
        + "\n".join([markdown_row(head), markdown_row(["---"] + ["---:"] * (len(head) - 1)), markdown_row(row)])
        + "\n"
    )


def add_fairness_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "fairness",
        help="does a one-query search wait behind large embedding requests? (a real server)",
        description="Time large POST /v1/embeddings requests alone, then again with one-query GET /search "
        "requests sent meanwhile; report the searches' p50/p95/max and the large requests' growth.",
    )
    p.add_argument("--index", required=True, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    p.add_argument("--large", type=int, default=4, help="concurrent large requests (default: %(default)s)")
    p.add_argument("--texts", type=int, default=64, help="texts per large request (default: %(default)s)")
    p.add_argument("--chars", type=int, default=1990, help="characters per text (default: %(default)s)")
    p.add_argument("--dim", type=int, default=None, help="the searches' dim (default: the server's)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu", help="server device (default: cpu)")
    p.add_argument(
        "--server-arg", dest="server_args", action="append", default=None, help="an extra `mrl serve` flag (repeat)"
    )
    add_server_limits(p, time_limit_s=600.0)
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_fairness_command)


def run_fairness_command(args: argparse.Namespace) -> int:
    check_positive(args, ("large", "texts", "chars"), ("dim",))
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_fairness(FairnessConfig(**config_fields(args)))
    print(fairness_markdown(report), end="")
    paths = write_report(report, args.out, "fairness", fairness_markdown)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
