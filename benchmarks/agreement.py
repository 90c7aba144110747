"""``mrl bench agreement``: does label-free agreement with the full dim predict a plan's real NDCG@10 ratio?

For each labelled dataset and model, a sample of the test split (``--max-queries`` judged questions,
their judged documents and random others up to ``--max-docs``) is indexed as ``mrl index build
--eval-data`` indexes it, so every plan (each dim, each two-stage plan) has its real NDCG@10 and its
ratio to the full dim's. The same plans are then scored without labels
(:mod:`index.calibration`) with every kind of pseudo-query (a random sentence, the first sentence,
the title), each held out from its own document or not, and both measures (agreement@10, rank-aware;
overlap@10). Reported:

- per dataset, model and plan: the NDCG@10 ratio next to each label-free figure;
- per pseudo-query kind and measure: the mean absolute error of predicting the ratio with the raw
  figure, and with a linear mapping ``ratio ≈ a + b · agreement`` fitted on the *other* datasets
  (leave one dataset out: a set is never predicted by a mapping fitted on it);
- a plot of ratio against agreement for the default kind.
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
from core.data import load_beir

logger = logging.getLogger(__name__)

DATASETS = ["scifact", "medquad", "medquad_pages", "piaf_fr"]
VARIANTS = [(kind, held) for kind in ("random", "first", "title") for held in (True, False)]
MEASURES = ("agreement", "overlap")


@dataclass
class AgreementConfig:
    datasets_root: Path
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    models: list[str] = field(default_factory=lambda: ["base"])
    max_queries: int = 300
    max_docs: int = 2000
    pseudo_queries: int = 200
    dims: list[int] | None = None  # default: the model's
    seed: int = 0
    cache: Path | None = None
    out: Path = Path("runs/bench")
    progress: bool = True


def sample_dataset(source: Path, target: Path, max_queries: int, max_docs: int, seed: int) -> int:
    """A BEIR folder at ``target``: up to ``max_queries`` judged test questions, their judged documents and random
    others up to ``max_docs``. Returns the number of documents."""
    dataset = load_beir(source, ["test"])
    qrels = dataset.split("test")
    rng = random.Random(seed)
    queries = sorted(q for q in qrels if q in dataset.queries)
    queries = sorted(rng.sample(queries, min(max_queries, len(queries))))
    judged = sorted({doc for q in queries for doc in qrels[q] if doc in dataset.corpus})
    others = sorted(set(dataset.corpus) - set(judged))
    extra = rng.sample(others, max(0, min(len(others), max_docs - len(judged))))
    chosen = set(judged) | set(extra)
    target.mkdir(parents=True, exist_ok=True)
    (target / "qrels").mkdir(exist_ok=True)
    with (target / "corpus.jsonl").open("w", encoding="utf-8") as out:
        for doc_id, doc in dataset.corpus.items():
            if doc_id in chosen:
                out.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with (target / "queries.jsonl").open("w", encoding="utf-8") as out:
        for q in queries:
            out.write(json.dumps({"_id": q, "text": dataset.queries[q]}) + "\n")
    with (target / "qrels" / "test.tsv").open("w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            for doc, grade in qrels[q].items():
                if doc in chosen:
                    out.write(f"{q}\t{doc}\t{grade}\n")
    return len(chosen)


def measure_one(config: AgreementConfig, dataset: str, model: str, work: Path) -> list[dict[str, Any]]:
    """Every plan of one dataset sample and model: its NDCG@10 ratio and every label-free figure."""
    from core.models import SentenceTransformerEncoder, load_model
    from index.build import BuildConfig, build_index
    from index.calibration import draw_pseudo_queries
    from index.loaded import open_index
    from index.plans import Plan, with_agreement

    data = work / "data" / dataset
    if not (data / "corpus.jsonl").is_file():
        sample_dataset(config.datasets_root / dataset, data, config.max_queries, config.max_docs, config.seed)
    name = "base" if model == "base" else Path(model).name
    root = work / "indexes" / f"{dataset}-{name}"
    build = BuildConfig(
        data=data, output=root, model=None if model == "base" else model, eval_data=data, calibration="none",
        dims=config.dims, cache_dir=config.cache or work / "cache", progress=config.progress, device="cpu",
        keep_versions=1,
    )  # fmt: skip
    started = time.perf_counter()
    _, manifest = build_index(build)
    build_s = time.perf_counter() - started
    index = open_index(root, device="cpu", lease=False)
    try:
        plans = [Plan.from_dict(raw) for raw in manifest.plans]
        passages = index.store.get(list(range(manifest.num_vectors)))
        ids = lambda rows: [passages[row].doc_id for row in rows]  # noqa: E731
        grouped = bool((manifest.chunking or {}).get("split_documents"))
        encoder = SentenceTransformerEncoder(load_model(build.model), name, progress=False)
        per_variant = {}
        for kind, held in VARIANTS:
            pseudo = draw_pseudo_queries(passages, config.pseudo_queries, kind, held, config.seed)
            if len(pseudo.ids) < 10:  # no titles in this corpus
                continue
            vectors = encoder.encode_queries(pseudo.texts)
            scored = with_agreement(plans, index.indexes, index.vectors, ids, vectors, pseudo, grouped)
            per_variant[f"{kind}{'-held' if held else ''}"] = {
                p.key: (p.agreement_at_10, p.overlap_at_10) for p in scored
            }
    finally:
        index.close()
    rows = []
    for plan in plans:
        figures = {
            variant: {"agreement": v[plan.key][0], "overlap": v[plan.key][1]} for variant, v in per_variant.items()
        }
        rows.append({
            "dataset": dataset, "model": name, "plan": plan.key, "ndcg_at_10": plan.ndcg_at_10,
            "ratio": plan.ratio, "label_free": figures,
        })  # fmt: skip
    logger.info("%s with %s: %d plans, built in %.0f s", dataset, name, len(rows), build_s)
    return rows


def prediction_errors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant and measure: the mean absolute error of the raw figure and of a leave-one-dataset-out linear fit."""
    variants = sorted({v for row in rows for v in row["label_free"]})
    datasets = sorted({row["dataset"] for row in rows})
    errors = []
    for variant in variants:
        for measure in MEASURES:
            points = [(row["dataset"], row["label_free"][variant][measure], row["ratio"]) for row in rows
                      if variant in row["label_free"] and row["ratio"] is not None]  # fmt: skip
            if not points:
                continue
            raw = [abs(x - y) for _, x, y in points]
            mapped, held_sets = [], []
            for held in datasets:
                train = [(x, y) for d, x, y in points if d != held]
                test = [(x, y) for d, x, y in points if d == held]
                if len(train) < 3 or not test:
                    continue
                xs, ys = np.array([x for x, _ in train]), np.array([y for _, y in train])
                slope, intercept = np.polyfit(xs, ys, 1)
                mapped += [abs(intercept + slope * x - y) for x, y in test]
                held_sets.append(held)
            xs, ys = np.array([x for _, x, _ in points]), np.array([y for _, _, y in points])
            slope, intercept = np.polyfit(xs, ys, 1)
            errors.append({
                "variant": variant, "measure": measure, "points": len(points),
                "raw_mae": round(float(np.mean(raw)), 4),
                "raw_max": round(float(np.max(raw)), 4),
                "mapped_mae": round(float(np.mean(mapped)), 4) if mapped else None,
                "mapped_max": round(float(np.max(mapped)), 4) if mapped else None,
                "fit_all": {"intercept": round(float(intercept), 4), "slope": round(float(slope), 4)},
                "correlation": round(float(np.corrcoef(xs, ys)[0, 1]), 4) if len(points) > 2 else None,
            })  # fmt: skip
    return sorted(errors, key=lambda e: (e["mapped_mae"] if e["mapped_mae"] is not None else 9, e["raw_mae"]))


