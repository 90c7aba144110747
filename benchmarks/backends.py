"""FAISS against Milvus in one run: the same vectors, the same index plan, the same server and the same load.

For each corpus (a real BEIR corpus, encoded once with the model, and a seeded synthetic one of
clustered unit vectors at the model's full dim with placeholder documents) and each backend (a
FAISS index folder; an index kept in a real Milvus server, which the benchmark starts on loopback
unless ``--milvus-uri`` names one), the index is built through the builder's own pieces
(:meth:`~index.stores.IndexStore.begin` of the folder or the Milvus store, with
:func:`~index.build.build_dim_indexes`), so both get the plan ``mrl index build`` would choose
(or ``--index-type``) and a manifest with the model's fingerprint that ``mrl serve`` accepts. Then:

1. *build time*: the whole version (documents, full vectors, every dim, the builder's own probe
   measurements, publishing), and each dim's ``build_seconds`` from the manifest;
2. *recall@10* per dim: the opened index searched in-process with the query vectors (encoded once,
   every dim derived with ``truncate_normalize``) against exact brute-force top 10;
3. *latency*: ``mrl serve`` over the index, one server at a time, and ``GET /search`` p50/p99 per
   (dim, concurrency) with the real query texts, a fixed number of requests after a warm-up, by the
   load generator of ``mrl bench latency``.

Every FAISS measurement runs before the benchmark's own Milvus server starts, so that the engine's
background work does not slow FAISS down. Servers, the Milvus indexes written and the temporary
folders are removed at the end, also after an error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import format_ms, machine_info, markdown_row, save_figure, utc_now, write_report
from benchmarks.args import DEFAULT_OUT, add_server_limits, int_list_argument
from benchmarks.latency import (
    Cell,
    LatencyConfig,
    measure_cells,
    read_query_texts,
    server_command,
    server_environment,
    server_info,
)
from core.cli_args import add_output_argument, config_fields, dims_argument
from core.data import DataError, Document
from core.errors import ConfigError
from core.files import json_fields
from core.matryoshka import truncate_normalize, validate_dims
from core.metrics import exact_top_k, neighbour_recall
from core.models import SentenceTransformerEncoder, load_model, model_dims, model_fingerprint
from core.servers import LOOPBACK, ServerError, free_port, running_process
from index.build import (
    PROBE_QUERIES,
    build_dim_indexes,
    encode_cache_key,
    encode_documents,
    library_versions,
    model_info,
    read_documents,
)
from index.layout import new_version_name, writing
from index.locator import IndexLocator
from index.manifest import IndexManifest, ModelInfo
from index.milvus import redact_uri
from index.params import IndexPlan, choose_index, search_params_for
from index.stores import VersionWriter, open_store

logger = logging.getLogger(__name__)

FAISS, MILVUS = "faiss", "milvus"
BACKENDS = (FAISS, MILVUS)
DEFAULT_DATA = Path("../shared/datasets/scifact")
RECALL_K = 10
SYNTHETIC = "synthetic"
# Synthetic corpus: as tests/test_index_backends.py's clustered_vectors, points around a few random
# centres (cosine ~0.8 within a cluster at 384 dims, ~0 across), so an approximate index has work to do.
SYNTHETIC_CLUSTERS = 20
SYNTHETIC_SPREAD = 0.5
SYNTHETIC_CHUNK = 65_536  # rows generated at a time: no float64 copy of the whole corpus
MILVUS_PACKAGES = ("pymilvus", "milvus", "milvus-lite")
COLORS = {FAISS: "tab:blue", MILVUS: "tab:orange"}
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class BackendsConfig:
    """What ``mrl bench backends`` can be told."""

    data: Path = DEFAULT_DATA  # BEIR folder: the real corpus, and the query texts of both corpora
    synthetic: int = 100_000  # synthetic vectors; 0 skips that corpus
    dims: list[int] | None = None  # default: the model's Matryoshka dims
    index_type: str | None = None  # default: what `mrl index build` chooses per dim
    concurrency: list[int] = field(default_factory=lambda: [1])
    requests: int = 200  # measured requests per cell
    warmup: int = 20  # unmeasured requests per cell (at least one per connection)
    milvus_uri: str | None = None  # default: a standalone server started (and stopped) by the benchmark
    model: str | None = None
    device: str = "cpu"
    encoder_threads: int | None = None
    memory_budget_mb: int = 4096  # for the automatic index choice, as `mrl index build`
    seed: int = 0
    time_limit_s: float = 3600.0
    ready_timeout_s: float = 300.0
    request_timeout_s: float = 30.0
    cache: Path | None = None  # embedding cache; default OUT/cache (shared with `mrl bench quality`)
    out: Path | None = None
    k: int = RECALL_K  # hits per request, as the recall is measured


@dataclass
class Corpus:
    """One corpus to index on both backends: its documents and their full-dimension vectors."""

    name: str
    kind: str  # "real" or "synthetic"
    source: str
    documents: list[Document]
    vectors: np.ndarray
    encode_seconds: float = 0.0  # what encoding it took (none for synthetic vectors), for the manifest


@dataclass
class Built:
    """One version built on one backend: where it is, its manifest, and what the whole build took."""

    location: str  # the version folder (FAISS) or NAME/VERSION (Milvus)
    manifest: IndexManifest
    corpus_s: float  # documents and full vectors
    total_s: float


# --- configuration ------------------------------------------------------------------------


def check_config(config: BackendsConfig) -> None:
    """Refuse settings that cannot work before anything is loaded or started.

    Raises:
        ConfigError: A count that is not positive, an index type Milvus has no equivalent of, a Milvus
            Lite file as ``--milvus-uri``, or no Milvus client installed.
    """
    positive = {"--requests": config.requests, "--time-limit": config.time_limit_s}
    positive |= {"--ready-timeout": config.ready_timeout_s, "--memory-budget-mb": config.memory_budget_mb}
    if config.encoder_threads is not None:
        positive["--encoder-threads"] = config.encoder_threads
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.warmup < 0 or config.synthetic < 0:
        raise ConfigError(f"--warmup and --synthetic must be 0 or more, got {config.warmup} and {config.synthetic}")
    if not config.concurrency or min(config.concurrency) < 1:
        raise ConfigError(f"--concurrency must list positive numbers, got {config.concurrency}")
    if config.index_type is not None:
        from index.milvus import milvus_layout

        milvus_layout(fixed_plan(config.index_type))  # ConfigError for a type Milvus cannot build
    if config.milvus_uri is not None and not re.match(r"https?://", config.milvus_uri):
        raise ConfigError(
            f"--milvus-uri must be a Milvus server (http://host:19530), got {redact_uri(config.milvus_uri)!r}: "
            "a Milvus Lite file cannot be shared with a server process"
        )
    needed = ["pymilvus"] if config.milvus_uri else ["pymilvus", "milvus"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} cannot be imported; install the milvus extra: pip install -e '.[milvus]'"
        )


def fixed_plan(factory: str) -> IndexPlan:
    """``--index-type``'s plan: the factory string and the search parameters the builder gives it."""
    return IndexPlan(factory, search_params_for(factory))


