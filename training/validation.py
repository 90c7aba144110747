"""Validation during training: a held-out share of the training queries, scored at every Matryoshka dim.

The validation queries are carved out of the *training* split, by query, so the evaluation
split stays untouched for the before/after comparison and no query is both trained on and
validated on. Scoring reuses :func:`training.evaluate.evaluate` (encode once at full
dimension, truncate and re-normalise per dim), so validation figures are computed exactly
like the published before/after figures.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.data import Qrels, RetrievalDataset
from core.errors import ConfigError
from core.metrics import metric_names

if TYPE_CHECKING:
    from training.config import TrainConfig

logger = logging.getLogger(__name__)

VALIDATION_SPLIT = "validation"
METRIC_PREFIX = "eval_"
RULE_KEY = "never_worse_gain"  # the best checkpoint's criterion (rule_objective), logged with every evaluation


def rule_objective(
    scores: dict[int, float], baseline: dict[int, float], tolerance: float, select_dim: int | None = None
) -> float:
    """The never-worse rule as one number the trainer maximises: the mean gain over the input model's
    validation scores (or the gain at ``select_dim``) when no dim falls more than ``tolerance`` below the
    input's, else below -1 (``-2`` plus the mean gain), so that any checkpoint that keeps every dim beats
    any that does not. A checkpoint improves on the input only when it is above 0.
    """
    import math

    if not baseline:
        return 0.0
    mean_gain = sum(scores[dim] - baseline[dim] for dim in baseline) / len(baseline)
    broken = any(not math.isfinite(scores[dim]) or scores[dim] < baseline[dim] - tolerance for dim in baseline)
    if broken:
        return -2.0 + (mean_gain if math.isfinite(mean_gain) else -1.0)
    return scores[select_dim] - baseline[select_dim] if select_dim is not None else mean_gain


@dataclass
class ValidationSet:
    """The held-out queries, as a dataset sharing the training corpus with one ``validation`` split."""

    dataset: RetrievalDataset
    training_qrels: Qrels

    @property
    def queries(self) -> list[str]:
        return [self.dataset.queries[qid] for qid in self.dataset.split(VALIDATION_SPLIT)]


def check_validation_fraction(fraction: float | None) -> None:
    """Raises: ConfigError unless ``fraction`` is None or in (0, 1) (``--validation-fraction``)."""
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigError(f"--validation-fraction must be in (0, 1), got {fraction}")


def check_validation_options(config: TrainConfig) -> None:
    """Reject impossible validation and tracking settings before any data or model is loaded.

    Raises:
        ConfigError: With the offending option named, in one line.
    """
    fraction = config.validation_fraction
    check_validation_fraction(fraction)
    check_folds(config)
    for name in ("early_stopping_patience", "eval_steps", "early_stopping_dim"):
        allowed_with_folds = config.folds is not None and name != "eval_steps"  # folds validate once per epoch
        if getattr(config, name) is not None and fraction is None and not allowed_with_folds:
            raise ConfigError(f"--{name.replace('_', '-')} needs --validation-fraction")
    if config.early_stopping_patience is not None and config.early_stopping_patience < 1:
        raise ConfigError(f"--early-stopping-patience must be at least 1, got {config.early_stopping_patience}")
    if config.eval_steps is not None and config.eval_steps < 1:
        raise ConfigError(f"--eval-steps must be at least 1, got {config.eval_steps}")
    if config.early_stopping_metric not in metric_names():
        raise ConfigError(
            f"--early-stopping-metric {config.early_stopping_metric!r} is not one of {', '.join(metric_names())}"
        )


def check_folds(config: TrainConfig) -> None:
    """Refuse ``--folds`` settings that cannot work, in one line (``mrl train``'s cross-validated epochs).

    Raises:
        ConfigError: Naming the option that conflicts.
    """
    if config.folds is None:
        return
    if config.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {config.folds}")
    if config.validation_fraction is not None:
        raise ConfigError("--folds and --validation-fraction are two ways to choose the checkpoint: pass one")
    if config.hard_negatives:
        raise ConfigError("--folds chooses the epochs of one training stage: it does not run with --hard-negatives")
    if config.max_steps > 0:
        raise ConfigError("--folds chooses the number of epochs: it does not run with --max-steps")
    if config.epochs != int(config.epochs):
        raise ConfigError(f"--folds chooses among whole epochs: --epochs must be a whole number, got {config.epochs}")


def positive_groups(relevant: list[dict[Hashable, int]]) -> list[list[int]]:
    """The questions (row numbers) joined by a shared relevant document (grade above 0), each group in row
    order, the groups in the order of their first row."""
    parent = list(range(len(relevant)))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    first_with: dict[Hashable, int] = {}
    for row, docs in enumerate(relevant):
        for doc, grade in docs.items():
            if grade > 0:
                other = first_with.setdefault(doc, row)
                parent[root(row)] = root(other)
    groups: dict[int, list[int]] = {}
    for row in range(len(relevant)):
        groups.setdefault(root(row), []).append(row)
    return list(groups.values())


def separable_groups(relevant: list[dict[Hashable, int]], held: str) -> list[list[int]]:
    """:func:`positive_groups`, or one group per question (with a warning naming what is ``held`` out) when a
    single web of shared positives joins them all and there is nothing to hold apart."""
    groups = positive_groups(relevant)
    if len(groups) > 1:
        return groups
    logger.warning("every training question shares a relevant document with another: %s are drawn at random, so "
                   "gains from memorising the training positives count in the choice", held)  # fmt: skip
    return [[row] for row in range(len(relevant))]


def grouped_folds(groups: list[list[int]], k: int, seed: int) -> list[np.ndarray]:
    """``k`` folds of whole groups, of near-equal sizes: the groups in a seeded order, largest first, each
    to the fold with the fewest questions so far."""
    order = np.random.default_rng(seed).permutation(len(groups))
    shuffled = sorted((groups[i] for i in order), key=len, reverse=True)  # stable: the seeded order within a size
    folds: list[list[int]] = [[] for _ in range(k)]
    for group in shuffled:
        min(folds, key=len).extend(group)
    return [np.array(sorted(fold), dtype=np.int64) for fold in folds]


def split_validation(dataset: RetrievalDataset, split: str, fraction: float, seed: int) -> ValidationSet:
    """Hold out ``fraction`` of the distinct query texts of ``split``, whole groups at a time, drawn by ``seed``.

    A group is the questions joined by a shared relevant document (:func:`positive_groups`): the
    validation questions' positives are then never training positives, as on a clean test view, so a
    checkpoint is not chosen for memorising them. Groups are taken in a seeded order, skipping any that
    would overshoot, until the share is reached. When one group holds every question, the split falls
    back to random questions and says so (:func:`separable_groups`). Splitting by text (not id) keeps a
    query asked twice under two ids on one side only.

    Raises:
        ConfigError: If the split has too few queries to leave at least one on each side.
    """
    qrels, positives = _positives_by_text(dataset, split)
    texts = sorted(positives)
    held_out = round(fraction * len(texts))
    if not 0 < held_out < len(texts):
        raise ConfigError(
            f"--validation-fraction {fraction} of {len(texts)} training queries leaves an empty side; "
            "choose a fraction that holds out at least one query and keeps one"
        )
    groups = separable_groups([positives[text] for text in texts], "the validation questions")
    chosen: list[int] = []
    for group in random.Random(seed).sample(groups, len(groups)):
        if len(chosen) + len(group) <= held_out:
            chosen.extend(group)
        if len(chosen) == held_out:
            break
    if not chosen:  # every group is larger than the share: the smallest one
        chosen = min(groups, key=len)
    return _hold_out(dataset, split, qrels, {texts[row] for row in chosen})


def split_folds(dataset: RetrievalDataset, split: str, folds: int, seed: int) -> list[ValidationSet]:
    """``folds`` grouped folds of the distinct query texts of ``split`` (:func:`grouped_folds`), each as the
    validation set of a run trained on the others: no fold's positives are another fold's training positives.

    Raises:
        ConfigError: If the split has fewer than two questions with a relevant document.
    """
    qrels, positives = _positives_by_text(dataset, split)
    texts = sorted(positives)
    if len(texts) < 2:
        raise ConfigError(f"--folds needs at least two training questions, split {split!r} has {len(texts)}")
    groups = separable_groups([positives[text] for text in texts], "the folds")
    parts = grouped_folds(groups, min(folds, len(groups)), seed)
    return [_hold_out(dataset, split, qrels, {texts[row] for row in part}) for part in parts]


def _positives_by_text(dataset: RetrievalDataset, split: str) -> tuple[Qrels, dict[str, dict[Hashable, int]]]:
    """The split's judged questions (with a relevant document), and each distinct text's best grade per doc."""
    qrels = {qid: docs for qid, docs in dataset.split(split).items() if any(s > 0 for s in docs.values())}
    positives: dict[str, dict[Hashable, int]] = {}
    for qid, docs in qrels.items():
        for doc, grade in docs.items():
            text = positives.setdefault(dataset.queries[qid], {})
            text[doc] = max(grade, text.get(doc, 0))
    return qrels, positives


def _hold_out(dataset: RetrievalDataset, split: str, qrels: Qrels, texts: set[str]) -> ValidationSet:
    validation = {qid: docs for qid, docs in qrels.items() if dataset.queries[qid] in texts}
    training = {qid: docs for qid, docs in dataset.split(split).items() if qid not in validation}
    held = RetrievalDataset(dataset.root, dataset.corpus, dataset.queries, {VALIDATION_SPLIT: validation})
    return ValidationSet(held, training)


def metric_key(dim: int, metric: str) -> str:
    return f"dim_{dim}_{metric}"


def validation_history(log_history: list[dict[str, Any]], dims: list[int], metric: str) -> list[dict[str, Any]]:
    """One entry per evaluation: step, epoch and ``metric`` at each dim (from the trainer's log)."""
    history = []
    for entry in log_history:
        keys = {dim: f"{METRIC_PREFIX}{metric_key(dim, metric)}" for dim in dims}
        if all(key in entry for key in keys.values()):
            history.append(
                {
                    "step": entry["step"],
                    "epoch": round(entry.get("epoch", 0.0), 4),
                    metric: {str(dim): round(entry[key], 4) for dim, key in keys.items()},
                }
            )
    return history
