"""The documents behind the vectors, in SQLite: read by row id without loading the corpus.

Row ``i`` of every FAISS index is row ``i`` here, so a search hit turns into a passage
with one indexed lookup. Readers open the file read-only; it is written once, at build
time, into the staging folder of a new index version.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from training.data import Document

SCHEMA = """
CREATE TABLE documents (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL
)
"""


class DocumentStore:
    """Read access to a ``docs.sqlite`` file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()  # one connection per thread: sqlite3 objects are not shared
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.connection = connection
            with self._lock:
                self._opened.append(connection)
        return connection

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def get(self, rows: Sequence[int]) -> list[Document | None]:
        """Documents at ``rows``, in the same order; ``None`` for a row that does not exist."""
        wanted = [int(r) for r in rows if r >= 0]
        found: dict[int, Document] = {}
        for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT row, id, title, text, metadata FROM documents WHERE row IN ({marks})"
            for row, doc_id, title, text, metadata in self._connection().execute(query, chunk):
                found[row] = Document(doc_id, text, title, json.loads(metadata))
        return [found.get(int(r)) for r in rows]

    def ids(self) -> set[str]:
        return {doc_id for (doc_id,) in self._connection().execute("SELECT id FROM documents")}

    def close(self) -> None:
        """Close every thread's connection (callers make sure no read is still running)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()
        self._local = threading.local()


def write_documents(path: Path, documents: Iterable[Document], first_row: int = 0) -> int:
    """Create (or extend) a store with ``documents`` at rows ``first_row, first_row + 1, ...``; return the count."""
    connection = sqlite3.connect(path)
    try:
        if first_row == 0:
            connection.execute(SCHEMA)
        rows = (
            (first_row + i, d.id, d.title, d.text, json.dumps(d.metadata, ensure_ascii=False))
            for i, d in enumerate(documents)
        )
        with connection:
            cursor = connection.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", rows)
        return cursor.rowcount
    finally:
        connection.close()
