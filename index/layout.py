"""Where an index root keeps its versions, and how a new version goes live atomically.

    ROOT/current -> versions/<version>      (symlink, swapped with one rename)
    ROOT/versions/<version>/manifest.json, vectors.npy, docs.sqlite, index_<dim>.faiss, probe_queries.npy
    ROOT/leases/<version>~<host>~<pid>~<tag>   (one empty file per process that has the version open)
    ROOT/.writer.lock                          (the writers' lock, see :class:`WriterLock`)

A version is built in ``versions/.building-*`` and renamed into place only when complete;
``current`` then moves to it. A build that fails or is killed leaves ``current`` and every
finished version untouched. Pruning never deletes a version that a live process holds a
lease on, so a server that has not reloaded yet keeps every file it serves.

Writers of one root exclude each other: publishing and pruning happen under the root's
:class:`WriterLock`, and ``mrl index add`` holds it from reading ``current`` to publishing, so
two writers never lose one another's version, and a prune never deletes a version that
another writer is about to make current.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from core.files import fresh_dir
from index.manifest import MANIFEST_FILE, IndexFolderError, IndexWriteError
from index.versions import LEASE_TTL_SECONDS as LEASE_TTL_SECONDS  # where the service reads it
from index.versions import LeaseRecord, held_by_live_processes, lease_holder, prune_old_versions

logger = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
LEASES = "leases"
WRITER_LOCK = ".writer.lock"
VECTORS_FILE = "vectors.npy"
DOCS_FILE = "docs.sqlite"
PROBE_FILE = "probe_queries.npy"
STALE_STAGING_SECONDS = 24 * 3600


def index_file(dim: int) -> str:
    return f"index_{dim}.faiss"


def new_version_name() -> str:
    """A name that sorts in build order: UTC time to the microsecond, then a random tag against clashes.

    Pruning keeps the newest versions by sorting these names, so seconds alone would not do: two
    builds within one second would sort by their random tags.
    """
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)


def staging_version(root: Path) -> Path:
    return fresh_dir(root / VERSIONS, ".building-")


def resolve_version(path: Path) -> Path:
    """The version folder for ``path``: a version folder itself, or an index root's ``current``.

    Raises:
        IndexFolderError: If ``path`` is neither.
    """
    if (path / MANIFEST_FILE).is_file():
        return path
    current = path / CURRENT
    if current.exists():
        return current.resolve()
    if not path.exists():
        raise IndexFolderError(f"{path}: index not found")
    raise IndexFolderError(f"{path}: not an index (no {MANIFEST_FILE} and no '{CURRENT}' version)")


class WriterLock:
    """The exclusive right to change an index root: publish, prune, and read-modify-write its ``current``.

    An advisory ``flock`` on ``ROOT/.writer.lock``, so the kernel releases it when its holder dies
    (a killed build never leaves the root locked). A second writer waits for the first, saying so
    once in the log; each ``WriterLock`` object is its own open file, so two in one process exclude
    each other as two processes do. Not re-entrant: take it once, pass it down.

    Raises:
        IndexWriteError: If the lock file cannot be created (a missing or read-only root).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        with writing(self.root):
            fd = os.open(self.root / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another writer of %s to finish", self.root)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file releases the lock

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextmanager
def writing(where: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only or missing folder, ...) into one :class:`IndexWriteError`.

    The message names the file the system names (else ``where``) and the system's reason, e.g.
    ``cannot write runs/idx/versions/.building-x/vectors.npy: No space left on device``.
    """
    try:
        yield
    except OSError as exc:
        target = exc.filename if exc.filename is not None else where
        reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
        raise IndexWriteError(f"cannot write {target}: {reason}") from None
    except sqlite3.OperationalError as exc:  # SQLite's own words for a full disk or a read-only file
        raise IndexWriteError(f"cannot write {where}: {exc}") from None


def publish_version(lock: WriterLock, staging: Path, name: str, keep: int) -> Path:
    """Rename a finished staging folder to ``versions/<name>``, point ``current`` at it, prune old ones.

    The caller holds ``lock`` (the root's :class:`WriterLock`), so no other writer publishes or
    prunes between the rename, the swap of ``current`` and the prune.
    """
    if not lock.held:
        raise RuntimeError("publish_version needs the root's WriterLock held")
    root = lock.root
    final = root / VERSIONS / name
    with writing(root):
        os.replace(staging, final)
        link = root / f".{CURRENT}.{secrets.token_hex(4)}"
        os.symlink(Path(VERSIONS) / name, link)
        os.replace(link, root / CURRENT)  # atomic: readers see the old target or the new one
    prune_versions(lock, keep)
    return final


def prune_versions(lock: WriterLock, keep: int) -> None:
    """Delete all but the newest ``keep`` finished versions, and the staging folders of builds that
    were killed (untouched for ``STALE_STAGING_SECONDS``; a running build touches its folder far more
    often). The current version and every version a live process holds a lease on are kept; the
    caller holds ``lock``, so ``current`` cannot move while this runs."""
    if not lock.held:
        raise RuntimeError("prune_versions needs the root's WriterLock held")
    root = lock.root
    for staging in (root / VERSIONS).glob(".building-*"):
        if time.time() - staging.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)
    current = (root / CURRENT).resolve()
    finished = [p.name for p in (root / VERSIONS).iterdir() if p.is_dir() and not p.name.startswith(".")]
    prune_old_versions(
        finished,
        keep,
        current.name if current.parent == (root / VERSIONS).resolve() else None,
        lambda: held_versions(root),
        lambda name: shutil.rmtree(root / VERSIONS / name, ignore_errors=True),
        str(root),
    )


# --- leases: which versions live processes have open -----------------------------------------


class VersionLease:
    """One process's claim on an index version: an empty file under ``ROOT/leases/``.

    Taken when a version is opened and released when it is closed; :func:`prune_versions` skips
    every version with a live lease. A lease is live while its process runs (checked by pid on
    this host) or, for another host, while its file is younger than ``LEASE_TTL_SECONDS``
    (:meth:`refresh` touches it). A folder that cannot be written (a read-only mount) gets no
    lease; that is logged, since builds into it could then prune the served version.
    """

    def __init__(self, version: Path) -> None:
        self.version = version.name
        self.path: Path | None = None
        root = version.parent.parent if version.parent.name == VERSIONS else None
        if root is None:
            return  # a loose version folder, not inside an index root: nothing prunes it
        name = f"{version.name}~{lease_holder()}"
        try:
            (root / LEASES).mkdir(exist_ok=True)
            (root / LEASES / name).touch()
            self.path = root / LEASES / name
        except OSError as exc:
            logger.warning("cannot record that %s is in use (%s); builds into this root may prune it", version, exc)

    def refresh(self) -> None:
        if self.path is not None:
            try:
                self.path.touch()
            except OSError as exc:
                logger.warning("cannot refresh the lease on %s: %s", self.version, exc)

    def release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def held_versions(root: Path) -> set[str]:
    """Names of the versions under ``root`` that a live process holds a lease on; stale leases are removed
    (:func:`index.versions.held_by_live_processes`)."""
    leases = (root / LEASES).glob("*~*~*~*") if (root / LEASES).is_dir() else []
    records = (LeaseRecord(lease, *lease.name.split("~", 1), _touched_at(lease)) for lease in leases)
    return held_by_live_processes(records, lambda stale: [lease.unlink(missing_ok=True) for lease in stale])


def _touched_at(lease: Path) -> float | None:
    try:
        return lease.stat().st_mtime
    except FileNotFoundError:
        return None
