"""The documents behind the vectors, in SQLite: read by row id without loading the corpus.

Row ``i`` of every FAISS index is row ``i`` here, so a search hit turns into a passage
with one indexed lookup. Readers open the file read-only, all their connections at once; it is written once, at build
time, into the staging folder of a new index version.
"""

from __future__ import annotations

import json
import queue
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from core.data import Document
from index.manifest import IndexFolderError

# A row is a passage: a whole document (parent NULL), or a passage cut from document ``parent`` at the
# character span [start, end) of its text (index.chunking). Stores written before passages had no
# parent/start/end columns; they read as whole documents.
SCHEMA = """
CREATE TABLE documents (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    parent TEXT,
    start INTEGER NOT NULL DEFAULT 0,
    "end" INTEGER
)
"""
COLUMNS = 'row, id, title, text, metadata, parent, start, "end"'
OLD_COLUMNS = "row, id, title, text, metadata, NULL, 0, NULL"


class DocumentStore:
    """Read access to a ``docs.sqlite`` file; safe to share between threads.

    Its connections are all opened up front and lent to one thread at a time. Nothing is
    opened later, so a store keeps working even if its file is deleted or replaced while it
    is open (the open descriptors still read the old file), and a search never fails on
    a connection it could not open.

    Raises:
        IndexFolderError: If the file is not a readable SQLite database of documents.
    """

    def __init__(self, path: Path, connections: int = 4) -> None:
        self.path = path
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._opened: list[sqlite3.Connection] = []
        self._columns = COLUMNS
        try:
            for _ in range(connections):
                connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                self._opened.append(connection)
                self._pool.put(connection)
            with self._borrow() as connection:
                names = {column[1] for column in connection.execute("PRAGMA table_info(documents)")}
                self._columns = COLUMNS if "parent" in names else OLD_COLUMNS
                connection.execute(f"SELECT {self._columns} FROM documents LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            self.close()
            raise IndexFolderError(f"{path.name}: not a readable document store ({exc})") from None

    @contextmanager
    def _borrow(self) -> Iterator[sqlite3.Connection]:
        if not self._opened:
            raise IndexFolderError(f"{self.path.name}: the document store is closed")
        connection = self._pool.get()
        try:
            yield connection
        finally:
            self._pool.put(connection)

    def __len__(self) -> int:
        with self._borrow() as connection:
            return connection.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def check_integrity(self) -> None:
        """SQLite's own integrity check over every page of the file.

        Raises:
            IndexFolderError: Naming the file and SQLite's first complaint.
        """
        try:
            with self._borrow() as connection:
                verdict = connection.execute("PRAGMA integrity_check(1)").fetchone()[0]
        except sqlite3.Error as exc:
            verdict = str(exc)
        if verdict != "ok":
            raise IndexFolderError(f"{self.path.name}: corrupt document store ({verdict})")

    def get(self, rows: Sequence[int]) -> list[Document | None]:
        """Documents at ``rows``, in the same order; ``None`` for a row that does not exist."""
        wanted = [int(r) for r in rows if r >= 0]
        found: dict[int, Document] = {}
        with self._borrow() as connection:
            for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {self._columns} FROM documents WHERE row IN ({marks})"
                for row, doc_id, title, text, metadata, parent, start, end in connection.execute(query, chunk):
                    found[row] = Document(doc_id, text, title, json.loads(metadata), parent, start, end)
        return [found.get(int(r)) for r in rows]

    def metadatas(self) -> list[dict]:
        """Every row's metadata, in row order (one query; what a filter's table is built from)."""
        with self._borrow() as connection:
            return [
                json.loads(metadata)
                for (metadata,) in connection.execute("SELECT metadata FROM documents ORDER BY row")
            ]

    def ids(self) -> set[str]:
        """The ids of the documents held (a split document's id once, not its passages')."""
        parent = "parent" if self._columns == COLUMNS else "NULL"
        with self._borrow() as connection:
            return {doc_id for (doc_id,) in connection.execute(f"SELECT COALESCE({parent}, id) FROM documents")}

    def close(self) -> None:
        """Close every connection (callers make sure no read is still running)."""
        opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()


def write_documents(path: Path, documents: Iterable[Document], first_row: int = 0) -> int:
    """Create (or extend) a store with ``documents`` at rows ``first_row, first_row + 1, ...``; return the count."""
    connection = sqlite3.connect(path)
    try:
        if first_row == 0:
            connection.execute(SCHEMA)
        rows = (
            (first_row + i, d.id, d.title, d.text, json.dumps(d.metadata, ensure_ascii=False), d.parent, d.start, d.end)
            for i, d in enumerate(documents)
        )
        with connection:
            cursor = connection.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return cursor.rowcount
    finally:
        connection.close()
