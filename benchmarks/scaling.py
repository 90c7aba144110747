"""Search time against corpus size and Matryoshka dimension, on a large seeded synthetic corpus.

No model and no index folder are needed: the corpus is drawn from a mixture of Gaussian
clusters whose per-coordinate spread decays with the coordinate's position (so, as in a
Matryoshka embedding, the leading coordinates carry most of the signal), L2-normalised at
the full dimension. Every dimension is derived from it with ``truncate_normalize``; the
queries are perturbed corpus vectors. The largest corpus is generated once and each smaller
size is its first rows (rows are independent, so a prefix is a smaller sample of the same
distribution) and every query's source row is in every size.

For each (size, dim) and each index kind, built through the index-backend contract
(``index.backends``, the ``faiss-cpu`` backend) with an explicit FAISS thread count:
build time, search time per query with all queries in one batch and with one query per
call (p50), recall@k against exact search at the same dim, and the bytes of the vectors.
The machine's memory bandwidth is measured in the same run: a flat search must read every
vector, so ``bytes ÷ bandwidth`` is a lower bound for one exact query, and the measured
time divided by it shows how close FAISS comes (batching can go below it: one pass over
the vectors serves many queries).

Only one index and one dimension's vectors are held at a time, added in chunks, so the
peak memory is about the full-dimension corpus plus one index (1M × 384: about 3 GB).
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import format_ms, machine_info, markdown_row, save_figure, utc_now, write_report
from core.errors import ConfigError
from core.files import json_fields
from core.machine import usable_cpus
from core.matryoshka import DimensionError, default_dims, truncate_normalize
from core.metrics import neighbour_recall
from index.backends import VectorIndex, faiss_threads, get_backend, set_faiss_threads
from index.params import HNSW_EF_CONSTRUCTION, HNSW_M, IndexPlan, flat_bytes, ivf_lists, search_params_for

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
DEFAULT_FULL_DIM = 384
COMPARED_DIM = 64  # the "dim 64 vs full dim" flat speed-up; the smallest dim when 64 is not a smaller measured dim
# Synthetic data: clusters, coordinate j's spread ∝ (j + 1) ** -DECAY, points around their centre
# with SPREAD times the centres' spread, queries = corpus vectors plus noise of norm QUERY_NOISE.
SYNTHETIC_CLUSTERS = 1024
COORDINATE_DECAY = 0.5
CLUSTER_SPREAD = 0.75
QUERY_NOISE = 0.5
CHUNK_ROWS = 65_536  # generation and index.add work in chunks: no second full-size copy of the corpus
# IVF k-means is the costly step (points × lists × dim × iterations): it is trained on a seeded
# sample of IVF_TRAIN_PER_LIST points per list (FAISS warns below 39) for IVF_KMEANS_ITERATIONS
# rounds (FAISS's IVF default, set explicitly since the report states it), which keeps 1M vectors
# to minutes on a small CPU.
IVF_TRAIN_PER_LIST = 64
IVF_KMEANS_ITERATIONS = 10
# HNSW32 inserts ~1-2k vectors/s per core at 384 dims: 1M vectors would take tens of minutes per dim.
HNSW_MAX_SIZE = 200_000
BATCHED_REPEATS = 3  # the batched search is timed as the best of this many calls
BANDWIDTH_BYTES = 256 * 2**20  # far above any CPU cache
BANDWIDTH_REPEATS = 5
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class ScalingConfig:
    """What ``mrl bench scaling`` can be told."""

    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    dims: list[int] | None = None  # default: the index's dims, else the Matryoshka dims of full_dim
    full_dim: int | None = None  # default: the index's full dim, else 384
    index: Path | None = None  # only its manifest is read, for the full dim and the dims
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    queries: int = 200
    single_queries: int = 50  # the first N queries are also searched one per call
    k: int = 10
    nprobe: int | None = None  # default: index.params.search_params_for, at most the list count
    hnsw_max_size: int = HNSW_MAX_SIZE
    threads: int | None = None  # default: every CPU this process may use
    seed: int = 0
    device: str = "cpu"  # gpu: the faiss-gpu backend (HNSW stays on the CPU, as in the service)
    out: Path | None = None
    bandwidth_bytes: int = BANDWIDTH_BYTES


@dataclass
class CellResult:
    """One index kind at one (size, dim)."""

    size: int
    dim: int
    kind: str
    factory: str
    search_params: dict[str, int]
    build_s: float  # train + add
    train_s: float | None  # IVF k-means only
    vector_bytes: int  # size × dim × 4
    batched_ms_per_query: float  # all queries in one search call, divided by their number
    single_p50_ms: float  # one query per call
    single_mean_ms: float
    recall_at_k: float  # against flat at the same (size, dim); 1.0 for flat itself
    scan_bound_ms: float | None = None  # flat only: vector_bytes ÷ read bandwidth
    batched_to_bound: float | None = None
    single_to_bound: float | None = None


@dataclass
class Timing:
    """Search results of the batched call, and the three times of one index."""

    ids: np.ndarray
    batched_ms_per_query: float
    single_p50_ms: float
    single_mean_ms: float


# --- configuration ------------------------------------------------------------------------


def check_config(config: ScalingConfig) -> tuple[int, list[int]]:
    """Validate ``config`` before any data is made; return the full dim and the dims (largest first).

    Raises:
        ConfigError: A size or count that is not positive, an unknown or missing index kind, or a
            --full-dim that contradicts --index. DimensionError: A dim above the full dim.
        IndexFolderError: An --index without a readable manifest.
    """
    if not config.sizes or min(config.sizes) < 1:
        raise ConfigError(f"--sizes must list positive numbers, got {config.sizes}")
    positive = {"--queries": config.queries, "--single-queries": config.single_queries, "--k": config.k}
    positive |= {"--hnsw-max-size": config.hnsw_max_size, "--full-dim": config.full_dim}
    positive |= {"--threads": config.threads, "--nprobe": config.nprobe}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.k > min(config.sizes):
        raise ConfigError(f"--k {config.k} is more than the smallest size {min(config.sizes)}")
    unknown = [kind for kind in config.kinds if kind not in KINDS]
    if unknown:
        raise ConfigError(f"unknown index kinds {unknown} (choose from {', '.join(KINDS)})")
    if "flat" not in config.kinds:
        raise ConfigError("--kinds must include flat: it is the exact reference for recall")
    if config.device not in ("cpu", "gpu"):
        raise ConfigError(f"unknown device {config.device!r} (choose from cpu, gpu)")
    if config.device == "gpu" and not get_backend("faiss-gpu").available():
        raise ConfigError("--device gpu: FAISS sees no GPU here (install faiss-gpu on a machine with one)")
    full_dim, index_dims = _full_dim(config)
    dims = sorted(set(config.dims or index_dims or default_dims(full_dim)), reverse=True)
    bad = [dim for dim in dims if not 1 <= dim <= full_dim]
    if bad:
        raise DimensionError(f"dims {bad} are not between 1 and the full dimension {full_dim}")
    return full_dim, dims


def _full_dim(config: ScalingConfig) -> tuple[int, list[int] | None]:
    """--index's full dim and dims, else --full-dim (384) and no dims."""
    if config.index is None:
        return config.full_dim or DEFAULT_FULL_DIM, None
    from index.stores import current_manifest

    manifest = current_manifest(config.index)
    full = manifest.model.full_dim
    if config.full_dim is not None and config.full_dim != full:
        raise ConfigError(f"--full-dim {config.full_dim} contradicts the index's full dimension {full}")
    return full, list(manifest.dims)


