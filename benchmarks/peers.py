"""``mrl bench peers``: the same corpus and the same model served several ways, measured side by side.

- **ours**: ``mrl serve`` over an index built by ``mrl index build``, at the full dim and at
  smaller Matryoshka dims;
- **sentence-transformers**: the thirty-line baseline of ``benchmarks.peer_servers.sentence_transformers_faiss``
  (``SentenceTransformer.encode(normalize_embeddings=True)`` + ``faiss.IndexFlatIP`` behind FastAPI);
- **txtai**: an ``Embeddings`` index served by txtai's own HTTP API (``uvicorn txtai.api:app`` configured
  by a YAML file), built through that API (``POST /add``, ``GET /index``);
- **infinity-torch**, **infinity-onnx**: infinity-emb's dynamic-batching embedding server (``infinity_emb v2``)
  with its sentence-transformers and its ONNX Runtime engine, from a virtual environment of its own
  (``benchmarks.peer_servers.infinity``). It has no search: it is measured on embeddings only.

Every peer gets the model folder named by the index manifest, the manifest's query/document prompts
and token limit (txtai has no option for the latter: a difference is reported), and exactly the passages
the index holds (title + text, read back from its ``docs.sqlite``). The search peers search exactly (flat
inner product over unit vectors), so at the full dim all must rank alike; the NDCG@10 columns check that
the peers are set up correctly. infinity's vectors are checked against ours before it is timed: the
cosine of each of 20 queries' vectors must be at least 0.999.

One server process runs at a time, on a free loopback port, and is always stopped. For each system:
corpus indexing time (ours: from the manifest), NDCG@10 / Recall@100 from ``k=100`` HTTP searches for
the judged queries of a split, then latency cells (dim × concurrency) driven by ``benchmarks.latency``'s
load generator with one request function shared by all (same client work per request). Ours and infinity
are also timed on their embeddings endpoint, one query per request at the full dim, at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import format_ms, machine_info, markdown_row, save_figure, utc_now, write_report
from benchmarks.latency import (
    ERROR_TEXT_CHARS,
    Cell,
    CellResult,
    LatencyConfig,
    Outcome,
    ServerVariant,
    read_query_texts,
    server_command,
    server_environment,
    time_cell,
    time_cells,
    timed_get,
    timed_post,
    wait_for_workers,
)
from benchmarks.loadgen import Answer, LoadClient
from benchmarks.peer_servers import infinity
from core.cli_args import add_output_argument
from core.data import DataError, Document, Qrels, load_beir
from core.errors import ConfigError
from core.files import json_fields
from core.matryoshka import DimensionError
from core.metrics import score_rankings
from core.models import ModelError, resolve_model
from core.servers import LOOPBACK, ServerError, free_port, running_process
from index.layout import DOCS_FILE, resolve_version
from index.locator import parse_locator
from index.manifest import IndexManifest
from index.store import DocumentStore
from training.evaluate import TOP_K

logger = logging.getLogger(__name__)

OURS = "ours"
OURS_ONNX = "ours-onnx"  # the same server with its ONNX Runtime encoder: our fastest CPU setting
SENTENCE_TRANSFORMERS = "sentence-transformers"
TXTAI = "txtai"
INFINITY_TORCH = "infinity-torch"
INFINITY_ONNX = "infinity-onnx"
INFINITY = (INFINITY_TORCH, INFINITY_ONNX)  # embeddings only: infinity has no search
PEERS = (TXTAI, SENTENCE_TRANSFORMERS, INFINITY_TORCH, INFINITY_ONNX)
EMBEDDINGS_PATHS = {  # the systems timed on embeddings, one query per request
    OURS: "/v1/embeddings",
    OURS_ONNX: "/v1/embeddings",
    INFINITY_TORCH: "/embeddings",
    INFINITY_ONNX: "/embeddings",
}
CHECK_QUERIES = 20  # queries whose vectors must agree with ours before infinity is timed
MIN_COSINE = 0.999
LONG_TEXT_CHARS = 2000  # the longest passage, cut to `mrl serve`'s default max_query_chars, probes token limits
DEFAULT_PEER_VENVS = Path("runs/peers-venvs")
RECOMMENDED_DIM = 64  # measured besides the full dim by default, when the index has it
QUALITY_K = TOP_K  # hits asked for per judged query: Recall@100 needs 100 (no server here caps below it)
MAX_K = 100  # `mrl serve`'s default max_k: the latency k may not exceed it
ENCODE_BATCH = 64  # corpus encoding batch of both peers, as `mrl index build`'s default
TXTAI_ADD_BATCH = 1000  # documents per POST /add to txtai's API
TXTAI_EXTRA_HINT = "pip install -c constraints.txt -e '.[peers]'"


@dataclass
class PeersConfig:
    """What ``mrl bench peers`` can be told."""

    index: Path
    data: Path  # BEIR folder: judged queries for quality, its queries.jsonl for latency
    split: str = "test"
    max_queries: int | None = None  # default: every judged query of the split
    dims: list[int] | None = None  # ours; the full dim is always added. Default: full and 64 if indexed
    peers: list[str] | None = None  # default: all; txtai skipped when not installed, infinity when it cannot install
    concurrency: list[int] = field(default_factory=lambda: [1, 16])
    requests: int = 200  # measured requests per cell
    warmup: int = 20  # unmeasured requests per cell (at least one per connection)
    k: int = 10  # hits per latency request
    device: str = "auto"
    encoder_threads: int | None = None  # every server's torch/OpenMP threads (default: the libraries')
    workers: int | None = None  # ours: `mrl serve --workers N` (default: one process)
    onnx: bool = True  # also measure our server with its ONNX encoder (system "ours-onnx")
    rounds: int = 1  # every server started and timed this many times, in turn; each cell reports its median round
    peer_venvs: Path = DEFAULT_PEER_VENVS  # the peers' own virtual environments (infinity's), created on first use
    time_limit_s: float = 1800.0  # no search request after it; later cells are recorded as cut short
    ready_timeout_s: float = 300.0  # per server start (model loading)
    build_timeout_s: float = 3600.0  # per peer's corpus indexing
    request_timeout_s: float = 30.0
    out: Path | None = None


@dataclass
class Plan:
    """What a valid config asks for: our dims, the peers to run, and those skipped with the reason."""

    dims: list[int]
    peers: list[str]
    skipped: dict[str, str]


@dataclass(frozen=True)
class SearchApi:
    """How one server is asked for the top ``k`` of a query, and where the hits are in its JSON answer."""

    query_param: str
    k_param: str
    hits_path: tuple[str | int, ...]  # keys from the body to the list of hits
    dim_param: str | None = None
    path: str = "/search"

    def params(self, query: str, k: int, dim: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {self.query_param: query, self.k_param: k}
        if self.dim_param is not None and dim is not None:
            params[self.dim_param] = dim
        return params

    def hit_ids(self, body: Any) -> list[str]:
        """Document ids, best first. Raises KeyError, IndexError or TypeError for an answer without hits."""
        hits = body
        for key in self.hits_path:
            hits = hits[key]
        if not isinstance(hits, list):
            raise TypeError(f"hits are a {type(hits).__name__}, not a list")
        return [str(hit["id"] if isinstance(hit, dict) else hit[0]) for hit in hits]


APIS = {
    OURS: SearchApi("q", "k", ("results", 0, "hits"), dim_param="dim"),
    OURS_ONNX: SearchApi("q", "k", ("results", 0, "hits"), dim_param="dim"),
    SENTENCE_TRANSFORMERS: SearchApi("q", "k", ("hits",)),
    TXTAI: SearchApi("query", "limit", ()),  # txtai's GET /search answers a bare list of {id, text, score}
}


@dataclass
class Served:
    """A system that is up: its base URL and what it says about itself (build time, how it is served)."""

    base: str
    details: dict[str, Any]


# --- configuration ------------------------------------------------------------------------


def check_config(config: PeersConfig, manifest: IndexManifest) -> Plan:
    """Validate ``config`` against the index before any server starts.

    Raises:
        ConfigError: A count or limit that is not positive, k above 100, an unknown peer or device,
            or txtai asked for by name while it is not installed. DimensionError: A dim the index lacks.
    """
    positive = {"--requests": config.requests, "--k": config.k, "--time-limit": config.time_limit_s}
    positive["--rounds"] = config.rounds
    positive |= {"--ready-timeout": config.ready_timeout_s, "--build-timeout": config.build_timeout_s}
    positive |= {"--request-timeout": config.request_timeout_s}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.k > MAX_K:
        raise ConfigError(f"--k must be at most {MAX_K} (the server's max_k), got {config.k}")
    if config.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {config.warmup}")
    if config.max_queries is not None and config.max_queries <= 0:
        raise ConfigError(f"--max-queries must be positive, got {config.max_queries}")
    if config.encoder_threads is not None and config.encoder_threads <= 0:
        raise ConfigError(f"--encoder-threads must be positive, got {config.encoder_threads}")
    if config.workers is not None and config.workers <= 0:
        raise ConfigError(f"--workers must be positive, got {config.workers}")
    if not config.concurrency or min(config.concurrency) < 1:
        raise ConfigError(f"--concurrency must list positive numbers, got {config.concurrency}")
    if config.device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"--device must be auto, cpu or gpu, got {config.device!r}")
    peers, skipped = choose_peers(config.peers)
    return Plan(our_dims(config.dims, manifest), peers, skipped)


def our_dims(requested: list[int] | None, manifest: IndexManifest) -> list[int]:
    """The dims to measure ours at, largest first: the full one always, then ``requested`` (default: 64).

    Raises:
        DimensionError: A requested dim that the index does not have.
    """
    full = manifest.model.full_dim
    default = [RECOMMENDED_DIM] if RECOMMENDED_DIM in manifest.dims else []
    wanted = set(requested if requested is not None else default) | {full}
    missing = sorted(wanted - set(manifest.dims))
    if missing:
        raise DimensionError(f"dims {missing} are not in the index (it has {manifest.dims})")
    return sorted(wanted, reverse=True)


def choose_peers(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The peers to run and the skipped ones with their reason.

    By default (``requested`` is None) txtai is skipped when it cannot run; named explicitly, it must.
    Whether infinity can run is known only once its venv is made (:func:`with_infinity`, before any server).

    Raises:
        ConfigError: An unknown peer name, or txtai named explicitly but not installed.
    """
    names = list(dict.fromkeys(requested if requested is not None else PEERS))  # drop repeats, keep order
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peers {unknown} (choose from {', '.join(PEERS)})")
    skipped = {}
    missing = txtai_missing() if TXTAI in names else None
    if missing and requested is not None:
        raise ConfigError(f"--peers asks for txtai, but {missing}")
    if missing:
        skipped[TXTAI] = missing
    return [name for name in names if name not in skipped], skipped


