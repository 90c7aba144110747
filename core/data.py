"""Reading retrieval data: BEIR folders and plain (query, positive[, negative]) pairs.

Every problem in the input becomes one :class:`DataError` whose message names the file
and, where there is one, the line, so a user can fix the data without reading a trace.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import MrlError

QRELS_HEADER = ("query-id", "corpus-id", "score")


class DataError(MrlError, ValueError):
    """Input data is missing or malformed; the message names the file and line."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Document:
    """One document of a corpus, or one passage of a document (what an index row holds).

    A passage cut from a longer document (:mod:`index.chunking`) has its own ``id``, the ``doc_id`` of its
    document, and its character span ``[start, end)`` in that document's text, whose title and metadata it
    shares. A whole document is its own passage: ``doc_id`` is its id and the span covers its text.
    """

    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # the document a passage was cut from (None: this is the whole document)
    start: int = 0  # the passage's span in its document's text
    end: int | None = None

    @property
    def passage(self) -> str:
        """The text that gets encoded: title and body, as BEIR's dense baselines do."""
        return f"{self.title} {self.text}" if self.title else self.text

    @property
    def doc_id(self) -> str:
        return self.parent if self.parent is not None else self.id

    @property
    def span(self) -> tuple[int, int]:
        """``[start, end)`` of this passage in its document's text."""
        return (self.start, self.end if self.end is not None else self.start + len(self.text))


@dataclass(frozen=True)
class Pair:
    """A training example: a query, a relevant passage and optionally a non-relevant one."""

    query: str
    positive: str
    negative: str | None = None


Qrels = dict[str, dict[str, int]]  # query id -> document id -> graded relevance (<= 0: not relevant)


@dataclass
class RetrievalDataset:
    """A BEIR-layout dataset: corpus, queries and one qrels table per split."""

    root: Path
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, Qrels]

    @property
    def name(self) -> str:
        return self.root.name

    def split(self, name: str) -> Qrels:
        """Relevance judgements of one split.

        Raises:
            DataError: If the split does not exist, listing those that do.
        """
        if name not in self.qrels:
            available = ", ".join(sorted(self.qrels)) or "none"
            raise DataError(self.root / "qrels", f"no split {name!r} (available: {available})")
        return self.qrels[name]

    def pairs(self, split: str) -> list[Pair]:
        """(query, relevant passage) pairs of a split, in file order; relevance 0 or below is not relevant."""
        return [
            Pair(self.queries[qid], self.corpus[doc_id].passage)
            for qid, docs in self.split(split).items()
            for doc_id, score in docs.items()
            if score > 0
        ]


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each line of a UTF-8 file; bytes that are not UTF-8 are one DataError.

    Lines are decoded one at a time, so the error names the line (a decoding file object would
    only say a byte offset, from deep inside its buffered reader).
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = raw[exc.start : exc.start + 1].hex()
                message = f"not valid UTF-8 (byte 0x{byte} at column {exc.start + 1}); save the file as UTF-8"
                raise DataError(path, message, number) from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON ({exc.msg})", number) from None
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object", number)
        yield number, record


def _required_text(record: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, f"field {key!r} is missing or empty", line)
    return value


def _record_id(record: dict[str, Any], path: Path, line: int, seen: set[str]) -> str:
    raw = record.get("_id")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DataError(path, "field '_id' is missing or empty", line)
    doc_id = str(raw)
    if doc_id in seen:
        raise DataError(path, f"duplicate id {doc_id!r}", line)
    seen.add(doc_id)
    return doc_id


