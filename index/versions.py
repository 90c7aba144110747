"""The rules of an index's versions, written once for every store (a folder of versions, an index in Milvus).

A store keeps versions its own way; which of them to prune, and whether a version may be opened
for a model and a set of dims, are decided here, so both stores decide alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from index.manifest import IndexFolderError, IndexManifest

logger = logging.getLogger(__name__)


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
