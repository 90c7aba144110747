"""``mrl bench recipes``: small-dimension quality per training recipe, chosen on validation, reported on test.

Each recipe is a model folder per dataset (``NAME=PATH``, ``{dataset}`` in PATH is replaced by the
dataset's folder name), or ``base`` for the untuned model. For every model the corpus and the
queries are encoded once at full dimension; the rows derived from those vectors (the model as it
is, a PCA rotation, a Matryoshka adaptor fitted on the training queries: ``--adaptor-on``) cost
seconds each. Validation queries are carved from the training split exactly as ``mrl train
--validation-fraction`` carves them (same fraction, same seed), so a model trained with that
option never saw them; the recipe is chosen on them, never on the test split.

The choice rule: highest validation NDCG@10 at the smallest dim, among the rows whose full-dim
validation NDCG@10 is within ``--full-dim-tolerance`` of the best full-dim row.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality import cached_encode, encode_corpus, load_scored_model
from core.cli_args import add_output_argument, check_positive, dims_argument
from core.data import DataError, load_beir
from core.errors import ConfigError
from core.files import write_json_atomic, write_text_atomic
from core.matryoshka import validate_dims
from core.models import embedding_dimension, model_dims
from training.adapt import Vectors
from training.adaptor import AdaptorConfig, better_start, fit_each_start, pca_rotation, score_mapped
from training.evaluate import split_views
from training.validation import VALIDATION_SPLIT, check_validation_fraction, split_validation

logger = logging.getLogger(__name__)

BASE = "base"
METRIC = "ndcg@10"
START_LABELS = {"identity": "adaptor", "pca": "PCA + adaptor"}  # row labels of the adaptor fitted from each start


@dataclass
class RecipesConfig:
    data: list[Path]
    recipes: list[str]  # NAME=PATH (PATH may hold {dataset}) or NAME=base
    adaptor_on: list[str] = field(default_factory=list)  # recipe names that also get +pca and +adaptor rows
    dims: list[int] | None = None
    validation_fraction: float = 0.1
    seed: int = 42
    train_split: str = "train"
    split: str = "test"
    full_dim_tolerance: float = 0.01
    adaptor_steps: int = 600
    cache: Path | None = None
    workers: int = 1
    out: Path = Path("runs/bench/recipes")
    progress: bool = True


def parse_recipes(entries: list[str]) -> dict[str, str]:
    """``NAME=PATH`` entries in order. Raises: ConfigError for a malformed or repeated one."""
    recipes: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--recipe {entry!r} is not NAME=PATH (e.g. default=runs/recipes/{{dataset}}-default)")
        if name in recipes:
            raise ConfigError(f"--recipe {name!r} is given twice")
        recipes[name] = path
    return recipes


def check_config(config: RecipesConfig) -> dict[str, str]:
    recipes = parse_recipes(config.recipes)
    if not recipes:
        raise ConfigError("give at least one --recipe NAME=PATH")
    unknown = [name for name in config.adaptor_on if name not in recipes]
    if unknown:
        raise ConfigError(f"--adaptor-on {unknown} names no --recipe (recipes: {', '.join(recipes)})")
    check_validation_fraction(config.validation_fraction)
    for folder in config.data:
        for name, path in recipes.items():
            resolved = recipe_path(path, folder)
            if resolved != BASE and not Path(resolved).is_dir():
                raise DataError(Path(resolved), f"recipe {name!r}: no model folder here")
    return recipes


def recipe_path(path: str, dataset: Path) -> str:
    return path if path == BASE else path.replace("{dataset}", dataset.name)


def training_seconds(folder: str) -> float | None:
    """The training stages' seconds from a tuned folder's report (``None`` for a model not trained here)."""
    report = Path(folder) / "training_report.json"
    if folder == BASE or not report.is_file():
        return None
    seconds = json.loads(report.read_text()).get("seconds", {})
    return sum(v for k, v in seconds.items() if k.startswith("train_"))


def _rounded(scores: dict[int, dict[str, float]]) -> dict[str, float]:
    return {str(dim): round(values[METRIC], 4) for dim, values in sorted(scores.items(), reverse=True)}


def measure_dataset(folder: Path, recipes: dict[str, str], config: RecipesConfig) -> dict[str, Any]:
    dataset = load_beir(folder, [config.train_split, config.split])
    held = split_validation(dataset, config.train_split, config.validation_fraction, config.seed)
    training_qrels, validation_qrels = held.training_qrels, held.dataset.split(VALIDATION_SPLIT)
    test_qrels = dataset.split(config.split)
    views = split_views(dataset.split(config.train_split), test_qrels)  # clean and shared (or none)
    doc_ids = list(dataset.corpus)
    query_ids = sorted(set(training_qrels) | set(validation_qrels) | set(test_qrels))
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    query_row = {q: i for i, q in enumerate(query_ids)}
    rows: list[dict[str, Any]] = []
    dims: list[int] | None = None
    for name, path in recipes.items():
        resolved = recipe_path(path, folder)
        model, fingerprint = load_scored_model(None if resolved == BASE else resolved)
        if dims is None:
            full = embedding_dimension(model)
            dims = (
                validate_dims(config.dims, full)
                if config.dims
                else model_dims(model, None if resolved == BASE else resolved)
            )
        options = {"batch_size": 64, "show_progress_bar": config.progress, "convert_to_numpy": True}
        logger.info("%s / %s: encoding %d documents and %d queries", folder.name, name, len(doc_ids), len(query_ids))
        docs, _ = cached_encode(
            lambda texts: encode_corpus(model, texts, config.workers, config.progress),  # noqa: B023 (called here)
            [dataset.corpus[d].passage for d in doc_ids],
            fingerprint,
            config.cache,
        )
        queries, _ = cached_encode(
            lambda texts: model.encode_query(texts, **options),  # noqa: B023
            [dataset.queries[q] for q in query_ids],
            fingerprint,
            config.cache,
        )
        vectors = Vectors(doc_row, docs, query_row, queries)
        train_set, valid_set, test_set = (vectors.judged(q) for q in (training_qrels, validation_qrels, test_qrels))
        view_sets = {view: vectors.judged(qrels) for view, qrels in views.items()}
        trained = training_seconds(resolved)
        variants: list[tuple[str, np.ndarray | None, float]] = [(name, None, 0.0)]
        if name in config.adaptor_on:
            variants.append((f"{name} + PCA", pca_rotation(docs), 0.0))
            adaptor = AdaptorConfig(dims=dims, steps=config.adaptor_steps, seed=config.seed, orthogonal=False)
            fits = fit_each_start(docs, train_set, valid_set, adaptor)
            for fit in fits:
                variants.append((f"{name} + {START_LABELS[fit.init]}", fit.weight, fit.seconds))
            auto = better_start(fits)  # what `mrl adapt` keeps by default (--init auto)
            variants.append((f"{name} + adaptor, auto start ({auto.init})", auto.weight, auto.seconds))
        for label, weight, fit_seconds in variants:
            rows.append(
                {
                    "recipe": label,
                    "model": resolved,
                    "validation": _rounded(score_mapped(weight, docs, valid_set, dims, METRIC)),
                    "test": _rounded(score_mapped(weight, docs, test_set, dims, METRIC)),
                    "test_views": {
                        view: _rounded(score_mapped(weight, docs, judged, dims, METRIC))
                        for view, judged in view_sets.items()
                    },
                    "training_seconds": None if trained is None and not fit_seconds else (trained or 0.0) + fit_seconds,
                    "adaptor_seconds": round(fit_seconds, 1) if fit_seconds else None,
                }
            )
    assert dims is not None
    chosen = choose(rows, dims, config.full_dim_tolerance)
    return {
        "dataset": folder.name,
        "dims": dims,
        "queries": {"training": len(training_qrels), "validation": len(validation_qrels), "test": len(test_qrels)},
        "views": {view: len(qrels) for view, qrels in views.items()},
        "documents": len(doc_ids),
        "rows": rows,
        "chosen": chosen,
    }


def choose(rows: list[dict[str, Any]], dims: list[int], tolerance: float) -> str:
    """The rule of the module docstring: best validation at the smallest dim, full dim within ``tolerance``."""
    full, small = str(max(dims)), str(min(dims))
    best_full = max(row["validation"][full] for row in rows)
    eligible = [row for row in rows if row["validation"][full] >= best_full - tolerance]
    return max(eligible, key=lambda row: row["validation"][small])["recipe"]


def run_recipes(config: RecipesConfig) -> dict[str, Any]:
    recipes = check_config(config)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
        "datasets": [measure_dataset(folder, recipes, config) for folder in config.data],
    }
    report["settings"]["data"] = [str(p) for p in config.data]
    config.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.out / "recipes.json", report)
    write_text_atomic(config.out / "recipes.md", recipes_markdown(report))
    for dataset in report["datasets"]:
        plot_recipes(dataset, config.out / f"recipes_{dataset['dataset']}.png")
    return report


def recipes_markdown(report: dict[str, Any]) -> str:
    lines = ["# NDCG@10 per recipe and dim", ""]
    for dataset in report["datasets"]:
        dims = [str(d) for d in dataset["dims"]]
        full, small = dims[0], dims[-1]
        q = dataset["queries"]
        lines += [
            f"## {dataset['dataset']} (test: {q['test']} queries, {dataset['documents']} documents; "
            f"validation: {q['validation']} held-out training queries)",
            "",
            f"Chosen on validation: **{dataset['chosen']}** (best validation NDCG@10 at {small} dims among the "
            f"rows within {report['settings']['full_dim_tolerance']} of the best at {full}).",
            "",
            "| recipe | " + " | ".join(f"{d}" for d in dims) + f" | % of full at {' / '.join(dims[1:])} | "
            f"validation {full} / {small} | training s |",
            "|---|" + "---:|" * (len(dims) + 3),
        ]
        for row in dataset["rows"]:
            test = row["test"]
            shares = " / ".join(f"{100 * test[d] / test[full]:.1f}%" for d in dims[1:])
            seconds = "–" if row["training_seconds"] is None else f"{row['training_seconds']:,.0f}"
            name = f"**{row['recipe']}**" if row["recipe"] == dataset["chosen"] else row["recipe"]
            lines.append(
                f"| {name} | " + " | ".join(f"{test[d]:.3f}" for d in dims) + f" | {shares} | "
                f"{row['validation'][full]:.3f} / {row['validation'][small]:.3f} | {seconds} |"
            )
        lines.append("")
        lines += views_markdown(dataset)
    return "\n".join(lines)


def views_markdown(dataset: dict[str, Any]) -> list[str]:
    """Each recipe on the clean test view (answers never training positives) and on the shared one."""
    views = dataset.get("views") or {}
    if not views:
        return []
    dims = [str(d) for d in dataset["dims"]]
    lines = [
        f"Clean test view ({views['clean']} questions whose relevant documents are no training positive; "
        f"{views['shared']} others share one, where a supervised recipe's gain is partly memorised), and the "
        "shared view:",
        "",
        "| recipe | " + " | ".join(f"clean {d}" for d in dims) + " | " + " | ".join(f"shared {d}" for d in dims) + " |",
        "|---|" + "---:|" * (2 * len(dims)),
    ]
    for row in dataset["rows"]:
        clean, shared = row["test_views"]["clean"], row["test_views"]["shared"]
        lines.append(f"| {row['recipe']} | " + " | ".join(f"{clean[d]:.3f}" for d in dims) + " | "
                     + " | ".join(f"{shared[d]:.3f}" for d in dims) + " |")  # fmt: skip
    return [*lines, ""]


def plot_recipes(dataset: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = dataset["dims"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in dataset["rows"]:
        style = "-" if row["recipe"] == dataset["chosen"] else "--"
        ax.plot(dims, [row["test"][str(d)] for d in dims], style, marker="o", label=row["recipe"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("dimension")
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title(f"{dataset['dataset']}: recipes (solid: chosen on validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_suffix(".tmp.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.replace(path)
    return path


def add_recipes_parser(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "recipes",
        help="small-dim quality per training recipe (+PCA, +adaptor), chosen on validation, reported on test",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--data", type=Path, action="append", required=True, help="BEIR folder; repeat per dataset")
    p.add_argument(
        "--recipe",
        dest="recipes",
        action="append",
        default=[],
        help="NAME=PATH of a model folder ({dataset} is replaced by the dataset folder's name), or NAME=base",
    )
    p.add_argument(
        "--adaptor-on",
        default="",
        help="comma-separated recipe names that also get a PCA-rotation row and Matryoshka-adaptor rows "
        "(fitted from each start, and the one mrl adapt --init auto keeps)",
    )
    p.add_argument("--dims", type=dims_argument, default=None, help="default: the first model's Matryoshka dims")
    p.add_argument(
        "--validation-fraction", type=float, default=0.1, help="as given to mrl train (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=42, help="as given to mrl train (default: %(default)s)")
    p.add_argument("--split", default="test", help="reported split (default: %(default)s)")
    p.add_argument("--full-dim-tolerance", type=float, default=0.01, help="default: %(default)s")
    p.add_argument("--adaptor-steps", type=int, default=600, help="default: %(default)s")
    p.add_argument("--cache", type=Path, default=None, help="encoding cache (default: OUT/cache)")
    add_output_argument(p, "report folder", default=Path("runs/bench/recipes"))
    p.add_argument("--workers", type=int, default=1, help="processes that encode each corpus")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    check_positive(args, ("adaptor_steps", "workers"))
    config = RecipesConfig(
        data=args.data,
        recipes=args.recipes,
        adaptor_on=[n for n in args.adaptor_on.split(",") if n],
        dims=args.dims,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        split=args.split,
        full_dim_tolerance=args.full_dim_tolerance,
        adaptor_steps=args.adaptor_steps,
        cache=args.cache or args.out / "cache",
        workers=args.workers,
        out=args.out,
        progress=args.progress,
    )
    report = run_recipes(config)
    print(recipes_markdown(report))
    print(f"wrote {config.out / 'recipes.md'}, {config.out / 'recipes.json'}")
    return 0
