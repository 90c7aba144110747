"""``mrl index build`` and ``mrl index add``: encode once, one index per dimension.

The corpus is encoded a single time at full dimension and kept (``vectors.npy``, or the
engine's document collection); every dimension's index is built from it with
:func:`truncate_normalize`, the same function the evaluation and the query path use. Where
a version goes is a :class:`VersionWriter`: a folder of FAISS files (:class:`FolderWriter`,
the default) or an index kept in Milvus (:class:`index.milvus_store.MilvusVersionWriter`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.data import DataError, Document, load_beir, load_queries
from core.errors import ConfigError
from core.files import load_npy
from core.matryoshka import truncate_normalize, validate_dims
from core.metrics import exact_top_k, neighbour_recall
from core.models import (
    DEFAULT_MODEL,
    Encoder,
    SentenceTransformerEncoder,
    encoder_pool,
    load_model,
    model_dims,
    model_fingerprint,
    read_model_card,
)
from core.readers import FieldMap, read_corpus
from index.backends import Device, VectorIndex
from index.calibration import DEFAULT_KIND, DEFAULT_QUERIES, KINDS, PseudoQueries, draw_pseudo_queries
from index.chunking import DEFAULT_OVERLAP, ChunkReport, ChunkSettings, chunk_documents, model_window
from index.filters import metadata_fields
from index.layout import (
    new_version_name,
    writing,
)
from index.locator import LOCATOR_FORMS, IndexLocator, parse_locator
from index.manifest import (
    DimIndex,
    IndexFolderError,
    IndexManifest,
    ModelInfo,
)
from index.params import IndexPlan, choose_index, search_params_for
from index.plans import JudgedQueries, plans_from_report, score_plans
from index.stores import IndexStore, VersionWriter, open_store

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from index.loaded import LoadedIndex

logger = logging.getLogger(__name__)

ENCODE_CHUNK = 4096
PROBE_QUERIES = 1000
RECALL_K = 10


BackendName = Literal["faiss", "milvus"]
DEFAULT_CACHE = Path("~/.cache/mrl/encode-cache")


@dataclass
class BuildConfig:
    """Everything ``mrl index build`` can be told.

    ``index`` is the locator of the index that gets the new version (:mod:`index.locator`): a folder,
    or an index in Milvus (credentials from ``MRL_MILVUS_TOKEN`` or ``MRL_MILVUS_USER`` and
    ``MRL_MILVUS_PASSWORD``). The old spelling (``output``, or ``backend="milvus"`` with ``milvus_uri``
    and ``index_name``) still works for one release. Vectors encoded so far are cached by content
    (see :func:`encode_cache_root`).
    """

    data: Path
    # the locator: a folder, milvus://HOST:PORT/NAME or milvus-lite://FILE.db/NAME; or one already parsed (which may
    # hold what its text may not: the credentials or path of an old-style Milvus URI)
    index: IndexLocator | str | None = None
    output: Path | None = None  # the old spelling of a folder locator
    model: str | None = None
    dims: list[int] | None = None
    index_type: str | None = None
    memory_budget_mb: int = 4096
    device: Device = "auto"
    batch_size: int = 64
    max_seq_length: int | None = None
    keep_versions: int = 3
    progress: bool = True
    backend: BackendName = "faiss"
    milvus_uri: str | None = None
    index_name: str | None = None
    cache_dir: Path | None = None
    eval_data: Path | None = None  # BEIR folder whose judged queries score every plan (index.plans)
    eval_split: str = "test"
    calibration: str = DEFAULT_KIND  # pseudo-queries for label-free agreement (index.calibration); "none": skip
    calibration_queries: int = DEFAULT_QUERIES
    workers: int = 1  # processes that encode the corpus: one per GPU, or CPU processes
    chunk_size: int | None = None  # tokens per passage (index.chunking): None, the model's window; 0, off
    chunk_overlap: int = DEFAULT_OVERLAP
    fields: FieldMap | None = None  # which record fields are id, text, title, metadata (default: BEIR's)

    def locator(self) -> IndexLocator:
        """Where the new version goes: ``index`` (a locator), or the old spelling (``output``; ``backend="milvus"``
        with ``milvus_uri`` and ``index_name``).

        Raises:
            ConfigError: Unless the options name exactly one place to write to.
        """
        old_milvus = self.backend == "milvus" or self.milvus_uri or self.index_name
        given = [name for name, value in (("--index", self.index), ("--output", self.output)) if value is not None]
        if old_milvus:
            if given:
                raise ConfigError("name the index once: --index milvus://HOST:PORT/NAME (not with --output)")
            if self.backend != "milvus" or not self.milvus_uri or not self.index_name:
                raise ConfigError("--backend milvus needs --milvus-uri (a .db file or http://host:19530) and --index")
            return IndexLocator.milvus(self.milvus_uri, self.index_name)
        if self.backend not in ("faiss", "milvus"):
            raise ConfigError(f"unknown backend {self.backend!r}; use faiss or milvus")
        if len(given) != 1:
            raise ConfigError(
                f"--index is required: {LOCATOR_FORMS}" if not given else "name the index once: --index or --output"
            )
        if isinstance(self.index, IndexLocator):
            return self.index
        return parse_locator(self.index) if self.index is not None else IndexLocator.folder(self.output)

    def check(self) -> None:
        """Raises ConfigError unless the options name one place to write to and a known calibration."""
        self.locator()
        if self.calibration not in (*KINDS, "none"):
            raise ConfigError(f"--calibration {self.calibration!r} is not one of {', '.join((*KINDS, 'none'))}")
        if self.calibration_queries < 1:
            raise ConfigError(f"--calibration-queries must be at least 1, got {self.calibration_queries}")


def read_documents(path: Path, fields: FieldMap | None = None) -> tuple[list[Document], list[str]]:
    """Documents (:func:`core.readers.read_corpus`), and from a BEIR folder up to 1000 query texts used to
    measure recall."""
    documents = read_corpus(path, fields)
    queries = []
    if path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file():
        queries = list(load_queries(path / "queries.jsonl").values())[:PROBE_QUERIES]
    return documents, queries


def encode_cache_key(documents: list[Document], fingerprint: str, model: SentenceTransformer) -> str:
    """The encode cache's folder name: a SHA-256 of everything that decides the vectors.

    The documents' content (ids, titles, texts, in order) is hashed rather than their
    file's path or count, so a corpus edited in place is never served stale vectors;
    the model's fingerprint, prompts and sequence length, and the chunk size (the cache
    holds one file per chunk), complete the key.
    """
    digest = hashlib.sha256()
    settings = {
        "fingerprint": fingerprint,
        "prompts": dict(sorted(model.prompts.items())),
        "max_seq_length": model.max_seq_length,
        "chunk": ENCODE_CHUNK,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for document in documents:
        # One JSON array per document keeps field boundaries unambiguous ("a"+"bc" is not "ab"+"c").
        digest.update(json.dumps([document.id, document.title, document.text]).encode() + b"\n")
    return digest.hexdigest()[:32]


def encode_documents(encoder: Encoder, documents: list[Document], cache: Path | None = None) -> np.ndarray:
    """Full-dimension vectors in chunks; with ``cache``, finished chunks survive a restart."""
    parts = []
    for number, start in enumerate(range(0, len(documents), ENCODE_CHUNK)):
        chunk = documents[start : start + ENCODE_CHUNK]
        cached = cache / f"chunk_{number:05d}_{len(chunk)}.npy" if cache else None
        if cached and cached.is_file():
            parts.append(load_npy(cached))
            continue
        logger.info("encoding documents %d-%d of %d", start + 1, start + len(chunk), len(documents))
        vectors = encoder.encode_documents([d.passage for d in chunk])
        if cached:  # written aside, then renamed: builds sharing a cache never read a partial chunk
            partial = cached.with_name(f".{cached.stem}.{os.getpid()}.{secrets.token_hex(4)}.npy")
            with writing(cached):
                np.save(partial, vectors)
                partial.replace(cached)
        parts.append(vectors)
    return np.concatenate(parts).astype(np.float32, copy=False)


def encode_probes(encoder: Encoder, texts: list[str], cache: Path) -> np.ndarray:
    """Query texts (the recall probes, judged and pseudo-queries) as vectors, kept in the build's encode cache
    beside the documents' (the cache folder is already keyed by the model), so a rebuild encodes none again."""
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    cached = cache / f"probes_{digest}.npy"
    if cached.is_file():
        return load_npy(cached)
    probes = encoder.encode_queries(texts)
    partial = cached.with_name(f".{cached.stem}.{os.getpid()}.{secrets.token_hex(4)}.npy")
    with writing(cached):
        np.save(partial, probes)
        partial.replace(cached)
    return probes


