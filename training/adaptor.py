"""Matryoshka adaptor: a linear map, learned on frozen embeddings, that moves quality into the leading dims.

After Yoon et al. (2024), "Matryoshka-Adaptor: Unsupervised and Supervised Tuning for Smaller
Embedding Dimensions". The encoder is never run during fitting: the corpus and the training
queries are encoded once at full dimension, and a square matrix ``W`` (identity or PCA at the
start) is fitted so that ``truncate_normalize(x @ W.T, m)`` ranks well at every Matryoshka dim
``m``. Three terms, summed over the dims:

- **ranking** (supervised): softmax cross-entropy of each training query's positive against the
  candidate documents (its batch's positives plus a sample of the corpus), other judged positives
  of the same query masked out;
- **similarity** (unsupervised): on a sample of documents, the truncated cosine of each document
  to its ten nearest neighbours should match the full-dim cosine before the map;
- **reconstruction**: ``x @ W.T`` stays close to ``x @ W0.T``, the starting map's output (``x`` itself
  from the identity), which keeps the full dim where it was.

The published model is the input model with a bias-free ``Dense`` module (and a ``Normalize``)
appended, so the index builder and the service load it unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from core.metrics import exact_top_k, score_rankings
from training.validation import grouped_folds, separable_groups

logger = logging.getLogger(__name__)

STARTS = ("pca", "identity")  # in this order, so that a tie on validation keeps the PCA start
INITS = (*STARTS, "auto")  # auto: fit from each start, keep the better on validation
NEIGHBOURS = 10
TOLERANCE = 0.005  # the never-worse rule: a step qualifies only if no dim loses more than this on validation
ROTATE_BELOW = 1000  # labelled questions: fewer, and the map is a rotation unless told (AdaptorConfig.orthogonal)
MIN_GAIN = 0.001  # a mean gain smaller than this is no gain (validation figures are rounded to 4 places)


@dataclass
class AdaptorConfig:
    """How the map is fitted; defaults measured on the validation splits of SciFact and MedQuAD (see README)."""

    dims: list[int]
    weights: list[float] | None = None
    # Which start wins depends on the model and data: PCA on SciFact (base and tuned), the identity on
    # MedQuAD's tuned model; so by default both are fitted and validation decides.
    init: str = "auto"
    steps: int = 600
    learning_rate: float = 1e-3
    batch_size: int = 128
    negatives: int = 4096
    scale: float = 20.0
    similarity_weight: float = 1.0
    reconstruction_weight: float = 1.0
    eval_every: int = 25
    patience: int = 6
    metric: str = "ndcg@10"
    select_dim: int | None = None  # maximise the gain at this dim alone (default: the mean gain over the dims)
    tolerance: float = TOLERANCE  # no dim's validation metric may fall more than this below the input model's
    folds: int | None = None  # choose the start and step by k-fold cross-validation over the training queries
    # The map kept a rotation of its start (which is one): cosines at the full dim are the input's, exactly, so
    # the full dim cannot be traded; only which directions the leading dims keep is learned. None: a rotation
    # below ROTATE_BELOW labelled questions, the free map from there (the learning curves' evidence)
    orthogonal: bool | None = None
    seed: int = 42

    def check(self) -> None:
        """Raises: ConfigError for impossible settings, naming the option."""
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init!r} is not one of {', '.join(INITS)}")
        for name in ("steps", "learning_rate", "batch_size", "negatives", "scale", "eval_every", "patience"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("similarity_weight", "reconstruction_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be zero or more, got {getattr(self, name)}")
        if self.weights is not None and len(self.weights) != len(self.dims):
            raise ConfigError(f"--dim-weights has {len(self.weights)} values for the {len(self.dims)} dims {self.dims}")
        if self.select_dim is not None and self.select_dim not in self.dims:
            raise ConfigError(f"--select-dim {self.select_dim} is not one of the dims {self.dims}")
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be zero or more, got {self.tolerance}")
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")

    def check_validation(self, has_validation: bool) -> None:
        """Raises: ConfigError if ``--init auto`` has no validation queries to choose the start on."""
        if self.init == "auto" and not has_validation and not self.folds:
            raise ConfigError(
                "--init auto picks the start on validation queries: pass --validation-fraction or --folds, or "
                "--init pca|identity"
            )


@dataclass
class Judged:
    """Queries (full-dim vectors) and, per query, the corpus rows that are relevant (graded)."""

    vectors: np.ndarray
    relevant: list[dict[int, int]]


@dataclass
class AdaptorFit:
    weight: np.ndarray  # (d, d): output = x @ weight.T, as torch's Linear stores it
    init: str  # the start this fit came from ("pca" for a PCA rotation alone)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_metric: float | None = None
    seconds: float = 0.0
    steps_run: int = 0
    starts: dict[str, float] = field(default_factory=dict)  # with init auto: best validation gain per start
    input_scores: dict[int, float] = field(default_factory=dict)  # the input model's validation metric per dim
    chosen_scores: dict[int, float] = field(default_factory=dict)  # the kept map's, per dim
    kept_input: bool = False  # no step kept every dim within the tolerance: the map is the identity
    orthogonal: bool = False  # the map was kept a rotation of its start
    folds: dict[str, Any] | None = None  # with cross-validation: folds, queries, the spread of the chosen gain

    @property
    def gain(self) -> float | None:
        """The kept map's validation gain (the rule's objective), or None without validation."""
        return self.best_metric

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init,
            **({"starts": {k: round(v, 4) for k, v in self.starts.items()}} if self.starts else {}),
            "best_step": self.best_step,
            "best_metric": None if self.best_metric is None else round(self.best_metric, 4),
            "kept_input": self.kept_input,
            "orthogonal": self.orthogonal,
            "validation_by_dim": {
                str(dim): {"input": round(self.input_scores[dim], 4), "chosen": round(self.chosen_scores[dim], 4)}
                for dim in self.input_scores
                if dim in self.chosen_scores
            },
            **({"cross_validation": self.folds} if self.folds else {}),
            "steps_run": self.steps_run,
            "seconds": round(self.seconds, 1),
            "history": self.history,
        }


def rule_gain(
    scores: dict[int, float], input_scores: dict[int, float], tolerance: float, select_dim: int | None = None
) -> float | None:
    """The never-worse rule's objective for a map with validation ``scores`` per dim: the mean gain over the
    input model's (or the gain at ``select_dim``), or None when any dim falls more than ``tolerance`` below it."""
    if any(scores[dim] < input_scores[dim] - tolerance for dim in input_scores):
        return None
    if select_dim is not None:
        return scores[select_dim] - input_scores[select_dim]
    return float(np.mean([scores[dim] - input_scores[dim] for dim in input_scores]))