# --- synthetic data -----------------------------------------------------------------------


def coordinate_scale(full_dim: int) -> np.ndarray:
    """Spread of each coordinate, decaying with its position: leading coordinates carry more signal."""
    return (np.arange(1, full_dim + 1, dtype=np.float32) ** -COORDINATE_DECAY).astype(np.float32)


def synthetic_corpus(size: int, full_dim: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, full_dim)`` unit vectors from a Gaussian mixture with decaying per-coordinate spread."""
    scale = coordinate_scale(full_dim)
    centers = rng.standard_normal((SYNTHETIC_CLUSTERS, full_dim), dtype=np.float32) * scale
    corpus = np.empty((size, full_dim), dtype=np.float32)
    for start, stop in _chunks(size):
        block = rng.standard_normal((stop - start, full_dim), dtype=np.float32)
        block *= CLUSTER_SPREAD * scale
        block += centers[rng.integers(0, SYNTHETIC_CLUSTERS, stop - start)]
        corpus[start:stop] = truncate_normalize(block, full_dim)
    return corpus


def synthetic_queries(corpus: np.ndarray, count: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors: corpus rows drawn from the first ``rows``, plus noise of norm about QUERY_NOISE."""
    full_dim = corpus.shape[1]
    scale = coordinate_scale(full_dim)
    noise = rng.standard_normal((count, full_dim), dtype=np.float32) * scale
    noise *= QUERY_NOISE / np.linalg.norm(scale)
    return truncate_normalize(corpus[rng.integers(0, rows, count)] + noise, full_dim)


