"""``manifest.json``: what an index folder holds and which exact model made it.

The service refuses an index whose manifest names another model (by fingerprint), so
vectors are never compared with queries from a different embedding space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import MrlError

if TYPE_CHECKING:
    pass

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
NORMALIZATION = "truncate-then-l2"


class IndexFolderError(MrlError, ValueError):
    """An index folder is missing, corrupt, or does not match the model."""


class IndexWriteError(IndexFolderError):
    """An index version could not be written (a full disk, a read-only root); nothing of it went live."""


@dataclass
class DimIndex:
    """One dimension's FAISS index file and what it cost."""

    factory: str
    file: str
    bytes: int
    build_seconds: float
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None  # against exact search; None for an exact index
    search_ms: float | None = None  # one query, k=10, measured at build time on this machine
    backend: str = "faiss-cpu"  # the registered index backend that built it (older manifests: FAISS on the CPU)


@dataclass
class ModelInfo:
    name: str
    fingerprint: str
    full_dim: int
    query_prompt: str = ""
    document_prompt: str = ""
    max_seq_length: int | None = None


@dataclass
class IndexManifest:
    version: str
    model: ModelInfo
    dims: list[int]
    num_vectors: int
    indexes: dict[int, DimIndex]
    files: dict[str, int]
    encode_seconds: float
    built_at: str
    source: str
    library_versions: dict[str, str]
    evaluation: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> "sha256:..." (empty: older builds)
    plans: list[dict[str, Any]] = field(default_factory=list)  # index.plans.Plan.to_dict() of every plan measured
    judged_queries: dict[str, Any] | None = None  # index.plans.JudgedQueries the plans were measured on
    calibration_queries: dict[str, Any] | None = None  # index.calibration.PseudoQueries of the plans' agreement
    # index.chunking.ChunkReport: how documents became passages (None: built before passages existed)
    chunking: dict[str, Any] | None = None
    # index.filters.metadata_fields of the documents: each metadata key's type (empty: built before filters)
    metadata_fields: dict[str, str] = field(default_factory=dict)
    normalization: str = NORMALIZATION
    metric: str = "inner_product"
    format: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["indexes"] = {str(dim): value for dim, value in raw["indexes"].items()}
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexManifest:
        raw = dict(raw)
        raw["model"] = ModelInfo(**raw["model"])
        raw["indexes"] = {int(dim): DimIndex(**value) for dim, value in raw["indexes"].items()}
        return cls(**raw)

    @classmethod
    def read(cls, folder: Path) -> IndexManifest:
        """Read and check ``folder/manifest.json``.

        Raises:
            IndexFolderError: For a missing, unparsable or incompatible manifest.
        """
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise IndexFolderError(f"{path}: manifest not found (is this an index folder?)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_VERSION:
                raise IndexFolderError(
                    f"{path}: index format {raw.get('format')!r}, this version reads {FORMAT_VERSION}"
                )
            return cls.from_dict(raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise IndexFolderError(f"{path}: corrupt manifest ({type(exc).__name__}: {exc})") from None


def file_checksum(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def folder_files(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Size and checksum of every file of a version folder but its manifest, for the manifest."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE]
    return {p.name: p.stat().st_size for p in paths}, {p.name: file_checksum(p) for p in paths}