def plan_chooser(config: BackendsConfig, count: int) -> Callable[[int], IndexPlan]:
    """Dim -> plan: ``--index-type`` for every dim, else what ``mrl index build`` chooses for ``count`` vectors."""
    budget = config.memory_budget_mb << 20
    if config.index_type:
        return lambda dim: fixed_plan(config.index_type)
    return lambda dim: choose_index(count, dim, budget)


# --- corpora ------------------------------------------------------------------------------


def synthetic_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """``count`` seeded unit vectors of ``dim`` coordinates around ``SYNTHETIC_CLUSTERS`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((SYNTHETIC_CLUSTERS, dim), dtype=np.float32)
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, SYNTHETIC_CHUNK):
        rows = min(SYNTHETIC_CHUNK, count - start)
        noise = rng.standard_normal((rows, dim), dtype=np.float32)
        vectors[start : start + rows] = truncate_normalize(
            centres[rng.integers(0, SYNTHETIC_CLUSTERS, rows)] + SYNTHETIC_SPREAD * noise, dim
        )
    return vectors


def placeholder_documents(count: int) -> list[Document]:
    """Documents for synthetic vectors: what the server returns as hits, never encoded."""
    return [Document(f"synthetic-{row}", f"synthetic document {row}") for row in range(count)]


def encode_corpus_and_queries(
    encoder: SentenceTransformerEncoder,
    fingerprint: str,
    documents: list[Document],
    queries: list[str],
    cache: Path | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Full-dimension vectors of the documents and the queries, each encoded once (or read from ``cache``).

    The documents are also kept in chunks as ``mrl index build --cache-dir`` keeps them, so ``cache`` may be
    a build's ``--cache-dir``: documents it has encoded with this model are not encoded again.
    """
    from benchmarks.quality import cached_encode  # the same cache (weights + texts) as `mrl bench quality`

    started = time.perf_counter()
    logger.info("encoding %d documents and %d queries at full dimension", len(documents), len(queries))
    chunks = cache / encode_cache_key(documents, fingerprint, encoder.model) if cache is not None else None
    if chunks is not None:
        with writing(chunks):
            chunks.mkdir(parents=True, exist_ok=True)
    vectors, docs_cached = cached_encode(
        lambda _: encode_documents(encoder, documents, chunks), [d.passage for d in documents], fingerprint, cache
    )
    query_vectors, queries_cached = cached_encode(encoder.encode_queries, queries, fingerprint, cache)
    seconds = round(time.perf_counter() - started, 2)
    logger.info("encoded in %.1f s%s", seconds, " (from the cache)" if docs_cached and queries_cached else "")
    info = {"documents": len(documents), "queries": len(queries), "seconds": seconds}
    return vectors, query_vectors, {**info, "from_cache": docs_cached and queries_cached}