def _chunks(rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, CHUNK_ROWS):
        yield start, min(rows, start + CHUNK_ROWS)


# --- measuring ----------------------------------------------------------------------------


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``action``."""
    fastest = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = BANDWIDTH_REPEATS) -> dict[str, Any]:
    """This machine's memory bandwidth in GB/s: reading (``np.dot(a, a)``) and copying a large float32 array.

    ``a`` is far larger than any CPU cache; the best of ``repeats`` passes counts. Copying moves
    each byte twice (read + write), and is counted so.
    """
    array = np.ones(max(1, nbytes // 4), dtype=np.float32)
    target = np.empty_like(array)
    read = best_seconds(lambda: np.dot(array, array), repeats)
    copy = best_seconds(lambda: np.copyto(target, array), repeats)
    return {
        "read_gb_s": round(array.nbytes / read / 1e9, 2),
        "copy_gb_s": round(2 * array.nbytes / copy / 1e9, 2),
        "array_mib": round(array.nbytes / 2**20, 1),
        "repeats": repeats,
        "method": "best of the repeats: np.dot(a, a) reads a once; np.copyto(b, a) reads and writes",
    }


def time_searches(index: VectorIndex, queries: np.ndarray, k: int, single: int) -> Timing:
    """A warm-up call; all queries in one call (best of BATCHED_REPEATS); the first ``single`` one per call."""
    index.search(queries[:1], k)
    batched = math.inf
    for _ in range(BATCHED_REPEATS):
        started = time.perf_counter()
        _, ids = index.search(queries, k)
        batched = min(batched, time.perf_counter() - started)
    seconds = np.empty(min(single, len(queries)))
    for number in range(len(seconds)):
        started = time.perf_counter()
        index.search(queries[number : number + 1], k)
        seconds[number] = time.perf_counter() - started
    return Timing(ids, _ms(batched / len(queries)), _ms(np.median(seconds)), _ms(seconds.mean()))


def _ms(seconds: float) -> float:
    return round(1000 * float(seconds), 4)


# --- building -----------------------------------------------------------------------------


def factory_for(kind: str, size: int) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{ivf_lists(size)},Flat"
    return f"HNSW{HNSW_M},Flat"


def search_params(kind: str, factory: str, size: int, nprobe: int | None) -> dict[str, int]:
    """The service's search parameters for ``factory`` (an IVF's nprobe overridable, at most its list count)."""
    params = search_params_for(factory)
    if kind == "ivf":
        params["nprobe"] = min(nprobe or params["nprobe"], ivf_lists(size))
    return params


def ivf_training_sample(corpus: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """IVF_TRAIN_PER_LIST seeded corpus rows per IVF list (all rows of a small corpus), at ``dim``, in row order."""
    size = len(corpus)
    rows = rng.choice(size, min(size, IVF_TRAIN_PER_LIST * ivf_lists(size)), replace=False)
    return truncate_normalize(corpus[np.sort(rows)], dim)


def build_index(
    kind: str,
    corpus: np.ndarray,
    dim: int,
    params: dict[str, int],
    rng: np.random.Generator,
    backend: str = "faiss-cpu",
) -> tuple[VectorIndex, float, float | None]:
    """A ``backend`` (faiss-cpu or faiss-gpu) inner-product index of ``corpus`` truncated to ``dim``; also its
    build and training seconds.

    An IVF index is trained on a seeded sample of IVF_TRAIN_PER_LIST points per list, for
    IVF_KMEANS_ITERATIONS rounds. Vectors are then truncated and added a chunk at a time, so no
    full copy at ``dim`` is ever held next to the index's own.
    """
    size = len(corpus)
    factory = factory_for(kind, size)
    plan = IndexPlan(factory, params, kmeans_iterations=IVF_KMEANS_ITERATIONS if kind == "ivf" else None)
    started = time.perf_counter()
    sample = ivf_training_sample(corpus, dim, rng) if kind == "ivf" else None
    # Built empty (trained on the sample if IVF), then filled a chunk at a time.
    index = get_backend(backend).build(np.empty((0, dim), dtype=np.float32), plan, train_vectors=sample)
    train_s = round(time.perf_counter() - started, 3) if kind == "ivf" else None
    for start, stop in _chunks(size):
        index.add(truncate_normalize(corpus[start:stop], dim))
    build_s = round(time.perf_counter() - started, 3)
    return index, build_s, train_s


def measure_cell(
    kind: str,
    corpus: np.ndarray,
    queries: np.ndarray,
    dim: int,
    exact_ids: np.ndarray | None,
    config: ScalingConfig,
    rng: np.random.Generator,
) -> tuple[CellResult, np.ndarray]:
    """Build one index over ``corpus`` at ``dim``, time its searches, and score it against ``exact_ids``.

    Returns:
        The result and the batched search's ids (the exact reference when ``kind`` is flat).
    """
    size = len(corpus)
    factory = factory_for(kind, size)
    params = search_params(kind, factory, size, config.nprobe)
    backend = "faiss-gpu" if config.device == "gpu" else "faiss-cpu"
    index, build_s, train_s = build_index(kind, corpus, dim, params, rng, backend)
    timing = time_searches(index, queries, config.k, config.single_queries)
    index.close()
    recall = 1.0 if exact_ids is None else round(neighbour_recall(timing.ids, exact_ids), 4)
    result = CellResult(
        size=size,
        dim=dim,
        kind=kind,
        factory=factory,
        search_params=params,
        build_s=build_s,
        train_s=train_s,
        vector_bytes=flat_bytes(size, dim),
        batched_ms_per_query=timing.batched_ms_per_query,
        single_p50_ms=timing.single_p50_ms,
        single_mean_ms=timing.single_mean_ms,
        recall_at_k=recall,
    )
    logger.info(
        "%d × %d %s: built in %.1f s, %s ms/query batched, %s ms p50 one at a time, recall@%d %.3f",
        size,
        dim,
        kind,
        build_s,
        format_ms(result.batched_ms_per_query),
        format_ms(result.single_p50_ms),
        config.k,
        recall,
    )
    return result, timing.ids


def add_scan_bound(result: CellResult, read_gb_s: float) -> None:
    """A flat result's lower bound (every vector read once) and how its measured times compare to it."""
    bound_ms = result.vector_bytes / (read_gb_s * 1e9) * 1000
    result.scan_bound_ms = round(bound_ms, 4)
    result.batched_to_bound = round(result.batched_ms_per_query / bound_ms, 3)
    result.single_to_bound = round(result.single_p50_ms / bound_ms, 3)


