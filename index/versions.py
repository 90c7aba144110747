"""The rules of an index's versions, written once for every store (a folder of versions, an index in Milvus).

A store keeps versions its own way; which of them to prune, whether a version may be opened
for a model and a set of dims, and whether what it opened holds what the manifest says, are
decided here, so both stores decide alike.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import NamedTuple

from index.manifest import IndexFolderError, IndexManifest

logger = logging.getLogger(__name__)

# A lease not refreshed for this long is stale unless its process is alive on this host (holders on
# other hosts, e.g. replicas over a shared volume or of one Milvus, refresh theirs far more often).
LEASE_TTL_SECONDS = 15 * 60


def prune_old_versions(
    finished: Iterable[str],
    keep: int,
    current: str | None,
    held: Callable[[], set[str]],
    drop: Callable[[str], None],
    where: str,
) -> list[str]:
    """Drop all but the newest ``keep`` finished versions, never ``current``, never one a live process holds.

    Version names sort in build order (:func:`index.layout.new_version_name`). ``held`` is read only
    once the candidates are chosen, so that a lease taken meanwhile still counts.

    Returns:
        The versions dropped.
    """
    ordered = sorted(finished)
    candidates = [version for version in (ordered[:-keep] if keep > 0 else []) if version != current]
    if not candidates:
        return []
    leased = held()
    dropped = []
    for version in candidates:
        if version in leased:
            logger.info("keeping %s of %s: a running server still serves it", version, where)
        else:
            drop(version)
            dropped.append(version)
    return dropped


def check_openable(
    manifest: IndexManifest, where: str, expected_fingerprint: str | None, dims: list[int] | None
) -> list[int]:
    """The dims to open of a version whose manifest is ``manifest``, if the serving model is the one that built it.

    Returns:
        ``dims``, or every dim of the version.

    Raises:
        IndexFolderError: Another model's version (by fingerprint), or dims the version does not have.
    """
    if expected_fingerprint and manifest.model.fingerprint != expected_fingerprint:
        raise IndexFolderError(
            f"{where}: built with model {manifest.model.name!r} ({manifest.model.fingerprint[:19]}…), "
            f"not the model being served ({expected_fingerprint[:19]}…); rebuild the index with this model"
        )
    wanted = dims or manifest.dims
    unknown = sorted(set(wanted) - set(manifest.dims))
    if unknown:
        raise IndexFolderError(f"{where}: no index for dims {unknown} (this index has {manifest.dims})")
    return list(wanted)


class DocumentCount(NamedTuple):
    """A version's document store as opened, for :func:`check_counts`: the message says
    ``{subject} {found} {unit}, {expected_as}``."""

    subject: str  # how the message begins: "docs.sqlite:", "index 'x' at URI: collection 'c' holds"
    found: int
    expected: int | None  # what was written: the manifest's vector count, or the rows an engine recorded
    unit: str = "documents"
    expected_as: str = ""  # the expectation in words; default "expected {expected}"


def check_counts(
    manifest: IndexManifest,
    dim_counts: Mapping[int, tuple[str, int, int]] | None = None,
    documents: DocumentCount | None = None,
    *,
    grown: bool = False,
) -> None:
    """Raise unless the parts of a version that a store opened hold what its manifest says.

    Each dim's index holds ``manifest.num_vectors`` vectors of that dim, and the documents what was
    written. A version that live writes change in place (``grown``) is checked for its dims only:
    its counts have moved on from the manifest's. A store may check its parts one call at a time,
    as it opens them.

    Args:
        manifest: The version's manifest.
        dim_counts: For each dim opened: ``(subject, ntotal, dim)``, what its index holds; the message
            says ``{subject} {ntotal} vectors of dim {dim}, expected …``.
        documents: What the document store holds.
        grown: Live writes have changed the version's counts.

    Raises:
        IndexFolderError: The first part that disagrees, named by its subject.
    """
    for dim, (subject, ntotal, found_dim) in (dim_counts or {}).items():
        if found_dim != dim or (not grown and ntotal != manifest.num_vectors):
            raise IndexFolderError(
                f"{subject} {ntotal} vectors of dim {found_dim}, expected {manifest.num_vectors} of dim {dim}"
            )
    if documents is not None and not grown and documents.found != documents.expected:
        expected = documents.expected_as or f"expected {documents.expected}"
        raise IndexFolderError(f"{documents.subject} {documents.found} {documents.unit}, {expected}")


# --- leases: which versions live processes have open ---------------------------------------------


class LeaseRecord(NamedTuple):
    """One lease as a store lists it: its key in the store, the version, the holder (``host~pid~tag``,
    :func:`lease_holder`) and when it was last refreshed (None: it went while being listed)."""

    key: Hashable  # what the store deletes it by: a file, a record's key
    version: str
    holder: str
    touched_at: float | None


def lease_holder() -> str:
    """This process as a lease or record names it: ``host~pid~tag``, a new random tag each time."""
    return f"{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}"


def held_by_live_processes(leases: Iterable[LeaseRecord], delete: Callable[[list], None]) -> set[str]:
    """The versions that a live process holds a lease on; the stale leases are deleted, in one call of ``delete``.

    Every store's ``held_versions`` (what :func:`prune_old_versions` keeps) is this over its own leases.
    """
    held, stale = set(), []
    for lease in leases:
        host, pid, _ = lease.holder.split("~", 2)
        if lease.touched_at is not None and lease_holder_is_live(host, pid, lease.touched_at):
            held.add(lease.version)
        else:
            stale.append(lease.key)
    if stale:
        delete(stale)
    return held


def lease_holder_is_live(host: str, pid: str, touched_at: float) -> bool:
    """Whether a lease holder still runs: by pid on this host, else by a refresh within ``LEASE_TTL_SECONDS``."""
    if host == socket.gethostname() and pid.isdigit():
        return _process_alive(int(pid))
    return time.time() - touched_at < LEASE_TTL_SECONDS


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