def measure_recall(index: VectorIndex, vectors: np.ndarray, probes: np.ndarray, k: int = RECALL_K) -> float:
    """Recall@k of an approximate index against exact search, over the probe queries."""
    _, found = index.search(probes, k)
    return round(neighbour_recall(found, exact_top_k(probes, vectors, k)), 4)


def measure_search_ms(index: VectorIndex, probes: np.ndarray, k: int = RECALL_K, count: int = 200) -> float:
    """Mean wall time of one single-query search (k=10), over up to ``count`` probe queries, in ms."""
    queries = probes[:count]
    index.search(queries[:1], k)  # warm-up
    started = time.perf_counter()
    for row in range(len(queries)):
        index.search(queries[row : row + 1], k)
    return round(1000 * (time.perf_counter() - started) / max(len(queries), 1), 4)


def describe_index(
    index: VectorIndex,
    dim: int,
    vectors: np.ndarray,
    probes: np.ndarray,
    stored: tuple[str, int],
    build_seconds: float,
) -> DimIndex:
    """Measure one dimension's index, kept as ``stored`` (name, bytes): recall (if approximate), search time."""
    reduced_probes = truncate_normalize(probes, dim)
    description = index.describe()
    entry = DimIndex(
        factory=description["factory"],
        file=stored[0],
        bytes=stored[1],
        build_seconds=round(build_seconds, 3),
        search_params=dict(description["search_params"]),
        recall_at_10=None if description["factory"] == "Flat" else measure_recall(index, vectors, reduced_probes),
        search_ms=measure_search_ms(index, reduced_probes),
        backend=description["backend"],
    )
    recall = "" if entry.recall_at_10 is None else f", recall@10 {entry.recall_at_10:.3f}"
    logger.info(
        "dim %d: %s, %d vectors, built in %.2f s, %.3f ms/query%s",
        dim,
        entry.factory,
        index.ntotal,
        build_seconds,
        entry.search_ms,
        recall,
    )
    return entry