def run_agreement(config: AgreementConfig) -> dict[str, Any]:
    work = config.out / "agreement"
    rows = []
    for dataset in config.datasets:
        for model in config.models:
            rows += measure_one(config, dataset, model, work)
    return {
        "benchmark": "agreement",
        "at": utc_now(),
        "machine": machine_info(),
        "config": {
            "datasets": config.datasets,
            "models": config.models,
            "max_queries": config.max_queries,
            "max_docs": config.max_docs,
            "pseudo_queries": config.pseudo_queries,
            "seed": config.seed,
        },  # fmt: skip
        "rows": rows,
        "errors": prediction_errors(rows),
    }


def agreement_markdown(report: dict[str, Any], variant: str = "random-held") -> str:
    config = report["config"]
    lines = [
        "# Label-free agreement against the real NDCG@10 ratio",
        "",
        f"{config['max_queries']} judged test questions per dataset, their documents and others up to "
        f"{config['max_docs']}; {config['pseudo_queries']} pseudo-queries per index; models: "
        f"{', '.join(Path(m).name for m in config['models'])}.",
        "",
        "## How well each kind of pseudo-query predicts the ratio",
        "",
        "Mean (max) absolute error over every plan of every dataset and model; *mapped*: `ratio ≈ a + b · figure` "
        "fitted on the other datasets (leave one dataset out).",
        "",
        markdown_row(
            [
                "pseudo-queries",
                "measure",
                "plans",
                "raw MAE (max)",
                "mapped MAE (max)",
                "correlation",
                "fit on all: a + b·x",
            ]
        ),  # fmt: skip
        markdown_row(["---", "---", "---:", "---:", "---:", "---:", "---"]),
    ]
    for e in report["errors"]:
        mapped = "–" if e["mapped_mae"] is None else f"{e['mapped_mae']:.3f} ({e['mapped_max']:.3f})"
        fit = e["fit_all"]
        lines.append(markdown_row([
            e["variant"], e["measure"], str(e["points"]), f"{e['raw_mae']:.3f} ({e['raw_max']:.3f})", mapped,
            "–" if e["correlation"] is None else f"{e['correlation']:.3f}",
            f"{fit['intercept']:.3f} + {fit['slope']:.3f}·x",
        ]))  # fmt: skip
    lines += [
        "",
        f"## Every plan: NDCG@10 ratio against agreement@10 ({variant})",
        "",
        markdown_row(["dataset", "model", "plan", "NDCG@10", "ratio", "agreement@10", "overlap@10", "error"]),
        markdown_row(["---", "---", "---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for row in report["rows"]:
        figures = row["label_free"].get(variant)
        if not figures or row["ratio"] is None:
            continue
        lines.append(markdown_row([
            row["dataset"], row["model"], row["plan"], f"{row['ndcg_at_10']:.3f}", f"{row['ratio']:.3f}",
            f"{figures['agreement']:.3f}", f"{figures['overlap']:.3f}", f"{figures['agreement'] - row['ratio']:+.3f}",
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_agreement(report: dict[str, Any], path: Path, variant: str = "random-held") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    markers = {"base": "o"}
    for dataset in sorted({row["dataset"] for row in report["rows"]}):
        for model in sorted({row["model"] for row in report["rows"]}):
            points = [(r["label_free"][variant]["agreement"], r["ratio"]) for r in report["rows"]
                      if r["dataset"] == dataset and r["model"] == model and variant in r["label_free"]]  # fmt: skip
            if points:
                axis.scatter(*zip(*points, strict=True), marker=markers.get(model, "^"), label=f"{dataset}, {model}",
                             alpha=0.8)  # fmt: skip
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel(f"label-free agreement@10 with the full dim ({variant})")
    axis.set_ylabel("NDCG@10 ÷ full dim's NDCG@10 (judged)")
    axis.set_title("Does agreement predict the NDCG@10 ratio? (one point per plan)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def add_agreement_parser(actions: argparse._SubParsersAction) -> None:
    from benchmarks.args import DEFAULT_OUT, name_list_argument
    from core.cli_args import add_output_argument, dims_argument

    p = actions.add_parser(
        "agreement",
        help="label-free plan calibration: agreement with the full dim against the real NDCG@10 ratio",
        description="On each labelled dataset, index a test-split sample with its judged queries, then score every "
        "plan without labels with each kind of pseudo-query, and report how well each predicts the real NDCG@10 "
        "ratio (raw, and mapped with a fit on the other datasets).",
    )
    p.add_argument("--datasets-root", type=Path, required=True, help="folder holding the BEIR datasets")
    p.add_argument("--datasets", type=name_list_argument, default=list(DATASETS),
                   help=f"comma-separated (default: {','.join(DATASETS)})")  # fmt: skip
    p.add_argument("--models", type=name_list_argument, default=["base"],
                   help="comma-separated model folders; 'base' is the default model (default: base)")  # fmt: skip
    p.add_argument("--max-queries", type=int, default=300, help="judged test questions per dataset (default: 300)")
    p.add_argument("--max-docs", type=int, default=2000, help="documents per dataset sample (default: 2000)")
    p.add_argument("--pseudo-queries", type=int, default=200, help="pseudo-queries per index (default: 200)")
    p.add_argument("--dims", type=dims_argument, default=None, help="dims to index (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="encoding cache (default: OUT/agreement/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_agreement_command)


def run_agreement_command(args: argparse.Namespace) -> int:
    from core.cli_args import check_positive, config_fields

    check_positive(args, ("max_queries", "max_docs", "pseudo_queries"))
    config = AgreementConfig(**config_fields(args))
    report = run_agreement(config)
    paths = write_report(report, config.out, "agreement", agreement_markdown)
    paths.append(plot_agreement(report, config.out / "agreement.png"))
    print(agreement_markdown(report), end="")
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
