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

logger = logging.getLogger(__name__)

STARTS = ("pca", "identity")  # in this order, so that a tie on validation keeps the PCA start
INITS = (*STARTS, "auto")  # auto: fit from each start, keep the better on validation
NEIGHBOURS = 10


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
    select_dim: int | None = None
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

    def check_validation(self, has_validation: bool) -> None:
        """Raises: ConfigError if ``--init auto`` has no validation queries to choose the start on."""
        if self.init == "auto" and not has_validation:
            raise ConfigError(
                "--init auto picks the start on validation queries: pass --validation-fraction, or --init pca|identity"
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
    starts: dict[str, float] = field(default_factory=dict)  # with init auto: best validation metric per start

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init,
            **({"starts": {k: round(v, 4) for k, v in self.starts.items()}} if self.starts else {}),
            "best_step": self.best_step,
            "best_metric": None if self.best_metric is None else round(self.best_metric, 4),
            "steps_run": self.steps_run,
            "seconds": round(self.seconds, 1),
            "history": self.history,
        }


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
    if config.init == "auto":
        return better_start(fit_each_start(corpus, training, validation, config, progress))
    return _fit_from(corpus, training, validation, config, progress)


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
    """What ``init="auto"`` keeps of :func:`fit_each_start`'s fits: the best validation metric, the
    first of equals (PCA); its ``starts`` name each start's metric, its ``seconds`` count every fit."""
    best = replace(max(fits, key=lambda fit: fit.best_metric or -1.0))
    best.starts = {fit.init: fit.best_metric or 0.0 for fit in fits}
    best.seconds = sum(fit.seconds for fit in fits)
    logger.info("adaptor: kept the %s start (validation %s)", best.init, best.starts)
    return best


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
    select_dim = config.select_dim or min(dims)
    d = corpus.shape[1]
    start = pca_rotation(corpus) if config.init == "pca" else np.eye(d, dtype=np.float32)
    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    initial = torch.from_numpy(start.copy())
    optimizer = torch.optim.Adam([weight], lr=config.learning_rate)
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
    if validation is not None:
        scores = evaluate(start)
        fit.history.append({"step": 0, config.metric: {str(k): round(v, 4) for k, v in scores.items()}})
        fit.best_metric, fit.best_step = scores[select_dim], 0
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
        current = weight.detach().numpy().copy()
        scores = evaluate(current)
        entry = {
            "step": step,
            "loss": round(loss.item(), 4),
            config.metric: {str(k): round(v, 4) for k, v in scores.items()},
        }
        fit.history.append(entry)
        if progress:
            progress(step, entry)
        if scores[select_dim] > (fit.best_metric or -1.0):
            fit.best_metric, fit.best_step, fit.weight, stale = scores[select_dim], step, current, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if validation is None:
        fit.weight, fit.best_step = weight.detach().numpy().copy(), fit.steps_run
    fit.seconds = time.perf_counter() - started
    return fit


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