def build_dim_indexes(
    vectors: np.ndarray,
    probes: np.ndarray,
    dims: list[int],
    plan_for: Callable[[int], IndexPlan],
    writer: VersionWriter,
    indexes: dict[int, VectorIndex] | None = None,
) -> dict[int, DimIndex]:
    """Per dimension: truncate + normalise and build; then store and measure each.

    ``indexes``, when given, receives every dim's built index (to score plans on).

    Every dim is built before the first is stored, so that an engine can finish them side by side
    (a Milvus server takes seconds to seal and index a collection, however small); the builder
    then holds every dim's index at once, as the service does. A dim's ``build_seconds`` is the
    time spent in its build and in waiting for it to be stored; an engine's dims overlap, so their
    sum exceeds the build's wall time.
    """
    built = {}
    for dim in dims:
        started = time.perf_counter()
        index = writer.build(dim, truncate_normalize(vectors, dim), plan_for(dim))
        built[dim] = (index, time.perf_counter() - started)
    result = {}
    for dim, (index, build_seconds) in built.items():
        started = time.perf_counter()
        stored = writer.keep(index, dim)  # an engine's index is ready (sealed) when this returns
        seconds = build_seconds + time.perf_counter() - started
        result[dim] = describe_index(index, dim, truncate_normalize(vectors, dim), probes, stored, seconds)
    if indexes is not None:
        indexes.update((dim, index) for dim, (index, _) in built.items())
    return result


def library_versions() -> dict[str, str]:
    import faiss
    import sentence_transformers
    import torch

    from core import __version__

    return {
        "mrl": __version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "python": platform.python_version(),
    }


