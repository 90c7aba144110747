"""Label-free plan calibration: pseudo-queries drawn from the corpus, scored by agreement with the full dim.

Most users have no judged queries for their corpus. Without them, ``mrl index build`` draws
pseudo-queries from the corpus itself (a sentence of a sampled passage, its first sentence, or its
document's title) and scores every plan by how closely its top 10 agrees with the full dim's exact
top 10 for the same query:

- **agreement@10** (rank-aware): NDCG@10 of the plan's ranking when each of the full dim's exact top
  10 is relevant with grade ``10 - rank`` (10 for the first, 1 for the tenth). 1.0 when the plan
  returns the same ten in the same order; it falls faster for a lost first hit than for a lost tenth.
- **overlap@10**: the share of the exact top 10 found anywhere in the plan's top 10.

With ``held_out`` the document a pseudo-query was drawn from is left out of both rankings, since
every dim finds the passage that contains the query's own words; agreement is then judged on the
other documents, as it is for a real query. ``mrl bench agreement`` measured which kind of
pseudo-query predicts the NDCG@10 ratio best on four labelled sets (``docs/results.md``); the
defaults below follow it.

The same two measures compare a served request's hits with a full-dim search of the same query
(:mod:`service.shadow`), so build-time and live figures are one quantity.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.data import Document
from core.matryoshka import truncate_normalize
from core.metrics import exact_top_k, ndcg_at_k

K = 10
KINDS = ("random", "first", "title")  # a random sentence of a passage, its first sentence, its document's title
DEFAULT_KIND = "random"
DEFAULT_HELD_OUT = True
DEFAULT_QUERIES = 200
SEED = 0
MIN_WORDS, MAX_WORDS = 4, 32  # a pseudo-query's length in words: shorter sentences are skipped, longer cut
EXACT_FETCH = 64  # exact rows fetched per pseudo-query, so that 10 documents remain once passages are grouped
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class PseudoQueries:
    """Queries drawn from the corpus: ids, texts, the document each came from, and how they were drawn."""

    ids: list[str]
    texts: list[str]
    sources: list[str]  # the document id each text was drawn from
    kind: str
    held_out: bool

    @property
    def description(self) -> str:
        drawn = {"random": "random sentences", "first": "first sentences", "title": "titles"}[self.kind]
        held = ", each held out from its own document" if self.held_out else ""
        return f"{len(self.ids)} pseudo-queries ({drawn} of sampled passages{held}) from this corpus"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PseudoQueries:
        return cls(list(raw["ids"]), list(raw["texts"]), list(raw["sources"]), raw["kind"], bool(raw["held_out"]))


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` long enough to be a query, each cut to :data:`MAX_WORDS` words."""
    found = []
    for part in _SENTENCE.split(text):
        words = part.split()
        if len(words) >= MIN_WORDS:
            found.append(" ".join(words[:MAX_WORDS]))
    return found


def draw_pseudo_queries(
    passages: Sequence[Document],
    count: int = DEFAULT_QUERIES,
    kind: str = DEFAULT_KIND,
    held_out: bool = DEFAULT_HELD_OUT,
    seed: int = SEED,
) -> PseudoQueries:
    """Up to ``count`` pseudo-queries from distinct sampled passages (fewer when the corpus has fewer).

    Raises:
        ValueError: An unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown pseudo-query kind {kind!r}; use one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    ids, texts, sources, seen = [], [], [], set()
    for row in order:
        if len(texts) >= count:
            break
        passage = passages[row]
        if kind == "title":
            words = (passage.title or "").split()
            options = [" ".join(words[:MAX_WORDS])] if len(words) >= 2 else []
        else:
            options = sentences(passage.text)
            options = options[:1] if kind == "first" else options
        text = rng.choice(options) if options else None
        if text is None or text in seen:  # a title shared by a document's passages is drawn once
            continue
        seen.add(text)
        ids.append(f"pseudo-{len(ids)}")
        texts.append(text)
        sources.append(passage.doc_id)
    return PseudoQueries(ids, texts, sources, kind, held_out)


def reference_grades(reference: Sequence[str], k: int = K) -> dict[str, int]:
    """The full dim's top ``k`` as graded judgements: ``k`` for its first hit down to 1 for its ``k``-th."""
    return {doc: k - rank for rank, doc in enumerate(reference[:k])}


def agreement(ranked: Sequence[str], reference: Sequence[str], k: int = K) -> tuple[float, float]:
    """``(agreement@k, overlap@k)`` of ``ranked`` against the ``reference`` ranking (module docstring)."""
    if not reference:
        return 1.0, 1.0
    top = list(reference[:k])
    overlap = len(set(ranked[:k]) & set(top)) / len(top)
    return ndcg_at_k(list(ranked), reference_grades(top, k), k), overlap


def agreement_judgements(
    pseudo: PseudoQueries,
    full_vectors: np.ndarray,
    queries: np.ndarray,
    doc_ids: Callable[[list[int]], list[str]],
) -> dict[str, dict[str, int]]:
    """Each pseudo-query's judgements: the full dim's exact top 10 documents, graded by rank.

    Rankings are of documents (a document's best passage), without the query's own document when
    ``pseudo.held_out``.
    """
    full = np.asarray(full_vectors, dtype=np.float32)
    rows = exact_top_k(truncate_normalize(np.asarray(queries, dtype=np.float32), full.shape[1]), full, EXACT_FETCH)
    qrels = {}
    for qid, source, found in zip(pseudo.ids, pseudo.sources, rows, strict=True):
        ranked = list(dict.fromkeys(doc_ids([int(row) for row in found])))
        if pseudo.held_out:
            ranked = [doc for doc in ranked if doc != source]
        qrels[qid] = reference_grades(ranked)
    return qrels
