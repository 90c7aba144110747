"""Search quality per dimension on real datasets: base vs tuned, two-stage, quantised.

For every BEIR folder: the base model and a model tuned on the folder's train split (given,
found in ``--models-dir``, or trained there) each encode the corpus and the judged queries of
the test split **once** at full dimension (cached on disk by model fingerprint and text hash).
Everything else is derived from those vectors with ``truncate_normalize`` and searched with
real FAISS indexes, one query at a time as the service does: the float indexes are built by
the ``faiss-cpu`` backend of ``index.backends`` and searched with ``index.search.staged_search``,
the service's own search function.

- ``float32``: a ``Flat`` (exact inner-product) index at every dim (what the service serves);
- ``two-stage``: shortlist ``S`` rows at a small dim, re-score them at full dim (``staged_search``
  with ``rerank_dim``), for every shortlist size in ``--shortlists``;
- ``int8``: an ``SQ8`` index (FAISS's scalar quantiser, 8 bits per coordinate, trained on the corpus);
- ``binary``: ``faiss.IndexBinaryFlat`` over sign bits, Hamming distance;
- ``binary+rescore``: the binary top 100 re-scored with the float query against the ±1
  document vectors (the sentence-transformers recipe; no float documents kept in memory).

The binary options are the one place a benchmark builds a FAISS index itself: a Hamming index
over packed bits is not an inner-product index of float vectors, which is what the backend
contract (``VectorIndex``) describes and what the service serves.

Every option is scored with ``core.metrics.score_rankings`` (NDCG@10, MRR@10, Recall@100)
and timed per query on a sample of the queries (search only; the query encoding is the same
for every option and is measured by ``mrl bench latency``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine_info, markdown_row, save_figure, utc_now, write_report
from benchmarks.args import DEFAULT_OUT, int_list_argument, name_list_argument
from benchmarks.search_quality import RankedRun, timed_per_query
from core.cli_args import add_output_argument, config_fields, dims_argument
from core.data import DataError, RetrievalDataset, load_beir
from core.errors import ConfigError
from core.files import json_fields
from core.matryoshka import DimensionError, truncate_normalize, validate_dims
from core.metrics import score_rankings
from index.backends import VectorIndex, faiss_threads, get_backend, set_faiss_threads
from index.params import IndexPlan
from index.search import staged_search

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@100")
DEPTH = 100  # rankings are scored to Recall@100
DEFAULT_DATASETS_ROOT = Path("../shared/datasets")
DEFAULT_DATASETS = ("scifact", "medquad", "piaf_fr")
BINARY_RESCORE_DEPTH = DEPTH


@dataclass
class QualityBenchConfig:
    """What ``mrl bench quality`` can be told."""

    data: list[Path] = field(default_factory=list)  # default: DEFAULT_DATASETS under datasets_root
    datasets_root: Path = DEFAULT_DATASETS_ROOT
    tuned: list[str] = field(default_factory=list)  # NAME=MODEL_DIR, one per dataset
    models_dir: Path = Path("runs/models")
    base_model: str | None = None  # default: the project's default model
    dims: list[int] | None = None  # default: the tuned model's Matryoshka dims
    split: str = "test"
    train_split: str = "train"
    shortlists: list[int] = field(default_factory=lambda: [30, 100])
    max_queries: int | None = None
    timing_queries: int = 200
    train: bool = True  # train a missing tuned model; off: report the base model only
    epochs: float = 5
    learning_rate: float = 1e-4
    batch_size: int = 64
    max_train_pairs: int | None = None
    query_encoders: list[str] = field(default_factory=lambda: list(QUERY_ENCODERS))  # scored next to torch's queries
    onnx_cache: Path | None = None  # ONNX exports (default: the service's)
    latency: list[str] = field(default_factory=list)  # NAME=latency.json of `mrl bench latency` on that dataset
    cache: Path | None = None  # default: <out>/cache
    workers: int = 1  # processes that encode each corpus (one per GPU, or CPU processes)
    progress: bool = True
    out: Path | None = None


@dataclass
class EncodedSplit:
    """Full-dimension vectors of a corpus and of the judged queries of one split."""

    doc_ids: list[str]
    docs: np.ndarray
    query_ids: list[str]
    queries: np.ndarray
    encode_seconds: float
    cached: bool


def check_config(config: QualityBenchConfig) -> None:
    """Raises ConfigError for counts that are not positive or a malformed ``--tuned``."""
    for name, value in {"--timing-queries": config.timing_queries, "--epochs": config.epochs}.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in {"--max-queries": config.max_queries, "--max-train-pairs": config.max_train_pairs}.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    unknown = sorted(set(config.query_encoders) - set(QUERY_ENCODERS))
    if unknown:
        raise ConfigError(f"unknown query encoders {unknown} (choose from {', '.join(QUERY_ENCODERS)}, or none)")
    if not config.shortlists or min(config.shortlists) < 10:
        raise ConfigError(f"--shortlists must be sizes of at least 10 (the k of NDCG@10), got {config.shortlists}")
    tuned_models(config)
    latency_reports(config)


def named_paths(entries: list[str], option: str, example: str) -> dict[str, Path]:
    """``NAME=PATH`` entries of a repeatable option as a mapping.

    Raises:
        ConfigError: For an entry without ``=`` or a path that does not exist.
    """
    found = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} expects NAME=PATH (e.g. {example}), got {entry!r}")
        if not Path(path).exists():
            raise ConfigError(f"{option} {name}: {path} does not exist")
        found[name] = Path(path)
    return found


def latency_reports(config: QualityBenchConfig) -> dict[str, dict[str, Any]]:
    """``--latency NAME=latency.json`` entries, read.

    Raises:
        ConfigError: For a malformed entry or a file that is not a ``mrl bench latency`` report.
    """
    reports = {}
    for name, path in named_paths(config.latency, "--latency", "scifact=runs/bench/latency.json").items():
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--latency {name}: cannot read {path} ({exc})") from None
        if not isinstance(report, dict) or report.get("benchmark") != "latency":
            raise ConfigError(f"--latency {name}: {path} is not a report of `mrl bench latency`")
        reports[name] = report
    return reports


def tuned_models(config: QualityBenchConfig) -> dict[str, Path]:
    """``--tuned NAME=DIR`` entries as a mapping.

    Raises:
        ConfigError: For a malformed entry or a folder that does not exist.
    """
    models = named_paths(config.tuned, "--tuned", "scifact=runs/models/scifact")
    for name, folder in models.items():
        if not folder.is_dir():
            raise ConfigError(f"--tuned {name}: {folder} is not a model folder")
    return models


def dataset_folders(config: QualityBenchConfig) -> list[Path]:
    """The BEIR folders to measure: ``--data``, else the default datasets found under ``--datasets-root``.

    Raises:
        DataError: When a folder is missing or none of the defaults exists.
    """
    if config.data:
        for folder in config.data:
            if not (folder / "corpus.jsonl").is_file():
                raise DataError(folder, "not a BEIR folder (no corpus.jsonl)")
        return list(config.data)
    found = [config.datasets_root / name for name in DEFAULT_DATASETS if (config.datasets_root / name).is_dir()]
    if not found:
        raise DataError(config.datasets_root, f"none of {', '.join(DEFAULT_DATASETS)} found; pass --data")
    return found


# Encoding, once per (model, dataset), cached by fingerprint and text hash


def text_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_folder(cache: Path | None, out: Path | None) -> Path | None:
    """``--cache``, else ``OUT/cache``; none when the run writes nowhere."""
    if cache is not None:
        return cache
    return out / "cache" if out is not None else None


def cached_encode(
    encode: Callable[[list[str]], np.ndarray], texts: list[str], fingerprint: str, cache: Path | None
) -> tuple[np.ndarray, bool]:
    """``encode(texts)``, read from ``cache`` when the same weights already encoded the same texts."""
    path = None
    if cache is not None:
        key = hashlib.sha256(f"{fingerprint}:{text_digest(texts)}".encode()).hexdigest()[:24]
        path = cache / f"{key}.npy"
        if path.is_file():
            return np.load(path), True
    vectors = np.asarray(encode(texts), dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp.npy")
        np.save(partial, vectors)
        partial.replace(path)
    return vectors, False


def encode_corpus(model: Any, texts: list[str], workers: int, progress: bool) -> np.ndarray:
    """Documents encoded by ``workers`` processes (:func:`core.models.encoder_pool`; one: this process)."""
    from core.models import SentenceTransformerEncoder, encoder_pool

    with encoder_pool(SentenceTransformerEncoder(model, "bench", 64, progress), workers) as encoder:
        return encoder.encode_documents(texts)


def encode_dataset(
    model: Any,
    fingerprint: str,
    dataset: RetrievalDataset,
    query_ids: list[str],
    cache: Path | None,
    progress: bool = True,
    workers: int = 1,
) -> EncodedSplit:
    """The corpus (by ``workers`` processes) and the judged queries at full dimension, with the model's
    document/query prompts."""
    doc_ids = list(dataset.corpus)
    options = {"batch_size": 64, "show_progress_bar": progress, "convert_to_numpy": True}
    started = time.perf_counter()
    logger.info("%s: encoding %d documents and %d queries", dataset.name, len(doc_ids), len(query_ids))
    docs, docs_cached = cached_encode(
        lambda texts: encode_corpus(model, texts, workers, progress),
        [dataset.corpus[d].passage for d in doc_ids],
        fingerprint,
        cache,
    )
    queries, queries_cached = cached_encode(
        lambda texts: model.encode_query(texts, **options),
        [dataset.queries[q] for q in query_ids],
        fingerprint,
        cache,
    )
    return EncodedSplit(
        doc_ids, docs, query_ids, queries, time.perf_counter() - started, docs_cached and queries_cached
    )


# Search options, each returning rankings (row ids, best first) and per-query times


def inner_product_index(docs: np.ndarray, dim: int, factory: str = "Flat") -> VectorIndex:
    """A ``faiss-cpu`` inner-product index of ``docs`` at ``dim`` (``Flat``: exact; ``SQ8``: 8-bit scalar quantiser)."""
    return get_backend("faiss-cpu").build(truncate_normalize(docs, dim), IndexPlan(factory))


def search_float(docs: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    index = inner_product_index(docs, dim)
    return lambda query: staged_search(index, docs, query, dim, DEPTH).rows


def search_two_stage(docs: np.ndarray, dim: int, shortlist: int) -> Callable[[np.ndarray], np.ndarray]:
    """Shortlist ``shortlist`` rows at ``dim``, re-score the whole shortlist at the full dimension.

    ``staged_search`` with ``k = shortlist`` and one candidate per hit: the shortlist is kept
    whole, re-ordered.
    """
    index = inner_product_index(docs, dim)
    full = docs.shape[1]
    return lambda query: staged_search(index, docs, query, dim, shortlist, rerank_dim=full, candidates=1).rows


def search_int8(docs: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    index = inner_product_index(docs, dim, "SQ8")
    return lambda query: staged_search(index, docs, query, dim, DEPTH).rows


def sign_bits(vectors: np.ndarray) -> np.ndarray:
    """One bit per coordinate (1 where positive), packed: ``dim / 8`` bytes per vector."""
    return np.packbits(vectors > 0, axis=1)


def binary_index(docs: np.ndarray, dim: int) -> Any:
    """``IndexBinaryFlat`` over the sign bits of ``docs`` at ``dim``; outside the backend contract (see the module)."""
    import faiss

    if dim % 8:
        raise DimensionError(f"binary search needs a dim divisible by 8, got {dim}")
    index = faiss.IndexBinaryFlat(dim)
    index.add(sign_bits(docs[:, :dim]))
    return index


def search_binary(docs: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    index = binary_index(docs, dim)
    return lambda query: index.search(sign_bits(query[:, :dim]), DEPTH)[1]


def search_binary_rescore(docs: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Hamming top 100, re-ordered by the float query against the ±1 document vectors of the shortlist."""
    index = binary_index(docs, dim)
    packed = sign_bits(docs[:, :dim])

    def search(query: np.ndarray) -> np.ndarray:
        rows = index.search(sign_bits(query[:, :dim]), BINARY_RESCORE_DEPTH)[1][0]
        rows = rows[rows >= 0]
        signs = np.unpackbits(packed[rows], axis=1, count=dim).astype(np.float32) * 2 - 1
        scores = signs @ truncate_normalize(query, dim)[0]
        return rows[np.argsort(-scores, kind="stable")][None, :]

    return search