def build_index(config: BuildConfig) -> tuple[Path | str, IndexManifest]:
    """Build a new index version where ``config`` says and make it live.

    Returns:
        The version folder (FAISS), or the locator and the version (an engine); and the manifest.

    Raises:
        ConfigError: Options that name no place to write. DataError: Bad corpus file.
        ModelError: Model cannot be loaded. DimensionError: Dims that do not fit the model.
        EngineUnavailable: Milvus cannot be reached.
    """
    config.check()
    locator = config.locator()
    chunking = ChunkSettings(config.chunk_size, config.chunk_overlap)
    documents, query_texts = read_documents(config.data, config.fields)
    judged = read_judged_queries(config.eval_data, config.eval_split, documents) if config.eval_data else None
    model = load_model(config.model, max_seq_length=config.max_seq_length)
    encoder = SentenceTransformerEncoder(model, config.model or "default", config.batch_size, config.progress)
    dims = validate_dims(config.dims, encoder.dimension) if config.dims else model_dims(model, config.model)
    fingerprint = model_fingerprint(model)
    passages, report = split_for(model, documents, chunking)
    store = open_store(locator)
    try:
        return _build_into(store, config, passages, report, query_texts, judged, model, encoder, dims, fingerprint)
    finally:
        store.close()


def split_for(model: SentenceTransformer, documents: list[Document], settings: ChunkSettings):
    """``documents`` as the passages ``model`` reads whole (:mod:`index.chunking`), and the report of it."""
    prompt = model.prompts.get("document", "")
    return chunk_documents(documents, model.tokenizer, model_window(model), settings, prompt)


def document_ids(passages: list[Document]) -> Callable[[list[int]], list[str]]:
    """The document id of each row, for plans scored (and hits grouped) by document."""
    return lambda rows: [passages[row].doc_id for row in rows]


def _build_into(
    store: IndexStore,
    config: BuildConfig,
    documents: list[Document],
    report: ChunkReport,
    query_texts: list[str],
    judged: JudgedQueries | None,
    model: SentenceTransformer,
    encoder: SentenceTransformerEncoder,
    dims: list[int],
    fingerprint: str,
) -> tuple[Path | str, IndexManifest]:
    """``build_index`` once the store is open: encode (or read the cache), build every dim, publish."""
    store.check_no_live_writer()  # a writable server owns the index: its writes go through its API
    store.prepare()  # an engine that does not answer, or a read-only version folder: fail before encoding
    version = new_version_name()

    key = encode_cache_key(documents, fingerprint, model)
    cache = encode_cache_root(config, store) / key
    started = time.perf_counter()
    with writing(cache):
        cache.mkdir(parents=True, exist_ok=True)
    with encoder_pool(encoder, config.workers) as pooled:
        vectors = encode_documents(pooled, documents, cache)
    probes = encode_probes(encoder, query_texts, cache) if query_texts else _sample_rows(vectors, PROBE_QUERIES)
    encode_seconds = time.perf_counter() - started

    budget = config.memory_budget_mb << 20

    def plan_for(dim: int) -> IndexPlan:
        if config.index_type:
            return IndexPlan(config.index_type, search_params_for(config.index_type))
        return choose_index(len(vectors), dim, budget)

    writer = store.begin(version, config.keep_versions, device=config.device)
    try:
        writer.write_corpus(documents, vectors, probes)
        built: dict[int, VectorIndex] = {}
        indexes = build_dim_indexes(vectors, probes, dims, plan_for, writer, built)
        card = read_model_card(config.model) if config.model and Path(config.model).is_dir() else None
        evaluation = (card.extra or {}).get("evaluation") if card else None
        per_vector = {dim: indexes[dim].bytes / max(1, len(vectors)) for dim in dims}
        pseudo = (
            draw_pseudo_queries(documents, config.calibration_queries, config.calibration)
            if config.calibration != "none"
            else None
        )
        ids, grouped = document_ids(documents), report.split_documents > 0
        queries_of = lambda texts: encode_probes(encoder, texts, cache)  # noqa: E731 - cached: a rebuild encodes none
        plans = score_plans(built, vectors, ids, queries_of, judged, pseudo, per_vector, grouped)
        if not plans:
            plans = plans_from_report(evaluation, dims, {d: indexes[d].search_ms for d in dims}, per_vector)
        files, checksums = writer.files()
        manifest = IndexManifest(
            version=version,
            model=model_info(model, config.model, fingerprint, encoder.dimension),
            dims=dims,
            num_vectors=len(vectors),
            indexes=indexes,
            files=files,
            checksums=checksums,
            encode_seconds=round(encode_seconds, 2),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source=str(config.data),
            library_versions=library_versions(),
            evaluation=evaluation,
            plans=[plan.to_dict() for plan in plans],
            judged_queries=judged.to_dict() if judged is not None else None,
            calibration_queries=pseudo.to_dict() if pseudo is not None and pseudo.ids else None,
            chunking=report.to_dict(),
            metadata_fields=metadata_fields(document.metadata for document in documents),
        )
        final = writer.publish(manifest)
    except BaseException:
        writer.abort()
        raise
    if report.over_window:
        logger.warning("%s", report.describe())
    if config.cache_dir is None:  # the build's own cache has done its work; a cache named by the user is kept
        shutil.rmtree(store.cache_dir() or cache, ignore_errors=True)  # the index's own whole, else our entry
    return final, manifest


