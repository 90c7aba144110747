"""``mrl bench passages``: does splitting long documents put the answer in front of the reader, at what cost?

On a corpus of long documents whose test questions come with the character span of their answer
(``medquad_pages``: consumer-health pages, one per disease or drug, and ``answers.jsonl``), each chunk
setting is indexed as ``mrl index build`` indexes it (:func:`index.chunking.chunk_documents`, the
model's own tokens) and searched as the service searches (:func:`index.search.staged_search`, exact
``Flat`` indexes, every dim and a two-stage plan). Reported per setting and plan:

- **answer-in-context@k** (k = 1, 3, 5): the share of questions whose answer span is at least half
  covered by the top-k passages returned (no grouping: what a RAG application would put in its
  prompt). An unsplit document's passage is what the encoder read of it: its first window of tokens,
  since the rest is never seen by the index (and a whole page would not fit a reader's prompt either);
- **page NDCG@10** with hits grouped by document (``group_by=document``);
- vectors and the bytes of the dim's index.

The corpus is the test split's pages plus ``--distractors`` other pages drawn with the seed (the
training split's pages: realistic neighbours from the same site and template).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine_info, markdown_row, save_figure, utc_now, write_report
from core.data import DataError, Document, load_beir
from core.errors import ConfigError
from core.files import json_fields
from core.matryoshka import truncate_normalize
from core.metrics import score_rankings

logger = logging.getLogger(__name__)

KS = (1, 3, 5)
COVERED = 0.5  # share of the answer's characters that the returned passages must hold
# the two-stage plan: shortlist at 64 dims (else the smallest), 10 candidates per hit, re-scored at the full dim
TWO_STAGE = (64, 10)


@dataclass
class PassagesConfig:
    data: Path
    model: str | None = None
    chunk_sizes: list[int] = field(default_factory=lambda: [0, 254, 128])
    overlap: int = 32
    distractors: int = 1000
    max_queries: int | None = None
    dims: list[int] | None = None
    seed: int = 0
    batch_size: int = 64
    cache: Path | None = None
    out: Path | None = None
    progress: bool = True


def read_answers(folder: Path) -> dict[str, tuple[str, int, int]]:
    """``answers.jsonl``: query id → (page id, start, end) of its answer in the page's text."""
    path = folder / "answers.jsonl"
    if not path.is_file():
        raise DataError(path, "not found: this benchmark needs the answer spans of a long-document corpus")
    answers = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["query-id"]] = (row["corpus-id"], int(row["start"]), int(row["end"]))
    return answers


def corpus_sample(pages: dict[str, Document], judged: set[str], distractors: int, seed: int) -> list[Document]:
    """Every judged page, and ``distractors`` others drawn with ``seed``, in the corpus's order."""
    others = sorted(set(pages) - judged)
    chosen = judged | set(random.Random(seed).sample(others, min(distractors, len(others))))
    return [page for page_id, page in pages.items() if page_id in chosen]