def exact_neighbours(corpus: Corpus, queries: np.ndarray, dims: list[int]) -> dict[int, np.ndarray]:
    """Per dim: each query's exact top 10 (row ids) by brute force, the reference of both backends."""
    logger.info("%s: exact top %d of %d queries at dims %s", corpus.name, RECALL_K, len(queries), dims)
    return {
        dim: exact_top_k(truncate_normalize(queries, dim), truncate_normalize(corpus.vectors, dim), RECALL_K)
        for dim in dims
    }


# --- building -----------------------------------------------------------------------------


def build_version(
    writer: VersionWriter,
    corpus: Corpus,
    probes: np.ndarray,
    dims: list[int],
    plan_for: Callable[[int], IndexPlan],
    model: ModelInfo,
) -> Built:
    """Write one version as ``mrl index build`` does after encoding; timed as a whole and per dim.

    Raises:
        Whatever the writer raises; what it wrote is removed first.
    """
    started = time.perf_counter()
    try:
        writer.write_corpus(corpus.documents, corpus.vectors, probes)
        corpus_s = time.perf_counter() - started
        indexes = build_dim_indexes(corpus.vectors, probes, dims, plan_for, writer)
        files, checksums = writer.files()
        manifest = IndexManifest(
            version=writer.version,
            model=model,
            dims=dims,
            num_vectors=len(corpus.vectors),
            indexes=indexes,
            files=files,
            checksums=checksums,
            encode_seconds=corpus.encode_seconds,
            built_at=utc_now(),
            source=corpus.source,
            library_versions=library_versions(),
        )
        location = writer.publish(manifest)
    except BaseException:
        writer.abort()
        raise
    return Built(str(location), manifest, round(corpus_s, 3), round(time.perf_counter() - started, 3))


def build_summary(built: Built) -> dict[str, Any]:
    """The build's figures for the report: the whole version, and each dim as its manifest records it."""
    dims = {
        str(dim): {
            "factory": entry.factory,
            "build_seconds": entry.build_seconds,
            "bytes": entry.bytes,
            "search_params": entry.search_params,
            "builder_search_ms": entry.search_ms,
            "builder_recall_at_10": entry.recall_at_10,
        }
        for dim, entry in built.manifest.indexes.items()
    }
    return {"version": built.manifest.version, "total_s": built.total_s, "corpus_s": built.corpus_s, "dims": dims}


def recall_per_dim(indexes: dict[int, Any], queries: np.ndarray, exact: dict[int, np.ndarray]) -> dict[str, float]:
    """Recall@10 of each opened index against exact search, for the same query vectors."""
    recall = {}
    for dim, index in indexes.items():
        _, found = index.search(truncate_normalize(queries, dim), RECALL_K)
        recall[str(dim)] = round(neighbour_recall(found, exact[dim]), 4)
    return recall


# --- serving and measuring ----------------------------------------------------------------