def _grown(was: ChunkReport | None, added: ChunkReport) -> ChunkReport:
    """The chunking report of a version that holds ``was``'s documents and ``added``'s."""
    if was is None:
        return added
    return ChunkReport(
        size=was.size,
        overlap=was.overlap,
        window=was.window,
        documents=was.documents + added.documents,
        passages=was.passages + added.passages,
        split_documents=was.split_documents + added.split_documents,
        over_window=was.over_window + added.over_window,
    )


def encode_cache_root(config: BuildConfig, store: IndexStore) -> Path:
    """Where a build keeps the vectors it has encoded, by content key: ``--cache-dir`` if given (kept, so a
    rebuild of the same texts with the same model encodes nothing), else the index's own cache
    (:meth:`~index.stores.IndexStore.cache_dir`: a folder's ``.encode-cache``) or, for an index with no
    folder, ``~/.cache/mrl/encode-cache``; cleared after a successful build."""
    if config.cache_dir is not None:
        return config.cache_dir.expanduser()
    return store.cache_dir() or DEFAULT_CACHE.expanduser()


def read_judged_queries(folder: Path, split: str, documents: list[Document]) -> JudgedQueries:
    """The judged queries of ``split`` in the BEIR folder ``folder``, to score the plans of an index of ``documents``.

    Raises:
        DataError: A bad folder or split, no judged query, or none of the judged documents in the corpus.
    """
    dataset = load_beir(folder, [split])
    qrels = {qid: docs for qid, docs in dataset.split(split).items() if any(s > 0 for s in docs.values())}
    if not qrels:
        raise DataError(folder, f"split {split!r} judges no query relevant to any document")
    judged_docs = {doc for docs in qrels.values() for doc, score in docs.items() if score > 0}
    missing = len(judged_docs - {document.id for document in documents})
    if missing == len(judged_docs):
        raise DataError(folder, f"none of the documents judged in split {split!r} are in the corpus being indexed")
    if missing:
        logger.warning("%d of %d judged documents are not in the corpus; they count as not found", missing,
                       len(judged_docs))  # fmt: skip
    ids = list(qrels)
    return JudgedQueries(ids, [dataset.queries[qid] for qid in ids], qrels, f"{folder} ({split})")


def model_info(model: SentenceTransformer, name: str | None, fingerprint: str, full_dim: int) -> ModelInfo:
    """What a manifest records of the model that encoded the corpus (``name`` as the builder was given it)."""
    return ModelInfo(
        name=_model_name(name),
        fingerprint=fingerprint,
        full_dim=full_dim,
        query_prompt=model.prompts.get("query", ""),
        document_prompt=model.prompts.get("document", ""),
        max_seq_length=model.max_seq_length,
    )


def _model_name(model: str | None) -> str:
    """How the manifest names the model: an absolute path for a local folder, so it resolves from anywhere."""
    if model is None:
        return DEFAULT_MODEL
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _sample_rows(vectors: np.ndarray, count: int) -> np.ndarray:
    rows = np.random.default_rng(0).choice(len(vectors), size=min(count, len(vectors)), replace=False)
    return vectors[np.sort(rows)]


def add_documents(
    index: IndexLocator | Path | str,
    data: Path,
    model_name: str | None = None,
    *,
    batch_size: int = 64,
    device: Device = "auto",
    keep_versions: int = 3,
    progress: bool = True,
    fields: FieldMap | None = None,
) -> tuple[Path | str, IndexManifest]:
    """Publish a new version of ``index`` with ``data``'s documents appended; old documents are not re-encoded.

    Works on every store: the new version holds the current one's documents and full vectors plus the
    new ones, every dim rebuilt from them with the current version's index plans, and goes live through
    the store's writer as a build does (the old version is pruned as after a build). A folder's writers
    exclude each other from reading ``current`` to publishing, so a concurrent add or build waits.

    Args:
        index: A locator, or a folder path.
        fields: Which record fields of ``data`` are id, text, title and metadata (default: BEIR's).

    Raises:
        IndexFolderError: No index there, or a model other than the one that built it.
        DataError: Bad documents, or ids that are already indexed. EngineUnavailable: the engine does not answer.
    """
    locator = index if isinstance(index, IndexLocator) else parse_locator(str(index))
    store = open_store(locator)
    try:
        with store.writing():
            store.check_no_live_writer()
            current = store.open(store.current(), device=device)
            try:
                return _append_version(
                    store, current, data, fields, model_name, batch_size, progress, keep_versions, device
                )
            finally:
                current.close()
    finally:
        store.close()


