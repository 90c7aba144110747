"""``mrl bench writes``: how fast a writable server ingests documents, and what writes cost searches.

A scratch copy of the index is served writable by a real ``mrl serve --writable``; the index named by
``--index`` is only read. A folder is copied file by file. An index in Milvus is copied into a fresh index
of its own (its current version's passages, full vectors and index plans: nothing encoded again), in the
same Milvus server, or for Milvus Lite in a new ``.db`` file beside the run (the served process must open
the file alone), and dropped at the end, whatever happens. Measured in one run:

- **ingestion**: documents (and passages) per second through ``POST /documents``, batches of
  ``--batch`` documents sent one after another: read, chunked, encoded by the build's document encoder,
  logged (fsync on FAISS; upserted into the version's collections on Milvus) and made searchable, end to
  end as a client sees it;
- **searches idle against searches under writes**: ``GET /search`` p50/p99 at one request in flight,
  first with nothing else running, then while a writer streams upserts, the ratio of the two side by side.

Documents come from ``--data`` (a corpus the readers take), written under new ids so that each one adds.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from index.locator import IndexLocator, parse_locator
from index.stores import IndexStore, open_store

logger = logging.getLogger(__name__)

PROBES = 1000  # rows of the copy that measure each dim's recall, as a build draws them
LITE_SCRATCH = "bench_writes"  # the scratch index's name in its own Milvus Lite file


@dataclass
class WritesConfig:
    index: Path | str  # a locator: a folder, milvus://HOST:PORT/NAME or milvus-lite://FILE.db/NAME
    data: Path
    documents: int = 256
    batch: int = 16
    searches: int = 200
    dim: int | None = None
    out: Path | None = None
    ready_timeout_s: float = 300.0


@dataclass
class Scratch:
    """The copy the benchmark writes: its locator, what the report calls its engine, the server's extra env."""

    locator: IndexLocator
    engine: str
    env: dict[str, str]


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
    """One run: ingestion, then searches idle and under a stream of writes, on a scratch copy of the index.

    Raises:
        ConfigError: Too few documents in ``--data``, or a write or search that failed.
        ServerError: The server exited or was not ready in time. EngineUnavailable: Milvus does not answer.
    """
    from core.readers import read_corpus

    documents = read_corpus(config.data)
    if len(documents) < config.documents * 2:
        raise ConfigError(f"{config.data}: {len(documents)} documents; the run needs {config.documents * 2}")
    ingest, stream = documents[: config.documents], documents[config.documents : 2 * config.documents]
    queries = [document.title or document.text[:80] for document in documents[: config.searches]]
    with tempfile.TemporaryDirectory(prefix="mrl-bench-writes-") as work, scratch_copy(config.index, Path(work)) as at:
        port = free_port()
        command = [sys.executable, "-m", "mrl", "serve", "--index", str(at.locator), "--host", LOOPBACK, "--port",
                   str(port), "--writable", "--log-level", "warning", "--compact-max-unmerged", "1000000"]  # fmt: skip
        log = (config.out or Path(work)) / "writes-server.log"
        with running_process(command, port, log, config.ready_timeout_s, server_environment() | at.env) as base:
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
        "engine": at.engine,
        "scratch_index": str(at.locator),
        "machine": machine_info(),
        "ingestion": ingestion,
        "searches": {
            "idle": {"p50_ms": percentile(idle, 50), "p99_ms": percentile(idle, 99), "count": len(idle)},
            "under_writes": {"p50_ms": percentile(busy, 50), "p99_ms": percentile(busy, 99), "count": len(busy)},
            "writes_during": streamed,
        },
        "live_counts": counts,
    }


# --- the scratch copy -----------------------------------------------------------------------------


@contextmanager
def scratch_copy(index: Path | str, work: Path) -> Iterator[Scratch]:
    """A copy of the index ``index`` (a locator) that the benchmark may write, removed afterwards.

    Raises:
        IndexFolderError: No index there. EngineUnavailable: Milvus does not answer.
    """
    locator = parse_locator(str(index))
    if locator.engine == "faiss":
        root = work / "index"
        shutil.copytree(locator.path, root, symlinks=True, ignore=shutil.ignore_patterns("leases", ".writer.lock"))
        yield Scratch(IndexLocator.folder(root), "FAISS", {})
        return
    with milvus_copy(locator, work) as scratch:
        yield scratch