# --- the whole run ------------------------------------------------------------------------


def run_scaling(config: ScalingConfig) -> dict[str, Any]:
    """Build and time every index kind at every (size, dim) on one synthetic corpus.

    Returns:
        The report: settings, machine, bandwidth, synthetic data, one result per (size, dim, kind),
        skipped cells with the reason, and the flat speed-up of a small dim over the full dim.
        Written as ``scaling.json``, ``scaling.md`` and ``scaling.png`` into ``config.out`` when set.

    Raises:
        ConfigError, DimensionError: Invalid settings. IndexFolderError: Unreadable --index.
    """
    full_dim, dims = check_config(config)
    threads = config.threads or usable_cpus()
    set_faiss_threads(threads)
    started_at, started = utc_now(), time.perf_counter()
    bandwidth = measure_bandwidth(config.bandwidth_bytes)
    logger.info("memory bandwidth: read %.1f GB/s, copy %.1f GB/s", bandwidth["read_gb_s"], bandwidth["copy_gb_s"])
    corpus_rng, query_rng, sample_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3))
    sizes = sorted(set(config.sizes))
    logger.info("generating %d × %d synthetic vectors", sizes[-1], full_dim)
    corpus = synthetic_corpus(sizes[-1], full_dim, corpus_rng)
    queries = synthetic_queries(corpus, config.queries, sizes[0], query_rng)
    results: list[CellResult] = []
    skipped: list[dict[str, Any]] = []
    for size in sizes:
        kinds = [kind for kind in KINDS if kind in config.kinds]
        if "hnsw" in kinds and size > config.hnsw_max_size:
            kinds.remove("hnsw")
            reason = f"size above --hnsw-max-size {config.hnsw_max_size}: HNSW build time grows too long"
            skipped.append({"size": size, "kind": "hnsw", "reason": reason})
        for dim in dims:
            dim_queries = truncate_normalize(queries, dim)
            exact_ids = None
            for kind in kinds:
                result, ids = measure_cell(kind, corpus[:size], dim_queries, dim, exact_ids, config, sample_rng)
                if kind == "flat":
                    exact_ids = ids
                    add_scan_bound(result, bandwidth["read_gb_s"])
                results.append(result)
    del corpus
    report = {
        "benchmark": "scaling",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 2),
        "settings": _settings_dict(config, full_dim, dims, threads),
        "machine": machine_info(),
        "faiss_threads": faiss_threads(),
        "memory_bandwidth": bandwidth,
        "data": _data_dict(config.seed),
        "results": [asdict(result) for result in results],
        "skipped": skipped,
        "flat_speedup": flat_speedups(results, full_dim),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if config.out is not None:
        write_scaling_report(report, config.out)
    return report