@contextmanager
def serve(config: BackendsConfig, index: str, log: Path, milvus_uri: str | None = None) -> Iterator[str]:
    """``mrl serve`` (torch encoder) over a FAISS version folder, or over the Milvus index ``index`` at ``milvus_uri``.

    Raises:
        ServerError: The server exited or was not ready within ``--ready-timeout``.
    """
    settings = LatencyConfig(
        index=Path(index), queries=config.data, device=config.device, encoder_threads=config.encoder_threads
    )
    port = free_port()
    command, env = server_command(settings, "torch", port), server_environment()
    if milvus_uri is not None:  # one locator, credentials in the environment (flags show in `ps`; a locator has none)
        from index.milvus import CREDENTIAL_VARIABLES, credentials_from_env, split_credentials

        address, credentials = split_credentials(milvus_uri, **credentials_from_env())
        command[command.index("--index") + 1] = str(IndexLocator.milvus(address, index))
        env |= {CREDENTIAL_VARIABLES[key]: value for key, value in credentials.items() if value}
    with running_process(command, port, log, config.ready_timeout_s, env) as base:
        yield base


def measure_server(
    base: str,
    corpus: Corpus,
    backend: str,
    dims: list[int],
    queries: list[str],
    config: BackendsConfig,
    deadline: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the server says it serves, and one result row per (dim, concurrency)."""
    served = {"url": base, **server_info(base, config.request_timeout_s), "load_average_1m": _load()}
    if served["num_vectors"] != len(corpus.vectors):
        raise ServerError(f"{backend} server serves {served['num_vectors']} vectors, expected {len(corpus.vectors)}")
    cells = [Cell(dim, level) for dim in dims for level in config.concurrency]
    results = asyncio.run(measure_cells(base, f"{corpus.name} {backend}", cells, queries, config, deadline))
    rows = []
    for result in results:
        row = asdict(result)
        row.pop("encoder")  # the label; corpus and backend are their own fields
        rows.append({"corpus": corpus.name, "backend": backend, **row, "cut_short": result.cut_short})
    return served, rows


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# --- the two backends ---------------------------------------------------------------------


@dataclass
class Run:
    """What every corpus's measurement on either backend shares."""

    config: BackendsConfig
    dims: list[int]
    model: ModelInfo
    queries: list[str]
    query_vectors: np.ndarray
    logs: Path
    deadline: float

    @property
    def probes(self) -> np.ndarray:
        return self.query_vectors[:PROBE_QUERIES]


def measure_faiss(run: Run, corpus: Corpus, exact: dict[int, np.ndarray], work: Path) -> tuple[dict, list[dict]]:
    """Build a FAISS index folder of ``corpus``, measure its recall in-process, then serve and time it."""
    config = run.config
    store = open_store(IndexLocator.folder(work / FAISS / corpus.name))
    writer = store.begin(new_version_name(), keep_versions=1, device=config.device)
    logger.info("%s faiss: building dims %s", corpus.name, run.dims)
    plan_for = plan_chooser(config, len(corpus.vectors))
    built = build_version(writer, corpus, run.probes, run.dims, plan_for, run.model)
    logger.info("%s faiss: built in %.2f s", corpus.name, built.total_s)
    loaded = store.open(built.manifest.version, device=config.device, lease=False)
    try:
        recall = recall_per_dim(loaded.indexes, run.query_vectors, exact)
    finally:
        loaded.close()
    logger.info("%s faiss: recall@%d %s; starting mrl serve", corpus.name, RECALL_K, recall)
    with serve(config, built.location, run.logs / f"backends-server-{corpus.name}-faiss.log") as base:
        served, rows = measure_server(base, corpus, FAISS, run.dims, run.queries, config, run.deadline)
    return {"build": build_summary(built), "recall_at_10": recall, "server": served}, rows


def measure_milvus(run: Run, corpus: Corpus, exact: dict[int, np.ndarray], uri: str) -> tuple[dict, list[dict]]:
    """The same on Milvus: an index of its own at ``uri``, dropped afterwards whatever happens."""
    config = run.config
    name = f"mrl_bench_{re.sub(r'[^A-Za-z0-9]', '_', corpus.name)}_{secrets.token_hex(3)}"
    store = open_store(IndexLocator.milvus(uri, name))
    try:
        writer = store.begin(new_version_name(), keep_versions=1, device=config.device)
        logger.info("%s milvus: building dims %s as index %r at %s", corpus.name, run.dims, name, redact_uri(uri))
        plan_for = plan_chooser(config, len(corpus.vectors))
        built = build_version(writer, corpus, run.probes, run.dims, plan_for, run.model)
        logger.info("%s milvus: built in %.2f s", corpus.name, built.total_s)
        loaded = store.open(built.manifest.version, lease=False)
        try:
            recall = recall_per_dim(loaded.indexes, run.query_vectors, exact)
        finally:
            loaded.close()
        logger.info("%s milvus: recall@%d %s; starting mrl serve", corpus.name, RECALL_K, recall)
        with serve(config, name, run.logs / f"backends-server-{corpus.name}-milvus.log", uri) as base:
            served, rows = measure_server(base, corpus, MILVUS, run.dims, run.queries, config, run.deadline)
    finally:
        drop_index(store)
    return {"build": build_summary(built), "recall_at_10": recall, "server": served, "index": name}, rows


def drop_index(store: Any) -> None:
    """Drop every collection of ``store``'s index (its versions and its records), then close the connection."""
    from index.backends import EngineUnavailable

    try:
        for collection in store.backend.all_collections():
            if collection == store.meta or collection.startswith(f"{store.name}_"):
                store.backend.drop(collection)
    except EngineUnavailable as exc:
        logger.warning("could not drop %s: %s", store.label, exc)
    finally:
        store.backend.close()


@contextmanager
def milvus_server(config: BackendsConfig, work: Path) -> Iterator[tuple[str, bool]]:
    """``(uri, started here)``: ``--milvus-uri``, else a standalone server started in ``work`` and stopped after.

    Raises:
        ServerError: The server did not start.
    """
    if config.milvus_uri is not None:
        yield config.milvus_uri, False
        return
    from index.milvus_server import MilvusServerError, running_milvus_server

    logger.info("starting a standalone Milvus server on %s", LOOPBACK)
    try:
        with running_milvus_server(work / "milvus") as uri:
            yield uri, True
    except MilvusServerError as exc:
        raise ServerError(f"the Milvus server did not start: {str(exc).splitlines()[0]}") from None


def milvus_server_version(uri: str) -> str | None:
    """What the Milvus server reports as its version (``None`` when it does not say)."""
    from index.milvus import MilvusBackend, credentials_from_env

    backend = MilvusBackend(uri, **credentials_from_env())
    try:
        return str(backend.client.get_server_version())
    except Exception:  # noqa: BLE001 - only informative
        return None
    finally:
        backend.close()


# --- the whole run ------------------------------------------------------------------------


def load_corpora(config: BackendsConfig) -> tuple[list[Document], list[str]]:
    """The real corpus's documents and the query texts of ``--data``.

    Raises:
        DataError: No such folder, no ``corpus.jsonl`` or ``queries.jsonl`` in it, or a malformed file.
    """
    if not config.data.is_dir():
        raise DataError(config.data, "not found (expected a BEIR folder with corpus.jsonl and queries.jsonl)")
    documents, _ = read_documents(config.data)
    queries = read_query_texts(config.data)
    if not documents or not queries:
        raise DataError(config.data, "needs at least one document and one query")
    return documents, queries


def run_backends(config: BackendsConfig) -> dict[str, Any]:
    """Build, search and serve every corpus on FAISS, then on Milvus; compare them.

    Returns:
        The report: settings, machine, model, encoding, per corpus and backend the build, recall and
        server, one row per measured cell, and the comparison rows. Written as ``backends.json``,
        ``backends.md`` and ``backends.png`` into ``config.out`` when it is set.

    Raises:
        ConfigError, DimensionError: Invalid settings. DataError: A missing or malformed dataset.
        ModelError: The model cannot be loaded. ServerError: A server did not start.
        EngineUnavailable: Milvus cannot be reached.
    """
    check_config(config)
    documents, queries = load_corpora(config)
    started_at, started, machine = utc_now(), time.monotonic(), machine_info()
    dims, model, query_vectors, corpora, encoded = encode_corpora(config, documents, queries)
    exact = {corpus.name: exact_neighbours(corpus, query_vectors, dims) for corpus in corpora}
    measured: dict[str, dict[str, Any]] = {corpus.name: {} for corpus in corpora}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mrl-bench-backends-") as scratch:
        work = Path(scratch)
        deadline = time.monotonic() + config.time_limit_s  # no request is sent after it
        run = Run(config, dims, model, queries, query_vectors, config.out or work, deadline)
        for corpus in corpora:
            measured[corpus.name][FAISS], rows = measure_faiss(run, corpus, exact[corpus.name], work)
            results += rows
        with milvus_server(config, work) as (uri, started_here):  # only now: FAISS is measured without it
            server_version = milvus_server_version(uri)
            milvus = {"uri": redact_uri(uri), "started_by_benchmark": started_here, "server_version": server_version}
            for corpus in corpora:
                measured[corpus.name][MILVUS], rows = measure_milvus(run, corpus, exact[corpus.name], uri)
                results += rows
    report = {
        "benchmark": "backends",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 2),
        "settings": {
            **json_fields(config),
            "milvus_uri": config.milvus_uri and redact_uri(config.milvus_uri),
            "dims": dims,
            "num_query_texts": len(queries),
            "host": LOOPBACK,
        },
        "machine": {**machine, "milvus_packages": _versions(MILVUS_PACKAGES)},
        "model": {"name": model.name, "fingerprint": model.fingerprint, "full_dim": model.full_dim},
        "encode": encoded,
        "milvus": milvus,
        "corpora": {
            corpus.name: {
                "kind": corpus.kind,
                "source": corpus.source,
                "num_vectors": len(corpus.vectors),
                "backends": measured[corpus.name],
            }
            for corpus in corpora
        },
        "results": results,
    }
    report["comparison"] = comparison_rows(report)
    if config.out is not None:
        write_backends_report(report, config.out)
    return report


