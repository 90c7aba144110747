"""Where an index root keeps its versions, and how a new version goes live atomically.

    ROOT/current -> versions/<version>      (symlink, swapped with one rename)
    ROOT/versions/<version>/manifest.json, vectors.npy, docs.sqlite, index_<dim>.faiss, probe_queries.npy

A version is built in ``versions/.building-*`` and renamed into place only when complete;
``current`` then moves to it. A build that fails or is killed leaves ``current`` and every
finished version untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from index.manifest import MANIFEST_FILE, IndexFolderError
from training.files import fresh_dir

CURRENT = "current"
VERSIONS = "versions"
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


def publish_version(root: Path, staging: Path, name: str, keep: int) -> Path:
    """Rename a finished staging folder to ``versions/<name>``, point ``current`` at it, prune old ones."""
    final = root / VERSIONS / name
    os.replace(staging, final)
    link = root / f".{CURRENT}.{secrets.token_hex(4)}"
    os.symlink(Path(VERSIONS) / name, link)
    os.replace(link, root / CURRENT)  # atomic: readers see the old target or the new one
    prune_versions(root, keep)
    return final


def prune_versions(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` finished versions (never the current one), and the staging
    folders of builds that were killed (untouched for ``STALE_STAGING_SECONDS``; a running build
    touches its folder far more often)."""
    for staging in (root / VERSIONS).glob(".building-*"):
        if time.time() - staging.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)
    current = (root / CURRENT).resolve()
    finished = sorted(p for p in (root / VERSIONS).iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in finished[:-keep] if keep > 0 else []:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)