def flat_speedups(results: list[CellResult], full_dim: int) -> list[dict[str, Any]]:
    """Per size: flat time at the full dim ÷ flat time at dim 64 (else the smallest dim), batched and one at a time.

    Needs the full dim among the measured dims; sizes without it get no entry.
    """
    flat = {(r.size, r.dim): r for r in results if r.kind == "flat"}
    dims = {dim for _, dim in flat}
    small = COMPARED_DIM if COMPARED_DIM in dims and COMPARED_DIM < full_dim else min(dims, default=full_dim)
    speedups = []
    for size in sorted({size for size, _ in flat}):
        full, reduced = flat.get((size, full_dim)), flat.get((size, small))
        if full is None or reduced is None or small == full_dim:
            continue
        speedups.append(
            {
                "size": size,
                "dim": small,
                "full_dim": full_dim,
                "batched": _ratio(full.batched_ms_per_query, reduced.batched_ms_per_query),
                "single_p50": _ratio(full.single_p50_ms, reduced.single_p50_ms),
                "bytes": _ratio(full.vector_bytes, reduced.vector_bytes),
            }
        )
    return speedups


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if denominator > 0 else None


def _settings_dict(config: ScalingConfig, full_dim: int, dims: list[int], threads: int) -> dict[str, Any]:
    settings = json_fields(config)
    return {**settings, "full_dim": full_dim, "dims": dims, "threads": threads, "sizes": sorted(set(config.sizes))}