def load_corpus(path: Path) -> dict[str, Document]:
    """Read ``corpus.jsonl``: objects with ``_id``, ``text`` and optional ``title``, ``metadata``."""
    corpus: dict[str, Document] = {}
    seen: set[str] = set()
    for line, record in _jsonl_records(path):
        doc_id = _record_id(record, path, line, seen)
        text = _required_text(record, "text", path, line)
        title = record.get("title") or ""
        metadata = record.get("metadata") or {}
        if not isinstance(title, str) or not isinstance(metadata, dict):
            raise DataError(path, "'title' must be a string and 'metadata' an object", line)
        corpus[doc_id] = Document(doc_id, text, title, metadata)
    if not corpus:
        raise DataError(path, "no documents")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    """Read ``queries.jsonl``: objects with ``_id`` and ``text``."""
    queries: dict[str, str] = {}
    seen: set[str] = set()
    for line, record in _jsonl_records(path):
        qid = _record_id(record, path, line, seen)
        queries[qid] = _required_text(record, "text", path, line)
    if not queries:
        raise DataError(path, "no queries")
    return queries


def load_qrels(path: Path, queries: dict[str, str], corpus: dict[str, Document]) -> Qrels:
    """Read a ``qrels/<split>.tsv`` file (``query-id  corpus-id  score``, header optional)."""
    qrels: Qrels = {}
    lines = (text for _, text in _text_lines(path))  # a row per line: qrels fields hold no quoted newlines
    for line, row in enumerate(csv.reader(lines, delimiter="\t"), start=1):
        if not row or not "".join(row).strip():
            continue
        if line == 1 and tuple(cell.strip() for cell in row) == QRELS_HEADER:
            continue
        if len(row) != 3:
            raise DataError(path, f"expected 3 tab-separated columns, got {len(row)}", line)
        qid, doc_id, score_text = (cell.strip() for cell in row)
        try:
            score = int(score_text)
        except ValueError:
            raise DataError(path, f"score {score_text!r} is not an integer", line) from None
        if qid not in queries:
            raise DataError(path, f"unknown query id {qid!r}", line)
        if doc_id not in corpus:
            raise DataError(path, f"unknown corpus id {doc_id!r}", line)
        if doc_id in qrels.setdefault(qid, {}):
            raise DataError(path, f"duplicate judgement for ({qid!r}, {doc_id!r})", line)
        qrels[qid][doc_id] = score
    if not qrels:
        raise DataError(path, "no judgements")
    return qrels


def load_beir(root: Path | str, splits: list[str] | None = None) -> RetrievalDataset:
    """Load a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

    Args:
        root: The dataset folder.
        splits: Splits to read; ``None`` reads every ``qrels/*.tsv``.

    Raises:
        DataError: For a missing folder or file, or any malformed line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    corpus = load_corpus(root / "corpus.jsonl")
    queries = load_queries(root / "queries.jsonl")
    qrels_dir = root / "qrels"
    if splits is None:
        splits = sorted(p.stem for p in qrels_dir.glob("*.tsv"))
        if not splits:
            raise DataError(qrels_dir, "no qrels/<split>.tsv files")
    qrels = {name: load_qrels(qrels_dir / f"{name}.tsv", queries, corpus) for name in splits}
    return RetrievalDataset(root, corpus, queries, qrels)


def load_pairs(path: Path | str) -> list[Pair]:
    """Read plain training pairs: JSON lines with ``query``, ``positive`` and optional ``negative``."""
    path = Path(path)
    pairs = []
    for line, record in _jsonl_records(path):
        query = _required_text(record, "query", path, line)
        positive = _required_text(record, "positive", path, line)
        negative = _required_text(record, "negative", path, line) if "negative" in record else None
        if pairs and (negative is None) != (pairs[0].negative is None):
            raise DataError(path, "either every pair has a 'negative' or none has", line)
        pairs.append(Pair(query, positive, negative))
    if not pairs:
        raise DataError(path, "no pairs")
    return pairs


def shared_positives(training: Qrels, evaluation: Qrels) -> set[str]:
    """The evaluation queries with a relevant document that is also relevant to some training query.

    A model tuned on the training split has seen those documents as positives: its gain on such
    questions is partly memorised (on SciFact, 216 of the 339 test judgements point at training
    positives). Report them apart from the clean rest.
    """
    seen = {doc for docs in training.values() for doc, grade in docs.items() if grade > 0}
    return {qid for qid, docs in evaluation.items() if any(grade > 0 and doc in seen for doc, grade in docs.items())}