def encode_corpora(
    config: BackendsConfig, documents: list[Document], queries: list[str]
) -> tuple[list[int], ModelInfo, np.ndarray, list[Corpus], dict[str, Any]]:
    """Load the model, check the dims, encode the documents and queries once; add the synthetic corpus.

    Returns:
        The dims (largest first), the model as manifests describe it, the query vectors, the corpora
        and what the encoding took.

    Raises:
        ModelError: The model cannot be loaded. DimensionError: Dims the model does not have.
    """
    model = load_model(config.model)
    encoder = SentenceTransformerEncoder(model, config.model or "default", progress=False)
    dims = validate_dims(config.dims, encoder.dimension) if config.dims else model_dims(model, config.model)
    fingerprint = model_fingerprint(model)
    cache = config.cache or (config.out / "cache" if config.out is not None else None)
    vectors, query_vectors, encoded = encode_corpus_and_queries(encoder, fingerprint, documents, queries, cache)
    corpora = [Corpus(config.data.name, "real", str(config.data), documents, vectors, encoded["seconds"])]
    if config.synthetic:
        logger.info("%s: %d clustered unit vectors of dim %d", SYNTHETIC, config.synthetic, encoder.dimension)
        synthetic = synthetic_vectors(config.synthetic, encoder.dimension, config.seed)
        corpora.append(
            Corpus(SYNTHETIC, "synthetic", f"seed {config.seed}", placeholder_documents(len(synthetic)), synthetic)
        )
    info = model_info(model, config.model, fingerprint, encoder.dimension)
    return dims, info, query_vectors, corpora, encoded


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


