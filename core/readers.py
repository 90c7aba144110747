"""Reading the documents people have into :class:`Document` s: one entry point, :func:`read_corpus`.

It takes a BEIR folder, a table of records (``.jsonl``, ``.csv``, ``.parquet``) whose fields a
:class:`FieldMap` names, or a folder of document files (``.txt``, ``.md``, ``.html``, ``.pdf``,
read by :mod:`core.extraction`). Every problem is one :class:`DataError` naming the file, and
the line or row where there is one; a file that cannot be read fails the whole read, so an
index never silently lacks a document.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from core.data import DataError, Document, _jsonl_records, load_corpus
from core.errors import ConfigError, MrlError
from core.extraction import FORMATS, extract, utf8_text

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
DEFAULT_TITLE = "title"
ACCEPTED = "a BEIR folder, a .jsonl/.csv/.parquet file, or a folder of .txt/.md/.html/.pdf files"


@dataclass(frozen=True)
class FieldMap:
    """Which field (JSON key or column) of a record holds what; the defaults are BEIR's.

    ``title`` may be absent from a file while it is the default ``"title"`` (no titles); a title field
    you name must be there, as must ``id`` and ``text``. ``metadata=None`` means the ``metadata`` object
    of a JSON record (none for CSV and Parquet); a tuple of names makes those fields the metadata.
    """

    id: str = "_id"
    text: str = "text"
    title: str = DEFAULT_TITLE
    metadata: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metadata, str):
            raise ConfigError(f"metadata fields must be a list of names, got the string {self.metadata!r}")
        if self.metadata is not None:  # a list from a caller: kept as a tuple, so the map stays hashable
            object.__setattr__(self, "metadata", tuple(self.metadata))
        names = [self.id, self.text, self.title, *(self.metadata or ())]
        if any(not name.strip() for name in names):
            raise ConfigError(f"field names must not be empty, got {names}")

    def required(self) -> dict[str, str]:
        """Field name -> what it is for, for every field a table must have."""
        wanted = {self.id: "id"}
        wanted.setdefault(self.text, "text")
        if self.title != DEFAULT_TITLE:
            wanted.setdefault(self.title, "title")
        for name in self.metadata or ():
            wanted.setdefault(name, "metadata")
        return wanted


def read_corpus(path: Path | str, fields: FieldMap | None = None) -> list[Document]:
    """The documents at ``path``: a BEIR folder, a ``.jsonl``, ``.csv`` or ``.parquet`` file, or a folder of
    ``.txt``, ``.md``/``.markdown``, ``.html``/``.htm`` and ``.pdf`` files (searched recursively).

    Args:
        path: What to read; a folder with a ``corpus.jsonl`` is a BEIR folder.
        fields: Which fields of a record are the id, text, title and metadata (tables and BEIR folders;
            a folder of files ignores it). Default: BEIR's ``_id``, ``text``, ``title``, ``metadata``.

    Returns:
        The documents in file order (a folder of files: in sorted path order, ids are relative paths).

    Raises:
        DataError: Nothing there, a form not read, a missing column, a bad record or a file that cannot be
            read; one line naming the file (and line or row).
    """
    path, fields = Path(path), fields or FieldMap()
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return read_jsonl(path / "corpus.jsonl", fields)
        return read_folder(path)
    if not path.exists():
        raise DataError(path, f"not found (expected {ACCEPTED})")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(path, f"cannot read a {suffix or 'suffix-less'} file as a corpus (expected {ACCEPTED})")
    return {".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}[suffix](path, fields)


def read_jsonl(path: Path, fields: FieldMap) -> list[Document]:
    """JSON lines, one object per document; with BEIR's field names exactly as :func:`load_corpus` reads them."""
    if fields == FieldMap():
        return list(load_corpus(path).values())
    return _documents(path, "line", _jsonl_records(path), fields, json_metadata=True)


def read_csv(path: Path, fields: FieldMap) -> list[Document]:
    """A UTF-8 CSV file with a header row naming the columns."""
    reader = csv.DictReader(io.StringIO(utf8_text(path), newline=""))
    _check_columns(path, reader.fieldnames or [], fields)

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV ({exc})", reader.line_num) from None

    return _documents(path, "line", rows(), fields, json_metadata=False)


