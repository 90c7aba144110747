"""Every Prometheus metric of the service, in one registry per app.

A fresh :class:`ServiceMetrics` (with its own ``CollectorRegistry``) is made for each app,
so tests can build many apps in one process. Label values are bounded: endpoints are
route templates, dims are the index's dims, statuses are classes (``2xx``); query text
never becomes a label. The registry also carries the process's own metrics (CPU seconds,
resident memory, open files) and ``mrl_serving_info``, which says which model and index
version this replica serves; counters have no ``_created`` series (noise to every dashboard).

Under ``mrl serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set), every worker writes its samples to
files in that folder and ``/metrics`` reports them added up across the workers: counters and histograms
summed, gauges as their ``multiprocess_mode`` says (live workers only). prometheus-client has no
process metrics in that mode; ``mrl_serving_info`` then carries a ``pid`` label per worker.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "mrl"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
AGREEMENT_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.999)
NO_DIM = "none"
NO_INDEX = "none"  # the index and version of mrl_serving_info when the model is served for embeddings only
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The metrics of one app instance."""

    def __init__(self) -> None:
        disable_created_metrics()  # prometheus_client's switch is process-wide; this process serves one app
        self.registry = CollectorRegistry()
        reg = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._serving: tuple[str, str, str, str] | None = None
        if not self.multiprocess:
            ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, …
        self.serving = Gauge(
            f"{PREFIX}_serving_info",
            "1 for what this replica serves: the model, its fingerprint, the index locator and version",
            ["model", "fingerprint", "index", "version"],
            registry=reg,
            multiprocess_mode="liveall",
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Whole request, from arrival to response",
            ["endpoint", "dim", "status"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.encode_seconds = Histogram(
            f"{PREFIX}_encode_duration_seconds",
            "Query encoding of one request, including the wait for its micro-batch",
            ["dim"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.search_seconds = Histogram(
            f"{PREFIX}_search_duration_seconds",
            "Index search of one request (the shortlist, for two-stage search)",
            ["dim"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.rerank_seconds = Histogram(
            f"{PREFIX}_rerank_duration_seconds",
            "Exact re-scoring of a two-stage search, labelled by the re-scoring dim",
            ["dim"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_encode_batch_size", "Texts per encoder call (micro-batch)", buckets=BATCH_BUCKETS, registry=reg
        )
        self.batch_seconds = Histogram(
            f"{PREFIX}_encode_batch_duration_seconds",
            "One encoder call (micro-batch)",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered", ["endpoint", "status"], registry=reg)
        self.failures = Counter(
            f"{PREFIX}_failures", "Requests answered with an error, by error type", ["type"], registry=reg
        )
        self.query_cache = Counter(
            f"{PREFIX}_query_cache_lookups",
            "Query texts looked up in the query-embedding cache, by result (hit, miss); none while it is off",
            ["result"],
            registry=reg,
        )
        self.plan_requests = Counter(
            f"{PREFIX}_plan_requests",
            "Searches by the plan that answered them (64, or 64>384x10 for two-stage; the index's plans only)",
            ["plan"],
            registry=reg,
        )
        self.targets_missed = Counter(
            f"{PREFIX}_targets_missed",
            "Searches whose quality or latency target no plan could meet (the closest plan answered)",
            ["target"],
            registry=reg,
        )
        self.plan_agreement = Histogram(
            f"{PREFIX}_plan_agreement",
            "Live agreement@10 of a reduced plan's hits with a full-dim search of the same sampled query (1: same "
            "hits in the same order)",
            ["plan"],
            buckets=AGREEMENT_BUCKETS,
            registry=reg,
        )
        self.plan_build_agreement = Gauge(
            f"{PREFIX}_plan_build_agreement",
            "A plan's agreement@10 with the full dim measured at build time (pseudo-queries from the corpus)",
            ["plan"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.shadow_samples = Counter(
            f"{PREFIX}_shadow_samples",
            "Sampled searches by outcome: compared, dropped_queue, dropped_budget, dropped_reloaded, failed",
            ["outcome"],
            registry=reg,
        )
        self.reloads = Counter(f"{PREFIX}_index_reloads", "Index reloads, by outcome", ["outcome"], registry=reg)
        self.queued_texts = Gauge(
            f"{PREFIX}_encode_queue_texts", "Texts waiting for the encoder", registry=reg, multiprocess_mode="livesum"
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being answered now", registry=reg, multiprocess_mode="livesum"
        )
        live_max = {"registry": reg, "multiprocess_mode": "livemax"}
        self.index_vectors = Gauge(f"{PREFIX}_index_vectors", "Vectors in the served index", ["dim"], **live_max)
        self.index_bytes = Gauge(f"{PREFIX}_index_bytes", "Size of the served index file", ["dim"], **live_max)
        # the write path (a writable server only)
        self.writes = Counter(
            f"{PREFIX}_document_writes",
            "Document write requests, by operation (upsert, delete) and outcome (written, refused, failed)",
            ["operation", "outcome"],
            registry=reg,
        )
        self.write_seconds = Histogram(
            f"{PREFIX}_document_write_duration_seconds",
            "One write request: chunking, encoding, the logged write",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.unmerged_passages = Gauge(
            f"{PREFIX}_unmerged_passages", "Written passages not yet compacted into a version", **live_max
        )
        self.wal_bytes = Gauge(f"{PREFIX}_write_log_bytes", "Size of the index's write-ahead log", **live_max)
        self.compactions = Counter(f"{PREFIX}_compactions", "Compactions, by outcome", ["outcome"], registry=reg)
        self.compaction_seconds = Histogram(
            f"{PREFIX}_compaction_duration_seconds",
            "One compaction of the write log into a new version",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=reg,
        )

    def set_index(self, sizes: dict[int, tuple[int, int]]) -> None:
        """Publish the served index: ``{dim: (vectors, bytes)}``; dims no longer served are dropped."""
        self.index_vectors.clear()
        self.index_bytes.clear()
        for dim, (vectors, size) in sizes.items():
            self.index_vectors.labels(dim=str(dim)).set(vectors)
            self.index_bytes.labels(dim=str(dim)).set(size)

    def set_plans(self, build_agreement: dict[str, float]) -> None:
        """Publish the served plans' build-time agreement (plans without one have no series)."""
        self.plan_build_agreement.clear()
        for plan, value in build_agreement.items():
            self.plan_build_agreement.labels(plan=plan).set(value)

    def set_serving(self, model: str, fingerprint: str, index: str, version: str) -> None:
        """Publish what is served now (one series: the previous version's goes; across workers, it stays at 0,
        since a worker's samples cannot be removed from its metric file)."""
        if self._serving is not None:
            self.serving.labels(*self._serving).set(0)
        self.serving.clear()
        self._serving = (model, fingerprint, index, version)
        self.serving.labels(*self._serving).set(1)

    def observe_request(self, endpoint: str, dim: str, status: int, seconds: float) -> None:
        status_class = f"{status // 100}xx"
        self.request_seconds.labels(endpoint=endpoint, dim=dim, status=status_class).observe(seconds)
        self.requests.labels(endpoint=endpoint, status=status_class).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric of this app (of every worker's, added up, under --workers)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
