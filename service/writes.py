"""Document writes over HTTP: read, chunk and encode as ``mrl index build`` does, then write durably.

A writable server (``writable``) owns its folder index through an :class:`index.live.LiveIndex`: every
write is in the index's write-ahead log (fsynced) before it is answered and is searchable at once on
this server; compaction folds the log into a new version in the background. Documents are chunked
with the version's chunking settings and the model's own tokenizer, and encoded by the build's
document encoder at full precision (the sentence-transformers model the manifest names, whatever
query encoder serves searches), so a document written over HTTP has exactly the vectors a rebuild
would give it. Writes are serialised (one at a time, off the event loop); searches never wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from core.data import Document
from core.errors import MrlError
from core.models import Encoder, SentenceTransformerEncoder, load_model, model_fingerprint
from index.backends import EngineUnavailable
from index.chunking import ChunkReport, ChunkSettings, chunk_documents, model_window
from index.filters import FilterError
from index.live import InvalidWrite, LiveIndex, WriteResult
from index.manifest import IndexFolderError, IndexWriteError
from service.errors import InvalidRequest, NotReady, WriteFailed
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

COMPACT_CHECK_S = 5.0  # how often the background task asks whether to compact
COMPACT_BACKOFF_S = 60.0  # after a failed compaction
ENGINE_WRITE_DOWN = "the index engine did not answer; retry the write (it is applied whole or not at all)"


@dataclass(frozen=True)
class Written:
    """What a write did, as the API answers it."""

    result: WriteResult
    version: str
    unmerged_passages: int


class DocumentWriter:
    """The write path of one writable server: the live index, the document encoder, compaction."""

    def __init__(
        self, live: LiveIndex | Any, settings: ServiceSettings, metrics: ServiceMetrics, model: Any, encoder: Encoder
    ) -> None:
        """``model``: what chunking reads of the model (tokenizer, window, prompts); ``encoder``: its documents."""
        self.live = live
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self.encoder = encoder
        manifest = live.manifest
        report = ChunkReport.from_dict(manifest.chunking) if manifest.chunking else None
        self.chunking = ChunkSettings(report.size if report else None, report.overlap if report else 32)
        self.window = model_window(model)
        self._lock = asyncio.Lock()
        self.on_compacted = None  # what the searcher does after a compaction (set once it serves)
        self._compactor: asyncio.Task | None = None
        self._failed_at: float | None = None

    @classmethod
    def load(cls, live: LiveIndex, settings: ServiceSettings, metrics: ServiceMetrics) -> DocumentWriter:
        """Load the build's document encoder (blocking: call it from a worker thread) and check its fingerprint.

        Raises:
            IndexFolderError: The model that loads is not the one the index was built with.
        """
        manifest = live.manifest
        model = load_model(
            settings.model or manifest.model.name,
            max_seq_length=manifest.model.max_seq_length,
            query_prompt=manifest.model.query_prompt,
            document_prompt=manifest.model.document_prompt,
            device=None if settings.device == "auto" else settings.device.replace("gpu", "cuda"),
        )
        if model_fingerprint(model) != manifest.model.fingerprint:
            raise IndexFolderError("the document encoder is not the model the index was built with")
        return cls(live, settings, metrics, model, SentenceTransformerEncoder(model, manifest.model.name, 32, False))

    # --- writes ---------------------------------------------------------------------------
    async def upsert(self, documents: list[Document]) -> Written:
        """Write ``documents`` (a known id replaces the document and all its passages).

        Raises:
            InvalidRequest: A write the index cannot take. WriteFailed: The log could not be written.
        """
        return await self._write("upsert", lambda: self._upsert(documents))

    async def delete(self, ids: list[str]) -> Written:
        return await self._write("delete", lambda: self.live.delete(ids))

    async def delete_where(self, raw_filter: dict[str, Any]) -> Written:
        """Delete every live document whose metadata match ``raw_filter``."""

        def delete() -> WriteResult:
            with self.live.view() as view:
                parsed = view.parse_filter(raw_filter)
                ids = view.matching_documents(parsed) if parsed is not None else []
            return self.live.delete(ids) if ids else WriteResult(None, [], 0)

        return await self._write("delete", delete)

    def _upsert(self, documents: list[Document]) -> WriteResult:
        prompt = self.model.prompts.get("document", "")
        passages, _ = chunk_documents(documents, self.model.tokenizer, self.window, self.chunking, prompt)
        vectors = self.encoder.encode_documents([passage.passage for passage in passages])
        return self.live.upsert(passages, vectors)

    async def _write(self, operation: str, action) -> Written:
        async with self._lock:
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(action)
            except (InvalidWrite, FilterError) as exc:
                self.metrics.writes.labels(operation=operation, outcome="refused").inc()
                raise InvalidRequest(str(exc)) from None
            except IndexWriteError as exc:
                self.metrics.writes.labels(operation=operation, outcome="failed").inc()
                logger.error("write not logged: %s", exc)
                raise WriteFailed(f"the write could not be logged ({exc}); nothing of it was applied") from None
            except EngineUnavailable as exc:  # Milvus did not answer: the writer finishes or undoes it next time
                self.metrics.writes.labels(operation=operation, outcome="failed").inc()
                logger.warning("write failed: %s", exc)
                raise NotReady(ENGINE_WRITE_DOWN) from None
            self.metrics.writes.labels(operation=operation, outcome="written").inc()
            self.metrics.write_seconds.labels(operation=operation).observe(time.perf_counter() - started)
            return Written(result, self.live.manifest.version, self._observe_counts())

    def _observe_counts(self) -> int:
        """The unmerged passages and the log's size, into the gauges (cheap: no count of the whole corpus)."""
        unmerged, log_bytes = self.live.unmerged()
        self.metrics.unmerged_passages.set(unmerged)
        self.metrics.wal_bytes.set(log_bytes)
        return unmerged

    # --- compaction -----------------------------------------------------------------------
    def start(self, on_compacted) -> None:
        """Compact in the background past ``compact_max_unmerged`` passages or ``compact_max_age_s``;
        ``on_compacted(version)`` is called (on the event loop) after each compaction."""
        self._compactor = asyncio.create_task(self._compact_when_due(on_compacted), name="mrl-compactor")

    async def _compact_when_due(self, on_compacted) -> None:
        while True:
            await asyncio.sleep(COMPACT_CHECK_S)
            if self._failed_at is not None and time.monotonic() - self._failed_at < COMPACT_BACKOFF_S:
                continue
            due = self.live.should_compact(self.settings.compact_max_unmerged, self.settings.compact_max_age_s)
            if due:
                await self.compact(on_compacted)

    async def compact(self, on_compacted=None) -> str | None:
        """Fold the log into a new version now; the version, or None if it failed (logged; writes go on)."""
        async with self._lock:
            started = time.perf_counter()
            try:
                version = await asyncio.to_thread(self.live.compact)
            except (MrlError, OSError) as exc:
                self._failed_at = time.monotonic()
                self.metrics.compactions.labels(outcome="failed").inc()
                logger.error("compaction failed (writes are kept in the log): %s", exc)
                return None
            self._failed_at = None
            self.metrics.compactions.labels(outcome="done").inc()
            self.metrics.compaction_seconds.observe(time.perf_counter() - started)
            self._observe_counts()
            logger.info("compacted into %s in %.1f s", version, time.perf_counter() - started)
        if on_compacted is not None:
            on_compacted(version)
        return version

    async def close(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
            try:
                await self._compactor
            except asyncio.CancelledError:
                pass
        async with self._lock:
            await asyncio.to_thread(self.live.close)
