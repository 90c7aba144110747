"""Two-stage search quality: what re-scoring a small-dim shortlist at the full dimension buys back.

The index and the query encoder are opened exactly as the service opens them
(``service.encoders.load_encoder`` with the manifest's prompts, ``index.loaded.open_index``
checked against the model's fingerprint). The judged queries of one BEIR split are encoded
once, in batches, at full dimension; then, query by query as the service answers them:

- single-stage at every dim ``d`` of the index: the ``d`` FAISS index, top 100;
- two-stage for every ``d`` below the full dimension: shortlist ``k × candidates`` documents
  at ``d``, re-score them exactly at the full dimension.

Both run through ``index.search.staged_search``, the function the service searches with, are
scored with ``core.metrics.score_rankings`` (NDCG@10, MRR@10, Recall@100) and are timed per
query in the same run (query truncation + FAISS search [+ re-scoring]; encoding
excluded, it is the same for both).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import ENCODERS, encoder_settings, format_ms, machine_info, markdown_row, utc_now, write_report
from benchmarks.args import DEFAULT_OUT
from core.cli_args import add_output_argument, config_fields
from core.data import DataError, Qrels, RetrievalDataset, load_beir
from core.errors import ConfigError
from core.files import json_fields
from core.metrics import score_rankings
from index.loaded import LoadedIndex
from index.locator import LOCATOR_FORMS
from index.search import staged_search
from index.stores import IndexStore, open_store
from service.encoders import LoadedEncoder, load_encoder
from service.settings import load_settings
from training.evaluate import TOP_K

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@100")


@dataclass
class QualityConfig:
    """What ``mrl bench two-stage`` can be told."""

    index: Path
    data: Path
    split: str = "test"
    candidates: int = 10  # the shortlist holds k × candidates documents, as the service's rerank_candidates
    k: int = 10  # hits a request asks for
    model: str | None = None  # default: the model named in the manifest
    encoder: str = "torch"
    device: str = "auto"
    max_queries: int | None = None  # default: every judged query of the split
    out: Path | None = None


@dataclass
class RankedRun:
    """Row ids per query, best first (-1 pads), and the search time of each query in seconds."""

    rows: np.ndarray
    seconds: np.ndarray


def check_config(config: QualityConfig) -> None:
    """Raises ConfigError for a count that is not positive or an unknown encoder."""
    for name, value in {"--candidates": config.candidates, "--k": config.k}.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.max_queries is not None and config.max_queries <= 0:
        raise ConfigError(f"--max-queries must be positive, got {config.max_queries}")
    if config.encoder not in ENCODERS:
        raise ConfigError(f"unknown encoder {config.encoder!r} (choose from {', '.join(ENCODERS)})")


def open_engine(config: QualityConfig) -> tuple[LoadedEncoder, LoadedIndex, IndexStore]:
    """The service's query encoder and the index, checked to belong together (as ``Searcher.open`` does), and
    the store it was opened from: close it after the index (a Milvus index searches through the store's client).

    Raises:
        IndexFolderError: Missing or corrupt index, or one built with another model. ModelError: No model.
    """
    settings = load_settings(
        index=config.index,
        model=config.model,
        device=config.device,
        **encoder_settings(config.encoder),
    )
    store = open_store(settings.locator())
    try:
        version = store.current()
        loaded_encoder = load_encoder(settings, store.manifest(version))
        index = store.open(version, device=config.device, expected_fingerprint=loaded_encoder.fingerprint)
    except BaseException:
        store.close()
        raise
    return loaded_encoder, index, store


def single_stage(index: LoadedIndex, queries: np.ndarray, dim: int, depth: int) -> RankedRun:
    """Search the ``dim`` index one query at a time, as one ``GET /search`` does."""
    dim_index = index.indexes[dim]

    def search(query: np.ndarray) -> np.ndarray:
        return staged_search(dim_index, index.vectors, query, dim, depth).rows

    return timed_per_query(search, queries, depth)


def two_stage(index: LoadedIndex, queries: np.ndarray, dim: int, rerank_dim: int, shortlist: int) -> RankedRun:
    """Shortlist ``shortlist`` rows at ``dim``, re-score them all exactly at ``rerank_dim``, one query at a time.

    The whole shortlist is kept, re-ordered (``staged_search`` with ``k = shortlist`` and one
    candidate per hit): its first ``k`` rows are what the service returns for ``k``, and its
    recall is the shortlist's recall.
    """
    dim_index = index.indexes[dim]

    def search(query: np.ndarray) -> np.ndarray:
        return staged_search(dim_index, index.vectors, query, dim, shortlist, rerank_dim, candidates=1).rows

    return timed_per_query(search, queries, shortlist)


def timed_per_query(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, width: int) -> RankedRun:
    """Run ``search`` on each ``(1, full_dim)`` query row, timing each call; one unmeasured call warms up first."""
    rows = np.full((len(queries), width), -1, dtype=np.int64)
    seconds = np.empty(len(queries))
    search(queries[:1])
    for number in range(len(queries)):
        started = time.perf_counter()
        found = search(queries[number : number + 1])
        seconds[number] = time.perf_counter() - started
        rows[number, : found.shape[1]] = found[0]
    return RankedRun(rows, seconds)


def row_ids(index: LoadedIndex, runs: list[RankedRun]) -> dict[int, str]:
    """Document id of every row any run returned (one store lookup per distinct row)."""
    wanted = sorted({int(row) for run in runs for row in np.unique(run.rows) if row >= 0})
    return {row: doc.id for row, doc in zip(wanted, index.store.get(wanted), strict=True) if doc is not None}


def score_run(run: RankedRun, query_ids: list[str], ids: dict[int, str], qrels: Qrels) -> dict[str, float]:
    """NDCG@10, MRR@10, Recall@100 and the search time per query (mean and median, ms) of one run."""
    rankings = {qid: [ids[int(r)] for r in rows if r >= 0] for qid, rows in zip(query_ids, run.rows, strict=True)}
    metrics = score_rankings(rankings, qrels)
    result = {name: round(metrics[name], 4) for name in METRICS}
    result["ms_per_query_mean"] = round(1000 * float(run.seconds.mean()), 4)
    result["ms_per_query_p50"] = round(1000 * float(np.median(run.seconds)), 4)
    return result


def _judged_queries(config: QualityConfig) -> tuple[RetrievalDataset, list[str], Qrels]:
    dataset = load_beir(config.data, [config.split])
    qrels = dataset.split(config.split)
    query_ids = list(qrels)[: config.max_queries]
    return dataset, query_ids, {qid: qrels[qid] for qid in query_ids}


def _check_coverage(index: LoadedIndex, qrels: Qrels, config: QualityConfig) -> int:
    """Number of judged documents missing from the index; all missing means the wrong dataset.

    Raises:
        DataError: When the index holds none of the judged documents.
    """
    judged = {doc for docs in qrels.values() for doc, score in docs.items() if score > 0}
    missing = len(judged - index.store.ids())
    if judged and missing == len(judged):
        raise DataError(
            config.data,
            f"none of the judged documents of split {config.split!r} are in the index {index.path or config.index}",
        )
    if missing:
        logger.warning("%d of %d judged documents are not in the index; they count as not found", missing, len(judged))
    return missing


def run_two_stage(config: QualityConfig) -> dict[str, Any]:
    """Single-stage quality at every dim and two-stage (→ full) quality at every smaller dim, with search times.

    Returns:
        The report (settings, machine, index, dataset, ``single_stage`` and ``two_stage`` by dim);
        written as ``two_stage.json`` and ``two_stage.md`` into ``config.out`` when it is set.

    Raises:
        ConfigError: Invalid settings. DataError: Bad dataset or one the index does not hold.
        IndexFolderError: Missing, corrupt or mismatched index. ModelError: The model cannot be loaded.
    """
    check_config(config)
    started_at, started = utc_now(), time.perf_counter()
    dataset, query_ids, qrels = _judged_queries(config)
    loaded_encoder, index, store = open_engine(config)
    try:
        missing = _check_coverage(index, qrels, config)
        encode_started = time.perf_counter()
        queries = loaded_encoder.encoder.encode_queries([dataset.queries[qid] for qid in query_ids])
        encoded = {"queries": len(query_ids), "seconds": round(time.perf_counter() - encode_started, 3)}
        measured = compare_stages(index, queries, query_ids, qrels, config)
        index_info = _index_dict(index, loaded_encoder.backend)
    finally:
        index.close()
        store.close()
    report = {
        "benchmark": "two-stage",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 2),
        "settings": json_fields(config),
        "machine": machine_info(),
        "index": index_info,
        "dataset": {
            "name": dataset.name,
            "split": config.split,
            "num_queries": len(query_ids),
            "num_documents": len(dataset.corpus),
            "judged_documents_missing_from_index": missing,
        },
        "encode": encoded,
        **measured,
    }
    if config.out is not None:
        write_quality_report(report, config.out)
    return report


def compare_stages(
    index: LoadedIndex, queries: np.ndarray, query_ids: list[str], qrels: Qrels, config: QualityConfig
) -> dict[str, Any]:
    """Single-stage runs at every dim and two-stage runs (→ full) at every smaller dim, scored and timed."""
    full = index.manifest.model.full_dim
    shortlist = config.k * config.candidates
    single = {dim: single_stage(index, queries, dim, max(TOP_K, config.k)) for dim in index.dims}
    staged = {dim: two_stage(index, queries, dim, full, shortlist) for dim in index.dims if dim < full}
    ids = row_ids(index, [*single.values(), *staged.values()])
    return {
        "full_dim": full,
        "shortlist": shortlist,
        "single_stage": {str(d): score_run(run, query_ids, ids, qrels) for d, run in single.items()},
        "two_stage": {
            str(d): {"rerank_dim": full, **score_run(run, query_ids, ids, qrels)} for d, run in staged.items()
        },
    }


def _index_dict(index: LoadedIndex, encoder: str) -> dict[str, Any]:
    manifest = index.manifest
    return {
        "path": str(index.path or index.location),
        "version": manifest.version,
        "model": manifest.model.name,
        "encoder": encoder,
        "num_vectors": manifest.num_vectors,
        "dims": manifest.dims,
        "factories": {str(dim): manifest.indexes[dim].factory for dim in manifest.dims},
    }


def write_quality_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``two_stage.json`` and ``two_stage.md`` in ``folder``, each written atomically."""
    return write_report(report, folder, "two_stage", quality_markdown)


def comparison_table(report: dict[str, Any]) -> str:
    """dim | single-stage NDCG@10 | two-stage (→full) NDCG@10 | Δ | two-stage % of full | ms/query of each.

    The full dim's own row has no two-stage figures; its "% of full" is 100 by definition.
    """
    full = report["full_dim"]
    reference = report["single_stage"][str(full)]["ndcg@10"]
    header = ["dim", "single-stage NDCG@10", f"two-stage (→{full}) NDCG@10", "Δ", "two-stage % of full"]
    header += ["single ms/query", "two-stage ms/query"]
    lines = [markdown_row(header), markdown_row(["---:"] * len(header))]
    for dim, single in report["single_stage"].items():
        staged = report["two_stage"].get(dim)
        compared = staged["ndcg@10"] if staged else single["ndcg@10"]  # the full row: itself, 100 %
        cells = [dim, f"{single['ndcg@10']:.3f}"]
        cells += [f"{staged['ndcg@10']:.3f}", f"{staged['ndcg@10'] - single['ndcg@10']:+.3f}"] if staged else ["–", "–"]
        cells.append(f"{100 * compared / reference:.1f}%" if reference else "–")
        cells += [format_ms(single["ms_per_query_mean"]), format_ms(staged["ms_per_query_mean"]) if staged else "–"]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def detail_table(report: dict[str, Any]) -> str:
    """Every metric and both timings, one row per (dim, mode)."""
    header = ["dim", "mode", "NDCG@10", "MRR@10", "R@100", "ms/query mean", "ms/query p50"]
    lines = [markdown_row(header), markdown_row(["---:", "---", *["---:"] * 5])]
    for dim, single in report["single_stage"].items():
        modes = [("single", single)]
        if dim in report["two_stage"]:
            modes.append((f"two-stage →{report['full_dim']}", report["two_stage"][dim]))
        for mode, values in modes:
            cells = [dim, mode, *(f"{values[name]:.3f}" for name in METRICS)]
            lines.append(
                markdown_row(cells + [format_ms(values["ms_per_query_mean"]), format_ms(values["ms_per_query_p50"])])
            )
    return "\n".join(lines)


def quality_markdown(report: dict[str, Any]) -> str:
    """Title, context, the comparison table and the detail table."""
    dataset, index = report["dataset"], report["index"]
    context = (
        f"Dataset `{dataset['name']}`, split `{dataset['split']}`: {dataset['num_queries']} judged queries; index "
        f"`{index['path']}` ({index['num_vectors']} vectors, {index['encoder']} encoder). Two-stage: shortlist "
        f"{report['shortlist']} documents at the dim, re-score them exactly at {report['full_dim']}. Times are per "
        "query, search only (truncation + FAISS [+ re-scoring]); queries were encoded once beforehand."
    )
    parts = ["# Two-stage search quality", "", context, "", comparison_table(report), "", "## Details", ""]
    return "\n".join([*parts, detail_table(report)]) + "\n"


# --- command line -------------------------------------------------------------------------


def add_two_stage_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "two-stage",
        help="NDCG@10 of single-stage vs two-stage (shortlist at a small dim, re-score at full) search",
        description="Encode a BEIR split's queries once with the service's encoder; search the index at every dim "
        "(single-stage) and shortlist k×candidates at every smaller dim re-scored at the full dim (two-stage); "
        "report NDCG@10, MRR@10, Recall@100 and search time per query.",
    )
    p.add_argument("--index", required=True, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    p.add_argument("--data", type=Path, required=True, help="BEIR folder the index was built from")
    p.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=10, help="shortlist = k × candidates (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="hits a request asks for (default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder or hub name (default: the one in the manifest)")
    p.add_argument("--encoder", choices=ENCODERS, default="torch", help="query encoder backend (default: torch)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: %(default)s")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N judged queries")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_two_stage_command)


def run_two_stage_command(args: argparse.Namespace) -> int:
    report = run_two_stage(QualityConfig(**config_fields(args)))
    print(quality_markdown(report), end="")
    print(f"wrote {args.out / 'two_stage.json'}, {args.out / 'two_stage.md'}")
    return 0