def _data_dict(seed: int) -> dict[str, Any]:
    return {
        "kind": "gaussian mixture, unit length at the full dim; each dim by truncate_normalize",
        "seed": seed,
        "clusters": SYNTHETIC_CLUSTERS,
        "coordinate_decay": COORDINATE_DECAY,
        "cluster_spread": CLUSTER_SPREAD,
        "query_noise": QUERY_NOISE,
        "ivf_train_per_list": IVF_TRAIN_PER_LIST,
        "ivf_kmeans_iterations": IVF_KMEANS_ITERATIONS,
        "hnsw_ef_construction": HNSW_EF_CONSTRUCTION,
    }


# --- the report -----------------------------------------------------------------------------


def write_scaling_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``scaling.json``, ``scaling.md`` and ``scaling.png`` in ``folder``, each written atomically."""
    paths = write_report(report, folder, "scaling", scaling_markdown)
    png = folder / "scaling.png"
    plot_scaling(report, png)
    return [*paths, png]


def results_table(report: dict[str, Any]) -> str:
    """One row per (size, dim, kind)."""
    k = report["settings"]["k"]
    header = ["size", "dim", "kind", "build s", "batched ms/query", "one-at-a-time p50 ms", f"recall@{k}"]
    header += ["vectors MiB", "scan bound ms", "batched ÷ bound", "p50 ÷ bound"]
    lines = [markdown_row(header), markdown_row(["---:", "---:", "---", *["---:"] * (len(header) - 3)])]
    for row in report["results"]:
        bound = row["scan_bound_ms"]
        cells = [f"{row['size']:,}", str(row["dim"]), row["kind"], f"{row['build_s']:.2f}"]
        cells += [format_ms(row["batched_ms_per_query"]), format_ms(row["single_p50_ms"]), f"{row['recall_at_k']:.3f}"]
        cells += [f"{row['vector_bytes'] / 2**20:.1f}", format_ms(bound)]
        cells += [f"{row[name]:.2f}" if bound is not None else "–" for name in ("batched_to_bound", "single_to_bound")]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def speedup_table(report: dict[str, Any]) -> str:
    header = ["size", "dims", "batched speed-up", "one-at-a-time speed-up", "bytes ratio"]
    lines = [markdown_row(header), markdown_row(["---:"] * len(header))]
    for row in report["flat_speedup"]:
        cells = [f"{row['size']:,}", f"{row['full_dim']} → {row['dim']}"]
        cells += [f"{row[name]:.2f}×" if row[name] is not None else "–" for name in ("batched", "single_p50", "bytes")]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def scaling_markdown(report: dict[str, Any]) -> str:
    """Title, context, the results table, the flat speed-up table and what was skipped."""
    settings, machine, bandwidth = report["settings"], report["machine"], report["memory_bandwidth"]
    context = (
        f"Synthetic corpus (seed {settings['seed']}, {report['data']['clusters']} Gaussian clusters, decaying "
        f"per-coordinate spread), full dim {settings['full_dim']}, each dim by truncate-then-L2; {settings['queries']} "
        f"perturbed-corpus queries searched in one batch, the first {settings['single_queries']} also one per call; "
        f"k={settings['k']}. CPU FAISS, threads: {report['faiss_threads']} of {machine['cpus_usable']} usable CPUs, "
        f"load average {machine['load_average_1m']} at the start. Memory bandwidth: read {bandwidth['read_gb_s']} "
        f"GB/s, copy {bandwidth['copy_gb_s']} GB/s; the scan bound is one read of every vector at that rate. "
        f"Recall is against flat at the same size and dim. Peak memory {report['peak_rss_mib']:.0f} MiB."
    )
    parts = ["# Search time vs corpus size and dimension", "", context, "", results_table(report)]
    if report["flat_speedup"]:
        parts += ["", "## Flat search: small dim vs full dim", "", speedup_table(report)]
    if report["skipped"]:
        parts += ["", "## Skipped", ""]
        parts += [f"- {row['kind']} at {row['size']:,}: {row['reason']}" for row in report["skipped"]]
    return "\n".join(parts) + "\n"


def plot_scaling(report: dict[str, Any], path: Path) -> None:
    """ms/query against dim (log y), one line per (size, kind): batched on the left, one at a time on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    dims = sorted({row["dim"] for row in report["results"]})
    sizes = sorted({row["size"] for row in report["results"]})
    lines = sorted({(row["size"], row["kind"]) for row in report["results"]})
    panels = (("batched_ms_per_query", "all queries in one call"), ("single_p50_ms", "one query per call (p50)"))
    for ax, (column, title) in zip(axes, panels, strict=True):
        for size, kind in lines:  # colour: the kind; line style: the size
            rows = sorted((r for r in report["results"] if (r["size"], r["kind"]) == (size, kind)), key=_by_dim)
            ax.plot(
                [r["dim"] for r in rows],
                [r[column] for r in rows],
                color=f"C{KINDS.index(kind)}",
                linestyle=LINE_STYLES[sizes.index(size) % len(LINE_STYLES)],
                marker="o",
                label=f"{kind}, {size:,}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_yscale("log")
        ax.set_xlabel("dimension (truncated, re-normalised)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("search ms per query")
    axes[1].legend(fontsize="small")
    fig.suptitle(f"Search time vs dim (FAISS threads: {report['faiss_threads']})")
    fig.tight_layout()
    save_figure(fig, path)


def _by_dim(row: dict[str, Any]) -> int:
    return row["dim"]


# --- command line ---------------------------------------------------------------------------


def add_scaling_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``mrl bench scaling`` on the ``mrl bench`` sub-parsers."""
    from benchmarks.args import DEFAULT_OUT, int_list_argument, name_list_argument
    from core.cli_args import add_output_argument, dims_argument

    p = actions.add_parser(
        "scaling",
        help="search time vs corpus size and dim on a large synthetic corpus (flat, IVF, HNSW)",
        description="Generate a seeded synthetic Matryoshka-like corpus, build flat, IVF and HNSW indexes at every "
        "(size, dim), and report build time, batched and one-at-a-time search time per query, recall@k against "
        "flat, the memory-bandwidth bound of a flat scan, and the flat speed-up of dim 64 over the full dim.",
    )
    p.add_argument(
        "--sizes", type=int_list_argument, default=[100_000, 1_000_000], help="corpus sizes (default: 100000,1000000)"
    )
    p.add_argument(
        "--dims", type=dims_argument, default=None, help="dims (default: the index's, else 384,256,128,64,32)"
    )
    p.add_argument("--full-dim", type=int, default=None, help="full dim (default: the index's, else 384)")
    p.add_argument(
        "--index", default=None, metavar="LOCATOR", help="the index (a folder or Milvus): its full dim and dims"
    )
    p.add_argument(
        "--kinds", type=name_list_argument, default=list(KINDS), help="index kinds; flat is required (flat,ivf,hnsw)"
    )
    p.add_argument("--queries", type=int, default=200, help="queries, searched in one batch (default: %(default)s)")
    p.add_argument(
        "--single-queries", type=int, default=50, help="of them, searched one per call (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=10, help="hits per query (default: %(default)s)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the service's, 32)")
    p.add_argument(
        "--hnsw-max-size", type=int, default=HNSW_MAX_SIZE, help="no HNSW above this size (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: every usable CPU)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default: %(default)s)")
    p.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="where FAISS searches (default: %(default)s)"
    )
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_scaling_command)


def run_scaling_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    report = run_scaling(ScalingConfig(**config_fields(args)))
    print(scaling_markdown(report), end="")
    print(f"wrote {args.out / 'scaling.json'}, {args.out / 'scaling.md'}, {args.out / 'scaling.png'}")
    return 0
