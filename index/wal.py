"""The write-ahead log of a living index root, and the lock of the one process that may write it.

    ROOT/wal/log.jsonl     one JSON object per line, in ``seq`` order:
        {"seq": 7, "op": "upsert", "at": "...", "passages": [{"id", "text", "title", "metadata", "parent",
         "start", "end"}, ...], "dim": 384, "vectors": "<base64: float32, little-endian, row-major>"}
        {"seq": 8, "op": "delete", "at": "...", "doc_ids": ["d1", "d2"]}
    ROOT/.live.lock        ``flock``-ed by the one writable process (:class:`LiveLock`); holds "PID ROLE"

A write is acknowledged only once its line is on disk (``fsync``, and the folder's when the file is
created), so a crash loses no acknowledged write: replay (:meth:`WriteAheadLog.records`) re-applies
every record above the applied ``seq`` with its full-dimension vectors, never re-encoding. A last line
cut short by a crash was never acknowledged: it is ignored (and logged), and cut off before the next
append. A damaged line before the last is an error naming the file and line. :meth:`WriteAheadLog.trim`
drops what a compacted version holds, atomically (written aside, renamed over the log).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core.data import Document
from core.errors import MrlError
from index.layout import writing
from index.manifest import IndexFolderError

logger = logging.getLogger(__name__)

WAL_DIR = "wal"
WAL_FILE = "log.jsonl"
LIVE_LOCK = ".live.lock"
UPSERT, DELETE = "upsert", "delete"
SERVER_ROLE = "writable server"


class WalCorruptError(IndexFolderError):
    """A write-ahead log line before the last cannot be read: the message names the file and the line."""


class LiveLockHeld(MrlError):
    """Another process owns the index's writes (a writable server, or a compaction); the message names its pid."""


@dataclass(frozen=True)
class WalRecord:
    """One replayed write: an upsert (``passages`` and their full ``vectors``) or a delete (``doc_ids``)."""

    seq: int
    op: str
    passages: list[Document]
    vectors: np.ndarray | None
    doc_ids: list[str]