def read_parquet(path: Path, fields: FieldMap) -> list[Document]:
    """A Parquet file; rows are counted from 1 in error messages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"cannot read Parquet ({' '.join(str(exc).split())})") from None
    _check_columns(path, table.column_names, fields)
    columns = [name for name in table.column_names if name in {fields.id, fields.text, fields.title}]
    columns += [name for name in fields.metadata or () if name not in columns]
    records = table.select(columns).to_pylist()
    return _documents(path, "row", enumerate(records, start=1), fields, json_metadata=False)


def _check_columns(path: Path, columns: list[str], fields: FieldMap) -> None:
    """One error for every field the map names that the table lacks, with the columns it has."""
    missing = [f"{name!r} ({use})" for name, use in fields.required().items() if name not in columns]
    if missing:
        has = ", ".join(repr(name) for name in columns) or "none"
        raise DataError(path, f"no column {', '.join(missing)}; the file's columns are {has}")


def _documents(
    path: Path, unit: str, records: Iterable[tuple[int, dict[str, Any]]], fields: FieldMap, json_metadata: bool
) -> list[Document]:
    """Records (numbered by ``unit``, "line" or "row") mapped through ``fields``; ids must be unique."""
    documents: list[Document] = []
    seen: set[str] = set()
    for number, record in records:
        try:
            document = _document(record, fields, json_metadata)
            if document.id in seen:
                raise _RecordError(f"duplicate id {document.id!r}")
        except _RecordError as exc:
            if unit == "line":
                raise DataError(path, str(exc), number) from None
            raise DataError(path, f"{unit} {number}: {exc}") from None
        seen.add(document.id)
        documents.append(document)
    if not documents:
        raise DataError(path, "no documents")
    return documents


class _RecordError(MrlError):
    """What is wrong with one record; :func:`_documents` adds where it is (never reaches the CLI itself)."""


def _document(record: dict[str, Any], fields: FieldMap, json_metadata: bool) -> Document:
    doc_id = _cell(record.get(fields.id))
    if not doc_id.strip():
        raise _RecordError(f"field {fields.id!r} (id) is missing or empty")
    text = record.get(fields.text)
    if not isinstance(text, str) or not text.strip():
        raise _RecordError(f"field {fields.text!r} (text) is missing, empty or not text")
    metadata = _metadata(record, fields, json_metadata)
    if metadata is None:
        raise _RecordError("field 'metadata' must be an object")
    return Document(doc_id, text, _cell(record.get(fields.title)), metadata)


def _metadata(record: dict[str, Any], fields: FieldMap, json_metadata: bool) -> dict[str, Any] | None:
    """The record's metadata (None: a JSON ``metadata`` field that is not an object)."""
    if fields.metadata is not None:
        return {name: _json_value(record[name]) for name in fields.metadata if name in record}
    if not json_metadata:
        return {}
    metadata = record.get("metadata") or {}
    return metadata if isinstance(metadata, dict) else None


def _cell(value: Any) -> str:
    """A field as text: ids may be numbers (``7`` -> ``"7"``); a missing or null field is empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _json_value(value: Any) -> Any:
    """``value`` as JSON can hold it (metadata is stored as JSON): dates in ISO 8601, NaN as null, else text."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return str(value)


def read_folder(root: Path) -> list[Document]:
    """Every ``.txt``, ``.md``/``.markdown``, ``.html``/``.htm`` and ``.pdf`` file under ``root``, in sorted path
    order; hidden files and folders (``.git``) are not looked at, other files are skipped and counted.

    Each document's id is its path relative to ``root`` (POSIX form); its title is the Markdown ``# heading``,
    the HTML ``<title>`` (else first ``<h1>``), the PDF's own title (else first line), else the file name
    without suffix; its metadata holds ``path``, ``modified`` (ISO 8601, UTC) and ``format``.
    """
    read, skipped = _document_files(root)
    if skipped:
        kinds = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(skipped.items()))
        logger.info("%s: skipped %d files of other types (%s)", root, sum(skipped.values()), kinds)
    if not read:
        wanted = ", ".join(FORMATS)
        raise DataError(root, f"no documents: no corpus.jsonl, and no {wanted} files in the folder or below")
    documents = [_file_document(root, path) for path in read]
    logger.info("%s: read %d documents", root, len(documents))
    return documents


def _document_files(root: Path) -> tuple[list[Path], Counter[str]]:
    """The files to read under ``root`` in order of their relative paths, and the other files' suffixes."""
    read: list[Path] = []
    skipped: Counter[str] = Counter()
    for path in sorted(root.rglob("*"), key=lambda found: found.relative_to(root).as_posix()):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in FORMATS:
            read.append(path)
        else:
            skipped[suffix or "(no suffix)"] += 1
    return read, skipped


def _file_document(root: Path, path: Path) -> Document:
    suffix = path.suffix.lower()
    extracted = extract(path, suffix)
    relative = path.relative_to(root).as_posix()
    modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    metadata = {"path": relative, "modified": modified, "format": FORMATS[suffix]}
    return Document(relative, extracted.text, extracted.title or path.stem, metadata)