# Query encoders the service can run besides torch: exact float32 search with the queries encoded by each.
QUERY_ENCODERS = ("onnx", "onnx-int8")
QUERY_METHOD = "queries by {}"  # the method name of their rows
METHODS = ("float32", *(QUERY_METHOD.format(name) for name in QUERY_ENCODERS), "two-stage", "int8", "binary",
           "binary+rescore")  # fmt: skip
MAX_ENCODER_LOSS = 0.005  # a query encoder losing more NDCG@10 than this fraction at any dim is flagged
QUANTISED = {"int8": search_int8, "binary": search_binary, "binary+rescore": search_binary_rescore}


def bytes_per_vector(method: str, dim: int) -> float:
    """Index memory per document vector (FAISS codes; the two-stage full-dim vectors are counted too)."""
    return {"float32": 4 * dim, "int8": dim, "binary": dim / 8, "binary+rescore": dim / 8}[method]


# Measuring


def batched_rankings(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Rankings of all queries (row ids, -1 pads) through a one-query search function."""
    rows = np.full((len(queries), DEPTH), -1, dtype=np.int64)
    for number in range(len(queries)):
        found = search(queries[number : number + 1])[0][:DEPTH]
        rows[number, : len(found)] = found
    return rows


@contextmanager
def single_threaded_search() -> Iterator[None]:
    """One FAISS thread: a query at a time is how the service searches, and timings stay steady on a busy machine."""
    threads = faiss_threads()
    set_faiss_threads(1)
    try:
        yield
    finally:
        set_faiss_threads(threads)


def measure(
    search: Callable[[np.ndarray], np.ndarray],
    encoded: EncodedSplit,
    qrels: dict,
    timing_queries: int,
    views: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Metrics over every judged query (and over each view's subset, from the same rankings), and the
    per-query search time over the first ``timing_queries``."""
    rows = batched_rankings(search, encoded.queries)
    rankings = {
        qid: [encoded.doc_ids[r] for r in row if r >= 0] for qid, row in zip(encoded.query_ids, rows, strict=True)
    }
    metrics = score_rankings(rankings, qrels)
    timed: RankedRun = timed_per_query(search, encoded.queries[:timing_queries], DEPTH)
    result: dict[str, Any] = {name: round(metrics[name], 4) for name in METRICS}
    if views:
        result["views"] = {
            view: {name: round(value, 4) for name, value in score_rankings(rankings, subset).items() if name in METRICS}
            for view, subset in views.items()
        }
    result["search_ms_p50"] = round(1000 * float(np.median(timed.seconds)), 4)
    return result


def measure_model(
    label: str,
    encoded: EncodedSplit,
    qrels: dict,
    dims: list[int],
    config: QualityBenchConfig,
    variants: bool,
    views: dict[str, dict] | None = None,
) -> list[dict[str, Any]]:
    """``float32`` at every dim for one model's vectors (also scored on each view); with ``variants``,
    two-stage and quantised too."""
    full = max(dims)
    rows = []

    def add(method: str, dim: int, search: Callable[[np.ndarray], np.ndarray], **extra: Any) -> None:
        started = time.perf_counter()
        row = {"model": label, "method": method, "dim": dim, **extra}
        row.update(measure(search, encoded, qrels, config.timing_queries, views if method == "float32" else None))
        logger.info("%s %s dim %d%s: NDCG@10 %.4f (%.1f s)", label, method, dim,
                    f" shortlist {extra['shortlist']}" if "shortlist" in extra else "", row["ndcg@10"],
                    time.perf_counter() - started)  # fmt: skip
        rows.append(row)

    for dim in dims:
        add("float32", dim, search_float(encoded.docs, dim), bytes_per_vector=4 * dim)
        if not variants:
            continue
        for shortlist in config.shortlists:
            if dim < full:
                search = search_two_stage(encoded.docs, dim, shortlist)
                add("two-stage", dim, search, shortlist=shortlist, bytes_per_vector=4 * dim + 4 * full)
        for method, build in (
            ("int8", search_int8),
            ("binary", search_binary),
            ("binary+rescore", search_binary_rescore),
        ):
            if method == "int8" or dim % 8 == 0:
                add(
                    method,
                    dim,
                    build(encoded.docs, dim),
                    bytes_per_vector=bytes_per_vector(method, dim),
                )
    return rows


def measure_query_encoders(
    label: str,
    model: str,
    fingerprint: str,
    texts: list[str],
    encoded: EncodedSplit,
    qrels: dict,
    dims: list[int],
    config: QualityBenchConfig,
    cache: Path | None,
) -> list[dict[str, Any]]:
    """Exact float32 search at every dim with the queries encoded by each of the service's other query encoders.

    The documents stay torch's, as in the service (the index is built once; only queries are encoded per
    request). Each row carries the mean cosine of its queries to torch's at full dim.
    """
    from benchmarks.encoders import EncodersConfig, open_encoder, service_settings

    rows = []
    for name in config.query_encoders:
        measured = EncodersConfig(Path("."), model=model, device="cpu", onnx_cache=config.onnx_cache)
        settings = service_settings(measured, name, threads=None)
        encode = lambda texts, settings=settings: open_encoder(settings, None).encoder.encode_queries(texts)  # noqa: E731
        queries, _ = cached_encode(encode, texts, f"{fingerprint}:{name}", cache)  # the encoder loads only on a miss
        cosines = np.sum(truncate_normalize(queries, max(dims)) * truncate_normalize(encoded.queries, max(dims)), 1)
        split = EncodedSplit(encoded.doc_ids, encoded.docs, encoded.query_ids, queries, 0.0, True)
        for dim in dims:
            row = {"model": label, "method": QUERY_METHOD.format(name), "dim": dim, "bytes_per_vector": 4 * dim}
            row.update(measure(search_float(encoded.docs, dim), split, qrels, config.timing_queries))
            row["cosine_to_torch"] = round(float(cosines.mean()), 5)
            logger.info("%s %s dim %d: NDCG@10 %.4f", label, row["method"], dim, row["ndcg@10"])
            rows.append(row)
    return rows


def encoder_losses(dataset: dict[str, Any], model: str) -> dict[str, float]:
    """Per query encoder: its largest NDCG@10 loss against torch's queries over the dims, as a fraction."""
    torch_rows = rows_of(dataset, model, "float32")
    losses = {}
    for name in QUERY_ENCODERS:
        rows = rows_of(dataset, model, QUERY_METHOD.format(name))
        if rows:
            losses[name] = max(
                1 - rows[dim]["ndcg@10"] / torch_rows[dim]["ndcg@10"] if torch_rows[dim]["ndcg@10"] else 0.0
                for dim in rows
            )
    return losses


# One dataset, then the whole run


def load_scored_model(name_or_path: str | None) -> tuple[Any, str]:
    """A sentence-transformers model (with the prompts of its card) and the fingerprint of its weights."""
    from core.models import load_model, model_fingerprint

    model = load_model(name_or_path)
    return model, model_fingerprint(model)


def tuned_model_for(folder: Path, config: QualityBenchConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The tuned model of a dataset: ``--tuned``, else ``--models-dir/NAME``, else trained there.

    Returns:
        The model folder (``None`` when there is none and training is off) and, when it was trained
        now, the training summary.
    """
    from core.models import read_model_card

    given = tuned_models(config).get(folder.name)
    if given is not None:
        return given, None
    found = config.models_dir / folder.name
    if found.is_dir() and read_model_card(found) is not None:
        return found, None
    if not config.train:
        return None, None
    from training.train import TrainConfig, train

    logger.info("%s: no tuned model in %s; training one on split %r", folder.name, found, config.train_split)
    started = time.perf_counter()
    train(
        TrainConfig(
            data=folder,
            output=found,
            model=config.base_model,
            train_split=config.train_split,
            eval_split=None,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            max_train_pairs=config.max_train_pairs,
            progress=config.progress,
        )
    )
    return found, {"seconds": round(time.perf_counter() - started, 1), "output": str(found)}


def measure_dataset(folder: Path, config: QualityBenchConfig) -> dict[str, Any]:
    """Base and tuned model on one BEIR folder: every option at every dim."""
    from core.models import DEFAULT_MODEL, default_dims, read_model_card, resolve_model
    from training.evaluate import split_views

    has_training = config.train_split != config.split and (folder / "qrels" / f"{config.train_split}.tsv").is_file()
    dataset = load_beir(folder, [config.split, *([config.train_split] if has_training else [])])
    qrels = dataset.split(config.split)
    query_ids = list(qrels)[: config.max_queries]
    qrels = {qid: qrels[qid] for qid in query_ids}
    # The clean view: test questions none of whose relevant documents is a training positive (what a model
    # tuned on the training split cannot have memorised); the shared view: the rest.
    views = split_views(dataset.split(config.train_split), qrels) if has_training else {}
    tuned_path, training = tuned_model_for(folder, config)
    models: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    card = read_model_card(tuned_path) if tuned_path else None
    dims: list[int] | None = config.dims or (list(card.dims) if card else None)
    for label, name in (("base", resolve_model(config.base_model)), ("tuned", tuned_path)):
        if name is None:
            continue
        model, fingerprint = load_scored_model(str(name))
        full = model.get_embedding_dimension()
        dims = validate_dims(dims or default_dims(full), full)
        cache = cache_folder(config.cache, config.out)
        encoded = encode_dataset(model, fingerprint, dataset, query_ids, cache, config.progress, config.workers)
        del model
        models[label] = {
            "name": (config.base_model or DEFAULT_MODEL) if label == "base" else str(name),
            "fingerprint": fingerprint,
            "encode_seconds": round(encoded.encode_seconds, 1),
            "from_cache": encoded.cached,
        }
        variants = label == "tuned" or tuned_path is None
        rows += measure_model(label, encoded, qrels, dims, config, variants, views)
        if variants:
            texts = [dataset.queries[q] for q in query_ids]
            rows += measure_query_encoders(label, str(name), fingerprint, texts, encoded, qrels, dims, config, cache)
    return {
        "name": folder.name,
        "path": str(folder),
        "split": config.split,
        "num_documents": len(dataset.corpus),
        "num_queries": len(query_ids),
        "views": {view: len(subset) for view, subset in views.items()},
        "dims": dims,
        "models": models,
        "training": training,
        "rows": rows,
    }


def run_quality(config: QualityBenchConfig) -> dict[str, Any]:
    """Measure every dataset; write ``quality.json``, ``quality.md`` and the two plots into ``config.out``.

    Raises:
        ConfigError, DimensionError: Invalid settings. DataError: A missing or malformed dataset.
        ModelError: A model cannot load.
    """
    check_config(config)
    folders = dataset_folders(config)
    started_at, started = utc_now(), time.perf_counter()
    with single_threaded_search():
        datasets = [measure_dataset(folder, config) for folder in folders]
    report = {
        "benchmark": "quality",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 2),
        "settings": json_fields(config),
        "machine": machine_info(),
        "datasets": datasets,
    }
    report["latency"] = {name: latency_summary(raw) for name, raw in latency_reports(config).items()}
    if config.out is not None:
        write_quality_report(report, config.out)
    return report


# Reading a report


def rows_of(dataset: dict[str, Any], model: str, method: str, shortlist: int | None = None) -> dict[int, dict]:
    """The rows of one (model, method[, shortlist]) by dim."""
    return {
        row["dim"]: row
        for row in dataset["rows"]
        if row["model"] == model and row["method"] == method and row.get("shortlist") == shortlist
    }


def recommended_dim(dataset: dict[str, Any], keep: float = 0.98) -> int | None:
    """Smallest dim whose tuned (else base) float32 NDCG@10 keeps ``keep`` of the full-dim NDCG@10."""
    by_dim = rows_of(dataset, "tuned", "float32") or rows_of(dataset, "base", "float32")
    if not by_dim:
        return None
    full = by_dim[max(by_dim)]["ndcg@10"]
    good = [dim for dim, row in by_dim.items() if row["ndcg@10"] >= keep * full]
    return min(good) if good else max(by_dim)


def _pct(value: float, full: float) -> str:
    return f"{100 * value / full:.1f}%" if full else "–"


def quality_markdown(report: dict[str, Any]) -> str:
    lines = ["# Search quality per dimension", ""]
    lines += summary_table(report) + [""]
    clean = summary_table(report, "clean")
    if clean:
        lines += clean + ["", "The shared view (the other test questions) is in `quality.json`, in rows' `views`.", ""]
    for dataset in report["datasets"]:
        lines += dataset_section(dataset)
    for name, latency in report.get("latency", {}).items():
        dataset = next((d for d in report["datasets"] if d["name"] == name), None)
        if dataset is not None:
            lines += pareto_table(dataset, latency)
    machine = report["machine"]
    lines += [
        f"Machine: {machine['cpus_usable']} CPUs, GPU {machine['gpu'] or 'none'}; {report['duration_s']:.0f} s in all. "
        "Search times are per query, one query at a time, search only (encoding excluded).",
        "",
    ]
    return "\n".join(lines)


def _ndcg(row: dict[str, Any], view: str | None) -> float:
    return row["ndcg@10"] if view is None else row["views"][view]["ndcg@10"]


def summary_table(report: dict[str, Any], view: str | None = None) -> list[str]:
    """NDCG@10 base → tuned per dim, one column per dataset: over the whole test split, or over one view
    (only the datasets that have it)."""
    datasets = [d for d in report["datasets"] if view is None or view in d.get("views", {})]
    if not datasets:
        return []
    dims = sorted({dim for d in datasets for dim in d["dims"]}, reverse=True)
    names = [f"{d['name']} ({view}, {d['views'][view]} q)" if view else d["name"] for d in datasets]
    header = ["dim"] + [f"{name} base → tuned (% of full)" for name in names]
    lines = [markdown_row(header), markdown_row(["---:"] * len(header))]
    for dim in dims:
        cells = [str(dim)]
        for dataset in datasets:
            base, tuned = rows_of(dataset, "base", "float32"), rows_of(dataset, "tuned", "float32")
            if dim not in base:
                cells.append("–")
                continue
            cell = f"{_ndcg(base[dim], view):.3f}"
            if dim in tuned:
                full = _ndcg(tuned[max(tuned)], view)
                cell += f" → **{_ndcg(tuned[dim], view):.3f}** ({_pct(_ndcg(tuned[dim], view), full)})"
            cells.append(cell)
        lines.append(markdown_row(cells))
    if view == "clean":
        title = (
            "NDCG@10 on the clean view of each test split (questions none of whose relevant documents is a "
            "positive of the training split, which a tuned model cannot have memorised), exact float32 search:"
        )
    elif view:
        title = f"NDCG@10 on the {view} view of each test split, exact float32 search:"
    else:
        title = "NDCG@10 on each test split, exact float32 search:"
    return [title, ""] + lines


def dataset_section(dataset: dict[str, Any]) -> list[str]:
    model = "tuned" if rows_of(dataset, "tuned", "float32") else "base"
    full_rows = rows_of(dataset, model, "float32")
    full = full_rows[max(full_rows)]["ndcg@10"]
    lines = [
        f"## {dataset['name']} ({dataset['num_documents']:,} documents, {dataset['num_queries']:,} judged queries, "
        f"split {dataset['split']})",
        "",
        f"Options of the {model} model; memory is the index's bytes per document vector.",
        "",
    ]
    header = ["option", "dim", "bytes/vector", "NDCG@10", "% of full", "MRR@10", "Recall@100", "search p50 ms"]
    lines += [markdown_row(header), markdown_row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])]
    for row in sorted(
        (r for r in dataset["rows"] if r["model"] == model),
        key=lambda r: (-r["dim"], METHODS.index(r["method"]), r.get("shortlist", 0)),
    ):
        option = row["method"] + (f" (shortlist {row['shortlist']} → {max(full_rows)})" if "shortlist" in row else "")
        lines.append(
            markdown_row(
                [
                    option,
                    str(row["dim"]),
                    f"{row['bytes_per_vector']:g}",
                    f"{row['ndcg@10']:.3f}",
                    _pct(row["ndcg@10"], full),
                    f"{row['mrr@10']:.3f}",
                    f"{row['recall@100']:.3f}",
                    f"{row['search_ms_p50']:.3f}",
                ]
            )
        )
    recommended = recommended_dim(dataset)
    lines += ["", f"Smallest dim keeping 98% of the full-dim NDCG@10 ({model}, float32): **{recommended}**."]
    for name, loss in encoder_losses(dataset, model).items():
        verdict = "**flagged**: more than" if loss > MAX_ENCODER_LOSS else "within"
        lines.append(
            f"Query encoder {name}: largest NDCG@10 loss against torch's queries {100 * loss:.2f}% ({verdict} "
            f"{100 * MAX_ENCODER_LOSS:g}%)."
        )
    return [*lines, ""]


def pareto_table(dataset: dict[str, Any], latency: dict[str, Any]) -> list[str]:
    """The options no other option beats on both end-to-end p50 and NDCG@10, fastest first."""
    lines = [
        f"### {dataset['name']}: Pareto front, NDCG@10 against end-to-end p50 (HTTP, 1 in flight)",
        "",
        f"From `{latency['index']}` measured {latency['started_at']}.",
        "",
        markdown_row(["option (encoder dim)", "p50 ms", "NDCG@10"]),
        markdown_row(["---", "---:", "---:"]),
    ]
    lines += [
        markdown_row([label, f"{x:.1f}", f"{y:.3f}"]) for x, y, label in pareto_front(pareto_points(dataset, latency))
    ]
    return lines + [""]


# Writing and drawing


def write_quality_report(report: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = write_report(report, folder, "quality", quality_markdown)
    written.append(plot_quality_vs_dim(report, folder / "quality_vs_dim.png"))
    written.append(plot_pareto(report, folder / "quality_vs_latency.png"))
    return written


def plot_quality_vs_dim(report: dict[str, Any], path: Path) -> Path:
    """NDCG@10 against dim (log2 axis): tuned solid, base dashed, one colour per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for number, dataset in enumerate(report["datasets"]):
        colour = f"C{number}"
        for model, style in (("tuned", "-"), ("base", "--")):
            by_dim = rows_of(dataset, model, "float32")
            if by_dim:
                dims = sorted(by_dim)
                axes.plot(dims, [by_dim[d]["ndcg@10"] for d in dims], style, marker="o", color=colour,
                          label=f"{dataset['name']} {model}")  # fmt: skip
    axes.set_xscale("log", base=2)
    dims = sorted({dim for d in report["datasets"] for dim in d["dims"]})
    axes.set_xticks(dims, [str(d) for d in dims])
    axes.set_xlabel("embedding dimension")
    axes.set_ylabel("NDCG@10 (test split)")
    axes.set_title("Matryoshka: quality per dimension, base (dashed) vs tuned")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def latency_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The cells of a ``mrl bench latency`` report that a Pareto plot needs."""
    k = report["settings"].get("k", 10)
    cells = [
        {
            "encoder": r["encoder"],
            "dim": r["dim"],
            "rerank_dim": r.get("rerank_dim"),
            # the server's shortlist: k × rerank_candidates, 10 unless the server was told otherwise
            "shortlist": k * 10 if r.get("rerank_dim") else None,
            "concurrency": r["concurrency"],
            "p50_ms": r["p50_ms"],
            "throughput_rps": r["throughput_rps"],
        }
        for r in report["results"]
        if not r.get("errors") and r.get("p50_ms") is not None and not r.get("target")  # dims, not targets
    ]
    return {"index": report["settings"].get("index"), "started_at": report.get("started_at"), "cells": cells}


def pareto_points(dataset: dict[str, Any], latency: dict[str, Any] | None = None) -> list[tuple[float, float, str]]:
    """(p50 ms, NDCG@10, label) of every option of the tuned (else base) model.

    With a latency summary of the same dataset the latency is the end-to-end HTTP p50 at one
    request in flight (per encoder backend; options the service serves); else the search p50.
    """
    model = "tuned" if rows_of(dataset, "tuned", "float32") else "base"
    if latency is None:
        return [
            (row["search_ms_p50"], row["ndcg@10"], f"{row['method']} {row['dim']}" + (
                f"/{row['shortlist']}" if "shortlist" in row else ""))
            for row in dataset["rows"]
            if row["model"] == model
        ]  # fmt: skip
    points = []
    for cell in latency["cells"]:
        if cell["concurrency"] != 1:
            continue
        method = "two-stage" if cell["rerank_dim"] else "float32"
        if method == "float32" and rows_of(dataset, model, QUERY_METHOD.format(cell["encoder"])):
            method = QUERY_METHOD.format(cell["encoder"])  # the quality of the queries this encoder makes
        row = rows_of(dataset, model, method, cell["shortlist"]).get(cell["dim"])
        if row is not None:
            label = f"{cell['encoder']} {cell['dim']}" + (f"→{cell['rerank_dim']}" if cell["rerank_dim"] else "")
            points.append((cell["p50_ms"], row["ndcg@10"], label))
    return points


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both latency (lower) and NDCG@10 (higher), fastest first."""
    front, best = [], -1.0
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def plot_pareto(report: dict[str, Any], path: Path) -> Path:
    """NDCG@10 against search p50 per query, every option as a dot, the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = report["datasets"]
    figure, all_axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for axes, dataset in zip(all_axes[0], datasets, strict=True):
        latency = report.get("latency", {}).get(dataset["name"])
        points = pareto_points(dataset, latency)
        if latency:
            series = sorted({cell["encoder"] for cell in latency["cells"]})
            axes.set_xlabel("end-to-end p50 over HTTP, 1 request in flight (ms)")
        else:
            series = list(METHODS)
            axes.set_xlabel("search p50 per query (ms, log)")
            axes.set_xscale("log")
            axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for number, name in enumerate(series):
            chosen = [p for p in points if p[2].startswith(name + " ")]
            if chosen:
                axes.scatter([p[0] for p in chosen], [p[1] for p in chosen], marker="os^xD"[number % 5], label=name,
                             alpha=0.7)  # fmt: skip
        front = pareto_front(points)
        axes.plot([p[0] for p in front], [p[1] for p in front], "k-", linewidth=1, label="Pareto front")
        last = None
        for x, y, label in front:
            if last is None or y - last >= 0.01:  # label the front's steps, not every point of a plateau
                axes.annotate(label, (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
                last = y
        axes.set_ylabel("NDCG@10")
        axes.set_title(f"{dataset['name']} ({dataset['num_documents']:,} docs)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    return save_figure(figure, path)


# --- command line -------------------------------------------------------------------------


def add_quality_parser(actions: argparse._SubParsersAction) -> None:
    from benchmarks.quality import DEFAULT_DATASETS, DEFAULT_DATASETS_ROOT, QualityBenchConfig

    defaults = QualityBenchConfig()
    p = actions.add_parser(
        "quality",
        help="NDCG@10 / MRR@10 / Recall@100 per dim on BEIR datasets: base vs tuned, two-stage, int8, binary",
        description="For each BEIR folder, encode the corpus and the test queries once per model (base and tuned on "
        "the train split; a missing tuned model is trained) and score exact, two-stage and quantised search at "
        "every dim. Writes quality.json, quality.md, quality_vs_dim.png and quality_vs_latency.png.",
    )
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        default=[],
        help=f"BEIR folder, repeatable (default: {', '.join(DEFAULT_DATASETS)} under --datasets-root)",
    )
    p.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS_ROOT, help="default: %(default)s")
    p.add_argument(
        "--tuned",
        action="append",
        default=[],
        metavar="NAME=MODEL_DIR",
        help="tuned model of the dataset NAME (its folder name), repeatable (default: --models-dir/NAME)",
    )
    p.add_argument("--models-dir", type=Path, default=defaults.models_dir, help="tuned models by dataset name "
                   "(default: %(default)s); a missing one is trained there")  # fmt: skip
    p.add_argument("--base-model", default=None, help="base model: hub name or local path (default: all-MiniLM-L6-v2)")
    p.add_argument("--dims", type=dims_argument, default=None, help="default: the tuned model's Matryoshka dims")
    p.add_argument("--split", default=defaults.split, help="qrels split to score (default: %(default)s)")
    p.add_argument("--train-split", default=defaults.train_split, help="qrels split to train on (default: train)")
    p.add_argument("--shortlists", type=int_list_argument, default=defaults.shortlists,
                   help="two-stage shortlist sizes (default: 30,100)")  # fmt: skip
    p.add_argument("--max-queries", type=int, default=None, help="score only the first N judged queries")
    p.add_argument("--timing-queries", type=int, default=defaults.timing_queries,
                   help="queries timed per option (default: %(default)s)")  # fmt: skip
    p.add_argument("--no-train", dest="train", action="store_false", help="report the base model alone when no "
                   "tuned model exists, instead of training one")  # fmt: skip
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="training (default: %(default)s)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=defaults.learning_rate, help="default: 1e-4")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--max-train-pairs", type=int, default=None, help="train on N sampled pairs (default: all)")
    p.add_argument(
        "--query-encoders",
        type=lambda text: [] if text == "none" else name_list_argument(text),
        default=defaults.query_encoders,
        help="the service's other query encoders scored next to torch's queries: onnx, onnx-int8, or none "
        "(default: onnx,onnx-int8)",
    )
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: the service's)")
    p.add_argument(
        "--latency",
        action="append",
        default=[],
        metavar="NAME=LATENCY_JSON",
        help="a `mrl bench latency` report of dataset NAME's index: its Pareto plot uses end-to-end HTTP p50",
    )
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.add_argument(
        "--workers", type=int, default=1, help="processes that encode each corpus: one per GPU, or CPU processes"
    )
    p.set_defaults(handler=run_quality_command)


def run_quality_command(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    report = run_quality(QualityBenchConfig(**config_fields(args)))
    print(quality_markdown(report), end="")
    print(f"wrote quality.json, quality.md, quality_vs_dim.png, quality_vs_latency.png to {args.out}")
    return 0
