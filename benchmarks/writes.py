"""``mrl bench writes``: how fast a writable server ingests documents, and what writes cost searches.

A copy of the index is served writable by a real ``mrl serve --writable``. Measured in one run:

- **ingestion**: documents (and passages) per second through ``POST /documents``, batches of
  ``--batch`` documents sent one after another: read, chunked, encoded by the build's document encoder,
  logged (fsync) and made searchable, end to end as a client sees it;
- **searches idle against searches under writes**: ``GET /search`` p50/p99 at one request in flight,
  first with nothing else running, then while a writer streams upserts, the ratio of the two side by side.

Documents come from ``--data`` (a corpus the readers take), written under new ids so that each one adds.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import format_ms, machine_info, markdown_row, utc_now, write_report
from benchmarks.latency import server_environment
from core.errors import ConfigError
from core.files import json_fields
from core.servers import LOOPBACK, free_port, running_process

logger = logging.getLogger(__name__)


@dataclass
class WritesConfig:
    index: Path
    data: Path
    documents: int = 256
    batch: int = 16
    searches: int = 200
    dim: int | None = None
    out: Path | None = None
    ready_timeout_s: float = 300.0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def time_searches(client: httpx.Client, queries: list[str], dim: int | None) -> list[float]:
    seconds = []
    for number, query in enumerate(queries):
        params: dict[str, Any] = {"q": query, "k": 10}
        if dim is not None:
            params["dim"] = dim
        started = time.perf_counter()
        response = client.get("/search", params=params)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise ConfigError(f"search {number} answered {response.status_code}: {response.text[:200]}")
    return seconds


def run_writes(config: WritesConfig) -> dict[str, Any]:
    from core.readers import read_corpus

    documents = read_corpus(config.data)
    if len(documents) < config.documents * 2:
        raise ConfigError(f"{config.data}: {len(documents)} documents; the run needs {config.documents * 2}")
    ingest, stream = documents[: config.documents], documents[config.documents : 2 * config.documents]
    queries = [document.title or document.text[:80] for document in documents[: config.searches]]
    with tempfile.TemporaryDirectory(prefix="mrl-bench-writes-") as scratch:
        root = Path(scratch) / "index"
        shutil.copytree(config.index, root, symlinks=True)
        port = free_port()
        command = [sys.executable, "-m", "mrl", "serve", "--index", str(root), "--host", LOOPBACK, "--port",
                   str(port), "--writable", "--log-level", "warning", "--compact-max-unmerged", "1000000"]  # fmt: skip
        log = (config.out or Path(scratch)) / "writes-server.log"
        with running_process(command, port, log, config.ready_timeout_s, server_environment()) as base:
            with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
                time_searches(client, queries[:20], config.dim)  # warm-up
                ingestion = ingest_documents(client, ingest, config.batch, "a")
                idle = time_searches(client, queries, config.dim)
                stop = threading.Event()
                streamed: dict[str, Any] = {}
                writer = threading.Thread(target=stream_writes, args=(base, stream, config.batch, stop, streamed))
                writer.start()
                busy = time_searches(client, queries, config.dim)
                stop.set()
                writer.join()
                counts = client.get("/dims").json().get("writes")
    return {
        "benchmark": "writes",
        "created": utc_now(),
        "settings": json_fields(config),
        "machine": machine_info(),
        "ingestion": ingestion,
        "searches": {
            "idle": {"p50_ms": percentile(idle, 50), "p99_ms": percentile(idle, 99), "count": len(idle)},
            "under_writes": {"p50_ms": percentile(busy, 50), "p99_ms": percentile(busy, 99), "count": len(busy)},
            "writes_during": streamed,
        },
        "live_counts": counts,
    }


def ingest_documents(client: httpx.Client, documents: list, batch: int, prefix: str) -> dict[str, Any]:
    passages, started = 0, time.perf_counter()
    for start in range(0, len(documents), batch):
        body = {"documents": [_wire(document, prefix) for document in documents[start : start + batch]]}
        response = client.post("/documents", json=body)
        if response.status_code != 200:
            raise ConfigError(f"a write answered {response.status_code}: {response.text[:200]}")
        passages += response.json()["passages"]
    seconds = time.perf_counter() - started
    return {
        "documents": len(documents),
        "passages": passages,
        "seconds": round(seconds, 2),
        "documents_per_s": round(len(documents) / seconds, 1),
        "passages_per_s": round(passages / seconds, 1),
    }


def stream_writes(base: str, documents: list, batch: int, stop: threading.Event, result: dict) -> None:
    sent = 0
    started = time.perf_counter()
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
        while not stop.is_set() and sent < len(documents):
            chunk = documents[sent : sent + batch]
            client.post("/documents", json={"documents": [_wire(document, "s") for document in chunk]})
            sent += len(chunk)
    result.update(documents=sent, seconds=round(time.perf_counter() - started, 2))


def _wire(document, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{document.id}", "text": document.text, "title": document.title,
            "metadata": document.metadata}  # fmt: skip


def writes_markdown(report: dict[str, Any]) -> str:
    ingestion, searches = report["ingestion"], report["searches"]
    idle, busy = searches["idle"], searches["under_writes"]
    ratio = busy["p50_ms"] / idle["p50_ms"] if idle["p50_ms"] else float("nan")
    ratio99 = busy["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] else float("nan")
    lines = [
        "# Writes: ingestion and searches under writes",
        "",
        f"Index `{report['settings']['index']}`, documents from `{report['settings']['data']}`, batches of "
        f"{report['settings']['batch']}; load average {report['machine']['load_average_1m']} at the start.",
        "",
        f"Ingestion: {ingestion['documents']} documents ({ingestion['passages']} passages) in "
        f"{ingestion['seconds']} s: **{ingestion['documents_per_s']} documents/s**, {ingestion['passages_per_s']} "
        "passages/s (chunked, encoded, logged with fsync, searchable).",
        "",
        markdown_row(["searches (1 in flight)", "p50 ms", "p99 ms"]),
        markdown_row(["---", "---:", "---:"]),
        markdown_row(["idle", format_ms(idle["p50_ms"]), format_ms(idle["p99_ms"])]),
        markdown_row(["under a stream of writes", format_ms(busy["p50_ms"]), format_ms(busy["p99_ms"])]),
        markdown_row(["ratio", f"{ratio:.2f}×", f"{ratio99:.2f}×"]),
        "",
        f"Writes during the second run: {searches['writes_during']}.",
    ]
    return "\n".join(lines) + "\n"


def add_writes_parser(actions: argparse._SubParsersAction) -> None:
    from benchmarks.args import DEFAULT_OUT
    from core.cli_args import add_output_argument

    p = actions.add_parser(
        "writes",
        help="a writable server: ingestion rate, and search latency under writes against idle",
        description="Serve a copy of a folder index writable, ingest documents through POST /documents, then time "
        "searches idle and while a writer streams upserts (one run, side by side).",
    )
    p.add_argument(
        "--index", required=True, metavar="LOCATOR", help="a folder index (copied: the original is never written)"
    )
    p.add_argument("--data", type=Path, required=True, help="documents to write (any format mrl index build reads)")
    p.add_argument("--documents", type=int, default=256, help="documents ingested, and streamed (default: 256)")
    p.add_argument("--batch", type=int, default=16, help="documents per write (default: 16)")
    p.add_argument("--searches", type=int, default=200, help="searches per run (default: 200)")
    p.add_argument("--dim", type=int, default=None, help="search dim (default: the server's)")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_writes_command)


def run_writes_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields
    from index.locator import parse_locator

    locator = parse_locator(args.index)
    if locator.engine != "faiss":
        raise ConfigError(f"--index: writes are benchmarked on a folder index; {locator} is in {locator.engine}")
    config = WritesConfig(**{**config_fields(args), "index": locator.path})
    report = run_writes(config)
    write_report(report, config.out, "writes", writes_markdown)
    print(writes_markdown(report), end="")
    return 0