def pca_rotation(corpus: np.ndarray) -> np.ndarray:
    """An orthogonal ``(d, d)`` map whose outputs are the corpus's uncentred principal axes, largest first.

    Orthogonal, so full-dim cosines are unchanged; truncation then keeps the directions the corpus
    varies most along. Uncentred, because a shift would change every cosine.
    """
    x = corpus.astype(np.float64)
    values, vectors = np.linalg.eigh(x.T @ x)  # (d, d) whatever the corpus size; ascending eigenvalues
    return vectors[:, ::-1].T.astype(np.float32)  # rows are the axes, largest first: x @ W.T gives coordinates


def apply_map(vectors: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return (vectors @ weight.T).astype(np.float32)


def score_mapped(
    weight: np.ndarray | None, corpus: np.ndarray, judged: Judged, dims: list[int], metric: str | None = None
) -> dict[int, dict[str, float]]:
    """Exact-search metrics at each dim after the map (``None``: no map), per dim, from frozen vectors."""
    docs = corpus if weight is None else apply_map(corpus, weight)
    queries = judged.vectors if weight is None else apply_map(judged.vectors, weight)
    qrels = {str(i): {str(doc): grade for doc, grade in rel.items()} for i, rel in enumerate(judged.relevant)}
    by_dim = {}
    for dim in sorted(dims, reverse=True):
        top = exact_top_k(truncate_normalize(queries, dim), truncate_normalize(docs, dim), 100)
        rankings = {str(i): [str(j) for j in row] for i, row in enumerate(top)}
        scores = score_rankings(rankings, qrels)
        by_dim[dim] = {metric: scores[metric]} if metric else scores
    return by_dim


def fit_adaptor(
    corpus: np.ndarray,
    training: Judged,
    validation: Judged | None,
    config: AdaptorConfig,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> AdaptorFit:
    """Fit the map; with ``validation``, keep the best step by ``config.metric`` at ``config.select_dim``.

    Without validation the last step is kept. ``progress`` is called after every validation. With
    ``init="auto"`` a map is fitted from each of :data:`STARTS` and the one with the better validation
    metric is kept (its ``seconds`` count both fits).

    Raises:
        ConfigError: impossible settings, or ``init="auto"`` without ``validation``.
    """
    config.check()
    config.check_validation(validation is not None)
    if config.orthogonal is None:
        questions = len(training.relevant) + (len(validation.relevant) if validation else 0)
        config = replace(config, orthogonal=questions < ROTATE_BELOW)
        if config.orthogonal:
            logger.info("adaptor: %d labelled questions (fewer than %d): the map is kept a rotation, so the "
                        "full dim is the input model's exactly (--no-orthogonal: a free map)", questions,
                        ROTATE_BELOW)  # fmt: skip
    if config.folds:
        fit = fit_cross_validated(corpus, training, config, progress)
    elif config.init == "auto":
        fit = better_start(fit_each_start(corpus, training, validation, config, progress))
    else:
        fit = _fit_from(corpus, training, validation, config, progress)
    fit.orthogonal = bool(config.orthogonal)
    return fit


def fit_each_start(
    corpus: np.ndarray,
    training: Judged,
    validation: Judged | None,
    config: AdaptorConfig,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[AdaptorFit]:
    """One fit from each of :data:`STARTS`, in that order (``config.init`` is ignored)."""
    fits = []
    for start in STARTS:
        logger.info("adaptor: fitting from the %s start", start)
        fits.append(fit_adaptor(corpus, training, validation, replace(config, init=start), progress))
    return fits


def better_start(fits: list[AdaptorFit]) -> AdaptorFit:
    """What ``init="auto"`` keeps of :func:`fit_each_start`'s fits: the larger validation gain under the
    never-worse rule, the first of equals (PCA); its ``starts`` name each start's gain, its ``seconds``
    count every fit. When neither start gained, the input model is kept (the identity map)."""
    best = replace(max(fits, key=lambda fit: -1.0 if fit.kept_input else (fit.best_metric or 0.0)))
    best.starts = {fit.init: 0.0 if fit.kept_input else (fit.best_metric or 0.0) for fit in fits}
    best.seconds = sum(fit.seconds for fit in fits)
    logger.info("adaptor: kept %s (validation gain per start %s)", _kept(best), best.starts)
    return best


def _kept(fit: AdaptorFit) -> str:
    return (
        "the input model (no step kept every dim within the tolerance)" if fit.kept_input else f"the {fit.init} start"
    )


def holds_across_folds(
    folds: list[dict[int, dict[int, float]]],
    inputs: list[dict[int, float]],
    step: int,
    dims: list[int],
    tolerance: float,
) -> bool:
    """The rule with the folds' noise counted: at every dim the mean change over the folds, less its standard
    error, stays above ``-tolerance``, and the mean gain over the dims, less its standard error, is above 0.

    A mean over five folds of a few dozen questions each moves by hundredths; a step that only looks better
    by less than that is not kept.
    """
    k = len(folds)
    if k < 2:
        return True
    for dim in dims:
        changes = np.array([fold[step][dim] - inputs[i][dim] for i, fold in enumerate(folds)])
        if changes.mean() - changes.std(ddof=1) / np.sqrt(k) < -tolerance:
            return False
    gains = np.array([np.mean([fold[step][d] - inputs[i][d] for d in dims]) for i, fold in enumerate(folds)])
    return bool(gains.mean() - gains.std(ddof=1) / np.sqrt(k) > 0)


def judge_folds(
    folds: list[dict[int, dict[int, float]]],
    inputs: list[dict[int, float]],
    mean_input: dict[int, float],
    dims: list[int],
    tolerance: float,
    select_dim: int | None = None,
) -> list[dict[str, Any]]:
    """Every step all the folds reached, in order: the fold means per dim (``mean``), the never-worse rule's
    gain on them against ``mean_input`` (``gain``: None when a dim falls beyond ``tolerance``), and whether
    the step qualifies (``holds``: a gain of at least ``MIN_GAIN`` that also holds across the folds)."""
    judged = []
    for step in sorted(set.intersection(*(set(fold) for fold in folds))):
        mean = {dim: float(np.mean([fold[step][dim] for fold in folds])) for dim in dims}
        gain = rule_gain(mean, mean_input, tolerance, select_dim)
        holds = gain is not None and gain >= MIN_GAIN and holds_across_folds(folds, inputs, step, dims, tolerance)
        judged.append({"step": step, "mean": mean, "gain": gain, "holds": holds})
    return judged


def fold_spread(
    folds: list[dict[int, dict[int, float]]], inputs: list[dict[int, float]], step: int, dims: list[int]
) -> dict[str, Any]:
    """The chosen step's gain over the folds: its spread, each fold's, and the worst fold's change per dim."""
    gains = [float(np.mean([fold[step][d] - inputs[i][d] for d in dims])) for i, fold in enumerate(folds)]
    worst = {str(d): round(min(fold[step][d] - inputs[i][d] for i, fold in enumerate(folds)), 4) for d in dims}
    return {"gain_std": round(float(np.std(gains)), 4), "gain_by_fold": [round(g, 4) for g in gains],
            "worst_fold_change_by_dim": worst}  # fmt: skip


def _subset(judged: Judged, rows: np.ndarray) -> Judged:
    return Judged(judged.vectors[rows], [judged.relevant[row] for row in rows])


def fit_cross_validated(
    corpus: np.ndarray,
    training: Judged,
    config: AdaptorConfig,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> AdaptorFit:
    """Choose the start and the number of steps by k-fold cross-validation over the training queries, then
    fit on all of them.

    The folds are grouped (:func:`grouped_folds`): questions that share a relevant document are in one
    fold, so each fold is scored on documents the others never had as positives, as a clean test view is.
    Random folds would reward memorising the training positives (on SciFact, a step chosen that way cost
    0.018 at 384 dims on the clean test view). Every fold fits each start on the other folds and scores
    its own queries every ``eval_every`` steps,
    stopping early as a single fit does; the steps every fold of a start reached are compared. The fold
    means, per start, step and dim, are judged by the never-worse rule against the input model's fold
    means; the best (start, step) is then fitted on every training query. The spread of the chosen gain
    over the folds is kept in ``folds``; none qualifying keeps the input model.
    """
    started = time.perf_counter()
    count = len(training.relevant)
    groups = separable_groups(training.relevant, "the folds")
    k = min(config.folds or 5, len(groups))
    parts = grouped_folds(groups, k, config.seed)
    dims = sorted(config.dims, reverse=True)
    starts = [config.init] if config.init in STARTS else list(STARTS)
    per_start: dict[str, list[dict[int, dict[int, float]]]] = {start: [] for start in starts}  # fold -> step -> dim
    inputs = []
    for number, held in enumerate(parts):
        rest = np.concatenate([part for i, part in enumerate(parts) if i != number])
        fold_config = replace(config, folds=None)
        for start in starts:
            logger.info("adaptor: fold %d of %d, %s start", number + 1, k, start)
            fit = _fit_from(
                corpus, _subset(training, rest), _subset(training, held), replace(fold_config, init=start), None
            )
            per_start[start].append({e["step"]: {int(d): v for d, v in e[config.metric].items()} for e in fit.history})
        inputs.append(fit.input_scores)
    mean_input = {dim: float(np.mean([scores[dim] for scores in inputs])) for dim in dims}
    best: tuple[float, str, int] | None = None
    gains: dict[str, float] = {}
    for start, folds in per_start.items():
        for entry in judge_folds(folds, inputs, mean_input, dims, config.tolerance, config.select_dim):
            step, gain = entry["step"], entry["gain"]
            if entry["holds"] and gain > gains.get(start, 0.0):
                gains[start] = gain
            if entry["holds"] and (best is None or gain > best[0]):
                best = (gain, start, step)
            if progress:
                progress(step, {"step": step, "loss": 0.0, f"{start} mean {config.metric}": entry["mean"]})
    summary: dict[str, Any] = {
        "folds": k,
        "queries": count,
        "groups": len(groups),
        "input": {str(d): round(v, 4) for d, v in mean_input.items()},
    }
    if best is None:
        kept = AdaptorFit(weight=np.eye(corpus.shape[1], dtype=np.float32), init="identity", kept_input=True)
        kept.input_scores = kept.chosen_scores = mean_input
        kept.best_metric, kept.best_step = 0.0, 0
    else:
        gain, start, step = best
        folds = per_start[start]
        summary |= {"start": start, "step": step, "gain_mean": round(gain, 4), **fold_spread(folds, inputs, step, dims)}
        logger.info("adaptor: cross-validation chose the %s start at step %d (mean gain %.4f ± %.4f over %d folds)",
                    start, step, gain, summary["gain_std"], k)  # fmt: skip
        kept = (
            _fit_from(corpus, training, None, replace(config, init=start, steps=step, folds=None), None)
            if step
            else None
        )
        if kept is None:  # the start itself (step 0): PCA with no step
            kept = AdaptorFit(weight=pca_rotation(corpus) if start == "pca" else np.eye(corpus.shape[1],
                              dtype=np.float32), init=start)  # fmt: skip
        kept.input_scores = mean_input
        kept.chosen_scores = {dim: float(np.mean([fold[step][dim] for fold in folds])) for dim in dims}
        kept.best_metric, kept.best_step = gain, step
    kept.starts = {start: gains.get(start, 0.0) for start in starts}
    kept.folds = summary
    kept.seconds = time.perf_counter() - started
    return kept


def _fit_from(
    corpus: np.ndarray,
    training: Judged,
    validation: Judged | None,
    config: AdaptorConfig,
    progress: Callable[[int, dict[str, Any]], None] | None,
) -> AdaptorFit:
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dims = sorted(config.dims, reverse=True)
    weights = config.weights or [1.0] * len(dims)
    d = corpus.shape[1]
    start = pca_rotation(corpus) if config.init == "pca" else np.eye(d, dtype=np.float32)
    initial = torch.from_numpy(start.copy())
    if config.orthogonal:  # the start times the Cayley transform of a skew-symmetric matrix: a rotation at every step
        skew = torch.nn.Parameter(torch.zeros(d, d))
        parameter = skew
        identity = torch.eye(d)

        def mapping() -> torch.Tensor:
            # (I - A)^-1 (I + A) is orthogonal for every skew A; with A = (S - S^T) / 2 it is I + (S - S^T) to first
            # order, as the exponential of S - S^T is, at a fifth of its cost (a solve for matrix_exp's Pade terms)
            half = (skew - skew.T) / 2
            return initial @ torch.linalg.solve(identity - half, identity + half)
    else:
        parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))

        def mapping() -> torch.Tensor:
            return parameter

    optimizer = torch.optim.Adam([parameter], lr=config.learning_rate)
    docs = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    queries = torch.from_numpy(np.ascontiguousarray(training.vectors, dtype=np.float32))
    pairs = [(q, doc) for q, rel in enumerate(training.relevant) for doc, grade in rel.items() if grade > 0]
    if not pairs:
        raise ConfigError("the training split has no relevant (query, document) pair to fit the adaptor on")
    relevant = [set(doc for doc, grade in rel.items() if grade > 0) for rel in training.relevant]

    def evaluate(w: np.ndarray) -> dict[int, float]:
        assert validation is not None
        return {dim: v[config.metric] for dim, v in score_mapped(w, corpus, validation, dims, config.metric).items()}

    fit = AdaptorFit(weight=start, init=config.init)
    if validation is not None:  # the never-worse rule: the input model (the identity) until a step beats it
        fit.input_scores = evaluate(np.eye(d, dtype=np.float32))
        fit.weight, fit.kept_input, fit.chosen_scores = np.eye(d, dtype=np.float32), True, dict(fit.input_scores)
        fit.best_metric, fit.best_step = 0.0, 0
        scores = evaluate(start)
        fit.history.append({"step": 0, config.metric: {str(k): round(v, 4) for k, v in scores.items()}})
        _consider(fit, 0, start, scores, config)
    stale = 0
    for step in range(1, config.steps + 1):
        batch = rng.choice(len(pairs), size=min(config.batch_size, len(pairs)), replace=False)
        batch_queries = [pairs[i][0] for i in batch]
        positives = [pairs[i][1] for i in batch]
        if docs.shape[0] <= config.negatives + len(positives):
            candidates = np.arange(docs.shape[0])
        else:
            sampled = rng.choice(docs.shape[0], size=config.negatives, replace=False)
            candidates = np.unique(np.concatenate([np.asarray(positives), sampled]))
        column = {int(doc): j for j, doc in enumerate(candidates)}
        target = torch.tensor([column[p] for p in positives])
        mask = torch.zeros(len(batch), len(candidates), dtype=torch.bool)
        for i, (q, p) in enumerate(zip(batch_queries, positives, strict=True)):
            for other in relevant[q] - {p}:
                if other in column:
                    mask[i, column[other]] = True
        weight = mapping()
        q_full = queries[torch.tensor(batch_queries)] @ weight.T
        d_full = docs[torch.from_numpy(candidates)] @ weight.T
        sample = torch.randperm(docs.shape[0], generator=generator)[: min(512, docs.shape[0])]
        original = docs[sample]
        mapped = original @ weight.T
        with torch.no_grad():
            anchor = original @ initial.T
            reference = original @ original.T
            reference.fill_diagonal_(-2.0)
            neighbours = reference.topk(min(NEIGHBOURS, len(sample) - 1), dim=1)
        loss = config.reconstruction_weight * (mapped - anchor).pow(2).sum(dim=1).mean()
        for dim, w in zip(dims, weights, strict=True):
            qm, dm = F.normalize(q_full[:, :dim], dim=1), F.normalize(d_full[:, :dim], dim=1)
            logits = (config.scale * qm @ dm.T).masked_fill(mask, float("-inf"))
            loss = loss + w * F.cross_entropy(logits, target)
            if config.similarity_weight:
                sm = F.normalize(mapped[:, :dim], dim=1)
                truncated = (sm @ sm.T).gather(1, neighbours.indices)
                loss = loss + w * config.similarity_weight * (truncated - neighbours.values).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fit.steps_run = step
        if validation is None or step % config.eval_every:
            continue
        current = mapping().detach().numpy().copy()
        scores = evaluate(current)
        entry = {
            "step": step,
            "loss": round(loss.item(), 4),
            config.metric: {str(k): round(v, 4) for k, v in scores.items()},
        }
        fit.history.append(entry)
        if progress:
            progress(step, entry)
        if _consider(fit, step, current, scores, config):
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if validation is None:
        fit.weight, fit.best_step = mapping().detach().numpy().copy(), fit.steps_run
    fit.seconds = time.perf_counter() - started
    return fit


def _consider(fit: AdaptorFit, step: int, weight: np.ndarray, scores: dict[int, float], config: AdaptorConfig) -> bool:
    """Keep ``weight`` if it beats the fit's kept map under the never-worse rule; True when kept."""
    gain = rule_gain(scores, fit.input_scores, config.tolerance, config.select_dim)
    if gain is None or gain < MIN_GAIN or gain <= (fit.best_metric or 0.0):
        return False
    fit.best_metric, fit.best_step, fit.weight, fit.kept_input = gain, step, weight, False
    fit.chosen_scores = dict(scores)
    return True


def append_adaptor(model: Any, weight: np.ndarray) -> Any:
    """``model`` with a bias-free linear ``Dense`` module (the map) and a ``Normalize`` module appended."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    d = weight.shape[1]
    dense = Dense(
        d, weight.shape[0], bias=False, activation_function=torch.nn.Identity(), init_weight=torch.from_numpy(weight)
    )
    modules = [module for _, module in model.named_children()] + [dense, Normalize()]
    adapted = SentenceTransformer(modules=modules, device=str(model.device), prompts=dict(model.prompts))
    adapted.default_prompt_name = model.default_prompt_name
    adapted.max_seq_length = model.max_seq_length
    return adapted
