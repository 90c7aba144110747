"""``mrl bench curves``: how much labelled data a recipe needs, and whether it ever costs a dimension.

For each dataset, one sample is drawn and kept for every row: test questions (``--max-test-queries``,
split into the **clean** view, whose relevant documents are not training positives, and the
**shared** view, whose are: :func:`core.data.shared_positives`), the first ``max(--sizes)`` training
questions of a seeded order, and a corpus of their judged documents plus random others up to
``--max-docs``. Then, for each number of training questions N (the first N of that order):

- **adaptor**: ``mrl adapt --no-orthogonal``'s fit on the base model's vectors (both starts, the
  never-worse rule, 5-fold cross-validation below 1,000 questions); ``orthogonal``: the rotation;
- **fine-tune** (N up to ``--max-finetune``): ``mrl train`` on the N questions (``--epochs``), then the
  tuned model as it is;
- **both**: the adaptor fitted on the fine-tuned model's vectors.

Every row is NDCG@10 at every dim on both test views, its change against the base model at each dim,
and retention (each dim over the row's own full dim). The test questions are never used to choose.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine_info, markdown_row, save_figure, utc_now, write_report
from core.data import RetrievalDataset, load_beir, shared_positives

logger = logging.getLogger(__name__)

SIZES = [50, 100, 200, 500, 1000]
VIEWS = ("clean", "shared")
DEFAULT_WEIGHTS = (1.0, 1.0)  # the adaptor's similarity and reconstruction weights, as mrl adapt fits it
RECIPES = ("adaptor", "fine-tune", "both")  # --recipes names; both: the adaptor fitted on the fine-tuned model
# also accepted, not run by default: the adaptor kept a rotation (mrl adapt --orthogonal), on the base model
# (orthogonal) and on the fine-tuned one (both-orthogonal); the rotation first, then fine-tuning from the rotated
# model (orthogonal-fine-tune: the small dims start where the rotation put them)
EXTRA_RECIPES = ("orthogonal", "both-orthogonal", "orthogonal-fine-tune")
ORTHOGONAL_ROW = "adaptor, orthogonal"
ROTATED_FINETUNE_ROW = "adaptor, orthogonal, then fine-tune"
SANDWICH_ROW = ROTATED_FINETUNE_ROW + ", then the rotation again"  # make demo's pipeline: adapt, train, adapt


@dataclass
class CurvesConfig:
    data: list[Path]
    model: str | None = None  # the base model (default: all-MiniLM-L6-v2)
    sizes: list[int] = field(default_factory=lambda: list(SIZES))
    max_finetune: int = 200  # fine-tune (and both) only up to this many questions: CPU hours beyond
    epochs: float = 5
    # fine-tune with mrl train --validation-fraction: that share of the N questions held out (in groups) to
    # choose the epoch under the never-worse rule (default: none held out, every question trains)
    validation_fraction: float | None = None
    # fine-tune with mrl train --folds: the number of epochs chosen by K-fold cross-validation over the N questions
    train_folds: int | None = None
    max_test_queries: int = 300
    max_docs: int = 4000
    seed: int = 0
    adaptor_steps: int = 600
    # extra adaptor rows on the base model's vectors, one per (similarity, reconstruction) weight pair: the
    # regularisation study (mrl adapt's default is 1:1, the plain "adaptor" row)
    regularisation: list[tuple[float, float]] = field(default_factory=list)
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))  # which rows to fit (a rerun's share)
    cache: Path | None = None
    out: Path = Path("runs/bench/curves")
    progress: bool = True


def draw_sample(dataset: RetrievalDataset, config: CurvesConfig) -> dict[str, Any]:
    """The test questions of both views, the training questions in their seeded order, and the corpus ids."""
    rng = random.Random(config.seed)
    train = {q: d for q, d in dataset.split("train").items() if any(g > 0 for g in d.values())}
    test = {q: d for q, d in dataset.split("test").items() if any(g > 0 for g in d.values())}
    shared = shared_positives(train, test)
    views = {}
    for view, ids in (("clean", sorted(set(test) - shared)), ("shared", sorted(shared))):
        views[view] = sorted(rng.sample(ids, min(config.max_test_queries, len(ids))))
    order = sorted(train)
    rng.shuffle(order)
    order = order[: max(config.sizes)]
    needed = {doc for q in order for doc in train[q]} | {doc for ids in views.values() for q in ids for doc in test[q]}
    needed &= set(dataset.corpus)
    others = sorted(set(dataset.corpus) - needed)
    extra = rng.sample(others, max(0, min(len(others), config.max_docs - len(needed))))
    return {"views": views, "order": order, "docs": sorted(needed | set(extra)), "train": train, "test": test,
            "shared_in_test": len(shared), "test_questions": len(test)}  # fmt: skip


def write_training_folder(dataset: RetrievalDataset, sample: dict[str, Any], size: int, folder: Path) -> Path:
    """A BEIR folder whose train split is the first ``size`` questions of the order (for ``mrl train``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    docs = set(sample["docs"])
    questions = sample["order"][:size]
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as out:
        for doc_id in sample["docs"]:
            doc = dataset.corpus[doc_id]
            out.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as out:
        for q in questions:
            out.write(json.dumps({"_id": q, "text": dataset.queries[q]}) + "\n")
    with (folder / "qrels" / "train.tsv").open("w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for q in questions:
            for doc, grade in sample["train"][q].items():
                if doc in docs:
                    out.write(f"{q}\t{doc}\t{grade}\n")
    return folder


class Encoded:
    """One model's full-dim vectors of the sample's corpus and of every question it needs."""

    def __init__(self, model_path: str | None, dataset: RetrievalDataset, sample: dict[str, Any], cache: Path | None,
                 progress: bool) -> None:  # fmt: skip
        from benchmarks.quality import cached_encode, encode_corpus, load_scored_model

        model, fingerprint = load_scored_model(model_path)
        self.dims = sorted(_dims(model, model_path), reverse=True)
        texts = [dataset.corpus[d].passage for d in sample["docs"]]
        self.docs, _ = cached_encode(lambda t: encode_corpus(model, t, 1, progress), texts, fingerprint, cache)
        self.doc_row = {d: i for i, d in enumerate(sample["docs"])}
        questions = [*sample["order"], *(q for ids in sample["views"].values() for q in ids)]
        queries = [dataset.queries[q] for q in questions]
        from core.models import SentenceTransformerEncoder

        encoder = SentenceTransformerEncoder(model, "bench", 64, False)
        self.queries, _ = cached_encode(encoder.encode_queries, queries, fingerprint + ":q", cache)
        self.query_row = {q: i for i, q in enumerate(questions)}

    def judged(self, qrels: dict[str, dict[str, int]], ids: list[str]):
        from training.adaptor import Judged

        relevant = [{self.doc_row[d]: g for d, g in qrels[q].items() if d in self.doc_row} for q in ids]
        return Judged(self.queries[[self.query_row[q] for q in ids]], relevant)


def _dims(model: Any, path: str | None) -> list[int]:
    from core.models import model_dims

    return model_dims(model, path)


def question_scores(weight: np.ndarray | None, encoded: Encoded, sample: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each test question's NDCG@10 at every dim on each view, after ``weight`` (for paired standard errors)."""
    from core.matryoshka import truncate_normalize
    from core.metrics import exact_top_k, ndcg_at_k
    from training.adaptor import apply_map

    docs = encoded.docs if weight is None else apply_map(encoded.docs, weight)
    scores: dict[str, dict[str, Any]] = {}
    for view, ids in sample["views"].items():
        if not ids:
            continue
        judged = encoded.judged(sample["test"], ids)
        queries = judged.vectors if weight is None else apply_map(judged.vectors, weight)
        scores[view] = {}
        for dim in encoded.dims:
            top = exact_top_k(truncate_normalize(queries, dim), truncate_normalize(docs, dim), 10)
            scores[view][str(dim)] = np.array([ndcg_at_k([str(d) for d in row], {str(d): g for d, g in rel.items()}, 10)
                                              for row, rel in zip(top, judged.relevant, strict=True)])  # fmt: skip
    return scores


def change_errors(row: dict[str, Any], base: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The standard error of each view's and dim's NDCG@10 change against the base model, paired over the
    test questions: a change within about two of them is the test questions' noise, not the recipe's."""
    errors: dict[str, dict[str, float]] = {}
    for view, by_dim in row.items():
        errors[view] = {}
        for dim, scores in by_dim.items():
            change = scores - base[view][dim]
            errors[view][dim] = round(float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else 0.0, 4)
    return errors


def rounded(questions: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per-question scores for the report (so its standard errors can be recomputed, or paired otherwise)."""
    return {view: {dim: [round(float(x), 4) for x in scores] for dim, scores in by_dim.items()}
            for view, by_dim in questions.items()}  # fmt: skip


def view_means(questions: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each view's NDCG@10 per dim: the mean of its questions' (trec_eval's mean, as ``score_rankings``)."""
    return {view: {dim: round(float(scores.mean()), 4) for dim, scores in by_dim.items()}
            for view, by_dim in questions.items()}  # fmt: skip


def fit_adaptor_row(
    encoded: Encoded,
    sample: dict[str, Any],
    size: int,
    config: CurvesConfig,
    weights: tuple[float, float] = DEFAULT_WEIGHTS,
    orthogonal: bool = False,
) -> dict[str, Any]:
    """``mrl adapt``'s default fit on the first ``size`` questions (``weights``: its similarity and reconstruction
    terms' weights; ``orthogonal``: ``--orthogonal``); its choice and its test scores."""
    from training.adapt import AUTO_FOLDS, CROSS_VALIDATE_BELOW
    from training.adaptor import AdaptorConfig, fit_adaptor
    from training.validation import VALIDATION_SPLIT, split_validation

    questions = sample["order"][:size]
    fit_config = AdaptorConfig(dims=encoded.dims, steps=config.adaptor_steps, similarity_weight=weights[0],
                               reconstruction_weight=weights[1], orthogonal=orthogonal)  # fmt: skip
    started = time.perf_counter()
    if size < CROSS_VALIDATE_BELOW:
        fit = fit_adaptor(encoded.docs, encoded.judged(sample["train"], questions), None,
                          replace(fit_config, folds=AUTO_FOLDS))  # fmt: skip
    else:  # a held-out tenth, as mrl adapt carves it
        texts = RetrievalDataset(Path("."), {}, {q: q for q in questions}, {"train": {q: sample["train"][q]
                                                                                     for q in questions}})  # fmt: skip
        held = split_validation(texts, "train", 0.1, fit_config.seed)
        validation = sorted(held.dataset.split(VALIDATION_SPLIT))
        training = sorted(held.training_qrels)
        fit = fit_adaptor(encoded.docs, encoded.judged(sample["train"], training),
                          encoded.judged(sample["train"], validation), fit_config)  # fmt: skip
    return {"weight": fit.weight, "kept_input": fit.kept_input, "init": fit.init, "step": fit.best_step,
            "validation_gain": round(fit.best_metric or 0.0, 4), "seconds": round(time.perf_counter() - started, 1),
            "cross_validation": fit.folds}  # fmt: skip


def save_rotated(model_name: str | None, weight: np.ndarray, output: Path) -> Path:
    """The base model with the rotation appended (as ``mrl adapt`` publishes it), for fine-tuning from there."""
    from core.files import publish_dir, staging_dir
    from core.models import load_model
    from training.adaptor import append_adaptor

    if not (output / "modules.json").is_file():
        staging = staging_dir(output)
        append_adaptor(load_model(model_name), weight).save(str(staging))
        publish_dir(staging, output, True)
    return output


def finetune(folder: Path, output: Path, config: CurvesConfig) -> Path:
    from training.config import TrainConfig
    from training.train import train

    if (output / "mrl.json").is_file():
        return output
    train(TrainConfig(data=folder, output=output, model=config.model, eval_split=None, epochs=config.epochs,
                      validation_fraction=config.validation_fraction, folds=config.train_folds,
                      progress=config.progress, overwrite=True))  # fmt: skip
    return output


def measure_dataset(folder: Path, config: CurvesConfig) -> dict[str, Any]:
    dataset = load_beir(folder, ["train", "test"])
    sample = draw_sample(dataset, config)
    cache = config.cache or config.out / "cache"
    work = config.out / "work" / folder.name
    base = Encoded(config.model, dataset, sample, cache, config.progress)
    base_questions = question_scores(None, base, sample)
    rows = [{"recipe": "base", "questions": 0, "scores": view_means(base_questions),
             "question_scores": rounded(base_questions)}]  # fmt: skip

    def scored(weight: np.ndarray | None, encoded: Encoded) -> dict[str, Any]:
        """The row's view scores and their changes' standard errors, from one search per view and dim."""
        questions = question_scores(weight, encoded, sample)
        return {"scores": view_means(questions), "change_se": change_errors(questions, base_questions),
                "question_scores": rounded(questions)}  # fmt: skip

    sizes = sorted({min(size, len(sample["order"])) for size in config.sizes})  # a size beyond them: all of them
    for size in sizes:
        logger.info("%s: %d training questions", folder.name, size)
        fits: list[tuple[str, dict[str, Any]]] = []  # (row name, fit_adaptor_row's options), on the base vectors
        if "adaptor" in config.recipes:
            fits += [("adaptor", {})] + [(regularised_recipe(w), {"weights": w}) for w in config.regularisation]
        if "orthogonal" in config.recipes:
            fits.append((ORTHOGONAL_ROW, {"orthogonal": True}))
        rotation: dict[str, Any] | None = None
        for recipe, options in fits:
            fitted = fit_adaptor_row(base, sample, size, config, **options)
            rows.append({"recipe": recipe, "questions": size, **_public(fitted), **scored(fitted["weight"], base)})
            rotation = fitted if recipe == ORTHOGONAL_ROW else rotation
        finetuned = {"fine-tune", "both", "both-orthogonal", "orthogonal-fine-tune"} & set(config.recipes)
        if size > config.max_finetune or not finetuned:
            continue
        train_folder = write_training_folder(dataset, sample, size, work / f"train-{size}")  # once for every fine-tune
        held = f"-validation-{config.validation_fraction:g}" if config.validation_fraction else ""
        held += f"-folds-{config.train_folds}" if config.train_folds else ""
        if "orthogonal-fine-tune" in config.recipes:
            rotation = rotation or fit_adaptor_row(base, sample, size, config, orthogonal=True)
            rotated = save_rotated(config.model, rotation["weight"], work / f"rotated-{size}")
            path = finetune(train_folder, work / f"model-{size}-rotated{held}", replace(config, model=str(rotated)))
            tuned_rotated = Encoded(str(path), dataset, sample, cache, config.progress)
            rows.append({"recipe": ROTATED_FINETUNE_ROW, "questions": size, "rotation": _public(rotation),
                         **scored(None, tuned_rotated)})  # fmt: skip
            again = fit_adaptor_row(tuned_rotated, sample, size, config, orthogonal=True)
            rows.append({"recipe": SANDWICH_ROW, "questions": size, **_public(again),
                         **scored(again["weight"], tuned_rotated)})  # fmt: skip
        if not finetuned - {"orthogonal-fine-tune"}:
            continue
        tuned_path = finetune(train_folder, work / f"model-{size}{held}", config)
        tuned = Encoded(str(tuned_path), dataset, sample, cache, config.progress)
        if "fine-tune" in config.recipes:
            rows.append({"recipe": "fine-tune", "questions": size, **scored(None, tuned)})
        for recipe, orthogonal in (("both", False), ("both-orthogonal", True)):
            if recipe not in config.recipes:
                continue
            both = fit_adaptor_row(tuned, sample, size, config, orthogonal=orthogonal)
            rows.append({"recipe": "fine-tune + " + (ORTHOGONAL_ROW if orthogonal else "adaptor"), "questions": size,
                         **_public(both), **scored(both["weight"], tuned)})  # fmt: skip
    return {
        "dataset": folder.name,
        "dims": base.dims,
        "test_questions": sample["test_questions"],
        "shared_in_test": sample["shared_in_test"],
        "views": {view: len(ids) for view, ids in sample["views"].items()},
        "view_questions": sample["views"],  # the test question ids in the order of every row's question_scores
        "documents": len(sample["docs"]),
        "training_questions": len(sample["order"]),
        "rows": rows,
    }


def regularised_recipe(weights: tuple[float, float]) -> str:
    return f"adaptor, similarity {weights[0]:g}, reconstruction {weights[1]:g}"


def regularisation_argument(text: str) -> list[tuple[float, float]]:
    """argparse type for ``--regularisation 0:0,4:4``: comma-separated similarity:reconstruction weight pairs."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            similarity, reconstruction = (float(v) for v in part.split(":"))
        except ValueError:
            message = f"expected SIMILARITY:RECONSTRUCTION weight pairs such as 0:0,4:4, got {part!r}"
            raise argparse.ArgumentTypeError(message) from None
        if similarity < 0 or reconstruction < 0:
            raise argparse.ArgumentTypeError(f"weights must be zero or more, got {part!r}")
        pairs.append((similarity, reconstruction))
    return pairs


def recipes_argument(text: str) -> list[str]:
    """argparse type for ``--recipes fine-tune,both``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in RECIPES + EXTRA_RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(RECIPES + EXTRA_RECIPES)}, got {text!r}")
    return names


def _public(fitted: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fitted.items() if key != "weight"}


def run_curves(config: CurvesConfig, after_each: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """The report over every dataset; ``after_each`` gets the report so far after each dataset (hours of CPU work
    are not lost to a late failure)."""
    started = time.perf_counter()
    datasets: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for folder in config.data:
        datasets.append(measure_dataset(folder, config))
        report = _report(config, datasets, time.perf_counter() - started)
        if after_each is not None:
            after_each(report)
    return report


def _report(config: CurvesConfig, datasets: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {
        "benchmark": "curves",
        "at": utc_now(),
        "machine": machine_info(),
        "seconds": round(seconds, 1),
        "config": {
            "sizes": config.sizes,
            "max_finetune": config.max_finetune,
            "epochs": config.epochs,
            "max_test_queries": config.max_test_queries,
            "max_docs": config.max_docs,
            "seed": config.seed,
            "adaptor_steps": config.adaptor_steps,
            "regularisation": [list(w) for w in config.regularisation],
        },  # fmt: skip
        "datasets": datasets,
    }


def never_worse(row: dict[str, Any], base: dict[str, Any], view: str, tolerance: float = 0.005) -> bool:
    """Whether ``row`` is within ``tolerance`` of the base model or better at every dim of ``view``."""
    return all(row["scores"][view][dim] >= base["scores"][view][dim] - tolerance for dim in base["scores"][view])


def within_noise(row: dict[str, Any], base: dict[str, Any], view: str, tolerance: float = 0.005) -> bool:
    """Whether every dim's change is above ``-tolerance`` less two paired standard errors (False without them)."""
    errors = row.get("change_se", {}).get(view)
    if not errors:
        return False
    return all(
        row["scores"][view][dim] - base["scores"][view][dim] >= -tolerance - 2 * errors[dim]
        for dim in base["scores"][view]
    )


def verdict(row: dict[str, Any], base: dict[str, Any], view: str) -> str:
    if never_worse(row, base, view):
        return "✓"
    return "✗ (within 2 SE)" if within_noise(row, base, view) else "✗"


def curves_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        "# Learning curves: NDCG@10 per dim against the number of training questions",
        "",
        f"Test questions per view: up to {config['max_test_queries']}; corpus: their judged documents, the training "
        f"questions' and others up to {config['max_docs']}; fine-tuning {config['epochs']:g} epochs, up to "
        f"{config['max_finetune']} questions. *clean*: test questions whose relevant documents are no training "
        "positive; change against the base model at each dim (± its standard error, paired over the test questions, "
        "when measured); ✓: within 0.005 of the base model or better at every dim; ✗ (within 2 SE): some dim below "
        "that, but by less than two standard errors, which the test questions' noise explains.",
    ]
    for data in report["datasets"]:
        dims = [str(d) for d in data["dims"]]
        base = data["rows"][0]
        for view in VIEWS:
            if view not in base["scores"]:
                continue
            lines += [
                "",
                f"## {data['dataset']}, {view} view ({data['views'][view]} test questions; {data['shared_in_test']} of "
                f"{data['test_questions']} test questions share a positive with training; {data['documents']} "
                "documents)",
                "",
                markdown_row(
                    [
                        "recipe",
                        "questions",
                        *[f"{d}" for d in dims],
                        "never worse",
                        f"retention at {dims[-2] if len(dims) > 1 else dims[0]}",
                    ]
                ),  # fmt: skip
                markdown_row(["---", "---:", *["---:"] * len(dims), "---", "---:"]),
            ]
            for row in data["rows"]:
                scores = row["scores"][view]
                cells = []
                errors = row.get("change_se", {}).get(view, {})
                for dim in dims:
                    change = scores[dim] - base["scores"][view][dim]
                    spread = f" ±{errors[dim]:.3f}" if dim in errors else ""
                    cells.append(f"{scores[dim]:.3f}" if row is base else f"{scores[dim]:.3f} ({change:+.3f}{spread})")
                small = dims[-2] if len(dims) > 1 else dims[0]
                unchanged = row.get("kept_input") or (row.get("init") == "identity" and row.get("step") == 0)
                kept = " (input kept)" if unchanged else ""
                lines.append(markdown_row([
                    row["recipe"] + kept, str(row["questions"]), *cells,
                    "–" if row is base else verdict(row, base, view),
                    f"{100 * scores[small] / scores[dims[0]]:.1f}%" if scores[dims[0]] else "–",
                ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_curves(report: dict[str, Any], path: Path, view: str = "clean") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = report["datasets"]
    figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for axis, data in zip(axes[0], datasets, strict=True):
        dims = [str(d) for d in data["dims"]]
        base = data["rows"][0]["scores"].get(view)
        if base is None:
            continue
        for recipe, style in (("adaptor", "-o"), ("fine-tune", "-s"), ("fine-tune + adaptor", "-^")):
            rows = [r for r in data["rows"] if r["recipe"] == recipe]
            for dim, colour in ((dims[0], "tab:blue"), (dims[-2] if len(dims) > 1 else dims[0], "tab:orange")):
                if rows:
                    axis.plot([r["questions"] for r in rows], [r["scores"][view][dim] for r in rows], style,
                              color=colour, alpha=0.8, label=f"{recipe}, {dim}d")  # fmt: skip
        for dim, colour in ((dims[0], "tab:blue"), (dims[-2] if len(dims) > 1 else dims[0], "tab:orange")):
            axis.axhline(base[dim], color=colour, linestyle=":", linewidth=1, label=f"base, {dim}d")
        axis.set_xscale("log")
        axis.set_xlabel("training questions")
        axis.set_ylabel(f"NDCG@10 ({view} test view)")
        axis.set_title(data["dataset"])
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    return save_figure(figure, path)


def add_curves_parser(actions: argparse._SubParsersAction) -> None:
    from benchmarks.args import int_list_argument
    from core.cli_args import add_output_argument

    p = actions.add_parser(
        "curves",
        help="learning curves: NDCG@10 per dim against training questions for the adaptor, fine-tuning and both",
        description="For each dataset, draw one sample (clean and shared test views, a training order, a corpus) "
        "and score the adaptor, fine-tuning and both at each number of training questions.",
    )
    p.add_argument("--data", type=Path, nargs="+", action="extend", required=True,
                   help="BEIR folders with train and test splits (--data A B, or --data A --data B)")
    p.add_argument("--model", default=None, help="the base model (default: all-MiniLM-L6-v2)")
    p.add_argument("--sizes", type=int_list_argument, default=list(SIZES), help="training questions (default: "
                   f"{','.join(map(str, SIZES))})")  # fmt: skip
    p.add_argument("--max-finetune", type=int, default=200, help="fine-tune up to this many questions (default: 200)")
    p.add_argument("--epochs", type=float, default=5, help="fine-tuning epochs (default: 5, mrl train's)")
    p.add_argument("--validation-fraction", type=float, default=None, help="fine-tune as mrl train "
                   "--validation-fraction does: hold out this share of the questions (in groups sharing an answer) "
                   "to choose the epoch (default: none; every question trains)")  # fmt: skip
    p.add_argument("--train-folds", type=int, default=None, metavar="K", help="fine-tune as mrl train --folds K "
                   "does: the number of epochs chosen by K-fold cross-validation over the questions, then every "
                   "question trains (default: off)")  # fmt: skip
    p.add_argument("--max-test-queries", type=int, default=300, help="test questions per view (default: 300)")
    p.add_argument("--max-docs", type=int, default=4000, help="corpus sample size (default: 4000)")
    p.add_argument("--adaptor-steps", type=int, default=600, help="most adaptor steps (default: 600)")
    p.add_argument("--regularisation", type=regularisation_argument, default=[], metavar="S:R,...",
                   help="also fit the adaptor with these similarity:reconstruction term weights at each size, on the "
                   "base model's vectors (the regularisation study; mrl adapt's default is 1:1)")  # fmt: skip
    p.add_argument("--recipes", type=recipes_argument, default=list(RECIPES), metavar="NAME,...",
                   help="the rows to fit at each size: adaptor (on the base model), fine-tune, both (the adaptor on "
                   "the fine-tuned model), orthogonal (the adaptor kept a rotation, on the base model), "
                   "both-orthogonal (the rotation on the fine-tuned model), orthogonal-fine-tune (fine-tuning from "
                   "the base model with the rotation appended); default the "
                   "first three. The sample depends only on the largest size and the "
                   "seed, so rows of separate runs compare")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="encoding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=Path("runs/bench/curves"))
    p.set_defaults(handler=run_curves_command)


def run_curves_command(args: argparse.Namespace) -> int:
    from core.cli_args import check_positive, config_fields
    from core.errors import ConfigError
    from training.config import TrainConfig
    from training.validation import check_folds, check_validation_fraction

    check_positive(args, ("max_test_queries", "max_docs", "adaptor_steps", "epochs"))
    check_validation_fraction(args.validation_fraction)
    config = CurvesConfig(**config_fields(args))
    try:
        check_folds(TrainConfig(data=Path("."), output=Path("."), epochs=config.epochs, folds=config.train_folds,
                                validation_fraction=config.validation_fraction))  # fmt: skip
    except ConfigError as error:  # named as this command names the option
        raise ConfigError(str(error).replace("--folds", "--train-folds")) from None
    paths: list[Path] = []

    def write(report: dict[str, Any]) -> None:  # after each dataset
        paths[:] = [*write_report(report, config.out, "curves", curves_markdown),
                    plot_curves(report, config.out / "curves.png")]  # fmt: skip

    report = run_curves(config, after_each=write)
    print(curves_markdown(report), end="")
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