def upsert_record(passages: list[Document], vectors: np.ndarray) -> dict[str, Any]:
    """The log record (without its ``seq``) of an upsert of ``passages`` with their full-dimension ``vectors``."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    return {
        "op": UPSERT,
        "at": _now(),
        "passages": [asdict(passage) for passage in passages],
        "dim": int(vectors.shape[1]),
        "vectors": base64.b64encode(vectors.tobytes()).decode("ascii"),
    }


def delete_record(doc_ids: list[str]) -> dict[str, Any]:
    """The log record (without its ``seq``) of a delete of the documents ``doc_ids``."""
    return {"op": DELETE, "at": _now(), "doc_ids": list(doc_ids)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def decode_record(raw: dict[str, Any]) -> WalRecord:
    """A parsed log line as a :class:`WalRecord`.

    Raises:
        ValueError, KeyError, TypeError: A line that is not a record this module wrote.
    """
    seq, op = raw["seq"], raw["op"]
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"bad seq {seq!r}")
    if op == DELETE:
        ids = raw["doc_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("doc_ids is not a list of strings")
        return WalRecord(seq, op, [], None, ids)
    if op != UPSERT:
        raise ValueError(f"unknown op {op!r}")
    passages = [Document(**fields) for fields in raw["passages"]]
    flat = np.frombuffer(base64.b64decode(raw["vectors"], validate=True), dtype="<f4")
    if flat.size != len(passages) * raw["dim"]:
        raise ValueError(f"{flat.size} numbers for {len(passages)} vectors of dim {raw['dim']}")
    return WalRecord(seq, op, passages, flat.reshape(len(passages), raw["dim"]).astype(np.float32), [])


class WriteAheadLog:
    """``ROOT/wal/log.jsonl``: appended by the process holding the root's :class:`LiveLock`, replayed on open.

    ``floor_seq`` is the ``seq`` the served version has applied: numbering continues above it even when the
    log has been trimmed empty.
    """

    def __init__(self, root: Path, floor_seq: int = 0) -> None:
        self.folder = root / WAL_DIR
        self.path = self.folder / WAL_FILE
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._floor = floor_seq
        self._last: int | None = None  # highest seq in the file (None: not scanned yet)
        self._good_size = 0  # bytes up to the end of the last whole line

    # --- reading -------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The highest ``seq`` written (or the floor, for an empty log)."""
        with self._lock:
            self._scan()
            return max(self._floor, self._last or 0)

    @property
    def first_seq(self) -> int | None:
        """The lowest ``seq`` in the log (None: empty)."""
        for _, raw, _ in self._lines():
            return raw["seq"]
        return None

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def records(self, after_seq: int = 0) -> Iterator[WalRecord]:
        """Every record with ``seq > after_seq``, in order; a torn last line is skipped (and logged).

        Raises:
            WalCorruptError: A line before the last that cannot be read, or seqs out of order.
        """
        for number, raw, _ in self._lines():
            if raw["seq"] > after_seq:
                try:
                    yield decode_record(raw)
                except (ValueError, KeyError, TypeError) as exc:
                    raise WalCorruptError(f"{self.path}:{number}: unreadable write-ahead log record ({exc})") from None

    def _lines(self) -> Iterator[tuple[int, dict[str, Any], bytes]]:
        """``(line number, parsed object, the line's bytes)`` of every whole line; notes where the last one ends."""
        previous, size = 0, 0
        if self.path.is_file():
            with self.path.open("rb") as handle:
                lines = enumerate(handle, start=1)
                pending = next(lines, None)
                while pending is not None:
                    number, line = pending
                    pending = next(lines, None)
                    parsed = _parse_line(line)
                    if isinstance(parsed, str):
                        if pending is None:  # cut short by a crash mid-append: it was never acknowledged
                            logger.warning("%s:%d: ignoring a torn last line (%s)", self.path, number, parsed)
                            break
                        raise WalCorruptError(f"{self.path}:{number}: corrupt write-ahead log line ({parsed})")
                    if parsed["seq"] <= previous:
                        raise WalCorruptError(f"{self.path}:{number}: seq {parsed['seq']} follows {previous}")
                    previous, size = parsed["seq"], size + len(line)
                    yield number, parsed, line
        self._last, self._good_size = previous, size

    def _scan(self) -> None:
        if self._last is None:
            for _ in self._lines():
                pass

    # --- writing -------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> int:
        """Write ``record`` (an :func:`upsert_record` or :func:`delete_record`) as the next line; returns its seq.

        Returns only once the line is on disk. A failed write is cut off again, so the log stays whole.

        Raises:
            IndexWriteError: The disk is full, the root read-only, ... (one line).
        """
        with self._lock:
            self._scan()
            seq = max(self._floor, self._last or 0) + 1
            line = (json.dumps({"seq": seq, **record}, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            fd = self._open()
            with writing(self.path):
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except BaseException:
                    _cut(fd, self._good_size)
                    raise
            self._last, self._good_size = seq, self._good_size + len(line)
            return seq

    def _open(self) -> int:
        """The append descriptor; creating the log (and its folder) is made durable, and a torn tail is cut off."""
        if self._fd is None:
            with writing(self.path):
                if not self.folder.is_dir():
                    self.folder.mkdir(parents=True)
                    fsync_dir(self.folder.parent)
                created = not self.path.exists()
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                if created:
                    fsync_dir(self.folder)
            self._fd = fd
        if os.fstat(self._fd).st_size > self._good_size:
            logger.warning("%s: cutting off a torn last line before appending", self.path)
            with writing(self.path):
                os.ftruncate(self._fd, self._good_size)
                os.fsync(self._fd)
        return self._fd

    def trim(self, upto_seq: int) -> int:
        """Drop every record with ``seq <= upto_seq`` (a compacted version holds them); returns how many were kept.

        The kept lines are written to a temporary file, synced, and renamed over the log (the folder synced
        after), so a crash leaves the old log or the new one, never a mix.

        Raises:
            IndexWriteError: The temporary file cannot be written.
        """
        with self._lock:
            kept = [(raw["seq"], line) for _, raw, line in self._lines() if raw["seq"] > upto_seq]
            if not self.path.is_file():
                return 0
            temporary = self.folder / f".{WAL_FILE}.{os.getpid()}.tmp"
            data = b"".join(line for _, line in kept)
            with writing(temporary):
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._install(temporary)
            self._floor = max(self._floor, upto_seq)
            self._last, self._good_size = (kept[-1][0] if kept else 0), len(data)
            return len(kept)

    def _install(self, temporary: Path) -> None:
        """Rename the trimmed log into place and make that durable; appends go to the new file from now on."""
        os.replace(temporary, self.path)
        fsync_dir(self.folder)
        self.close()

    def remove_leftovers(self) -> None:
        """Delete temporary files of a trim that was killed (the log itself is whole: the rename is atomic)."""
        for leftover in self.folder.glob(f".{WAL_FILE}.*.tmp") if self.folder.is_dir() else []:
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _parse_line(line: bytes) -> dict[str, Any] | str:
    """The line's object, or why it is not one."""
    if not line.endswith(b"\n"):
        return "no line end"
    try:
        parsed = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("seq"), int) or "op" not in parsed:
        return "not a record"
    return parsed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _cut(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:  # the next open cuts the torn line off instead
        logger.warning("cannot cut a failed write-ahead log append off: %s", exc)


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a file created or renamed in it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the writable process's lock -------------------------------------------------------------


class LiveLock:
    """The exclusive right to write an index root through its write-ahead log: ``flock`` on ``ROOT/.live.lock``.

    Held by the one writable process (a server taking writes, or ``mrl index compact``) for as long as it
    runs; the kernel releases it when that process dies. A second one fails at once, naming the holder.

    Raises:
        LiveLockHeld: Another process holds it (the message names its pid and role).
        IndexWriteError: The lock file cannot be created (a read-only root).
    """

    def __init__(self, root: Path, role: str = SERVER_ROLE) -> None:
        self.root, self.role = root, role
        self._fd: int | None = None

    def acquire(self) -> LiveLock:
        with writing(self.root):
            fd = os.open(self.root / LIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LiveLockHeld(held_message(self.root)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # its only descriptor: the lock goes with it

    def __enter__(self) -> LiveLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None


def held_message(root: Path) -> str:
    """Who holds ``root``'s live lock, as the one-line refusal says it."""
    try:
        pid, _, role = (root / LIVE_LOCK).read_text().strip().partition(" ")
    except OSError:
        pid, role = "", ""
    holder = f"a {role or SERVER_ROLE} (pid {pid or 'unknown'})"
    return f"{root}: {holder} owns this index: write through its API, or stop it first"


def check_not_live(root: Path) -> None:
    """Refuse to write ``root`` behind the back of a process that holds its :class:`LiveLock`.

    ``mrl index build`` and ``add`` call this before writing a folder index: a version published under a
    writable server would be overwritten by its next compaction. A root without a lock file has no live writer.

    Raises:
        LiveLockHeld: "a writable server (pid N) owns this index: write through its API, or stop it first".
    """
    try:
        fd = os.open(root / LIVE_LOCK, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LiveLockHeld(held_message(root)) from None
    finally:
        os.close(fd)
