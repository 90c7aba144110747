"""``mrl bench formats``: what the quantised ``/v1/embeddings`` formats keep of NDCG@10 at each dim.

The corpus and the test queries are encoded once at full dimension (cached); at each dim the vectors
are truncated and re-normalised, then kept as float32, as ``int8`` (each coordinate mapped from its
range over the corpus, :func:`core.quantization.int8_ranges`, the calibration the service uses) or
as ``ubinary`` (packed sign bits), exactly as the service returns them. Search is exact: inner
product of the int8 codes, Hamming similarity of the bits. Reported per dim: NDCG@10 of each format,
its share of float32's, and bytes per vector.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine_info, markdown_row, utc_now, write_report
from core.data import load_beir
from core.matryoshka import truncate_normalize
from core.metrics import score_rankings
from core.quantization import int8_ranges, quantize

logger = logging.getLogger(__name__)

FORMATS = ("float", "int8", "ubinary")
K = 100


@dataclass
class FormatsConfig:
    data: Path
    model: str | None = None
    split: str = "test"
    cache: Path | None = None
    out: Path = Path("runs/bench")
    progress: bool = True


def top_rows(queries: np.ndarray, docs: np.ndarray, fmt: str, k: int = K) -> np.ndarray:
    """The ``k`` best documents per query in ``fmt``'s own similarity: inner product (float, int8 codes as
    integers) or matching bits (ubinary)."""
    if fmt == "ubinary":
        q, d = np.unpackbits(queries, axis=1).astype(np.float32), np.unpackbits(docs, axis=1).astype(np.float32)
        scores = q @ d.T + (1 - q) @ (1 - d).T  # bits that agree
    else:
        scores = queries.astype(np.float32) @ docs.astype(np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def measure(config: FormatsConfig) -> dict[str, Any]:
    from benchmarks.quality import cached_encode, encode_corpus, load_scored_model
    from core.models import SentenceTransformerEncoder, model_dims

    dataset = load_beir(config.data, [config.split])
    qrels = {q: d for q, d in dataset.split(config.split).items() if any(g > 0 for g in d.values())}
    model, fingerprint = load_scored_model(config.model)
    dims = sorted(model_dims(model, config.model), reverse=True)
    doc_ids = list(dataset.corpus)
    cache = config.cache or config.out / "cache"
    texts = [dataset.corpus[d].passage for d in doc_ids]
    docs, _ = cached_encode(lambda t: encode_corpus(model, t, 1, config.progress), texts, fingerprint, cache)
    query_ids = sorted(qrels)
    encoder = SentenceTransformerEncoder(model, "bench", 64, False)
    queries, _ = cached_encode(encoder.encode_queries, [dataset.queries[q] for q in query_ids], fingerprint + ":q",
                               cache)  # fmt: skip
    rows = []
    for dim in dims:
        d, q = truncate_normalize(docs, dim), truncate_normalize(queries, dim)
        ranges = int8_ranges(docs, dim)
        stored = {"float": (q, d), "int8": (quantize(q, "int8", ranges), quantize(d, "int8", ranges)),
                  "ubinary": (quantize(q, "ubinary"), quantize(d, "ubinary"))}  # fmt: skip
        row: dict[str, Any] = {"dim": dim}
        for fmt in FORMATS:
            top = top_rows(*stored[fmt], fmt)
            rankings = {qid: [doc_ids[i] for i in found] for qid, found in zip(query_ids, top, strict=True)}
            row[fmt] = round(score_rankings(rankings, qrels)["ndcg@10"], 4)
            row[f"{fmt}_bytes"] = int(stored[fmt][1].itemsize * stored[fmt][1].shape[1])
        rows.append(row)
        logger.info("dim %d: %s", dim, row)
    return {
        "benchmark": "formats",
        "at": utc_now(),
        "machine": machine_info(),
        "dataset": dataset.name,
        "split": config.split,
        "model": config.model or "all-MiniLM-L6-v2",
        "queries": len(query_ids),
        "documents": len(doc_ids),
        "rows": rows,
    }


def formats_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Quantised embeddings: NDCG@10 per dim and format",
        "",
        f"{report['dataset']} ({report['split']}: {report['queries']} queries, {report['documents']} documents), "
        f"model `{Path(report['model']).name}`; exact search in each format's own similarity.",
        "",
        markdown_row(["dim", "float32", "int8", "% of float", "ubinary", "% of float", "bytes: float / int8 / bits"]),
        markdown_row(["---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for row in report["rows"]:
        base = row["float"] or 1.0
        lines.append(markdown_row([
            str(row["dim"]), f"{row['float']:.3f}", f"{row['int8']:.3f}", f"{100 * row['int8'] / base:.1f}%",
            f"{row['ubinary']:.3f}", f"{100 * row['ubinary'] / base:.1f}%",
            f"{row['float_bytes']} / {row['int8_bytes']} / {row['ubinary_bytes']}",
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def add_formats_parser(actions: argparse._SubParsersAction) -> None:
    from core.cli_args import add_output_argument

    p = actions.add_parser(
        "formats",
        help="NDCG@10 per dim of the /v1/embeddings formats: float32, int8, ubinary",
        description="Encode a BEIR dataset once, then search it exactly at every dim in float32, int8 (corpus-"
        "calibrated ranges) and packed sign bits, as /v1/embeddings returns them.",
    )
    p.add_argument("--data", type=Path, required=True, help="BEIR folder")
    p.add_argument("--model", default=None, help="model folder or hub name (default: all-MiniLM-L6-v2)")
    p.add_argument("--split", default="test")
    p.add_argument("--cache", type=Path, default=None, help="encoding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=Path("runs/bench"))
    p.set_defaults(handler=run_formats_command)


def run_formats_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    config = FormatsConfig(**config_fields(args))
    report = measure(config)
    paths = write_report(report, config.out, "formats", formats_markdown)
    print(formats_markdown(report), end="")
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