def _append_version(
    store: IndexStore,
    current: LoadedIndex,
    data: Path,
    fields: FieldMap | None,
    model_name: str | None,
    batch_size: int,
    progress: bool,
    keep_versions: int,
    device: Device,
) -> tuple[Path | str, IndexManifest]:
    """``add_documents`` once the store's writers are excluded and its current version is open."""
    old = current.manifest
    model = load_model(
        model_name or old.model.name,
        max_seq_length=old.model.max_seq_length,
        query_prompt=old.model.query_prompt,
        document_prompt=old.model.document_prompt,
    )
    if model_fingerprint(model) != old.model.fingerprint:
        where = store.where(current.location)
        raise IndexFolderError(f"{where}: built with another model than {model_name or old.model.name!r}")
    documents, _ = read_documents(data, fields)
    rows = current.rows()  # not only 0 .. num_vectors - 1: a version in Milvus may have taken live writes
    kept = current.store.get(rows)
    existing = {document.doc_id for document in kept}
    clashes = [d.id for d in documents if d.id in existing]
    if clashes:
        raise DataError(data, f"{len(clashes)} document ids are already indexed (first: {clashes[0]!r})")
    was = ChunkReport.from_dict(old.chunking) if old.chunking else None
    documents, report = split_for(model, documents, ChunkSettings(was.size if was else 0, was.overlap if was else 0))
    encoder = SentenceTransformerEncoder(model, old.model.name, batch_size, progress)
    started = time.perf_counter()
    added = encode_documents(encoder, documents)
    encode_seconds = time.perf_counter() - started
    vectors = np.concatenate([np.asarray(current.vectors[rows], dtype=np.float32), added])
    everything = [*kept, *documents]
    probes = current.probe_queries if current.probe_queries is not None else _sample_rows(vectors, PROBE_QUERIES)
    plans = {dim: IndexPlan(old.indexes[dim].factory, old.indexes[dim].search_params) for dim in old.dims}

    writer = store.begin(new_version_name(), keep_versions, device=device)
    try:
        writer.write_corpus(everything, vectors, probes)
        built: dict[int, VectorIndex] = {}
        indexes = build_dim_indexes(vectors, probes, old.dims, plans.__getitem__, writer, built)
        manifest = IndexManifest.from_dict(old.to_dict())
        manifest.version, manifest.num_vectors, manifest.indexes = writer.version, len(vectors), indexes
        if old.judged_queries or old.calibration_queries:  # the plans' quality changes with the corpus: score again
            judged = JudgedQueries.from_dict(old.judged_queries) if old.judged_queries else None
            pseudo = None
            if old.calibration_queries:  # drawn again, the same way, from the grown corpus
                drawn = PseudoQueries.from_dict(old.calibration_queries)
                pseudo = draw_pseudo_queries(everything, len(drawn.ids), drawn.kind, drawn.held_out)
                manifest.calibration_queries = pseudo.to_dict()
            per_vector = {dim: indexes[dim].bytes / len(vectors) for dim in indexes}
            grouped = any(passage.parent is not None for passage in everything)
            ids = document_ids(everything)
            scored = score_plans(built, vectors, ids, encoder.encode_queries, judged, pseudo, per_vector, grouped)
            manifest.plans = [plan.to_dict() for plan in scored]
        manifest.chunking = _grown(was, report).to_dict()
        manifest.metadata_fields = metadata_fields(document.metadata for document in everything)
        manifest.files, manifest.checksums = writer.files()
        manifest.history.append(
            {
                "added": len(documents),
                "source": str(data),
                "encode_seconds": round(encode_seconds, 2),
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "from": old.version,
            }
        )
        final = writer.publish(manifest)
    except BaseException:
        writer.abort()
        raise
    return final, manifest
