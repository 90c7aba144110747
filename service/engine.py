"""The search engine behind the HTTP layer: one index, one query encoder, micro-batched encoding.

A :class:`Searcher` is built at start-up: it reads the index manifest, loads the model the
index was built with, refuses the index if the model's fingerprint differs, and opens
every dimension's FAISS index. Queries are encoded once at full dimension (in
micro-batches, off the event loop); each dimension is derived with the project's only
truncation function, ``core.matryoshka.truncate_normalize``.

No FastAPI here: errors are the domain exceptions of :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from index.backends import EngineUnavailable
from index.layout import LEASE_TTL_SECONDS
from index.loaded import IndexSource, LoadedIndex
from index.manifest import IndexFolderError, IndexManifest
from index.search import staged_search
from service.batching import MicroBatcher, TextKind
from service.cache import QueryCache
from service.encoders import LoadedEncoder, load_encoder
from service.errors import InvalidRequest, NotReady, ReloadFailed, UnknownDimension
from service.limits import RequestLimits
from service.metrics import ServiceMetrics
from service.results import (
    DimInfo,
    EmbeddingResult,
    Hit,
    IndexInfo,
    ReloadOutcome,
    SearchResult,
    Timings,
)
from service.settings import ServiceSettings
from service.slot import IndexSlot
from service.sources import index_source

logger = logging.getLogger(__name__)

EncoderLoader = Callable[[ServiceSettings, IndexManifest], LoadedEncoder]
WARM_UP_QUERY = "warm-up query"
CHARS_PER_TOKEN = 4  # about, for English with WordPiece or SentencePiece; texts are cut at the model's limit
DEFAULT_MAX_TOKENS = 512
ENGINE_DOWN = "the index engine did not answer; retry later (the server log has the details)"


class ConfigurationError(ConfigError):
    """The settings do not fit the index (e.g. a default dimension it does not have)."""


# --- the searcher -------------------------------------------------------------------------


class Searcher:
    """Search and embed over one index version at a time; built by :meth:`open`, ended by :meth:`close`."""

    def __init__(
        self,
        settings: ServiceSettings,
        loaded_encoder: LoadedEncoder,
        index: LoadedIndex,
        metrics: ServiceMetrics,
        source: IndexSource,
    ) -> None:
        self.settings = settings
        self.source = source
        self.limits = RequestLimits(settings.max_k, settings.max_query_chars, settings.max_batch_queries)
        self.encoder = loaded_encoder
        self.metrics = metrics
        self._slot = IndexSlot(index)
        self._default_dim = _default_dim(settings.default_dim, index.manifest)
        self._reload_lock = asyncio.Lock()
        self._search_lock = threading.Lock()  # for indexes that are not thread-safe (GPU)
        self._lease_refresher: asyncio.Task | None = None
        longest = index.manifest.model.max_seq_length or DEFAULT_MAX_TOKENS
        self._batcher = MicroBatcher(
            self._encode_batch,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            on_batch=metrics.observe_batch,
            max_tokens=settings.batch_max_tokens,
            cost=lambda text: min(len(text) // CHARS_PER_TOKEN + 2, longest),  # before tokenizing: an estimate
        )
        self._query_prompt = index.manifest.model.query_prompt  # the encoder was loaded with it
        size = settings.query_cache_size
        self._query_cache = QueryCache(size, metrics.query_cache) if size else None
        metrics.set_index(_index_sizes(index))
        metrics.queued_texts.set_function(lambda: self._batcher.pending)

    # --- life cycle ---------------------------------------------------------------------
    @classmethod
    async def open(
        cls, settings: ServiceSettings, metrics: ServiceMetrics, load: EncoderLoader = load_encoder
    ) -> Searcher:
        """Load model and index (in a worker thread), check they belong together, start the batcher.

        Raises:
            IndexFolderError: Missing or corrupt index, or one built with another model.
            ModelError: The model cannot be loaded. ConfigurationError: Settings that do not fit the index.
        """
        source = index_source(settings)
        loaded_encoder, index = await asyncio.to_thread(_load, source, settings, load)
        try:
            searcher = cls(settings, loaded_encoder, index, metrics, source)
        except BaseException:
            index.close()
            raise
        await searcher._batcher.start()
        searcher._lease_refresher = asyncio.create_task(searcher._refresh_leases(), name="mrl-lease-refresher")
        logger.info(
            "serving %s (%d vectors, dims %s) with %s on %s",
            index.path,
            index.manifest.num_vectors,
            index.dims,
            loaded_encoder.encoder.name,
            loaded_encoder.backend,
        )
        return searcher

    async def close(self) -> None:
        """Stop encoding; the index closes (and its lease ends) once the searches still running are done."""
        if self._lease_refresher is not None:
            self._lease_refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_refresher
        await self._batcher.stop()
        self._slot.close()

    async def check_ready(self) -> None:
        """Raises NotReady if requests cannot be answered: the encoder's worker has stopped, or the engine
        that holds the index (Milvus) does not answer."""
        if not self._batcher.alive:
            raise NotReady("the encoder stopped; the server log says why; restart the service")
        try:
            await asyncio.to_thread(self._slot.current.check_health)
        except EngineUnavailable as exc:
            logger.warning("not ready: %s", exc)
            raise NotReady(ENGINE_DOWN) from None

    async def _refresh_leases(self) -> None:
        """Keep the served version's lease fresh, for builds that run on other hosts over the same folder."""
        while True:
            await asyncio.sleep(LEASE_TTL_SECONDS / 5)
            lease = self._slot.current.lease
            if lease is not None:
                await asyncio.to_thread(lease.refresh)

    # --- what is served -----------------------------------------------------------------
    @property
    def dims(self) -> list[int]:
        return self._slot.current.dims

    @property
    def default_dim(self) -> int:
        return self._default_dim

    @property
    def index_version(self) -> str:
        return self._slot.current.manifest.version

    @property
    def model_name(self) -> str:
        """The model's hub name, or a local model folder's own name (clients never see server paths)."""
        name = self.encoder.encoder.name
        return Path(name).name if Path(name).is_absolute() else name

    def info(self) -> IndexInfo:
        """Dims served, with cost (index type, bytes, vectors) and measured quality (NDCG@10) of each."""
        manifest = self._slot.current.manifest
        ndcg = _ndcg_by_dim(manifest)
        dims = [
            DimInfo(
                dim=dim,
                index_type=manifest.indexes[dim].factory,
                bytes=manifest.indexes[dim].bytes,
                vectors=manifest.num_vectors,
                ndcg_at_10=ndcg.get(dim),
                recall_at_10=manifest.indexes[dim].recall_at_10,
                search_ms=manifest.indexes[dim].search_ms,
            )
            for dim in manifest.dims
        ]
        return IndexInfo(
            model=self.model_name,
            index_version=manifest.version,
            encoder=self.encoder.backend,
            full_dim=manifest.model.full_dim,
            default_dim=self._default_dim,
            num_vectors=manifest.num_vectors,
            built_at=manifest.built_at,
            dims=dims,
        )

    # --- search -------------------------------------------------------------------------
    async def search(
        self, queries: Sequence[str], dim: int | None, k: int, rerank_dim: int | None = None
    ) -> SearchResult:
        """Top ``k`` documents per query at ``dim``; with ``rerank_dim``, two-stage adaptive retrieval.

        Two-stage: shortlist ``k * rerank_candidates`` documents with the (small, fast) ``dim``
        index, then re-score them exactly with their full vectors truncated to ``rerank_dim``.

        Raises:
            InvalidRequest: Bad k or query texts. UnknownDimension: ``dim``/``rerank_dim`` not served.
        """
        started = time.perf_counter()
        self.limits.check_texts(queries)
        self.limits.check_k(k)
        dim = self._check_dims(self._slot.current, dim, rerank_dim)  # fail before encoding
        vectors = await self._encode_queries(list(queries))
        encoded = time.perf_counter()
        # The lease is taken and released in the worker thread, so a cancelled request cannot
        # release it while the thread still searches.
        try:
            version, hits, search_s, rerank_s = await asyncio.to_thread(self._search_sync, vectors, dim, k, rerank_dim)
        except EngineUnavailable as exc:  # Milvus down or slow: 503, and the requests after it too, until it answers
            logger.warning("search failed: %s", exc)
            raise NotReady(ENGINE_DOWN) from None
        timings = Timings(
            encode_ms=_ms(encoded - started),
            search_ms=_ms(search_s),
            rerank_ms=_ms(rerank_s),
            total_ms=_ms(time.perf_counter() - started),
        )
        self._observe_stages(dim, rerank_dim, encoded - started, search_s, rerank_s)
        return SearchResult(dim, rerank_dim, k, version, hits, timings)

    async def _encode_queries(self, texts: list[str]) -> np.ndarray:
        if self._query_cache is None:
            return await self._batcher.encode(texts, "query")
        prompt = self._query_prompt
        encode = lambda missing: self._batcher.encode(missing, "query")  # noqa: E731
        return await self._query_cache.encode(texts, self.encoder.fingerprint, prompt, encode)

    def _check_dims(self, index: LoadedIndex, dim: int | None, rerank_dim: int | None) -> int:
        if dim is None:  # two-stage search shortlists at the smallest dim unless told otherwise
            dim = min(index.indexes) if rerank_dim is not None else self._default_dim
        if dim not in index.indexes:
            raise UnknownDimension(dim, index.dims)
        if rerank_dim is not None:
            if rerank_dim not in index.dims:
                raise UnknownDimension(rerank_dim, index.dims, what="rerank_dim")
            if rerank_dim <= dim:
                raise InvalidRequest(f"rerank_dim must be larger than dim ({dim}), got {rerank_dim}")
        return dim

    def _search_sync(
        self, vectors: np.ndarray, dim: int, k: int, rerank_dim: int | None
    ) -> tuple[str, list[list[Hit]], float, float]:
        with self._slot.acquire() as index:
            self._check_dims(index, dim, rerank_dim)  # a reload may have changed the dims meanwhile
            dim_index = index.indexes[dim]
            found = staged_search(
                dim_index,
                index.vectors,
                vectors,
                dim,
                k,
                rerank_dim,
                self.settings.rerank_candidates,
                search_lock=None if dim_index.thread_safe else self._search_lock,
            )
            hits = self._hits(index, found.scores, found.rows)
            return index.manifest.version, hits, found.search_seconds, found.rerank_seconds

    def _hits(self, index: LoadedIndex, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        documents = index.store.get(rows.ravel().tolist())
        per_query = len(rows[0]) if len(rows) else 0
        result = []
        for number, query_scores in enumerate(scores):
            docs = documents[number * per_query : (number + 1) * per_query]
            result.append(
                [
                    Hit(doc.id, float(score), doc.title, self._snippet(doc.text), dict(doc.metadata))
                    for score, doc in zip(query_scores, docs, strict=True)
                    if doc is not None
                ]
            )
        return result

    def _snippet(self, text: str) -> str:
        limit = self.settings.snippet_chars
        return text if not limit or len(text) <= limit else text[:limit].rstrip() + "…"

    def _observe_stages(
        self, dim: int, rerank_dim: int | None, encode_s: float, search_s: float, rerank_s: float
    ) -> None:
        label = str(dim)
        self.metrics.encode_seconds.labels(dim=label).observe(encode_s)
        self.metrics.search_seconds.labels(dim=label).observe(search_s)
        if rerank_dim:
            self.metrics.rerank_seconds.labels(dim=str(rerank_dim)).observe(rerank_s)

    # --- embeddings ---------------------------------------------------------------------
    async def embed(
        self, texts: Sequence[str], dimensions: int | None = None, kind: TextKind = "document"
    ) -> EmbeddingResult:
        """Unit-length embeddings of ``texts`` at ``dimensions`` (default: full), truncated then re-normalised.

        Raises:
            InvalidRequest: Bad texts. UnknownDimension: ``dimensions`` is not a Matryoshka dim of the index.
        """
        self.limits.check_texts(texts, what="input")
        allowed = self.dims
        dim = max(allowed) if dimensions is None else dimensions
        if dim not in allowed:
            raise UnknownDimension(dim, allowed, what="dimensions")
        started = time.perf_counter()
        vectors, tokens = await self._batcher.encode_counted(list(texts), kind)
        self.metrics.encode_seconds.labels(dim=str(dim)).observe(time.perf_counter() - started)
        if tokens is None:  # an encoder that does not count as it tokenizes: a second pass
            # On the encoder's thread: a fast tokenizer used from two threads at once can pad one call with the
            # other's settings ("Unable to create tensor ... activate truncation and/or padding").
            tokens = await self._batcher.run_on_encoder_thread(self.encoder.encoder.count_tokens, list(texts))
        return EmbeddingResult(truncate_normalize(vectors, dim), dim, self.model_name, tokens)

    def _encode_batch(self, texts: list[str], kind: TextKind) -> np.ndarray | tuple[np.ndarray, list[int]]:
        """Vectors of ``texts``, with their token counts when the encoder noted them while tokenizing."""
        encoder = self.encoder.encoder
        vectors = encoder.encode_queries(texts) if kind == "query" else encoder.encode_documents(texts)
        counts = getattr(encoder, "last_token_counts", None)
        return (vectors, counts) if counts is not None and len(counts) == len(texts) else vectors

    # --- reload -------------------------------------------------------------------------
    async def reload(self) -> ReloadOutcome:
        """Open the newest ``current`` version of the index root and swap it in atomically.

        Searches running on the old version finish on it; it is closed after the last one.

        Raises:
            ReloadFailed: The new version is missing, corrupt, from another model, or lacks the default dim;
                the old version keeps serving.
        """
        async with self._reload_lock:
            previous = self._slot.current
            try:
                target = await asyncio.to_thread(self.source.current)
            except IndexFolderError as exc:
                raise self._refused(previous, exc) from exc
            if target == previous.location:  # nothing new: nothing is loaded
                self.metrics.reloads.labels(outcome="unchanged").inc()
                return ReloadOutcome(previous.manifest.version, previous.manifest.version, changed=False)
            try:
                index = await asyncio.to_thread(self._open_index, target)
            except IndexFolderError as exc:
                raise self._refused(previous, exc) from exc
            except Exception as exc:  # not a known defect of the folder, but still no reason to stop serving
                logger.exception("opening %s failed", target)
                raise self._refused(previous, exc) from exc
            try:
                default_dim = _default_dim(self.settings.default_dim, index.manifest)
            except ConfigurationError as exc:
                index.close()
                raise self._refused(previous, exc) from exc
            self._default_dim = default_dim
            self._slot.swap(index)
            self.metrics.set_index(_index_sizes(index))
            self.metrics.reloads.labels(outcome="changed").inc()
            logger.info("reloaded: %s -> %s", previous.manifest.version, index.manifest.version)
            return ReloadOutcome(previous.manifest.version, index.manifest.version, changed=True)

    def _refused(self, previous: LoadedIndex, exc: Exception) -> ReloadFailed:
        self.metrics.reloads.labels(outcome="failed").inc()
        logger.warning("reload refused, still serving %s: %s", previous.manifest.version, exc)
        return ReloadFailed(f"reload refused, still serving {previous.manifest.version}: {exc}")

    def _open_index(self, location: str) -> LoadedIndex:
        return self.source.open(location, device=self.settings.device, expected_fingerprint=self.encoder.fingerprint)


# --- helpers ------------------------------------------------------------------------------


def _load(source: IndexSource, settings: ServiceSettings, load: EncoderLoader) -> tuple[LoadedEncoder, LoadedIndex]:
    location = source.current()
    manifest = source.manifest(location)
    loaded_encoder = load(settings, manifest)
    index = source.open(location, device=settings.device, expected_fingerprint=loaded_encoder.fingerprint)
    try:
        _default_dim(settings.default_dim, index.manifest)
        loaded_encoder.encoder.encode_queries([WARM_UP_QUERY])  # the first call is slow; pay it before serving
    except BaseException:
        index.close()
        raise
    return loaded_encoder, index


def _default_dim(configured: int | None, manifest: IndexManifest) -> int:
    if configured is None:
        return max(manifest.dims)
    if configured not in manifest.dims:
        raise ConfigurationError(f"default dim {configured} is not served by this index (it has {manifest.dims})")
    return configured


def _ndcg_by_dim(manifest: IndexManifest) -> dict[int, float]:
    by_dim = (manifest.evaluation or {}).get("by_dim") or {}
    result = {}
    for dim, metrics in by_dim.items():
        value = metrics.get("ndcg@10") if isinstance(metrics, dict) else None
        if value is not None:
            result[int(dim)] = float(value)
    return result


def _index_sizes(index: LoadedIndex) -> dict[int, tuple[int, int]]:
    return {dim: (index.indexes[dim].ntotal, index.manifest.indexes[dim].bytes) for dim in index.indexes}


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)
