"""The bundled sample (``data/sample_medical``) as the real-model tests use it: judged queries, dims."""

from __future__ import annotations

import shutil
from pathlib import Path

from index.build import BuildConfig, build_index
from index.layout import resolve_version
from index.manifest import IndexManifest

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_medical"
DIMS = [384, 256, 128, 64, 32]
# (query, the passage the sample's qrels mark relevant)
JUDGED = [
    ("how would I even know I have type 2 diabetes if I feel fine?", "d001"),
    ("when is an asthma attack bad enough to call an ambulance?", None),
    ("what do the top and bottom numbers on a blood pressure reading mean?", None),
]
QUERIES = [query for query, _ in JUDGED]


def build_sample(root: Path, encode_cache: Path, data: Path = SAMPLE, **overrides) -> tuple[Path, IndexManifest]:
    """``build_index`` of ``data`` (the sample) into ``root`` with the real default model and the session's
    encode cache (the session fixture ``encode_cache``): only the first build of a text encodes it."""
    config = BuildConfig(data=data, output=root, device="cpu", progress=False, cache_dir=encode_cache, **overrides)
    return build_index(config)


def half_shared_sample(folder: Path) -> tuple[Path, set[str]]:
    """A copy of the sample at ``folder`` whose train split keeps its first 60 questions, and the test questions
    that then share a relevant passage with training (the shared view; the other test questions are clean)."""
    from core.data import load_beir, shared_positives

    shutil.copytree(SAMPLE, folder)
    train = folder / "qrels" / "train.tsv"
    train.write_text("\n".join(train.read_text().splitlines()[:61]) + "\n")  # the header and 60 questions
    dataset = load_beir(folder)
    shared = shared_positives(dataset.split("train"), dataset.split("test"))
    assert 0 < len(shared) < len(dataset.split("test"))  # both views have questions
    return folder, shared


def copy_index(source: Path, target: Path) -> Path:
    """A copy of the index root ``source`` at ``target`` (its ``current`` link is relative: it follows)."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("leases", ".writer.lock"))
    resolve_version(target)
    return target
