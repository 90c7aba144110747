"""``mrl adapt``: fit a Matryoshka adaptor (or a PCA rotation) on a model's frozen embeddings and publish it.

The corpus and the training queries are encoded once at full dimension; the map is fitted on
those vectors in seconds; the published folder is the model plus a ``Dense`` and a ``Normalize``
module (see :mod:`training.adaptor`), with a report that scores the evaluation split before and
after from the same vectors. The validation queries come out of the training split exactly as
``mrl train --validation-fraction`` carves them (same seed, same fraction), so a model trained
with that option is validated here on queries it never saw.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.data import DataError, Qrels, RetrievalDataset, load_beir
from core.errors import ConfigError, OutputExistsError
from core.files import json_fields, publish_dir, staging_dir, write_json_atomic, write_text_atomic
from core.matryoshka import validate_dims
from core.models import (
    DEFAULT_MODEL,
    DOCUMENT_PROMPT,
    QUERY_PROMPT,
    MatryoshkaCard,
    SentenceTransformerEncoder,
    embedding_dimension,
    encoder_pool,
    load_model,
    model_dims,
    read_model_card,
    resolve_model,
)
from training.adaptor import AdaptorConfig, AdaptorFit, Judged, append_adaptor, fit_adaptor, pca_rotation, score_mapped
from training.evaluate import EvalResult, split_views
from training.report import comparison_table, plot_ndcg, views_section
from training.validation import VALIDATION_SPLIT, check_validation_fraction, split_validation

logger = logging.getLogger(__name__)

REPORT_STEM = "adaptor_report"
METHODS = ("adaptor", "pca")


# The map's own settings (init, steps, learning rate, loss weights, patience, seed): ``mrl adapt`` takes
# them from ``AdaptorConfig``'s fields and defaults, so the two cannot drift apart. ``--dim-weights`` is
# its ``weights``.
FIT_OPTIONS = (
    "init",
    "steps",
    "learning_rate",
    "negatives",
    "similarity_weight",
    "reconstruction_weight",
    "patience",
    "tolerance",
    "folds",
    "orthogonal",
    "seed",
)
CROSS_VALIDATE_BELOW = 1000  # training queries: fewer, and the start and step are chosen by k-fold cross-validation
AUTO_FOLDS = 5
MIN_QUESTIONS = 50  # fewer training queries: a warning (the choice is mostly noise; the input is usually kept)


def default_fit() -> AdaptorConfig:
    return AdaptorConfig(dims=[])


@dataclass
class AdaptConfig:
    data: Path
    output: Path
    model: str | None = None
    method: str = "adaptor"
    train_split: str = "train"
    eval_split: str | None = "test"
    validation_fraction: float | None = 0.1
    dims: list[int] | None = None
    fit: AdaptorConfig = field(default_factory=default_fit)  # its dims are filled in by adapt()
    batch_size: int = 64
    workers: int = 1
    overwrite: bool = False
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        fields = json_fields(self)
        fit = fields.pop("fit")
        return fields | {"dim_weights": fit["weights"]} | {name: fit[name] for name in FIT_OPTIONS}


@dataclass
class Vectors:
    """Full-dim vectors of the whole corpus and of every query the run needs, by id."""

    doc_row: dict[str, int]
    docs: np.ndarray
    query_row: dict[str, int]
    queries: np.ndarray

    def judged(self, qrels: Qrels) -> Judged:
        ids = [qid for qid, docs in qrels.items() if any(grade > 0 for grade in docs.values())]
        relevant = [{self.doc_row[d]: g for d, g in qrels[qid].items() if d in self.doc_row} for qid in ids]
        return Judged(self.queries[[self.query_row[q] for q in ids]], relevant)


def encode_vectors(encoder: SentenceTransformerEncoder, dataset: RetrievalDataset, query_ids: list[str]) -> Vectors:
    doc_ids = list(dataset.corpus)
    docs = encoder.encode_documents([dataset.corpus[d].passage for d in doc_ids])
    queries = encoder.encode_queries([dataset.queries[q] for q in query_ids])
    return Vectors({d: i for i, d in enumerate(doc_ids)}, docs, {q: i for i, q in enumerate(query_ids)}, queries)


def check_adapt_config(config: AdaptConfig) -> None:
    """Raises: ConfigError or FileExistsError, before any data or model is read."""
    if config.method not in METHODS:
        raise ConfigError(f"--method {config.method!r} is not one of {', '.join(METHODS)}")
    check_validation_fraction(config.validation_fraction)
    if config.method == "adaptor":
        config.fit.check_validation(config.validation_fraction is not None)
    if config.eval_split and config.eval_split == config.train_split:
        raise ConfigError(f"training and evaluation split are both {config.train_split!r}")
    if config.output.exists() and not config.overwrite:
        raise OutputExistsError(f"{config.output} already exists (pass --overwrite to replace it)")


def adaptor_config(config: AdaptConfig, dims: list[int]) -> AdaptorConfig:
    return replace(config.fit, dims=dims)


def adapt(config: AdaptConfig, cross_validate: bool = True) -> dict[str, Any]:
    """Fit and publish; returns the report. With ``cross_validate``, fewer than :data:`CROSS_VALIDATE_BELOW`
    training queries (and no ``folds`` given) choose by :data:`AUTO_FOLDS`-fold cross-validation.

    Raises:
        ConfigError, DataError, DimensionError, ModelError, FileExistsError: with one readable line.
    """
    check_adapt_config(config)
    splits = [config.train_split] + ([config.eval_split] if config.eval_split else [])
    dataset = load_beir(config.data, splits)
    training_qrels = dataset.split(config.train_split)
    validation_qrels: Qrels | None = None
    judged_count = sum(1 for docs in training_qrels.values() if any(g > 0 for g in docs.values()))
    auto = cross_validate and config.fit.folds is None and config.validation_fraction is not None
    if config.method == "adaptor" and auto:
        if judged_count < CROSS_VALIDATE_BELOW:  # a held-out tenth of a few hundred questions is noise
            config = replace(config, fit=replace(config.fit, folds=AUTO_FOLDS))
    if config.method == "adaptor" and judged_count < MIN_QUESTIONS:
        logger.warning(
            "only %d training questions: the adaptor is chosen on very few, so expect little or no gain; the "
            "never-worse rule keeps the input model unless every dim holds (label %d or more questions to gain)",
            judged_count,
            MIN_QUESTIONS,
        )
    if config.validation_fraction is not None and not config.fit.folds:
        held = split_validation(dataset, config.train_split, config.validation_fraction, config.fit.seed)
        training_qrels, validation_qrels = held.training_qrels, held.dataset.split(VALIDATION_SPLIT)
    if not any(any(g > 0 for g in docs.values()) for docs in training_qrels.values()):
        raise DataError(config.data, f"split {config.train_split!r} has no relevant (query, passage) pairs")

    model = load_model(config.model)
    dims = validate_dims(config.dims, embedding_dimension(model)) if config.dims else model_dims(model, config.model)
    fit_config = adaptor_config(config, dims)
    fit_config.check()
    eval_qrels = dataset.split(config.eval_split) if config.eval_split else {}
    query_ids = sorted(set(training_qrels) | set(validation_qrels or {}) | set(eval_qrels))
    encoder = SentenceTransformerEncoder(
        model, Path(config.model or DEFAULT_MODEL).name, config.batch_size, config.progress
    )
    with encoder_pool(encoder, config.workers) as pooled:
        vectors = encode_vectors(pooled, dataset, query_ids)

    validation = vectors.judged(validation_qrels) if validation_qrels else None
    if config.method == "pca":
        fit = AdaptorFit(weight=pca_rotation(vectors.docs), init="pca")
    else:
        fit = fit_adaptor(vectors.docs, vectors.judged(training_qrels), validation, fit_config, _log_progress)
    report: dict[str, Any] = {
        "base_model": config.model or DEFAULT_MODEL,
        "method": config.method,
        "dims": dims,
        "settings": config.settings(),
        "fit": fit.to_dict(),
        "training_queries": len(training_qrels),
        "validation_queries": len(validation_qrels or {}),
        "rule": {
            "tolerance": fit_config.tolerance,
            "chosen_by": "cross-validation" if fit.folds else ("validation" if validation is not None else "none"),
            "kept_input": fit.kept_input,
        },
    }
    if validation is not None:
        report["validation"] = {
            "before": _by_dim(score_mapped(None, vectors.docs, validation, dims)),
            "after": _by_dim(score_mapped(fit.weight, vectors.docs, validation, dims)),
        }
    compared = []
    if eval_qrels:
        judged = vectors.judged(eval_qrels)
        views = split_views(dataset.split(config.train_split), eval_qrels)  # the adaptor is fitted on train
        for label, weight in (("input", None), (config.method, fit.weight)):
            by_dim = score_mapped(weight, vectors.docs, judged, dims)
            result = EvalResult(
                label, dataset.name, str(config.eval_split), len(judged.relevant), len(vectors.doc_row), 0.0, by_dim
            )
            for view, qrels in views.items():
                scores = score_mapped(weight, vectors.docs, vectors.judged(qrels), dims)
                result.views[view] = {"num_queries": len(qrels), "by_dim": scores}
            compared.append(result)
        report["before"], report["after"] = compared[0].to_dict(), compared[1].to_dict()
    _publish(append_adaptor(model, fit.weight), config, dims, report, compared)
    return report


def _by_dim(scores: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {str(dim): {k: round(v, 4) for k, v in values.items()} for dim, values in scores.items()}


def _log_progress(step: int, entry: dict[str, Any]) -> None:
    metric = next(key for key in entry if key not in ("step", "loss"))
    logger.info("adaptor step %d: loss %.4f, validation %s %s", step, entry["loss"], metric, entry[metric])


def _publish(
    model: Any, config: AdaptConfig, dims: list[int], report: dict[str, Any], compared: list[EvalResult]
) -> None:
    staging = staging_dir(config.output)
    try:
        model.save(str(staging))
        source = read_model_card(resolve_model(config.model))
        card = MatryoshkaCard(
            dims=dims,
            base_model=source.base_model if source else report["base_model"],
            query_prompt=model.prompts.get(QUERY_PROMPT, ""),
            document_prompt=model.prompts.get(DOCUMENT_PROMPT, ""),
            extra={
                **(source.extra if source else {}),
                "adaptor": {"method": config.method, "input_model": report["base_model"], "after": report.get("after")},
            },
        )
        card.write(staging)
        write_json_atomic(staging / f"{REPORT_STEM}.json", report)
        write_text_atomic(staging / f"{REPORT_STEM}.md", adaptor_markdown(report, compared))
        if compared:
            plot_ndcg(compared, staging / f"{REPORT_STEM}_ndcg.png")
        publish_dir(staging, config.output, config.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


KEPT_INPUT = (
    "no step of the adaptor kept every dim within {tolerance} of the input model on validation, so the published "
    "map is the identity (the input model's vectors, unchanged)"
)


def _start(fit: dict[str, Any]) -> str:
    if not fit.get("starts"):
        return fit["init"]
    tried = ", ".join(f"{start} {gain:+.4f}" for start, gain in fit["starts"].items())
    return f"{fit['init']} (chosen by --init auto on the validation gain: {tried})"


def adaptor_markdown(report: dict[str, Any], compared: list[EvalResult]) -> str:
    fit, settings = report["fit"], report["settings"]
    lines = [
        f"# Matryoshka {report['method']} report",
        "",
        f"- Input model: `{report['base_model']}`; dims: {', '.join(map(str, report['dims']))}",
        f"- Fitted on {report['training_queries']} training queries' vectors in {fit['seconds']:.1f} s"
        f" ({fit['steps_run']} steps, best step {fit['best_step']}); start {_start(fit)}, lr "
        f"{settings['learning_rate']}, similarity weight {settings['similarity_weight']}, reconstruction weight "
        f"{settings['reconstruction_weight']}",
    ]
    if fit.get("orthogonal"):
        lines.append("- The map is a rotation of its start (`--orthogonal`, the default below 1,000 labelled "
                     "questions): every full-dim cosine, so the full dim's NDCG@10, is the input model's")  # fmt: skip
    rule = report.get("rule") or {}
    if rule.get("kept_input"):
        lines += ["", f"**The input model was kept:** {KEPT_INPUT.format(tolerance=rule['tolerance'])}"]
    by_dim = fit.get("validation_by_dim") or {}
    if by_dim:
        cross = fit.get("cross_validation")
        where = (
            f"mean of {cross['folds']} cross-validation folds over the {cross['queries']} training queries"
            if cross
            else f"{report['validation_queries']} held-out training queries"
        )
        lines += [
            "",
            f"## Validation NDCG@10 at the chosen step ({where})",
            "",
            f"Chosen by the never-worse rule: the largest mean gain over the dims with no dim more than "
            f"{rule.get('tolerance', 0.005)} below the input model.",
            "",
            "| dim | input | chosen | change |",
            "|---:|---:|---:|---:|",
            *(
                f"| {dim} | {v['input']:.4f} | {v['chosen']:.4f} | {v['chosen'] - v['input']:+.4f} |"
                for dim, v in by_dim.items()
            ),
        ]
        if cross and "gain_std" in cross:
            lines += [
                "",
                f"Spread over the folds: mean gain {cross['gain_mean']:+.4f} ± {cross['gain_std']:.4f} "
                f"(per fold {', '.join(f'{g:+.4f}' for g in cross['gain_by_fold'])}); the worst fold's change per "
                f"dim: {', '.join(f'{d}d {v:+.4f}' for d, v in cross['worst_fold_change_by_dim'].items())}.",
            ]
    if compared:
        lines += ["", f"## NDCG@10 on split `{compared[0].split}`", "", comparison_table(compared),
                  *views_section(compared)]  # fmt: skip
    return "\n".join(lines) + "\n"
