"""Compaction: a living index's base and overlay written out as one new folder version.

The new version holds the base's live rows, then the delta's live rows, with their full vectors as they
are (nothing is re-encoded); every dim is rebuilt with the base version's index plans, as ``mrl index add``
does (:func:`index.build.build_dim_indexes`), and published through the store's writer under the root's
:class:`~index.layout.WriterLock`. Its manifest records the write-ahead log ``seq`` it holds up to, in
``history`` (``{"compacted": ..., "wal_seq": ...}``): replay on open starts after it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from core.data import Document
from index.build import build_dim_indexes
from index.chunking import ChunkReport
from index.filters import metadata_fields
from index.layout import new_version_name
from index.manifest import IndexFolderError, IndexManifest
from index.overlay import LiveView
from index.params import IndexPlan
from index.stores import IndexStore

PROBE_SAMPLE = 1000  # probe queries drawn from the vectors when the base kept none


def applied_seq(manifest: IndexManifest) -> int:
    """The write-ahead log ``seq`` a version holds up to: its latest compaction's, or 0 (it applied nothing)."""
    for event in reversed(manifest.history):
        if "wal_seq" in event:
            return int(event["wal_seq"])
    return 0


def live_corpus(view: LiveView) -> tuple[list[Document], np.ndarray, int, int]:
    """The live passages of ``view`` (base rows, then delta rows, in row order), their full vectors, how many
    came from the delta, and how many dead rows were left out."""
    base, overlay = view.base, view.overlay
    rows = overlay.base_live if overlay.base_live is not None else np.arange(view.base_rows)
    delta = np.flatnonzero(~overlay.delta_dead)
    kept = base.store.get(rows.tolist()) if len(rows) else []
    vectors = np.concatenate(
        [np.asarray(base.vectors[rows], dtype=np.float32), overlay.buffers.full[: overlay.count][delta]]
    )
    passages = [*kept, *(overlay.passages[i] for i in delta)]
    return passages, vectors, len(delta), overlay.tombstones


def write_compacted(
    store: IndexStore, view: LiveView, wal_seq: int, keep_versions: int, device: str = "cpu"
) -> IndexManifest:
    """Publish ``view`` (base plus overlay) as the store's new current version, holding the log up to ``wal_seq``.

    Raises:
        IndexFolderError: ``current`` is no longer the view's base (someone wrote past the live lock), or no
            document is left alive (a version cannot be empty). IndexWriteError: a full disk, a read-only root.
    """
    old = view.base.manifest
    with store.writing():
        if store.current() != view.base.location:
            raise IndexFolderError(
                f"{store.where(store.current())}: current is no longer {view.base.location}, which this live index "
                "serves; restart it to serve the new version"
            )
        passages, vectors, merged, dropped = live_corpus(view)
        if not passages:
            raise IndexFolderError(f"{store.where(old.version)}: every document is deleted; nothing to compact into")
        probes = view.base.probe_queries if view.base.probe_queries is not None else _sample(vectors)
        plans = {dim: IndexPlan(old.indexes[dim].factory, old.indexes[dim].search_params) for dim in old.dims}
        writer = store.begin(new_version_name(), keep_versions, device=device)
        try:
            writer.write_corpus(passages, vectors, probes)
            indexes = build_dim_indexes(vectors, probes, old.dims, plans.__getitem__, writer)
            manifest = IndexManifest.from_dict(old.to_dict())
            manifest.version, manifest.num_vectors, manifest.indexes = writer.version, len(vectors), indexes
            manifest.chunking = _chunking(old.chunking, passages)
            manifest.metadata_fields = metadata_fields(passage.metadata for passage in passages)
            manifest.files, manifest.checksums = writer.files()
            manifest.history.append(_event(old, merged, dropped, wal_seq))
            writer.publish(manifest)
        except BaseException:
            writer.abort()
            raise
    return manifest


def _event(old: IndexManifest, merged: int, dropped: int, wal_seq: int) -> dict[str, Any]:
    """The history entry of a compaction; plans (when measured) were measured on the version before the writes."""
    event: dict[str, Any] = {
        "compacted": merged,
        "dropped": dropped,
        "wal_seq": wal_seq,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from": old.version,
    }
    if old.plans:
        earlier = [e["plans_measured_on"] for e in old.history if "plans_measured_on" in e]
        event["plans_measured_on"] = earlier[-1] if earlier else old.version
    return event


def _chunking(was: dict[str, Any] | None, passages: list[Document]) -> dict[str, Any] | None:
    """The chunking report with the documents and passages the compacted version holds."""
    if not was:
        return was
    per_document: dict[str, int] = {}
    for passage in passages:
        per_document[passage.doc_id] = per_document.get(passage.doc_id, 0) + 1
    report = ChunkReport.from_dict(was)
    report.documents, report.passages = len(per_document), len(passages)
    report.split_documents = sum(1 for count in per_document.values() if count > 1)
    return report.to_dict()


def _sample(vectors: np.ndarray) -> np.ndarray:
    rows = np.random.default_rng(0).choice(len(vectors), size=min(PROBE_SAMPLE, len(vectors)), replace=False)
    return vectors[np.sort(rows)]
