"""The search engine behind the HTTP layer: one index, and the :class:`~service.embedder.Embedder` of its model.

A :class:`Searcher` is built at start-up: it reads the index manifest, loads the model the
index was built with, refuses the index if the model's fingerprint differs, and opens
every dimension's FAISS index. Queries are encoded once at full dimension (in
micro-batches, off the event loop, by the embedder); each dimension is derived with the
project's only truncation function, ``core.matryoshka.truncate_normalize``.

No FastAPI here: errors are the domain exceptions of :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.quantization import int8_ranges
from index.backends import EngineUnavailable
from index.calibration import K, PseudoQueries
from index.filters import FilterError, SearchFilter, parse_filter
from index.layout import LEASE_TTL_SECONDS
from index.loaded import LoadedIndex
from index.locator import IndexLocator
from index.manifest import IndexFolderError, IndexManifest
from index.plans import (
    JUDGED,
    NOT_MEASURED,
    TRAINING_REPORT,
    JudgedQueries,
    Plan,
    plans_from_report,
    quality_source,
    report_source,
    score_plans,
)
from index.search import staged_search
from index.stores import IndexStore, open_live
from service.embedder import WARM_UP_QUERY, ConfigurationError, Embedder, EncoderLoader, public_name, served_default
from service.encoders import LoadedEncoder, load_encoder
from service.errors import InvalidRequest, NotReady, ReloadFailed, UnknownDimension
from service.limits import RequestLimits
from service.metrics import ServiceMetrics
from service.planner import Choice, LiveLatency, choose
from service.results import (
    DimInfo,
    Hit,
    IndexInfo,
    PlanInfo,
    PlanUsed,
    ReloadOutcome,
    SearchResult,
    ServedModel,
    Timings,
)
from service.settings import ServiceSettings
from service.shadow import Sample, ShadowSampler
from service.slot import IndexSlot
from service.sources import index_source
from service.writes import DocumentWriter

logger = logging.getLogger(__name__)

ENGINE_DOWN = "the index engine did not answer; retry later (the server log has the details)"
WRITABLE_KEEP_VERSIONS = 3  # versions a writable server's compactions keep
MAX_ENCODER_LOSS = 0.005  # /dims warns when the served query encoder loses more NDCG@10 than this at a dim
BOTH_GIVEN = (
    "give either dim (and rerank_dim) or a target (min_quality, latency_budget_ms), not both: the service "
    "chooses dim, rerank_dim and the candidates for a target"
)
NO_QUALITY = (
    "this index has no measured quality, so min_quality cannot be met; rebuild it with `mrl index build` (its "
    "plans are then calibrated on the corpus), or with `--eval-data BEIR_FOLDER` to measure NDCG@10 on judged queries"
)


# --- the searcher -------------------------------------------------------------------------


class Searcher:
    """Search and embed over one index version at a time; built by :meth:`open`, ended by :meth:`close`."""

    def __init__(
        self,
        settings: ServiceSettings,
        loaded_encoder: LoadedEncoder,
        index: LoadedIndex,
        metrics: ServiceMetrics,
        source: IndexStore,
        plans: ServedPlans | None = None,
        writer: DocumentWriter | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.writer = writer  # a writable server's write path; searches then go through its live index
        self.limits = RequestLimits(settings.max_k, settings.max_query_chars, settings.max_batch_queries)
        self.encoder = loaded_encoder
        self.metrics = metrics
        self._slot = IndexSlot(index)
        self.shadow = ShadowSampler(settings.shadow_fraction, settings.shadow_cpu_budget, self._search_full, metrics)
        self._set_plans(plans or ServedPlans.of(index.manifest))
        self._default_dim = _default_dim(settings.default_dim, index.manifest)
        self._reload_lock = asyncio.Lock()
        self._search_lock = threading.Lock()  # for indexes that are not thread-safe (GPU)
        self._lease_refresher: asyncio.Task | None = None
        model = index.manifest.model
        self.embedder = Embedder(
            settings,
            loaded_encoder,
            metrics,
            _served_model(settings, loaded_encoder, index.manifest),
            max_seq_length=model.max_seq_length,
            query_prompt=model.query_prompt,  # the encoder was loaded with it
        )
        self.embedder.calibration = self._int8_ranges
        self._ranges: dict[tuple[str, int], np.ndarray] = {}
        metrics.set_index(_index_sizes(index))
        self._publish_serving(index)

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
        writer = None
        if settings.writable:
            loaded_encoder, writer = await asyncio.to_thread(_load_writable, source, settings, load, metrics)
            index = Borrowed(writer.live.base)
        else:
            loaded_encoder, index = await asyncio.to_thread(_load, source, settings, load)
        try:
            plans = await asyncio.to_thread(served_plans, index, loaded_encoder)
            searcher = cls(settings, loaded_encoder, index, metrics, source, plans, writer)
        except BaseException:
            index.close()
            if writer is not None:
                await asyncio.to_thread(writer.live.close)
            raise
        await searcher.embedder.start()
        searcher.shadow.start()
        if writer is not None:
            writer.on_compacted = searcher._compacted
            writer.start(searcher._compacted)
        searcher._lease_refresher = asyncio.create_task(searcher._refresh_leases(), name="mrl-lease-refresher")
        logger.info(
            "serving %s (%d vectors, dims %s) with %s on %s",
            source.where(index.location),
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
        await self.embedder.close()
        await asyncio.to_thread(self.shadow.close)
        if self.writer is not None:
            await self.writer.close()  # the live index, its base and its lock
        self._slot.close()

    async def check_ready(self) -> None:
        """Raises NotReady if requests cannot be answered: the encoder's worker has stopped, or the engine
        that holds the index (Milvus) does not answer."""
        self.embedder.check_ready()
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
    def metadata_fields(self) -> dict[str, str]:
        """What a filter may name now: the version's fields, and on a writable server those written since."""
        if self.writer is not None:
            with self.writer.live.view() as view:
                return view.metadata_fields
        return self._slot.current.metadata_fields

    @property
    def default_dim(self) -> int:
        return self._default_dim

    @property
    def index_version(self) -> str:
        return self._slot.current.manifest.version

    @property
    def model_name(self) -> str:
        """The model's hub name, or a local model folder's own name (clients never see server paths)."""
        return self.embedder.model_name

    def info(self) -> IndexInfo:
        """Dims served, with cost (index type, bytes, vectors) and measured quality (NDCG@10) of each."""
        manifest = self._slot.current.manifest
        ndcg = _ndcg_by_dim(manifest)
        single = {plan.dim: plan for plan in self._plans.plans if plan.rerank_dim is None}
        judged = {dim: plan.ndcg_at_10 for dim, plan in single.items() if plan.source == JUDGED}
        dims = [
            DimInfo(
                dim=dim,
                index_type=manifest.indexes[dim].factory,
                bytes=manifest.indexes[dim].bytes,
                vectors=manifest.num_vectors,
                ndcg_at_10=ndcg.get(dim),
                ndcg_source=report_source(manifest.evaluation) if ndcg.get(dim) is not None else None,
                recall_at_10=manifest.indexes[dim].recall_at_10,
                search_ms=manifest.indexes[dim].search_ms,
                measured_ndcg_at_10=judged.get(dim),
                agreement_at_10=single[dim].agreement_at_10 if dim in single else None,
            )
            for dim in manifest.dims
        ]
        loss = self._plans.encoder_loss
        warning = None
        if loss is not None and loss > MAX_ENCODER_LOSS:
            warning = (
                f"the {self.encoder.backend} query encoder loses {100 * loss:.2f}% "
                f"{'NDCG@10' if self._plans.kind == JUDGED else 'agreement@10'} at some dim against the "
                f"build's encoder (more than {100 * MAX_ENCODER_LOSS:g}%); /plans has its figures per plan"
            )
        return IndexInfo(
            model=self.model_name,
            index_version=manifest.version,
            encoder=self.encoder.backend,
            full_dim=manifest.model.full_dim,
            default_dim=self._default_dim,
            num_vectors=manifest.num_vectors,
            built_at=manifest.built_at,
            index=public_locator(self.settings.locator()),
            dims=dims,
            encoder_quality_loss=loss,
            encoder_warning=warning,
            quality_kind=self._plans.kind,
            quality_source=self._plans.source,
            metadata_fields=dict(self.metadata_fields),
            passages=manifest.chunking,
            writes=self._write_counts(),
        )

    def _write_counts(self) -> dict[str, Any] | None:
        if self.writer is None:
            return None
        counts = dataclasses.asdict(self.writer.live.counts())
        counts.pop("version", None)
        return counts

    # --- search -------------------------------------------------------------------------
    async def search(
        self,
        queries: Sequence[str],
        dim: int | None,
        k: int,
        rerank_dim: int | None = None,
        *,
        min_quality: float | None = None,
        latency_budget_ms: float | None = None,
        group_by: str | None = None,
        filter: dict[str, Any] | None = None,  # noqa: A002 (the API's name for it)
    ) -> SearchResult:
        """Top ``k`` documents per query at ``dim``; with ``rerank_dim``, two-stage adaptive retrieval.

        With ``group_by="document"``, the best passage of each of ``k`` distinct documents. With ``filter``
        (:mod:`index.filters`), only passages whose document metadata match it, selected before the scan.

        Two-stage: shortlist ``k * rerank_candidates`` documents with the (small, fast) ``dim``
        index, then re-score them exactly with their full vectors truncated to ``rerank_dim``.
        With ``min_quality`` or ``latency_budget_ms`` instead of dims, :mod:`service.planner` chooses the plan.

        Raises:
            InvalidRequest: Bad k or query texts, dims and a target together, or a quality target on an index
                without measured quality. UnknownDimension: ``dim``/``rerank_dim`` not served.
        """
        started = time.perf_counter()
        self.limits.check_texts(queries)
        self.limits.check_k(k)
        choice = self._choose(dim, rerank_dim, min_quality, latency_budget_ms)
        dim, rerank_dim, candidates = choice.plan.dim, choice.plan.rerank_dim, choice.plan.candidates or 1
        dim = self._check_dims(self._slot.current, dim, rerank_dim)  # fail before encoding
        if self.writer is None:
            _checked_filter(self._slot.current, filter)  # and on a bad filter (written fields: checked at search)
        vectors = await self.embedder.encode_queries(list(queries))
        encoded = time.perf_counter()
        # The lease is taken and released in the worker thread, so a cancelled request cannot
        # release it while the thread still searches.
        try:
            version, hits, search_s, rerank_s = await asyncio.to_thread(
                self._search_sync, vectors, dim, k, rerank_dim, candidates, group_by, filter
            )
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
        self._observe_plan(choice, time.perf_counter() - started, search_s + rerank_s)
        if self._plans.has(choice.plan.key) and (rerank_dim is not None or dim < max(self.dims)):
            served = lambda: [[hit.id for hit in query] for query in hits]  # noqa: E731
            self.shadow.offer(lambda: Sample(choice.plan.key, version, vectors, k, group_by, filter, served()))
        return SearchResult(dim, rerank_dim, k, version, hits, timings, _plan_used(choice, self._plans))

    def _choose(
        self, dim: int | None, rerank_dim: int | None, min_quality: float | None, latency_budget_ms: float | None
    ) -> Choice:
        if min_quality is None and latency_budget_ms is None:
            return self._given(dim, rerank_dim)
        if dim is not None or rerank_dim is not None:
            raise InvalidRequest(BOTH_GIVEN)
        plans = self._plans.plans
        if min_quality is not None and not any(plan.ratio is not None for plan in plans):
            raise InvalidRequest(NO_QUALITY)
        choice = choose(plans, self._live, min_quality, latency_budget_ms)
        for target in choice.missed:
            self.metrics.targets_missed.labels(target=target).inc()
        return choice

    def _given(self, dim: int | None, rerank_dim: int | None) -> Choice:
        """The plan a caller named by its dims (the default dim when none), with what was measured of it."""
        index = self._slot.current
        reason = "the dims the request gave" if dim is not None or rerank_dim is not None else "the default dim"
        if dim is None:
            dim = min(index.indexes) if rerank_dim is not None else self._default_dim
        candidates = self.settings.rerank_candidates if rerank_dim is not None else None
        wanted = Plan(dim, rerank_dim, candidates)
        plan = next((p for p in self._plans.plans if p.key == wanted.key), wanted)
        return Choice(plan, self._live.of(plan), reason)

    def _observe_plan(self, choice: Choice, total_s: float, search_s: float) -> None:
        key = choice.plan.key
        if self._plans.has(key):  # a bounded label: the index's plans only
            self._live.observe(key, total_s, search_s)
            self.metrics.plan_requests.labels(plan=key).inc()

    def plans(self) -> list[PlanInfo]:
        """Every plan of the served index with its quality (and its source), live agreement and live latency."""
        result = []
        for plan in self._plans.plans:
            live, samples = self.shadow.live(plan.key)
            result.append(
                PlanInfo(
                    **_plan_fields(plan),
                    ndcg_at_10=plan.ndcg_at_10,
                    recall_at_10=plan.recall_at_10,
                    ratio=plan.ratio,
                    quality_kind=self._plans.kind,
                    quality_source=self._plans.source,
                    agreement_at_10=plan.agreement_at_10,
                    overlap_at_10=plan.overlap_at_10,
                    live_agreement=live,
                    live_agreement_samples=samples,
                    bytes_per_vector=plan.bytes_per_vector,
                    build_search_ms=plan.search_ms,
                    **_latency_fields(self._live.of(plan)),
                )
            )
        return result

    def _set_plans(self, plans: ServedPlans) -> None:
        """Serve ``plans``: fresh live latency and live agreement, and their build-time agreement published."""
        self._plans, self._live = plans, LiveLatency()
        self.shadow.reset()
        self.metrics.set_plans({p.key: p.agreement_at_10 for p in plans.plans if p.agreement_at_10 is not None})

    def _int8_ranges(self, dim: int) -> np.ndarray:
        """Each coordinate's range at ``dim`` over the served version's corpus (a sample), computed once a version."""
        with self._slot.acquire() as index:
            key = (index.manifest.version, dim)
            if key not in self._ranges:
                self._ranges = {k: v for k, v in self._ranges.items() if k[0] == key[0]}  # an older version's: gone
                self._ranges[key] = int8_ranges(index.vectors, dim, count=index.manifest.num_vectors)
            return self._ranges[key]

    def _search_full(self, sample: Sample) -> tuple[str, list[list[str]]]:
        """The shadow's reference: the sample's queries searched at the full dim, single-stage, as a request would."""
        full = max(self.dims)
        version, hits, _, _ = self._search_sync(sample.vectors, full, min(sample.k, K), None, 1, sample.group_by,
                                                sample.filter)  # fmt: skip
        return version, [[hit.id for hit in query] for query in hits]

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
        self,
        vectors: np.ndarray,
        dim: int,
        k: int,
        rerank_dim: int | None,
        candidates: int,
        group_by: str | None,
        filter: dict[str, Any] | None,  # noqa: A002
    ) -> tuple[str, list[list[Hit]], float, float]:
        if self.writer is not None:
            return self._search_live(vectors, dim, k, rerank_dim, candidates, group_by, filter)
        with self._slot.acquire() as index:
            self._check_dims(index, dim, rerank_dim)  # a reload may have changed the dims meanwhile
            where = _checked_filter(index, filter, rows=True)  # and the fields: parsed for the version searched
            dim_index = index.indexes[dim]
            found = staged_search(
                dim_index,
                index.vectors,
                vectors,
                dim,
                k,
                rerank_dim,
                candidates,
                search_lock=None if dim_index.thread_safe else self._search_lock,
                group=_documents_of(index) if group_by == "document" else None,
                where=where,
            )
            hits = self._hits(index, found.scores, found.rows)
            return index.manifest.version, hits, found.search_seconds, found.rerank_seconds

    def _search_live(
        self,
        vectors: np.ndarray,
        dim: int,
        k: int,
        rerank_dim: int | None,
        candidates: int,
        group_by: str | None,
        filter: dict[str, Any] | None,  # noqa: A002
    ) -> tuple[str, list[list[Hit]], float, float]:
        """A writable server's search: the base version and every logged write, as one consistent view."""
        assert self.writer is not None
        with self.writer.live.view() as view:
            try:
                where = view.parse_filter(filter) if filter else None
            except FilterError as exc:
                raise InvalidRequest(str(exc)) from None
            found = view.search(vectors, dim, k, rerank_dim, candidates, where, group_by == "document")
            documents = view.documents(found.rows.ravel().tolist())
            hits = self._hits_of(documents, found.scores, found.rows)
            return view.base.manifest.version, hits, found.search_seconds, found.rerank_seconds

    def _compacted(self, version: str) -> None:
        """After a compaction: serve the new base's manifest (dims, plans, sizes) from the slot."""
        base = self.writer.live.base if self.writer is not None else None
        if base is None or base.manifest.version != version:
            return
        self._slot.swap(Borrowed(base))
        self._set_plans(ServedPlans.of(base.manifest))
        self.metrics.set_index(_index_sizes(base))
        self._publish_serving(base)

    def _hits(self, index: LoadedIndex, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        return self._hits_of(index.store.get(rows.ravel().tolist()), scores, rows)

    def _hits_of(self, documents: list, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        per_query = len(rows[0]) if len(rows) else 0
        result = []
        for number, query_scores in enumerate(scores):
            docs = documents[number * per_query : (number + 1) * per_query]
            result.append(
                [
                    Hit(
                        doc.id,
                        float(score),
                        doc.title,
                        self._snippet(doc.text),
                        dict(doc.metadata),
                        doc.doc_id,
                        *doc.span,
                    )  # fmt: skip
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

    # --- reload -------------------------------------------------------------------------
    def _unavailable(self, exc: EngineUnavailable) -> NotReady:
        """A reload that could not reach the engine: counted, and a 503 to retry (the old version serves on)."""
        logger.warning("reload: %s", exc)
        self.metrics.reloads.labels(outcome="unavailable").inc()
        return NotReady(ENGINE_DOWN)

    async def reload(self) -> ReloadOutcome:
        """Open the newest ``current`` version of the index root and swap it in atomically.

        Searches running on the old version finish on it; it is closed after the last one.

        Raises:
            ReloadFailed: The new version is missing, corrupt, from another model, or lacks the default dim;
                the old version keeps serving.
            NotReady: The engine holding the index did not answer (try again); the old version keeps serving.
        """
        async with self._reload_lock:
            previous = self._slot.current
            try:
                target = await asyncio.to_thread(self.source.current)
            except EngineUnavailable as exc:  # nothing is wrong with the index: try again once the engine answers
                raise self._unavailable(exc) from None
            except IndexFolderError as exc:
                raise self._refused(previous, exc) from exc
            if target == previous.location:  # nothing new: nothing is loaded
                self.metrics.reloads.labels(outcome="unchanged").inc()
                return ReloadOutcome(previous.manifest.version, previous.manifest.version, changed=False)
            try:
                index = await asyncio.to_thread(self._open_index, target)
            except EngineUnavailable as exc:
                raise self._unavailable(exc) from None
            except IndexFolderError as exc:
                raise self._refused(previous, exc) from exc
            except Exception as exc:  # not a known defect of the folder, but still no reason to stop serving
                logger.exception("opening %s failed", target)
                raise self._refused(previous, exc) from exc
            try:
                default_dim = _default_dim(self.settings.default_dim, index.manifest)
                served = _served_model(self.settings, self.encoder, index.manifest)
            except ConfigurationError as exc:
                index.close()
                raise self._refused(previous, exc) from exc
            try:
                plans = await asyncio.to_thread(served_plans, index, self.encoder)
            except Exception as exc:
                index.close()
                raise self._refused(previous, exc) from exc
            self._default_dim, self.embedder.served = default_dim, served
            self._set_plans(plans)
            self._slot.swap(index)
            self.metrics.set_index(_index_sizes(index))
            self._publish_serving(index)
            self.metrics.reloads.labels(outcome="changed").inc()
            logger.info("reloaded: %s -> %s", previous.manifest.version, index.manifest.version)
            return ReloadOutcome(previous.manifest.version, index.manifest.version, changed=True)

    def _publish_serving(self, index: LoadedIndex) -> None:
        model = index.manifest.model
        self.metrics.set_serving(self.model_name, model.fingerprint, str(self.settings.locator()), index.location)

    def _refused(self, previous: LoadedIndex, exc: Exception) -> ReloadFailed:
        self.metrics.reloads.labels(outcome="failed").inc()
        logger.warning("reload refused, still serving %s: %s", previous.manifest.version, exc)
        return ReloadFailed(f"reload refused, still serving {previous.manifest.version}: {exc}")

    def _open_index(self, location: str) -> LoadedIndex:
        return self.source.open(location, device=self.settings.device, expected_fingerprint=self.encoder.fingerprint)


# --- helpers ------------------------------------------------------------------------------


def _load(source: IndexStore, settings: ServiceSettings, load: EncoderLoader) -> tuple[LoadedEncoder, LoadedIndex]:
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


def _load_writable(
    source: IndexStore, settings: ServiceSettings, load: EncoderLoader, metrics: ServiceMetrics
) -> tuple[LoadedEncoder, DocumentWriter]:
    """A writable server's start: the index opened for writes by this process (:func:`index.stores.open_live`),
    the query encoder and the build's document encoder.

    Raises:
        MrlError: Another process writes the index, or it takes no writes (a version folder).
        IndexFolderError: Built with another model.
    """
    live = open_live(source, device=settings.device, keep_versions=WRITABLE_KEEP_VERSIONS)
    try:
        loaded_encoder = load(settings, live.manifest)
        if loaded_encoder.fingerprint != live.manifest.model.fingerprint:
            where = source.where(live.manifest.version)
            raise IndexFolderError(f"{where}: built with another model than the one served")
        _default_dim(settings.default_dim, live.manifest)
        loaded_encoder.encoder.encode_queries([WARM_UP_QUERY])
        writer = DocumentWriter.load(live, settings, metrics)
    except BaseException:
        live.close()
        raise
    return loaded_encoder, writer


class Borrowed:
    """A live index's base as the slot holds it: read for what is served; closing it is the live index's job."""

    def __init__(self, loaded: LoadedIndex) -> None:
        self._loaded = loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loaded, name)

    def close(self) -> None:
        """The live index closes its bases (after their last search)."""


def _default_dim(configured: int | None, manifest: IndexManifest, what: str = "default dim") -> int:
    return served_default(configured, manifest.dims, what)


def _served_model(settings: ServiceSettings, loaded_encoder: LoadedEncoder, manifest: IndexManifest) -> ServedModel:
    """What the embeddings endpoints serve next to this index: its dims, from its model."""
    return ServedModel(
        model=public_name(loaded_encoder.encoder.name),
        dims=sorted(manifest.dims, reverse=True),
        default_dim=_default_dim(settings.embeddings_default_dim, manifest, "embeddings default dim"),
        created=manifest.built_at,
        index_version=manifest.version,
    )


def _ndcg_by_dim(manifest: IndexManifest) -> dict[int, float]:
    by_dim = (manifest.evaluation or {}).get("by_dim") or {}
    result = {}
    for dim, metrics in by_dim.items():
        value = metrics.get("ndcg@10") if isinstance(metrics, dict) else None
        if value is not None:
            result[int(dim)] = float(value)
    return result


class ServedPlans:
    """The plans of the served index, scored for the served query encoder where it is not the build's."""

    def __init__(self, plans: list[Plan], kind: str, source: str, encoder_loss: float | None = None) -> None:
        self.plans = plans
        self.kind = kind  # index.plans.SOURCES: judged, agreement, training report, not measured
        self.source = source  # where their quality comes from, in words
        self.encoder_loss = encoder_loss  # the served encoder's largest quality loss against the build's, if scored
        self._keys = {plan.key for plan in plans}

    def has(self, key: str) -> bool:
        return key in self._keys

    @classmethod
    def of(cls, manifest: IndexManifest) -> ServedPlans:
        """The manifest's plans; without any, the training report's, or one unmeasured plan per dim."""
        plans = [Plan.from_dict(raw) for raw in manifest.plans]
        if not plans:
            per_vector = {dim: entry.bytes / max(1, manifest.num_vectors) for dim, entry in manifest.indexes.items()}
            search_ms = {dim: entry.search_ms for dim, entry in manifest.indexes.items()}
            plans = plans_from_report(manifest.evaluation, manifest.dims, search_ms, per_vector) or [
                Plan(dim, search_ms=search_ms[dim], bytes_per_vector=round(per_vector[dim], 2), source=NOT_MEASURED)
                for dim in sorted(manifest.dims, reverse=True)
            ]
        return cls(plans, *quality_source(manifest, plans))


def served_plans(index: LoadedIndex, loaded_encoder: LoadedEncoder) -> ServedPlans:
    """The index's plans; with judged or pseudo-queries and a query encoder other than torch, scored again with
    its vectors (the served encoder's quality, not the build's)."""
    built = ServedPlans.of(index.manifest)
    manifest = index.manifest
    if loaded_encoder.backend == "torch" or not (manifest.judged_queries or manifest.calibration_queries):
        return built
    judged = JudgedQueries.from_dict(manifest.judged_queries) if manifest.judged_queries else None
    pseudo = PseudoQueries.from_dict(manifest.calibration_queries) if manifest.calibration_queries else None
    ids = lambda rows: [doc.doc_id if doc is not None else "" for doc in index.store.get(rows)]  # noqa: E731
    per_vector = {plan.dim: plan.bytes_per_vector for plan in built.plans if plan.rerank_dim is None}
    grouped = bool((manifest.chunking or {}).get("split_documents"))
    plans = score_plans(
        index.indexes, index.vectors, ids, loaded_encoder.encoder.encode_queries, judged, pseudo, per_vector, grouped
    )
    by_key = {plan.key: _quality(plan) for plan in built.plans if plan.rerank_dim is None and _quality(plan)}
    losses = [1 - _quality(p) / by_key[p.key] for p in plans if p.key in by_key and _quality(p) is not None]
    loss = round(max(losses), 5) if losses else None
    logger.info("plans scored again with the %s query encoder: largest quality loss %s", loaded_encoder.backend, loss)
    kind, source = quality_source(manifest, plans)
    return ServedPlans(plans, kind, f"{source}, queries encoded by the served {loaded_encoder.backend} encoder", loss)


def _quality(plan: Plan) -> float | None:
    """A plan's own quality figure: NDCG@10 where judged, else its agreement."""
    return plan.ndcg_at_10 if plan.ndcg_at_10 is not None else plan.agreement_at_10


def _plan_used(choice: Choice, plans: ServedPlans) -> PlanUsed:
    plan = choice.plan
    reason = choice.reason
    if plans.kind == TRAINING_REPORT and "quality" in reason:  # a quality figure from another dataset
        reason += f"; its quality is from {plans.source}"
    return PlanUsed(
        **_plan_fields(plan),
        expected_ndcg_at_10=plan.ndcg_at_10,
        expected_ratio=plan.ratio,
        quality_kind=plans.kind,
        quality_source=plans.source,
        reason=reason,
        targets_missed=list(choice.missed),
        **(_latency_fields(choice.latency) if choice.latency else {}),
    )


def _plan_fields(plan: Plan) -> dict:
    return {"key": plan.key, "dim": plan.dim, "rerank_dim": plan.rerank_dim, "candidates": plan.candidates}


def _latency_fields(latency) -> dict:
    return {
        "p50_ms": latency.p50_ms,
        "p95_ms": latency.p95_ms,
        "latency_samples": latency.samples,
        "latency_source": latency.source,
    }


def _index_sizes(index: LoadedIndex) -> dict[int, tuple[int, int]]:
    return {dim: (index.indexes[dim].ntotal, index.manifest.indexes[dim].bytes) for dim in index.indexes}


def _checked_filter(index: LoadedIndex, raw: dict[str, Any] | None, rows: bool = False) -> SearchFilter | None:
    """``raw`` checked against ``index``'s metadata fields (``rows``: with the rows it allows, for searching).

    Raises:
        InvalidRequest: What is wrong with the filter and what is allowed (422).
    """
    if not raw:
        return None
    try:
        if rows:
            return index.search_filter(raw)
        parse_filter(raw, index.metadata_fields)
        return None
    except FilterError as exc:
        raise InvalidRequest(str(exc)) from None


def _documents_of(index: LoadedIndex) -> Callable[[list[int]], list[str]]:
    """The document id of each of a list of rows of ``index`` (a passage's, its document's)."""

    def documents(rows: list[int]) -> list[str]:
        return [doc.doc_id if doc is not None else "" for doc in index.store.get(rows)]

    return documents


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def public_locator(locator: IndexLocator) -> str:
    """The served index as clients may see it: a folder by its name (the server's paths stay private, as in
    error bodies), an engine's index by its locator with any password as ``***``."""
    return locator.path.name if locator.path is not None else str(locator)