def txtai_missing() -> str | None:
    """Why txtai's API cannot run here (one line), or None when it can."""
    if importlib.util.find_spec("txtai") is None:
        return f"txtai is not installed ({TXTAI_EXTRA_HINT})"
    if importlib.util.find_spec("fastapi_mcp") is None:  # txtai.api imports it: the txtai[api] extra
        return f"txtai's HTTP API needs the txtai[api] extra ({TXTAI_EXTRA_HINT})"
    return None


def local_model_folder(manifest: IndexManifest) -> str:
    """The manifest's model as a local folder: the peers get a path, never a hub name (they run offline).

    Raises:
        ModelError: The manifest names a model that is not a local folder.
    """
    folder = resolve_model(manifest.model.name)
    if not Path(folder).is_dir():
        raise ModelError(f"the peers need the model as a local folder; the manifest's {manifest.model.name!r} is not")
    return folder


# --- inputs -------------------------------------------------------------------------------


def read_passages(version: Path, manifest: IndexManifest) -> list[Document]:
    """Every document of the index, in row order, exactly as it was indexed (``Document.passage`` is encoded)."""
    store = DocumentStore(version / DOCS_FILE)
    try:
        documents = store.get(range(manifest.num_vectors))
    finally:
        store.close()
    missing = sum(doc is None for doc in documents)
    if missing:
        raise DataError(version / DOCS_FILE, f"{missing} of {manifest.num_vectors} rows are missing")
    return [doc for doc in documents if doc is not None]


def judged_queries(config: PeersConfig, documents: list[Document]) -> tuple[str, dict[str, str], Qrels, int]:
    """Dataset name, judged query texts by id, their qrels, and how many judged documents the index lacks.

    Raises:
        DataError: Bad dataset, or an index that holds none of the judged documents.
    """
    dataset = load_beir(config.data, [config.split])
    qrels = dataset.split(config.split)
    query_ids = list(qrels)[: config.max_queries]
    qrels = {qid: qrels[qid] for qid in query_ids}
    judged = {doc for docs in qrels.values() for doc, score in docs.items() if score > 0}
    missing = len(judged - {doc.id for doc in documents})
    if judged and missing == len(judged):
        raise DataError(config.data, f"none of the judged documents of split {config.split!r} are in the index")
    if missing:
        logger.warning("%d of %d judged documents are not in the index; they count as not found", missing, len(judged))
    return dataset.name, {qid: dataset.queries[qid] for qid in query_ids}, qrels, missing


# --- the servers --------------------------------------------------------------------------


