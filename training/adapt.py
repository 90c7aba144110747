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
from training.evaluate import EvalResult
from training.report import comparison_table, plot_ndcg
from training.validation import VALIDATION_SPLIT, split_validation

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
    "seed",
)


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
    if config.validation_fraction is not None and not 0 < config.validation_fraction < 1:
        raise ConfigError(f"--validation-fraction must be in (0, 1), got {config.validation_fraction}")
    if config.method == "adaptor":
        config.fit.check_validation(config.validation_fraction is not None)
    if config.eval_split and config.eval_split == config.train_split:
        raise ConfigError(f"training and evaluation split are both {config.train_split!r}")
    if config.output.exists() and not config.overwrite:
        raise OutputExistsError(f"{config.output} already exists (pass --overwrite to replace it)")


def adaptor_config(config: AdaptConfig, dims: list[int]) -> AdaptorConfig:
    return replace(config.fit, dims=dims)


def adapt(config: AdaptConfig) -> dict[str, Any]:
    """Fit and publish; returns the report.

    Raises:
        ConfigError, DataError, DimensionError, ModelError, FileExistsError: with one readable line.
    """
    check_adapt_config(config)
    splits = [config.train_split] + ([config.eval_split] if config.eval_split else [])
    dataset = load_beir(config.data, splits)
    training_qrels = dataset.split(config.train_split)
    validation_qrels: Qrels | None = None
    if config.validation_fraction is not None:
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
    }
    if validation is not None:
        report["validation"] = {
            "before": _by_dim(score_mapped(None, vectors.docs, validation, dims)),
            "after": _by_dim(score_mapped(fit.weight, vectors.docs, validation, dims)),
        }
    compared = []
    if eval_qrels:
        judged = vectors.judged(eval_qrels)
        for label, weight in (("input", None), (config.method, fit.weight)):
            by_dim = score_mapped(weight, vectors.docs, judged, dims)
            compared.append(
                EvalResult(
                    label, dataset.name, str(config.eval_split), len(judged.relevant), len(vectors.doc_row), 0.0, by_dim
                )
            )
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


def _start(fit: dict[str, Any]) -> str:
    if not fit.get("starts"):
        return fit["init"]
    tried = ", ".join(f"{start} {metric:.4f}" for start, metric in fit["starts"].items())
    return f"{fit['init']} (chosen by --init auto on validation NDCG@10: {tried})"


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
    if "validation" in report:
        before, after = report["validation"]["before"], report["validation"]["after"]
        lines += [
            "",
            f"## Validation NDCG@10 ({report['validation_queries']} held-out training queries)",
            "",
            "| dim | input | after |",
            "|---:|---:|---:|",
            *(f"| {dim} | {before[dim]['ndcg@10']:.4f} | {after[dim]['ndcg@10']:.4f} |" for dim in before),
        ]
    if compared:
        lines += ["", f"## NDCG@10 on split `{compared[0].split}`", "", comparison_table(compared)]
    return "\n".join(lines) + "\n"
