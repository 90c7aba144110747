"""Writing artifacts so that a reader never sees a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.errors import OutputExistsError


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# CPython 3.11 before 3.11.8 (and 3.12 before 3.12.2) counts the depth of every parse tree being turned into
# Python objects in one counter shared by all threads (CPython gh-106905). np.load reads a .npy header with
# ast.literal_eval, so a load that runs while another thread parses fails now and then with this error, and
# a reload in the service's thread pool was refused for it once in a test run. Loading again succeeds.
AST_DEPTH_RACE = "AST constructor recursion depth mismatch"


def load_npy(path: Path, **options: Any) -> Any:
    """``numpy.load(path, **options)``, tried once more after the interpreter's spurious AST depth error."""
    import numpy as np

    try:
        return np.load(path, **options)
    except SystemError as exc:
        if AST_DEPTH_RACE not in str(exc):
            raise
        return np.load(path, **options)


def json_fields(config: Any) -> dict[str, Any]:
    """A dataclass's fields for a JSON report: paths (also inside lists) as strings."""
    from dataclasses import asdict

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        return [plain(item) for item in value] if isinstance(value, list) else value

    return {key: plain(value) for key, value in asdict(config).items()}


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty, world-readable folder in ``parent`` (created if needed) whose name starts with ``prefix``."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o755)  # mkdtemp makes 0700; artifacts are meant to be shared
    return folder


def staging_dir(final: Path) -> Path:
    """A fresh empty folder beside ``final`` (same file system, so the last rename is atomic)."""
    return fresh_dir(final.parent, f".{final.name}.partial-")


def publish_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move a finished staging folder to ``final``; an existing ``final`` is replaced only if allowed.

    The old folder is renamed aside first and deleted last, so at every moment ``final``
    is either the complete old folder or the complete new one.
    """
    if final.exists():
        if not overwrite:
            raise OutputExistsError(f"{final} already exists (pass --overwrite to replace it)")
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