@contextmanager
def milvus_copy(locator: IndexLocator, work: Path) -> Iterator[Scratch]:
    """A fresh index beside ``locator``'s with a copy of its current version; dropped at the end, even on failure.

    On a Milvus server the copy is a new index ``mrl_bench_writes_<random>`` at the same URI, dropped afterwards
    (all its collections). Milvus Lite lets one process open a ``.db`` file, so the copy goes to a new file in
    ``work``, released by this process before the server opens it, and removed with ``work``.
    """
    from benchmarks.backends import drop_index, milvus_server_version
    from index.milvus import CREDENTIAL_VARIABLES, credentials_from_env

    lite = str(locator.uri).endswith(".db")
    if lite:
        target = IndexLocator.milvus(str((work / "scratch.db").resolve()), LITE_SCRATCH)
        engine, env = "Milvus Lite", {}
    else:
        target = IndexLocator.milvus(str(locator.uri), f"mrl_bench_writes_{secrets.token_hex(4)}")
        engine = f"Milvus server {milvus_server_version(str(locator.uri)) or ''}".strip()
        env = {CREDENTIAL_VARIABLES[key]: value for key, value in credentials_from_env().items() if value}
    scratch = open_store(target)
    try:
        source = open_store(locator)
        try:
            logger.info("copying %s into %s", locator, target)
            copy_current_version(source, scratch)
        finally:
            source.close()
        if lite:
            release_lite_file(scratch)
        yield Scratch(target, engine, env)
    finally:
        if lite:
            release_lite_file(scratch)
        else:
            drop_index(scratch)


def release_lite_file(store: Any) -> None:
    """Close ``store``'s Milvus Lite file in this process, so that another process can open it."""
    from milvus_lite.server_manager import server_manager_instance

    store.close()
    server_manager_instance.release_server(store.backend.uri)


def copy_current_version(source: IndexStore, target: IndexStore) -> str:
    """The current version of ``source`` published as a version of ``target``: its passages (as live writes left
    them), their full vectors and each dim's index plan; nothing is encoded again. ``source`` is only read (no
    lease either: a version pruned while it is copied fails the copy). Returns the new version's name."""
    from index.build import build_dim_indexes
    from index.filters import metadata_fields
    from index.layout import new_version_name
    from index.manifest import IndexManifest
    from index.params import IndexPlan

    loaded = source.open(source.current(), device="cpu", lease=False)
    try:
        old, rows = loaded.manifest, loaded.rows()
        passages = loaded.store.get(rows)
        vectors = np.asarray(loaded.vectors[rows], dtype=np.float32)
        probes = loaded.probe_queries
    finally:
        loaded.close()
    if probes is None:  # an engine keeps none: rows of the corpus, as a build without queries draws them
        drawn = np.random.default_rng(0).choice(len(vectors), size=min(PROBES, len(vectors)), replace=False)
        probes = vectors[np.sort(drawn)]
    plans = {dim: IndexPlan(old.indexes[dim].factory, old.indexes[dim].search_params) for dim in old.dims}
    target.prepare()
    writer = target.begin(new_version_name(), keep_versions=1, device="cpu")
    try:
        writer.write_corpus(passages, vectors, probes)
        indexes = build_dim_indexes(vectors, probes, old.dims, plans.__getitem__, writer)
        manifest = IndexManifest.from_dict(old.to_dict())
        manifest.version, manifest.num_vectors, manifest.indexes = writer.version, len(vectors), indexes
        manifest.metadata_fields = metadata_fields(passage.metadata for passage in passages)
        manifest.files, manifest.checksums = writer.files()
        writer.publish(manifest)
    except BaseException:
        writer.abort()
        raise
    return writer.version


# --- the writes -----------------------------------------------------------------------------------


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
    engine = report.get("engine", "FAISS")  # reports from before Milvus: folders only
    logged = "logged with fsync" if engine == "FAISS" else "upserted into the version's collections"
    lines = [
        f"# Writes on {engine}: ingestion and searches under writes",
        "",
        f"Index `{report['settings']['index']}` ({engine}; a scratch copy served writable), documents from "
        f"`{report['settings']['data']}`, batches of {report['settings']['batch']}; load average "
        f"{report['machine']['load_average_1m']} at the start.",
        "",
        f"Ingestion: {ingestion['documents']} documents ({ingestion['passages']} passages) in "
        f"{ingestion['seconds']} s: **{ingestion['documents_per_s']} documents/s**, {ingestion['passages_per_s']} "
        f"passages/s (chunked, encoded, {logged}, searchable).",
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
        description="Serve a scratch copy of an index writable (a folder, or an index in Milvus copied into a "
        "fresh index dropped afterwards), ingest documents through POST /documents, then time searches idle and "
        "while a writer streams upserts (one run, side by side).",
    )
    p.add_argument(
        "--index",
        required=True,
        metavar="LOCATOR",
        help="a folder, milvus://HOST:PORT/NAME or milvus-lite://FILE.db/NAME (copied: never written)",
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

    parse_locator(args.index)  # a malformed locator fails here, in one line, before any documents are read
    config = WritesConfig(**config_fields(args))
    report = run_writes(config)
    write_report(report, config.out, "writes", writes_markdown)
    print(writes_markdown(report), end="")
    return 0