def server_env(config: PeersConfig) -> dict[str, str]:
    """The same environment for all three servers: no ``MRL_*``, offline, and the thread limit if one is set."""
    env = server_environment() | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if config.encoder_threads is not None:
        env |= {name: str(config.encoder_threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return env


def our_command(config: PeersConfig, settings: LatencyConfig, encoder: str, port: int) -> list[str]:
    """``mrl serve`` as ``mrl bench latency`` starts it, with ``config.workers`` worker processes if set."""
    return server_command(settings, encoder, port, ServerVariant(workers=config.workers))


@contextmanager
def serve_ours(config: PeersConfig, manifest: IndexManifest, logs: Path, encoder: str = "torch") -> Iterator[Served]:
    """``mrl serve`` over the index (``encoder``: torch or onnx); its build time comes from the manifest."""
    settings = LatencyConfig(
        index=config.index,
        queries=config.data,
        encoders=[encoder],
        device=config.device,
        encoder_threads=config.encoder_threads,
    )
    port = free_port()
    command = our_command(config, settings, encoder, port)
    build_s = manifest.encode_seconds + sum(entry.build_seconds for entry in manifest.indexes.values())
    details = {
        "served_by": f"`mrl serve` ({encoder} encoder) over the index"
        + (f", {config.workers} worker processes" if config.workers else ""),
        "build_s": round(build_s, 2),
        "build_note": f"from the manifest: corpus encoding, with up to 1000 probe queries, + FAISS builds of all "
        f"{len(manifest.dims)} dims",
        "index_factories": {str(dim): manifest.indexes[dim].factory for dim in manifest.dims},
    }
    log = logs / f"peers-server-ours-{encoder}.log"
    with running_process(command, port, log, config.ready_timeout_s, server_env(config)) as base:
        if config.workers:
            wait_for_workers(base, config.workers, config.ready_timeout_s)
        yield Served(base, details)


def write_corpus(path: Path, documents: list[Document]) -> Path:
    """JSON lines of ``{"id", "text"}`` with each document's passage as text: the baseline server's input."""
    with path.open("w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"id": doc.id, "text": doc.passage}) + "\n")
    return path


@contextmanager
def serve_sentence_transformers(
    config: PeersConfig, manifest: IndexManifest, model: str, documents: list[Document], work: Path, logs: Path
) -> Iterator[Served]:
    """The baseline server; it encodes the corpus before listening and reports the time in ``GET /info``."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.peer_servers.sentence_transformers_faiss"]
    command += ["--corpus", str(write_corpus(work / "corpus.jsonl", documents)), "--model", model]
    command += ["--query-prompt", manifest.model.query_prompt, "--document-prompt", manifest.model.document_prompt]
    command += ["--batch-size", str(ENCODE_BATCH), "--port", str(port)]
    if manifest.model.max_seq_length:
        command += ["--max-seq-length", str(manifest.model.max_seq_length)]
    if config.device != "auto":
        command += ["--device", "cuda" if config.device == "gpu" else "cpu"]
    log = logs / "peers-server-sentence-transformers.log"
    timeout = config.ready_timeout_s + config.build_timeout_s
    with running_process(command, port, log, timeout, server_env(config), ready_path="/info") as base:
        with httpx.Client(timeout=config.request_timeout_s, trust_env=False) as client:
            response = client.get(f"{base}/info")
            response.raise_for_status()
            info = response.json()
        _check_count(SENTENCE_TRANSFORMERS, info["num_vectors"], len(documents))
        yield Served(
            base,
            {
                "served_by": "`python -m benchmarks.peer_servers.sentence_transformers_faiss` (FastAPI + uvicorn)",
                "build_s": info["build_s"],
                "build_note": "corpus encoding + IndexFlatIP, timed by the server; model loading not included",
                "model_load_s": info["load_s"],
                "index_factories": {str(info["dim"]): "IndexFlatIP"},
                "versions": _versions("sentence-transformers", "faiss-cpu", "faiss-gpu", "fastapi", "uvicorn"),
            },
        )


def txtai_settings(model: str, manifest: IndexManifest, device: str) -> dict[str, Any]:
    """txtai's application YAML: a writable in-memory ``Embeddings`` index with the same model and prompts.

    ``method: sentence-transformers`` makes txtai encode with the model's own modules (pooling,
    normalisation) through ``encode_query``/``encode_document``; ``vectors`` are keyword arguments of
    ``SentenceTransformer(...)``, so the manifest's prompts replace any saved in the folder, as in
    ``mrl serve``. ``IDMap,Flat`` is exact search (txtai's own choice up to 5000 vectors; IVF above).
    """
    return {
        "writable": True,
        "embeddings": {
            "path": model,
            "method": "sentence-transformers",
            "content": True,  # store and return the text, as the other two servers do
            "backend": "faiss",
            "faiss": {"components": "IDMap,Flat"},
            "gpu": device != "cpu",
            "encodebatch": ENCODE_BATCH,
            "vectors": {"prompts": {"query": manifest.model.query_prompt, "document": manifest.model.document_prompt}},
        },
    }


@contextmanager
def serve_txtai(
    config: PeersConfig, manifest: IndexManifest, model: str, documents: list[Document], work: Path, logs: Path
) -> Iterator[Served]:
    """txtai's own API (``uvicorn txtai.api:app`` with ``CONFIG``), then the corpus indexed through it."""
    import yaml  # a txtai dependency

    settings = work / "txtai.yml"
    settings.write_text(yaml.safe_dump(txtai_settings(model, manifest, config.device)), encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "txtai.api:app", "--host", LOOPBACK, "--port", str(port)]
    command += ["--log-level", "warning"]
    env = server_env(config) | {"CONFIG": str(settings)}
    log = logs / "peers-server-txtai.log"
    with running_process(command, port, log, config.ready_timeout_s, env, ready_path="/count") as base:
        build_s = build_txtai_index(base, documents, config)
        details = {
            "served_by": "txtai's HTTP API (`uvicorn txtai.api:app`, CONFIG=txtai.yml)",
            "build_s": round(build_s, 3),
            "build_note": f"POST /add of {TXTAI_ADD_BATCH} passages per request + GET /index, timed by the client; "
            "includes the model reload txtai's API does on every GET /index",
            "index_factories": {str(manifest.model.full_dim): "IDMap,Flat"},
            "settings": txtai_settings(model, manifest, config.device),
            "versions": _versions("txtai"),
        }
        details |= _max_seq_length_note(model, manifest)
        yield Served(base, details)


def build_txtai_index(base: str, documents: list[Document], config: PeersConfig) -> float:
    """Send the passages to txtai's API and have it index them; return the seconds it took.

    Raises:
        httpx.HTTPError: An error answer, or no answer within ``config.build_timeout_s``.
        ServerError: The index holds another number of documents than was sent.
    """
    started = time.perf_counter()
    with httpx.Client(base_url=base, timeout=config.build_timeout_s, trust_env=False) as client:
        for start in range(0, len(documents), TXTAI_ADD_BATCH):
            batch = [{"id": doc.id, "text": doc.passage} for doc in documents[start : start + TXTAI_ADD_BATCH]]
            client.post("/add", json=batch).raise_for_status()
        client.get("/index").raise_for_status()
        seconds = time.perf_counter() - started
        count = client.get("/count")
        count.raise_for_status()
    _check_count(TXTAI, int(count.json()), len(documents))
    return seconds


def _check_count(system: str, indexed: int, expected: int) -> None:
    if indexed != expected:
        raise ServerError(f"{system} indexed {indexed} documents, not the {expected} sent")


def _max_seq_length_note(model: str, manifest: IndexManifest) -> dict[str, Any]:
    """txtai's sentence-transformers method has no token-limit option: it encodes with the folder's own."""
    try:
        folder_limit = json.loads((Path(model) / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if manifest.model.max_seq_length in (None, folder_limit):
        return {}
    return {
        "caveat": f"txtai encodes with the model folder's max_seq_length {folder_limit}; "
        f"the index was built with {manifest.model.max_seq_length}"
    }


def _versions(*packages: str) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --- infinity -----------------------------------------------------------------------------


def with_infinity(plan: Plan, config: PeersConfig, logs: Path) -> tuple[Plan, Path | None]:
    """The plan once infinity's venv is ready, created on first use, and its interpreter (None: not asked for).

    By default a venv that cannot be created skips both infinity systems with the reason; named in ``--peers``,
    infinity must run.

    Raises:
        ConfigError: infinity named in ``--peers`` and its venv cannot be created.
    """
    wanted = [name for name in plan.peers if name in INFINITY]
    if not wanted:
        return plan, None
    try:
        return plan, infinity.ensure_venv(config.peer_venvs, logs / "peers-infinity-install.log")
    except ConfigError as exc:
        if config.peers is not None:
            raise
        logger.warning("infinity skipped: %s", exc)
        peers = [name for name in plan.peers if name not in INFINITY]
        return Plan(plan.dims, peers, plan.skipped | dict.fromkeys(wanted, str(exc))), None


def prepare_infinity_model(model: str, manifest: IndexManifest, target: Path, onnx: bool) -> infinity.PreparedFolder:
    """A copy of the model folder that infinity reads, with ``model.onnx`` from our exporter when ``onnx``.

    Raises:
        ConfigError: A folder infinity's libraries cannot be given. ModelError, EncoderError: The export failed.
    """
    from core.models import load_model
    from service.encoders import export_onnx

    shutil.rmtree(target, ignore_errors=True)  # a failed attempt for the other engine
    prepared = infinity.prepare_model_folder(Path(model), target, manifest.model.max_seq_length)
    if onnx:
        network = load_model(model, max_seq_length=manifest.model.max_seq_length, device="cpu")
        export_onnx(network, target / infinity.ONNX_FILE)  # output `last_hidden_state`, as infinity reads it
    return prepared


@contextmanager
def serve_infinity(
    system: str, config: PeersConfig, python: Path, prepared: infinity.PreparedFolder, work: Path, logs: Path
) -> Iterator[Served]:
    """infinity's server with the engine of ``system`` over the prepared folder; ``GET /health`` answers once loaded.

    Raises:
        ServerError: The model pools in a way infinity's ONNX engine cannot, or the server did not start.
    """
    engine = infinity.ENGINES[system]
    if engine == "optimum" and prepared.pooling not in ("mean", "cls"):
        raise ServerError(f"the model pools by {prepared.pooling}; infinity's ONNX engine pools by mean or cls only")
    pooling = prepared.pooling if prepared.pooling in ("mean", "cls") else "auto"
    port = free_port()
    command = infinity.server_command(python, prepared.path, engine, pooling, port, config.device)
    env = infinity.server_environment(server_env(config), work / f"{system}-home")
    log = logs / f"peers-server-{system}.log"
    with running_process(command, port, log, config.ready_timeout_s, env, ready_path="/health") as base:
        details: dict[str, Any] = {
            "served_by": f"infinity-emb {infinity.VERSION}, engine `{engine}`, from its own venv",
            "endpoint": "POST /embeddings",
            "command": "infinity_emb " + " ".join(command[4:]),  # without the launcher that sets the cwd
            "cwd": str(prepared.path),
            "model_folder": {"pooling": prepared.pooling, "rewritten": list(prepared.rewritten)},
            "versions": infinity.installed_versions(python),
        }
        failure = infinity.optimisation_failure(log.read_text(encoding="utf-8", errors="replace"))
        if engine == "optimum" and failure:
            details["caveat"] = f"its ONNX graph optimisation failed ({failure}); it serves the unoptimised graph"
        yield Served(base, details)


# --- measuring ----------------------------------------------------------------------------


def request_sender(api: SearchApi) -> Callable[[LoadClient, dict[str, Any]], Awaitable[Outcome]]:
    """One search request for ``benchmarks.latency.drive``, the same for every system.

    The latency is the time to the whole answer; the JSON is then parsed and its hits found (not timed),
    so an answer without hits is an error. ``timings_ms`` are kept where a server reports them (ours).
    """

    def read(response: Answer) -> dict | None:
        body = response.json()
        api.hit_ids(body)
        timings = body.get("timings_ms") if isinstance(body, dict) else None
        return dict(timings) if isinstance(timings, dict) else None

    async def send(client: LoadClient, params: dict[str, Any]) -> Outcome:
        return await timed_get(client, api.path, params, read, "hits")

    return send


async def measure_cells(
    base: str, system: str, cells: list[Cell], queries: list[str], config: PeersConfig, deadline: float
) -> list[CellResult]:
    """Every cell in turn against one system, through its own API with the shared load generator."""
    api = APIS[system]
    send = request_sender(api)

    def measure(cell: Cell) -> Awaitable[CellResult]:
        dim = cell.dim if api.dim_param else None

        def params_from(offset: int) -> Callable[[int], dict[str, Any]]:
            return lambda number: api.params(queries[(offset + number) % len(queries)], config.k, dim)

        return time_cell(base, system, cell, params_from, config, deadline, send)

    return await time_cells(system, cells, measure)


def search_quality(
    base: str, system: str, dim: int, queries: dict[str, str], qrels: Qrels, config: PeersConfig, deadline: float
) -> dict[str, Any]:
    """NDCG@10, MRR@10 and Recall@100 from one ``k=100`` HTTP search per judged query, one at a time.

    A failed request leaves its query without hits (it scores 0) and is counted in ``errors``; no request
    is sent after ``deadline``, and the queries not asked count in ``not_asked``.
    """
    api = APIS[system]
    rankings: dict[str, list[str]] = {}
    errors: list[str] = []
    with httpx.Client(base_url=base, timeout=config.request_timeout_s, trust_env=False) as client:
        for qid, text in queries.items():
            if time.monotonic() >= deadline:
                break
            try:
                response = client.get(api.path, params=api.params(text, QUALITY_K, dim if api.dim_param else None))
                response.raise_for_status()
                rankings[qid] = api.hit_ids(response.json())
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS])
    metrics = score_rankings(rankings, qrels)
    return {
        "k": QUALITY_K,
        **{name: round(metrics[name], 4) for name in ("ndcg@10", "mrr@10", "recall@100")},
        "queries": len(queries),
        "not_asked": len(queries) - len(rankings) - len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def measure_system(
    system: str,
    served: Served,
    dims: list[int],
    judged: tuple[dict[str, str], Qrels],
    query_texts: list[str],
    config: PeersConfig,
    deadline: float,
    quality: bool = True,
) -> tuple[dict[str, Any], list[CellResult]]:
    """Quality at every dim (unless ``quality`` is false: a later round), then every latency cell, against one
    running server."""
    queries, qrels = judged
    dims_scored = dims if quality else []
    scores = {str(d): search_quality(served.base, system, d, queries, qrels, config, deadline) for d in dims_scored}
    cells = [Cell(dim, level) for dim in dims for level in config.concurrency]
    results = asyncio.run(measure_cells(served.base, system, cells, query_texts, config, deadline))
    return {"status": "measured", "url": served.base, **served.details, "quality": scores}, results


# --- embeddings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorProbe:
    """What every embeddings endpoint is asked before it is timed: check queries, a small dim, a long passage."""

    queries: list[str]
    query_prompt: str
    document_prompt: str
    long_text: str
    small_dim: int
    small_dim_indexed: bool  # ours serves only the index's dims


def vector_probe(
    queries: list[str], documents: list[Document], manifest: IndexManifest, dims: list[int]
) -> VectorProbe:
    """The first :data:`CHECK_QUERIES` queries, the longest passage (cut), and the smallest dim measured (else 64)."""
    small = min(dims) if min(dims) < manifest.model.full_dim else RECOMMENDED_DIM
    longest = max((doc.passage for doc in documents), key=len, default="a passage")
    return VectorProbe(
        queries=queries[:CHECK_QUERIES],
        query_prompt=manifest.model.query_prompt,
        document_prompt=manifest.model.document_prompt,
        long_text=longest[:LONG_TEXT_CHARS],
        small_dim=small,
        small_dim_indexed=small in manifest.dims,
    )


def embedding_body(
    system: str, texts: str | list[str], prompt: str, kind: str = "query", dimensions: int | None = None
) -> dict[str, Any]:
    """An embeddings request: ours applies the manifest's prompt of ``input_type`` itself; infinity has no
    prompts, so the client puts ``prompt`` (the same manifest prompt) before each text."""
    if system in INFINITY:
        body: dict[str, Any] = {"input": prompt + texts if isinstance(texts, str) else [prompt + t for t in texts]}
    else:
        body = {"input": texts, "input_type": kind}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def embedding_matrix(body: Any, count: int) -> np.ndarray:
    """The vectors of an OpenAI-style embeddings answer in input order, one row each.

    Raises:
        ServerError: Not an answer with ``count`` vectors of one length.
    """
    try:
        rows = sorted(body["data"], key=lambda row: row["index"])
        matrix = np.asarray([row["embedding"] for row in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ServerError(f"not an embeddings answer ({type(exc).__name__}: {exc})"[:ERROR_TEXT_CHARS]) from None
    if matrix.ndim != 2 or len(matrix) != count:
        raise ServerError(f"expected {count} vectors, got an array of shape {matrix.shape}")
    return matrix


def probe_vectors(base: str, system: str, probe: VectorProbe, config: PeersConfig) -> dict[str, np.ndarray]:
    """The probe's vectors from one system: ``queries`` and ``long`` at the full dim, ``small`` at the small dim.

    Raises:
        httpx.HTTPError: An error answer. ServerError: An answer without the vectors asked for.
    """
    path = EMBEDDINGS_PATHS[system]
    with httpx.Client(base_url=base, timeout=config.request_timeout_s, trust_env=False) as client:

        def fetch(texts: list[str], kind: str, dimensions: int | None = None) -> np.ndarray:
            prompt = probe.query_prompt if kind == "query" else probe.document_prompt
            response = client.post(path, json=embedding_body(system, texts, prompt, kind, dimensions))
            response.raise_for_status()
            return embedding_matrix(response.json(), len(texts))

        vectors = {"queries": fetch(probe.queries, "query"), "long": fetch([probe.long_text], "document")}
        if system in INFINITY or probe.small_dim_indexed:
            vectors["small"] = fetch(probe.queries, "query", probe.small_dim)
    return vectors


def rowwise_cosine(reference: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(vectors, axis=1)
    return np.sum(reference * vectors, axis=1) / np.maximum(norms, 1e-12)


def vector_check(reference: np.ndarray, vectors: np.ndarray, minimum: float = MIN_COSINE) -> dict[str, Any]:
    """Cosine of each query's vector with ours (``reference``): min, mean, and whether each reaches ``minimum``."""
    check: dict[str, Any] = {"queries": len(vectors), "threshold": minimum}
    if reference.shape != vectors.shape:
        return check | {"min_cosine": None, "mean_cosine": None, "passed": False, "shape": list(vectors.shape)}
    cosines = rowwise_cosine(reference, vectors)
    minimum_seen = round(float(cosines.min()), 6)
    return check | {
        "min_cosine": minimum_seen,
        "mean_cosine": round(float(cosines.mean()), 6),
        "passed": bool(cosines.min() >= minimum),
    }


def norm_summary(vectors: np.ndarray, dim: int) -> dict[str, Any]:
    """Min, mean and max L2 norm of ``vectors`` (asked for at ``dim``): 1.0 for unit vectors."""
    norms = np.linalg.norm(vectors, axis=1)
    low, mean, high = (round(float(value), 4) for value in (norms.min(), norms.mean(), norms.max()))
    return {"dim": dim, "min": low, "mean": mean, "max": high}


def vector_facts(
    vectors: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None, probe: VectorProbe
) -> dict[str, Any]:
    """What the probe measured of one system: agreement with ours, the norm at the small dim, the long passage."""
    facts: dict[str, Any] = {}
    if reference is not None:
        facts["check"] = vector_check(reference["queries"], vectors["queries"])
        long = vector_check(reference["long"], vectors["long"], minimum=MIN_COSINE)
        facts["long_input"] = {"chars": len(probe.long_text), "cosine": long["min_cosine"]}
    if "small" in vectors:
        facts["norm_at_dim"] = norm_summary(vectors["small"], probe.small_dim)
    return facts


def check_failure(check: dict[str, Any]) -> str:
    """The one-line reason of a failed vector check."""
    if check["min_cosine"] is None:
        return f"its vectors have shape {check.get('shape')}, not ours: not timed"
    return (
        f"its vectors differ from ours: min cosine {check['min_cosine']:.4f} over {check['queries']} queries "
        f"(at least {check['threshold']} needed): not timed"
    )


async def measure_embedding_cells(
    base: str, system: str, full_dim: int, queries: list[str], prompt: str, config: PeersConfig, deadline: float
) -> list[CellResult]:
    """One query per ``POST`` to the system's embeddings endpoint, at the full dim, at every concurrency.

    Answers are judged alike: one vector of ``full_dim`` numbers, parsed after the time is taken.
    """
    path = EMBEDDINGS_PATHS[system]

    def read(response: Answer) -> None:
        if embedding_matrix(response.json(), 1).shape[1] != full_dim:
            raise ValueError(f"not a {full_dim}-dim vector")

    async def send(client: LoadClient, body: dict[str, Any]) -> Outcome:
        return await timed_post(client, path, body, read, f"one {full_dim}-dim embedding")

    def measure(cell: Cell) -> Awaitable[CellResult]:
        def params_from(offset: int) -> Callable[[int], dict[str, Any]]:
            return lambda number: embedding_body(system, queries[(offset + number) % len(queries)], prompt)

        return time_cell(base, system, cell, params_from, config, deadline, send)

    cells = [Cell(full_dim, level) for level in config.concurrency]
    return await time_cells(f"{system} POST {path}", cells, measure)


def measure_embeddings(
    system: str,
    base: str,
    probe: VectorProbe,
    reference: dict[str, np.ndarray] | None,
    query_texts: list[str],
    config: PeersConfig,
    full_dim: int,
    deadline: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[CellResult]]:
    """The probe's facts and vectors, then the timed embeddings cells; infinity is timed only if its check passed."""
    vectors = probe_vectors(base, system, probe, config)
    facts = vector_facts(vectors, reference, probe)
    if system in INFINITY and not facts["check"]["passed"]:
        logger.warning("%s: %s", system, check_failure(facts["check"]))
        return facts, vectors, []
    prompt = probe.query_prompt
    cells = asyncio.run(measure_embedding_cells(base, system, full_dim, query_texts, prompt, config, deadline))
    return facts, vectors, cells


def embedding_rows(results: list[CellResult]) -> list[dict[str, Any]]:
    """One row per embeddings cell; ``rps_vs_best_infinity``: req/s ÷ the faster infinity engine's, same in flight."""
    best: dict[int, CellResult] = {}
    for result in results:
        if result.encoder in INFINITY and result.throughput_rps > 0:
            current = best.get(result.concurrency)
            if current is None or result.throughput_rps > current.throughput_rps:
                best[result.concurrency] = result
    rows = []
    for result in results:
        row = asdict(result)
        system = row.pop("encoder")
        for unused in ("rerank_dim", "server_ms"):
            row.pop(unused)
        reference = best.get(result.concurrency)
        rows.append(
            {
                "system": system,
                **row,
                "cut_short": result.cut_short,
                "best_infinity": reference.encoder if reference else None,
                "rps_vs_best_infinity": _ratio(result.throughput_rps, reference.throughput_rps if reference else None),
            }
        )
    return rows


# --- the whole run ------------------------------------------------------------------------


def run_peers(config: PeersConfig) -> dict[str, Any]:
    """Measure ours, then each peer, each against its own fresh server process; all of it ``config.rounds`` times.

    Later rounds time the same cells again (quality and each system's facts come from the first), so that
    a machine's drift during the run falls on every system: each cell reports its median round, and the
    report's ``rounds`` keeps every round's rows.

    A peer that fails (its server does not start, answers errors while indexing, or its vectors disagree
    with ours) is recorded as failed with the reason, and the others are still measured; ours failing ends
    the run. infinity's venv is created first when it is missing (minutes, before the time limit starts).

    Returns:
        The report (settings, machine, index, dataset, each system, one row per measured search cell with its
        ratios to ours at the full dim, one row per embeddings cell with its ratio to the best infinity
        engine); written as ``peers.json``, ``peers.md`` and ``peers.png`` into ``config.out``.

    Raises:
        IndexFolderError: No index at ``config.index``. DataError: Bad dataset or one the index does not hold.
        ConfigError, DimensionError: Invalid settings, or infinity named but not installable.
        ServerError: Our server did not start.
    """
    locator = parse_locator(str(config.index))
    if locator.engine != "faiss":
        raise ConfigError(f"mrl bench peers reads the corpus of a folder index, not {locator}; build one: --index PATH")
    version = resolve_version(locator.path)
    manifest = IndexManifest.read(version)
    plan = check_config(config, manifest)
    model = local_model_folder(manifest)
    documents = read_passages(version, manifest)
    dataset_name, queries, qrels, missing = judged_queries(config, documents)
    query_texts = read_query_texts(config.data)
    logs = config.out or Path(tempfile.mkdtemp(prefix="mrl-bench-peers-"))  # server logs
    plan, infinity_python = with_infinity(plan, config, logs)
    probe = vector_probe(list(queries.values()) or query_texts, documents, manifest, plan.dims)
    started_at, started = utc_now(), time.monotonic()
    deadline = started + config.time_limit_s
    full = manifest.model.full_dim
    systems: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mrl-bench-peers-") as scratch:
        work = Path(scratch)
        prepared: list[infinity.PreparedFolder] = []  # one model copy for both engines, made on first use

        def serve_infinity_engine(system: str) -> Any:
            if not prepared:
                onnx = INFINITY_ONNX in plan.peers
                prepared.append(prepare_infinity_model(model, manifest, work / "infinity-model", onnx))
            assert infinity_python is not None  # with_infinity leaves infinity in the plan only with its venv
            return serve_infinity(system, config, infinity_python, prepared[0], work, logs)

        servers: dict[str, Callable[[], Any]] = {
            OURS: lambda: serve_ours(config, manifest, logs),
            OURS_ONNX: lambda: serve_ours(config, manifest, logs, encoder="onnx"),
            SENTENCE_TRANSFORMERS: lambda: serve_sentence_transformers(config, manifest, model, documents, work, logs),
            TXTAI: lambda: serve_txtai(config, manifest, model, documents, work, logs),
            INFINITY_TORCH: lambda: serve_infinity_engine(INFINITY_TORCH),
            INFINITY_ONNX: lambda: serve_infinity_engine(INFINITY_ONNX),
        }
        reference: dict[str, np.ndarray] | None = None  # ours' probe vectors, of the round being measured

        def measure(system: str, first: bool) -> tuple[dict[str, Any], list[CellResult], list[CellResult]]:
            """One fresh server of ``system``: its facts (or why it failed), search cells and embeddings cells."""
            nonlocal reference
            dims = plan.dims if system in (OURS, OURS_ONNX) else [full]
            search: list[CellResult] = []
            embeddings: list[CellResult] = []
            try:
                with servers[system]() as served:
                    if system in INFINITY:
                        details = {"status": "measured", "url": served.base, **served.details}
                    else:
                        judged = (queries, qrels)
                        details, search = measure_system(
                            system, served, dims, judged, query_texts, config, deadline, quality=first
                        )
                    if system in EMBEDDINGS_PATHS:
                        facts, vectors, embeddings = measure_embeddings(
                            system, served.base, probe, reference, query_texts, config, full, deadline
                        )
                        details |= facts
                        reference = vectors if system == OURS else reference
            except (httpx.HTTPError, ValueError) as exc:  # ServerError, DataError and ConfigError are ValueErrors
                if system == OURS:
                    raise
                logger.warning("%s failed: %s", system, exc)
                return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}, [], []
            if system in INFINITY and not details["check"]["passed"]:
                details |= {"status": "failed", "reason": check_failure(details["check"])}
            return details, search, embeddings

        rounds: list[tuple[list[CellResult], list[CellResult]]] = []
        for number in range(1, config.rounds + 1):
            round_search: list[CellResult] = []
            round_embeddings: list[CellResult] = []
            for system in [OURS, *([OURS_ONNX] if config.onnx else []), *plan.peers]:
                if number > 1 and systems[system]["status"] != "measured":
                    continue  # it failed in the first round, which says why
                if config.rounds > 1:
                    logger.info("round %d of %d: %s", number, config.rounds, system)
                details, search, embeddings = measure(system, first=number == 1)
                if number == 1:
                    systems[system] = details
                elif details["status"] != "measured":  # the first round's facts stay; this round's failure is noted
                    systems[system].setdefault("failed_rounds", []).append(
                        {"round": number, "reason": details["reason"]}
                    )
                round_search += search
                round_embeddings += embeddings
            rounds.append((round_search, round_embeddings))
    systems |= {name: {"status": "skipped", "reason": reason} for name, reason in plan.skipped.items()}
    report = {
        "benchmark": "peers",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 2),
        "settings": _settings_dict(config, plan, len(query_texts)),
        "machine": machine_info(),
        "index": _index_dict(version, manifest, model),
        "dataset": {
            "name": dataset_name,
            "split": config.split,
            "num_queries": len(queries),
            "judged_documents_missing_from_index": missing,
        },
        "systems": systems,
        "results": result_rows(median_round([search for search, _ in rounds]), systems, full),
        "embeddings": embedding_rows(median_round([embeddings for _, embeddings in rounds])),
    }
    if config.rounds > 1:
        report["rounds"] = [
            {"round": number, "results": result_rows(search, systems, full), "embeddings": embedding_rows(embeddings)}
            for number, (search, embeddings) in enumerate(rounds, start=1)
        ]
    if config.out is not None:
        write_peers_report(report, config.out)
    return report


def median_round(rounds: list[list[CellResult]]) -> list[CellResult]:
    """Per cell (system, dims, in flight), the round with the median req/s (the lower one of an even count).

    Each row stays one real measurement, its percentiles and throughput from the same requests.
    """
    cells: dict[tuple[Any, ...], list[CellResult]] = {}
    for results in rounds:
        for result in results:
            key = (result.encoder, result.dim, result.rerank_dim, result.concurrency, result.target)
            cells.setdefault(key, []).append(result)
    return [sorted(runs, key=lambda r: r.throughput_rps)[(len(runs) - 1) // 2] for runs in cells.values()]


def write_peers_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``peers.json``, ``peers.md`` and ``peers.png`` in ``folder``, each written atomically."""
    return [*write_report(report, folder, "peers", peers_markdown), plot_peers(report, folder / "peers.png")]


def result_rows(results: list[CellResult], systems: dict[str, dict[str, Any]], full_dim: int) -> list[dict[str, Any]]:
    """One row per cell: its latency figures, its ratios to ours at the full dim, its quality and build time.

    Ratios compare with ours at the full dim and the same concurrency: ``p50_ratio`` above 1 means
    slower than ours, ``rps_ratio`` above 1 means more requests per second than ours.
    """
    reference = {r.concurrency: r for r in results if r.encoder == OURS and r.dim == full_dim}
    rows = []
    for result in results:
        row = asdict(result)
        system = row.pop("encoder")
        quality = systems[system]["quality"].get(str(result.dim), {})
        ours = reference.get(result.concurrency)
        rows.append(
            {
                "system": system,
                **row,
                "cut_short": result.cut_short,
                "p50_ratio": _ratio(result.p50_ms, ours.p50_ms if ours else None),
                "p95_ratio": _ratio(result.p95_ms, ours.p95_ms if ours else None),
                "rps_ratio": _ratio(result.throughput_rps, ours.throughput_rps if ours else None),
                "ndcg@10": quality.get("ndcg@10"),
                "recall@100": quality.get("recall@100"),
                "build_s": systems[system].get("build_s"),
            }
        )
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 3) if value is not None and reference else None


def _settings_dict(config: PeersConfig, plan: Plan, num_query_texts: int) -> dict[str, Any]:
    settings = json_fields(config)
    return {
        **settings,
        "dims": plan.dims,
        "peers": plan.peers,
        "quality_k": QUALITY_K,
        "num_query_texts": num_query_texts,
        "host": LOOPBACK,
    }


def _index_dict(version: Path, manifest: IndexManifest, model: str) -> dict[str, Any]:
    return {
        "path": str(version),
        "version": manifest.version,
        "model": manifest.model.name,
        "model_folder": model,
        "full_dim": manifest.model.full_dim,
        "dims": manifest.dims,
        "num_vectors": manifest.num_vectors,
        "query_prompt": manifest.model.query_prompt,
        "document_prompt": manifest.model.document_prompt,
        "max_seq_length": manifest.model.max_seq_length,
    }


# --- the report ---------------------------------------------------------------------------


def peers_table(report: dict[str, Any]) -> str:
    """One row per (system, dim, concurrency)."""
    header = ["system", "dim", "conc.", "p50 ms", "p95 ms", "p99 ms", "req/s", "errors"]
    header += ["p50 vs ours-full", "req/s vs ours-full", "NDCG@10", "Recall@100", "index build s"]
    lines = [markdown_row(header), markdown_row(["---", *["---:"] * (len(header) - 1)])]
    for row in report["results"]:
        errors = str(row["errors"]) + (f" ({row['sent']} of {row['requested']} sent)" if row["cut_short"] else "")
        cells = [row["system"], str(row["dim"]), str(row["concurrency"])]
        cells += [format_ms(row[name]) for name in ("p50_ms", "p95_ms", "p99_ms")]
        cells += [f"{row['throughput_rps']:.1f}", errors, _times(row["p50_ratio"]), _times(row["rps_ratio"])]
        cells += [_metric(row["ndcg@10"]), _metric(row["recall@100"])]
        cells.append(f"{row['build_s']:.1f}" if row["build_s"] is not None else "–")
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def _times(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def _metric(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


def embeddings_table(report: dict[str, Any]) -> str:
    """One row per (system, concurrency) of the embeddings endpoints."""
    header = ["system", "in flight", "req/s", "p50 ms", "p99 ms", "errors", "req/s ÷ best infinity"]
    lines = [markdown_row(header), markdown_row(["---", *["---:"] * (len(header) - 1)])]
    for row in report.get("embeddings", []):
        errors = str(row["errors"]) + (f" ({row['sent']} of {row['requested']} sent)" if row["cut_short"] else "")
        cells = [row["system"], str(row["concurrency"]), f"{row['throughput_rps']:.1f}"]
        cells += [format_ms(row["p50_ms"]), format_ms(row["p99_ms"]), errors, _times(row["rps_vs_best_infinity"])]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def systems_section(report: dict[str, Any]) -> list[str]:
    """One bullet per system: how it was served and indexed, what its vectors measured, or why it was not measured."""
    lines = []
    for name, system in report["systems"].items():
        if system["status"] != "measured":
            lines.append(f"- **{name}**: {system['status']}: {system['reason']}{_vector_text(system)}")
            continue
        text = f"- **{name}**: {system['served_by']}"
        if "build_s" in system:
            text += f"; index build {system['build_s']:.2f} s ({system['build_note']})"
            quality_errors = sum(q["errors"] + q["not_asked"] for q in system["quality"].values())
            if quality_errors:
                text += f"; {quality_errors} judged queries without an answer (scored 0)"
        if "command" in system:
            text += f"; `{system['command']}` run in a copy of the model folder"
        text += _vector_text(system)
        if system.get("caveat"):
            text += f"; caveat: {system['caveat']}"
        for failed in system.get("failed_rounds", []):
            text += f"; not timed in round {failed['round']}: {failed['reason']}"
        lines.append(text + ".")
    return lines


def _vector_text(system: dict[str, Any]) -> str:
    """What the vector probe measured of a system, as clauses of its bullet (empty when it was not probed)."""
    parts = []
    check = system.get("check")
    if check and check["min_cosine"] is not None:
        parts.append(
            f"vectors vs ours: min cosine {check['min_cosine']:.6f} over {check['queries']} queries "
            f"(at least {check['threshold']} needed)"
        )
    long = system.get("long_input")
    if long and long["cosine"] is not None:
        parts.append(f"the longest passage (first {long['chars']} characters): cosine {long['cosine']:.6f} with ours")
    norm = system.get("norm_at_dim")
    if norm:
        parts.append(
            f"vector norm at `dimensions={norm['dim']}`: {norm['min']:.4f}–{norm['max']:.4f} (mean {norm['mean']:.4f})"
        )
    return "".join(f"; {part}" for part in parts)


def peers_markdown(report: dict[str, Any]) -> str:
    """Title, context, the search table, the embeddings table, how each system was served."""
    settings, machine, index, dataset = report["settings"], report["machine"], report["index"], report["dataset"]
    context = (
        f"Model `{index['model']}`, {index['num_vectors']} passages of index `{index['path']}`, served by each "
        f"system below, one server at a time. Quality: {dataset['num_queries']} judged queries of "
        f"`{dataset['name']}` split `{dataset['split']}`, one `k={settings['quality_k']}` HTTP search each. "
        f"Latency: `GET /search` with k={settings['k']}, {settings['requests']} measured requests per cell after "
        f"{settings['warmup']} warm-up ones. Ratios compare with ours at the full dim and the same concurrency "
        "(p50 above 1×: slower than ours; req/s above 1×: more throughput). Client and servers share one machine: "
        f"{machine['cpus_usable']} CPUs, load average {machine['load_average_1m']} at the start, "
        f"GPU {machine['gpu'] or 'none'}."
    )
    embeddings = (
        "One query per request at the full dim: ours' `POST /v1/embeddings` (`input_type: query`, the manifest's "
        "query prompt applied by the server), infinity's `POST /embeddings` (the same prompt put before the text by "
        f"the client); {settings['requests']} measured requests per cell after {settings['warmup']} warm-up ones, "
        "the same load generator and answer check for all. The last column divides by the faster infinity engine's "
        f"req/s at the same concurrency. Before it is timed, infinity's vectors of {CHECK_QUERIES} queries must have "
        f"a cosine of at least {MIN_COSINE} with ours."
    )
    rounds = report.get("rounds")
    if rounds:
        context += (
            f" Every server was started and timed {len(rounds)} times, in turn (rounds); each row is the round "
            "with the median req/s of its cell, and the last section has every round."
        )
    parts = ["# Peers: the same model and corpus, served side by side", "", context, "", peers_table(report), ""]
    parts += ["## Embeddings endpoints", "", embeddings, "", embeddings_table(report), ""]
    if rounds:
        parts += ["## Rounds", "", ROUNDS_TEXT, "", rounds_table(rounds), ""]
    return "\n".join([*parts, "## Systems", "", *systems_section(report)]) + "\n"


ROUNDS_TEXT = (
    "req/s of each cell in every round, and its ratio in that round: for embeddings, to the faster infinity "
    "engine's; for searches, to ours at the full dim. The lowest ratio is the lead that held in every round."
)


def rounds_table(rounds: list[dict[str, Any]]) -> str:
    """One row per cell: its req/s and its ratio in each round, and the lowest ratio."""
    header = ["endpoint", "system", "dim", "in flight", "req/s per round", "ratio per round", "lowest ratio"]
    lines = [markdown_row(header), markdown_row(["---", "---", "---:", "---:", "---", "---", "---:"])]
    for endpoint, rows_key, ratio_key in (("embeddings", "embeddings", "rps_vs_best_infinity"),
                                          ("search", "results", "rps_ratio")):  # fmt: skip
        cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for number, measured in enumerate(rounds):
            for row in measured[rows_key]:
                key = (row["system"], row.get("dim"), row["concurrency"])
                cells.setdefault(key, [None] * len(rounds))[number] = row
        for (system, dim, concurrency), runs in cells.items():
            rates = [f"{row['throughput_rps']:.1f}" if row else "–" for row in runs]
            ratios = [row[ratio_key] if row else None for row in runs]
            known = [ratio for ratio in ratios if ratio is not None]
            cells_text = [endpoint, system, str(dim) if dim is not None else "–", str(concurrency)]
            cells_text += [" / ".join(rates), " / ".join(_times(ratio) for ratio in ratios)]
            lines.append(markdown_row([*cells_text, _times(min(known)) if known else "–"]))
    return "\n".join(lines)


# --- the plot -----------------------------------------------------------------------------

SYSTEM_COLORS = {OURS: "C0", OURS_ONNX: "C1", SENTENCE_TRANSFORMERS: "C2", TXTAI: "C3"}
SYSTEM_COLORS |= {INFINITY_TORCH: "C4", INFINITY_ONNX: "C5"}


def plot_lines(report: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float, float | None]]]]:
    """The plot's data: per panel row (``embeddings``, ``search``) and line, (in flight, req/s, p50 ms) points.

    A search line is a system at the full dim, or ``system @ dim D`` at a smaller one. Rows without lines are left out.
    """
    full = report["index"]["full_dim"]
    panels: dict[str, dict[str, list[tuple[int, float, float | None]]]] = {"embeddings": {}, "search": {}}
    for row in report.get("embeddings", []):
        panels["embeddings"].setdefault(row["system"], []).append(_point(row))
    for row in report["results"]:
        label = row["system"] if row["dim"] == full else f"{row['system']} @ dim {row['dim']}"
        panels["search"].setdefault(label, []).append(_point(row))
    return {name: {label: sorted(points) for label, points in lines.items()} for name, lines in panels.items() if lines}


def _point(row: dict[str, Any]) -> tuple[int, float, float | None]:
    return row["concurrency"], row["throughput_rps"], row["p50_ms"]


def plot_peers(report: dict[str, Any], path: Path) -> Path:
    """req/s and p50 against requests in flight, one line per system: embeddings on top, search below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_lines(report)
    titles = {"embeddings": "embeddings, one query per POST", "search": f"GET /search, k={report['settings']['k']}"}
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.0 * len(panels)), dpi=110, squeeze=False)
    levels = sorted({level for lines in panels.values() for points in lines.values() for level, _, _ in points})
    for row_axes, (panel, lines) in zip(axes, panels.items(), strict=True):
        for label, points in lines.items():
            system = label.split(" @ ")[0]
            style = {"color": SYSTEM_COLORS.get(system), "marker": "o", "linestyle": "--" if " @ " in label else "-"}
            row_axes[0].plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
            timed = [(level, p50) for level, _, p50 in points if p50 is not None]
            row_axes[1].plot([p[0] for p in timed], [p[1] for p in timed], label=label, **style)
        for axis, measure in zip(row_axes, ("req/s", "p50 ms"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(level) for level in levels])
            axis.set_ylim(bottom=0)
            axis.set_xlabel("requests in flight")
            axis.set_ylabel(measure)
            axis.set_title(f"{measure}: {titles[panel]}")
            axis.grid(alpha=0.3)
        row_axes[0].legend(fontsize="small")
    fig.suptitle(f"One model served side by side: {report['dataset']['name']}, {report['machine']['cpus_usable']} CPUs")
    fig.tight_layout()
    return save_figure(fig, path)


# --- command line -------------------------------------------------------------------------


def add_peers_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``mrl bench peers`` on the ``mrl bench`` sub-commands."""
    from benchmarks.args import DEFAULT_OUT, add_server_limits, int_list_argument, name_list_argument
    from core.cli_args import dims_argument

    p = actions.add_parser(
        "peers",
        help="ours vs txtai vs sentence-transformers+FAISS vs infinity: latency, throughput, quality, build time",
        description="Serve the index's corpus with its model several ways, one server process at a time on "
        "127.0.0.1: `mrl serve` over the index (full dim and smaller dims), txtai's HTTP API, a plain "
        "sentence-transformers + FAISS IndexFlatIP FastAPI app, and infinity-emb's embedding server (torch and "
        "ONNX engines, from a venv of its own created on first use). Report indexing time, NDCG@10 and Recall@100 "
        "of a split's judged queries (k=100 over HTTP), GET /search latency p50/p95/p99 and req/s per "
        "concurrency with ratios to ours at the full dim, and the same for one-query embeddings requests (ours "
        "and infinity, whose vectors must first match ours). Writes peers.json, peers.md and peers.png.",
    )
    p.add_argument("--index", required=True, metavar="PATH", help="a folder index: its corpus, model and prompts")
    p.add_argument("--data", type=Path, required=True, help="BEIR folder: judged queries and query texts")
    p.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N judged queries")
    p.add_argument(
        "--dims", type=dims_argument, default=None, help="our dims besides the full one (default: 64 if indexed)"
    )
    p.add_argument(
        "--peers",
        type=name_list_argument,
        default=None,
        help="txtai, sentence-transformers, infinity-torch, infinity-onnx (default: all; txtai skipped when not "
        "installed, infinity when its venv cannot be created)",
    )
    p.add_argument("--concurrency", type=int_list_argument, default=[1, 16], help="requests in flight (default: 1,16)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per cell (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="hits per latency request (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="every server's device (auto)")
    p.add_argument("--encoder-threads", type=int, default=None, help="every server's torch/OpenMP threads")
    p.add_argument("--workers", type=int, default=None, help="our servers' processes (mrl serve --workers; default 1)")
    p.add_argument(
        "--no-onnx", dest="onnx", action="store_false", help="skip our server with its ONNX encoder (ours-onnx)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start and time every server this many times, in turn; each cell reports its median round "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--peer-venvs",
        type=Path,
        default=DEFAULT_PEER_VENVS,
        help="where the peers' own virtual environments are kept, infinity's created on first use "
        "(default: %(default)s)",
    )
    add_server_limits(p, time_limit_s=1800.0)
    p.add_argument(
        "--build-timeout",
        dest="build_timeout_s",
        metavar="SECONDS",
        type=float,
        default=3600.0,
        help="seconds per peer's corpus indexing (3600)",
    )
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_peers_command)


def run_peers_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    report = run_peers(PeersConfig(**config_fields(args)))
    print(peers_markdown(report), end="")
    print(f"wrote {args.out / 'peers.json'}, {args.out / 'peers.md'}, {args.out / 'peers.png'}")
    return 0
