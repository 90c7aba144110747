"""``mrl bench latency|two-stage``: argument parsing and printing; the work is in latency.py and search_quality.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import ENCODERS
from benchmarks.encoders import add_encoders_parser
from benchmarks.peers import add_peers_parser
from benchmarks.scaling import add_scaling_parser
from benchmarks.strategies import add_strategies_parser
from training.cli import config_fields, dims_argument

DEFAULT_OUT = Path("runs/bench")


def int_list_argument(text: str) -> list[int]:
    """argparse type for ``--concurrency 1,16``: comma-separated integers."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def name_list_argument(text: str) -> list[str]:
    """argparse type for ``--encoders torch,onnx``: comma-separated names (checked by the benchmark)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_server_limits(p: argparse.ArgumentParser, time_limit_s: float) -> None:
    """``--time-limit`` and ``--ready-timeout``: the bounds of every benchmark that starts servers."""
    p.add_argument("--time-limit", dest="time_limit_s", metavar="SECONDS", type=float, default=time_limit_s,
                   help=f"seconds; no request is sent after it ({time_limit_s:g})")  # fmt: skip
    p.add_argument("--ready-timeout", dest="ready_timeout_s", metavar="SECONDS", type=float, default=300.0,
                   help="seconds per server start (300)")  # fmt: skip


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks: quality per dim, HTTP latency, encoders, search scaling, peers, training strategies"
    )
    actions = bench.add_subparsers(dest="action", required=True, metavar="BENCHMARK")
    _add_quality_parser(actions)
    _add_latency_parser(actions)
    _add_two_stage_parser(actions)
    add_encoders_parser(actions)
    add_scaling_parser(actions)
    add_peers_parser(actions)
    add_strategies_parser(actions)


def _add_quality_parser(actions: argparse._SubParsersAction) -> None:
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
        "--latency",
        action="append",
        default=[],
        metavar="NAME=LATENCY_JSON",
        help="a `mrl bench latency` report of dataset NAME's index: its Pareto plot uses end-to-end HTTP p50",
    )
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default: %(default)s)")
    p.set_defaults(handler=run_quality_command)


def _add_latency_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "latency",
        help="end-to-end GET /search latency of a real server process",
        description="Start `mrl serve` on a free 127.0.0.1 port for each encoder backend, send a fixed number of "
        "GET /search requests per (dim, concurrency) after a warm-up, and report p50/p95/p99 latency, throughput, "
        "errors and the server's own stage timings.",
    )
    p.add_argument("--index", type=Path, required=True, help="index root or version folder")
    p.add_argument("--queries", type=Path, required=True, help="BEIR folder (its queries.jsonl) or a queries .jsonl")
    p.add_argument("--dims", type=dims_argument, default=None, help="dims to measure (default: every dim of the index)")
    p.add_argument(
        "--concurrency", type=int_list_argument, default=[1, 4, 16, 64], help="requests in flight (default: 1,4,16,64)"
    )
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per cell (default: %(default)s)")
    p.add_argument(
        "--encoders",
        type=name_list_argument,
        default=["torch", "onnx"],
        help="backends, each in its own server: torch, onnx, onnx-int8 (default: torch,onnx)",
    )
    p.add_argument("--rerank", action="store_true", help="add two-stage cells: smallest dim, rerank_dim = full")
    p.add_argument("--k", type=int, default=10, help="hits per request (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="server device (default: auto)")
    p.add_argument("--encoder-threads", type=int, default=None, help="server's encoder CPU threads")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: the server's)")
    add_server_limits(p, time_limit_s=900.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default: %(default)s)")
    p.set_defaults(handler=run_latency_command)


def _add_two_stage_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "two-stage",
        help="NDCG@10 of single-stage vs two-stage (shortlist at a small dim, re-score at full) search",
        description="Encode a BEIR split's queries once with the service's encoder; search the index at every dim "
        "(single-stage) and shortlist k×candidates at every smaller dim re-scored at the full dim (two-stage); "
        "report NDCG@10, MRR@10, Recall@100 and search time per query.",
    )
    p.add_argument("--index", type=Path, required=True, help="index root or version folder")
    p.add_argument("--data", type=Path, required=True, help="BEIR folder the index was built from")
    p.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=10, help="shortlist = k × candidates (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="hits a request asks for (default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder or hub name (default: the one in the manifest)")
    p.add_argument("--encoder", choices=ENCODERS, default="torch", help="query encoder backend (default: torch)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: %(default)s")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N judged queries")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default: %(default)s)")
    p.set_defaults(handler=run_two_stage_command)


def run_quality_command(args: argparse.Namespace) -> int:
    from benchmarks.quality import QualityBenchConfig, quality_markdown, run_quality

    report = run_quality(QualityBenchConfig(**config_fields(args)))
    print(quality_markdown(report), end="")
    print(f"wrote quality.json, quality.md, quality_vs_dim.png, quality_vs_latency.png to {args.out}")
    return 0


def run_latency_command(args: argparse.Namespace) -> int:
    from benchmarks.latency import LatencyConfig, latency_markdown, run_latency

    report = run_latency(LatencyConfig(**config_fields(args)))
    print(latency_markdown(report), end="")
    print(f"wrote {args.out / 'latency.json'}, {args.out / 'latency.md'}")
    return 0


def run_two_stage_command(args: argparse.Namespace) -> int:
    from benchmarks.search_quality import QualityConfig, quality_markdown, run_two_stage

    report = run_two_stage(QualityConfig(**config_fields(args)))
    print(quality_markdown(report), end="")
    print(f"wrote {args.out / 'two_stage.json'}, {args.out / 'two_stage.md'}")
    return 0