def read_spans(passages: list[Document], tokenizer: Any, window: int) -> list[tuple[int, int]]:
    """The span of each passage's document that the encoder read: all of a split passage, the first ``window``
    tokens of a whole document (title included, as it is encoded)."""
    spans = []
    for passage in passages:
        if passage.parent is not None:
            spans.append(passage.span)
            continue
        title = len(tokenizer(passage.title, add_special_tokens=False)["input_ids"]) if passage.title else 0
        offsets = tokenizer(passage.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        kept = [end for _, end in offsets["offset_mapping"][: max(window - title, 0)]]
        spans.append((passage.start, passage.start + (kept[-1] if kept else 0)))
    return spans


def answer_in_context(
    rows: np.ndarray,
    query_ids: list[str],
    answers: dict[str, tuple[str, int, int]],
    passages: list[Document],
    spans: list[tuple[int, int]],
) -> dict[int, float]:
    """Share of questions whose answer is at least ``COVERED`` covered by the top-k passages, per k in ``KS``."""
    found = {k: 0 for k in KS}
    for qid, hits in zip(query_ids, rows, strict=True):
        page, start, end = answers[qid]
        covered = np.zeros(end - start, dtype=bool)
        for rank, row in enumerate(hits[: max(KS)], start=1):
            if row >= 0 and passages[row].doc_id == page:
                a, b = spans[row]
                covered[max(a, start) - start : max(min(b, end), start) - start] = True
            if rank in KS and covered.mean() >= COVERED:
                for k in KS:
                    found[k] += k >= rank
                break
    return {str(k): round(found[k] / len(query_ids), 4) for k in KS}  # str keys: as the JSON report holds them


def run_passages(config: PassagesConfig) -> dict[str, Any]:
    from benchmarks.quality import cached_encode
    from core.models import SentenceTransformerEncoder, load_model, model_dims, model_fingerprint
    from index.backends import FaissIndex
    from index.chunking import ChunkSettings, chunk_documents, model_window
    from index.params import IndexPlan
    from index.search import staged_search

    if not config.chunk_sizes:
        raise ConfigError("--chunk-sizes needs at least one size (0: unsplit)")
    dataset = load_beir(config.data, ["test"])
    answers = read_answers(config.data)
    qrels = dataset.split("test")
    query_ids = [qid for qid in qrels if qid in answers][: config.max_queries]
    qrels = {qid: qrels[qid] for qid in query_ids}
    corpus = corpus_sample(dataset.corpus, {answers[q][0] for q in query_ids}, config.distractors, config.seed)
    model = load_model(config.model)
    fingerprint = model_fingerprint(model)
    encoder = SentenceTransformerEncoder(model, config.model or "default", config.batch_size, config.progress)
    dims = config.dims or model_dims(model, config.model)
    full, window = max(dims), model_window(model)
    cache = config.cache or (config.out / "cache" if config.out else None)
    texts = [dataset.queries[qid] for qid in query_ids]
    queries, _ = cached_encode(encoder.encode_queries, texts, f"queries:{fingerprint}", cache)
    settings = []
    for size in config.chunk_sizes:
        chunking = ChunkSettings(size, config.overlap if size else 0)
        prompt = model.prompts.get("document", "")
        passages, report = chunk_documents(corpus, model.tokenizer, window, chunking, prompt)
        started = time.perf_counter()
        vectors, cached = cached_encode(encoder.encode_documents, [p.passage for p in passages], fingerprint, cache)
        encode_s = None if cached else round(time.perf_counter() - started, 1)
        spans = read_spans(passages, model.tokenizer, window)
        doc_of = [passage.doc_id for passage in passages]
        group = lambda rows, doc_of=doc_of: [doc_of[row] for row in rows]  # noqa: E731
        shortlist = TWO_STAGE[0] if TWO_STAGE[0] in dims and TWO_STAGE[0] < full else min(dims)
        plans = [(dim, None, 1) for dim in dims] + [(shortlist, full, TWO_STAGE[1])]
        indexes = {dim: FaissIndex.build(truncate_normalize(vectors, dim), IndexPlan("Flat", {})) for dim in dims}
        results = []
        for dim, rerank_dim, candidates in plans:
            index = indexes[dim]
            top = staged_search(index, vectors, queries, dim, max(KS), rerank_dim, candidates)
            grouped = staged_search(index, vectors, queries, dim, 10, rerank_dim, candidates, group=group)
            ranked = zip(query_ids, grouped.rows, strict=True)
            rankings = {qid: [doc_of[row] for row in rows if row >= 0] for qid, rows in ranked}
            results.append(
                {
                    "plan": f"{dim}>{rerank_dim}x{candidates}" if rerank_dim else str(dim),
                    "dim": dim,
                    "rerank_dim": rerank_dim,
                    "answer_in_context": answer_in_context(top.rows, query_ids, answers, passages, spans),
                    "page_ndcg_at_10": round(score_rankings(rankings, qrels)["ndcg@10"], 4),
                    "index_bytes": len(vectors) * dim * 4,
                }
            )
            logger.info("chunk size %s, plan %s: %s", size or "off", results[-1]["plan"], results[-1])
        settings.append({"chunking": report.to_dict(), "vectors": len(vectors), "encode_seconds": encode_s,
                         "results": results})  # fmt: skip
    return {
        "benchmark": "passages",
        "created": utc_now(),
        "settings": {**json_fields(config), "dims": dims, "window": window, "model_fingerprint": fingerprint},
        "data": {
            "pages": len(corpus),
            "judged_pages": len({answers[q][0] for q in query_ids}),
            "queries": len(query_ids),
            "source": str(config.data),
        },  # fmt: skip
        "machine": machine_info(),
        "chunk_settings": settings,
    }


def passages_markdown(report: dict[str, Any]) -> str:
    data, settings = report["data"], report["settings"]
    lines = [
        "# Long documents: passages against whole documents",
        "",
        f"`{data['source']}`: {data['queries']} test questions; {data['pages']} pages indexed ({data['judged_pages']} "
        f"that hold a test answer, the rest drawn from the other pages as distractors, seed {settings['seed']}). "
        f"Model window {settings['window']} tokens. Exact search; two-stage: shortlist at {TWO_STAGE[0]} dims, "
        f"{TWO_STAGE[1]} candidates per hit, re-scored at the full dim. Answer-in-context@k: the answer span is at "
        f"least {COVERED:.0%} covered by the top-k passages (no grouping); page NDCG@10 with hits grouped by page.",
        "",
    ]
    header = ["passages", "vectors", "plan", *(f"answer@{k}" for k in KS), "page NDCG@10", "index MiB"]
    lines += [markdown_row(header), markdown_row(["---", "---:", "---", *["---:"] * (len(header) - 3)])]
    for setting in report["chunk_settings"]:
        chunking = setting["chunking"]
        name = f"≤ {chunking['size']} tokens" if chunking["size"] else "whole pages (unsplit)"
        for row in setting["results"]:
            cells = [name, f"{setting['vectors']:,}", row["plan"]]
            cells += [f"{row['answer_in_context'][str(k)]:.3f}" for k in KS]
            cells += [f"{row['page_ndcg_at_10']:.3f}", f"{row['index_bytes'] / 2**20:.1f}"]
            lines.append(markdown_row(cells))
    return "\n".join(lines) + "\n"


def plot_passages(report: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for setting in report["chunk_settings"]:
        chunking = setting["chunking"]
        label = f"≤ {chunking['size']} tokens" if chunking["size"] else "whole pages"
        single = [row for row in setting["results"] if row["rerank_dim"] is None]
        dims = [row["dim"] for row in single]
        answer5 = [row["answer_in_context"]["5"] for row in single]
        axes[0].plot(dims, answer5, marker="o", label=label)
        axes[1].plot([row["index_bytes"] / 2**20 for row in single], answer5, marker="o", label=label)
    axes[0].set(xscale="log", xlabel="dimension", ylabel="answer-in-context@5", title="Answer in the top 5 passages")
    dims = sorted({row["dim"] for setting in report["chunk_settings"] for row in setting["results"]})
    axes[0].set_xticks(dims, [str(dim) for dim in dims])
    axes[0].minorticks_off()
    axes[1].set(xscale="log", xlabel="index size (MiB)", ylabel="answer-in-context@5", title="…against index size")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(figure, path)


def write_passages_report(report: dict[str, Any], folder: Path) -> list[Path]:
    written = write_report(report, folder, "passages", passages_markdown)
    return [*written, plot_passages(report, folder / "passages.png")]


def add_passages_parser(actions: argparse._SubParsersAction) -> None:
    from benchmarks.args import DEFAULT_OUT, int_list_argument
    from core.cli_args import add_output_argument

    p = actions.add_parser(
        "passages",
        help="long documents: answer-in-context@k and page NDCG per chunk size and dim",
        description="Index a long-document corpus with answer spans (medquad_pages) unsplit and at each chunk size, "
        "search it at every dim and a two-stage plan, and report how often the answer is in the top-k passages, "
        "page-level NDCG@10 (grouped by page), vectors and index bytes.",
    )
    p.add_argument("--data", type=Path, required=True, help="BEIR folder with answers.jsonl (e.g. medquad_pages)")
    p.add_argument("--model", default=None, help="model folder or hub name (default: all-MiniLM-L6-v2)")
    p.add_argument("--chunk-sizes", type=int_list_argument, default=[0, 254, 128],
                   help="passage sizes in tokens, 0 for unsplit (default: 0,254,128)")  # fmt: skip
    p.add_argument("--overlap", type=int, default=32, help="tokens of overlap (default: %(default)s)")
    p.add_argument("--distractors", type=int, default=1000, help="pages besides the judged ones (default: 1000)")
    p.add_argument("--max-queries", type=int, default=None, help="the first N test questions (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="encoding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_passages_command)


def run_passages_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    config = PassagesConfig(**config_fields(args))
    report = run_passages(config)
    paths = write_passages_report(report, config.out)
    print(passages_markdown(report), end="")
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