# --- comparison and report ----------------------------------------------------------------


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (corpus, dim, concurrency): both backends' figures side by side, with Milvus/FAISS ratios.

    Latency from ``report["results"]``; recall and per-dim build seconds from ``report["corpora"]``. A ratio
    above 1 means Milvus takes longer; a figure missing on either side leaves the ratio ``None``.
    """
    cells = {(r["corpus"], r["backend"], r["dim"], r["concurrency"]): r for r in report["results"]}
    keys = dict.fromkeys((r["corpus"], r["dim"], r["concurrency"]) for r in report["results"])
    rows = []
    for corpus, dim, level in keys:
        backends = report["corpora"][corpus]["backends"]
        row: dict[str, Any] = {"corpus": corpus, "dim": dim, "concurrency": level}
        for backend in BACKENDS:
            cell = cells.get((corpus, backend, dim, level), {})
            measured = backends.get(backend, {})
            row[f"{backend}_p50_ms"] = cell.get("p50_ms")
            row[f"{backend}_p99_ms"] = cell.get("p99_ms")
            row[f"{backend}_errors"] = cell.get("errors")
            server = cell.get("server_ms") or {}
            row[f"{backend}_server_search_ms"] = server.get("search_ms")  # the index search alone, server-side
            row[f"{backend}_server_total_ms"] = server.get("total_ms")
            row[f"{backend}_recall_at_10"] = measured.get("recall_at_10", {}).get(str(dim))
            row[f"{backend}_build_s"] = measured.get("build", {}).get("dims", {}).get(str(dim), {}).get("build_seconds")
        for figure, name in (("p50_ms", "p50_ratio"), ("p99_ms", "p99_ratio"), ("build_s", "build_ratio")):
            row[name] = ratio(row[f"{MILVUS}_{figure}"], row[f"{FAISS}_{figure}"])
        rows.append(row)
    return rows


def build_totals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per corpus: each backend's whole-version build time, its ratio, and the index types built."""
    rows = []
    for name, corpus in report["corpora"].items():
        builds = {backend: corpus["backends"].get(backend, {}).get("build") for backend in BACKENDS}
        totals = {backend: build["total_s"] if build else None for backend, build in builds.items()}
        factories = sorted({d["factory"] for build in builds.values() if build for d in build["dims"].values()})
        rows.append(
            {
                "corpus": name,
                "num_vectors": corpus["num_vectors"],
                "factories": factories,
                **{f"{backend}_total_s": total for backend, total in totals.items()},
                "ratio": ratio(totals[MILVUS], totals[FAISS]),
            }
        )
    return rows


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` to 3 decimals; ``None`` when either is missing or the reference is 0."""
    return round(value / reference, 3) if value is not None and reference else None


def _times(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}×" if value >= 100 else f"{value:.2f}×"


def _recall(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "–"  # 4 places: an exact index can miss a float-level tie


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    header = ["corpus", "dim", "conc.", "FAISS p50 ms", "FAISS p99 ms", "Milvus p50 ms", "Milvus p99 ms"]
    header += ["p50 Milvus/FAISS", "p99 Milvus/FAISS", "FAISS recall@10", "Milvus recall@10"]
    header += ["FAISS build s", "Milvus build s", "build Milvus/FAISS", "server search ms F/M", "errors F/M"]
    lines = [markdown_row(header), markdown_row(["---", *["---:"] * (len(header) - 1)])]
    for row in rows:
        cells = [row["corpus"], str(row["dim"]), str(row["concurrency"])]
        cells += [format_ms(row[f"{b}_{p}_ms"]) for b in BACKENDS for p in ("p50", "p99")]
        cells += [_times(row["p50_ratio"]), _times(row["p99_ratio"])]
        cells += [_recall(row[f"{b}_recall_at_10"]) for b in BACKENDS]
        cells += [_seconds(row[f"{b}_build_s"]) for b in BACKENDS] + [_times(row["build_ratio"])]
        cells.append(" / ".join(format_ms(row.get(f"{b}_server_search_ms")) for b in BACKENDS))
        cells.append("/".join("–" if row[f"{b}_errors"] is None else str(row[f"{b}_errors"]) for b in BACKENDS))
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def totals_table(rows: list[dict[str, Any]]) -> str:
    header = ["corpus", "vectors", "index types", "FAISS build s", "Milvus build s", "Milvus/FAISS"]
    lines = [markdown_row(header), markdown_row(["---", "---:", "---", "---:", "---:", "---:"])]
    for row in rows:
        cells = [row["corpus"], str(row["num_vectors"]), ", ".join(f"`{f}`" for f in row["factories"]) or "–"]
        cells += [_seconds(row[f"{b}_total_s"]) for b in BACKENDS] + [_times(row["ratio"])]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def backends_markdown(report: dict[str, Any]) -> str:
    """Title, context, the per-(corpus, dim) comparison and the whole-build totals."""
    settings, machine, milvus = report["settings"], report["machine"], report["milvus"]
    where = "a standalone server started by the benchmark" if milvus["started_by_benchmark"] else f"`{milvus['uri']}`"
    version = f" (it reports {milvus['server_version']})" if milvus.get("server_version") else ""
    context = (
        f"Model `{report['model']['name']}` ({report['model']['full_dim']}-d); {settings['num_query_texts']} query "
        f"texts from `{settings['data']}` for both corpora. Milvus: {where}{version}. "
        f"Latency: `GET /search` of `mrl serve` (torch encoder, device {settings['device']}), k={settings['k']}, "
        f"{settings['requests']} measured requests per cell after {settings['warmup']} warm-up ones, one server at a "
        f"time. Recall@10: the opened index searched in-process against exact brute force, same query vectors. "
        f"Build s per dim: the manifest's `build_seconds`, that dim's build and the wait until it is stored (Milvus "
        f"seals every dim side by side, so its per-dim times overlap and add up to more than its build took): the "
        f"totals below are the whole builds. Ratios: Milvus ÷ FAISS, above 1× means Milvus takes longer. "
        f"Server search ms: the server's own mean `search_ms` (the index search alone; on Milvus one gRPC call, "
        f"and fetching the hits' documents from Milvus is a second one). "
        f"Client, servers and Milvus share one machine: {machine['cpus_usable']} CPUs, load average "
        f"{machine['load_average_1m']} at the start, GPU {machine['gpu'] or 'none'}."
    )
    parts = ["# FAISS against Milvus: latency, recall and build time", "", context, ""]
    parts += [comparison_table(report["comparison"]), "", "## Whole build (documents, vectors, every dim)", ""]
    return "\n".join([*parts, totals_table(build_totals(report))]) + "\n"


def plot_p50(report: dict[str, Any], path: Path) -> Path:
    """p50 against dim, one panel per corpus, one line per backend (and concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["corpora"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), dpi=110, squeeze=False)
    levels = sorted({row["concurrency"] for row in report["results"]})
    for axis, name in zip(axes[0], names, strict=True):
        rows = [row for row in report["results"] if row["corpus"] == name and row["p50_ms"] is not None]
        for backend in BACKENDS:
            for number, level in enumerate(levels):
                points = sorted(
                    (r["dim"], r["p50_ms"]) for r in rows if (r["backend"], r["concurrency"]) == (backend, level)
                )
                if points:
                    label = backend if len(levels) == 1 else f"{backend}, {level} in flight"
                    axis.plot(*zip(*points, strict=True), marker="o", color=COLORS[backend],
                              linestyle=LINE_STYLES[number % len(LINE_STYLES)], label=label)  # fmt: skip
        dims = sorted({row["dim"] for row in rows})
        axis.set_xscale("log", base=2)
        axis.set_xticks(dims, [str(dim) for dim in dims])
        axis.set_ylim(bottom=0)
        axis.set_title(f"{name} ({report['corpora'][name]['num_vectors']:,} vectors)")
        axis.set_xlabel("dim")
        axis.set_ylabel("p50 ms, GET /search")
        axis.grid(alpha=0.3)
        axis.legend()
    return save_figure(fig, path)


def write_backends_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``backends.json``, ``backends.md`` and ``backends.png`` in ``folder``, each written atomically."""
    return [*write_report(report, folder, "backends", backends_markdown), plot_p50(report, folder / "backends.png")]


# --- command line -------------------------------------------------------------------------


def add_backends_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``mrl bench backends`` on the ``mrl bench`` sub-commands."""
    p = actions.add_parser(
        "backends",
        help="FAISS vs Milvus (a real server): GET /search p50/p99, recall@10 and build time per dim",
        description="Build the same index plan for a real corpus and a synthetic one on FAISS and on a real Milvus "
        "server (started on 127.0.0.1 unless --milvus-uri is given), measure recall@10 against exact search, serve "
        "each with `mrl serve` in turn and time GET /search per dim; report them side by side, Milvus/FAISS ratios.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder: the real corpus and the query texts "
                   "of both corpora (default: %(default)s)")  # fmt: skip
    p.add_argument("--synthetic", type=int, default=100_000, help="synthetic vectors; 0 skips them (%(default)s)")
    p.add_argument("--dims", type=dims_argument, default=None, help="dims (default: the model's; full dim always)")
    p.add_argument("--index-type", default=None, help="FAISS factory string for every dim, e.g. HNSW32,Flat "
                   "(default: what `mrl index build` chooses)")  # fmt: skip
    p.add_argument("--concurrency", type=int_list_argument, default=[1], help="requests in flight (default: 1)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per cell (default: %(default)s)")
    p.add_argument("--milvus-uri", default=None, help="a running Milvus server, http://host:19530 (default: start one; "
                   "credentials from MRL_MILVUS_TOKEN or MRL_MILVUS_USER and MRL_MILVUS_PASSWORD)")  # fmt: skip
    p.add_argument("--model", default=None, help="model folder or hub name (default: all-MiniLM-L6-v2)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu",
                   help="FAISS and the servers' encoder (default: cpu, as the Milvus server searches)")  # fmt: skip
    p.add_argument("--encoder-threads", type=int, default=None, help="the servers' encoder CPU threads")
    p.add_argument("--memory-budget-mb", type=int, default=4096, help="for the automatic index choice (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic corpus seed (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: OUT/cache)")
    add_server_limits(p, time_limit_s=3600.0)
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_backends_command)


def run_backends_command(args: argparse.Namespace) -> int:
    report = run_backends(BackendsConfig(**config_fields(args)))
    print(backends_markdown(report), end="")
    print(f"wrote {', '.join(str(args.out / f'backends.{ext}') for ext in ('json', 'md', 'png'))}")
    return 0
