from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Under pytest-xdist (`make test` runs `-n 2`) each worker gets its share of the cores as BLAS and torch
# threads, before numpy or torch is imported here or in a subprocess it starts: two workers with two
# spinning threads each on two cores run slower than one worker alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from core.machine import usable_cpus

    _threads = str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

import numpy as np
import pytest

# The Milvus fixtures (a real server for the session, Milvus Lite per module), for every test module.
pytest_plugins = ["tests.milvus_server"]

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_medical"


class KeywordEncoder:
    """One coordinate per keyword, counting its occurrences: exact, fast, deterministic.

    Keywords early in the vocabulary land in the leading coordinates, so truncation
    removes the later keywords first and every metric at every dimension can be
    worked out by hand.
    """

    def __init__(self, vocabulary: list[str], name: str = "keywords") -> None:
        self.vocabulary = vocabulary
        self.dimension = len(vocabulary)
        self.name = name

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())
            for col, keyword in enumerate(self.vocabulary):
                vectors[row, col] = words.count(keyword)
        return vectors

    encode_queries = _encode
    encode_documents = _encode


def write_beir(
    root: Path,
    corpus: list[dict],
    queries: list[dict],
    qrels: dict[str, list[tuple[str, str, int]]],
) -> Path:
    """Write a BEIR folder from Python lists (one JSON object per line; qrels with header)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{s}" for q, d, s in rows)]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def scramble(path: Path, seed: int = 0) -> None:
    """Random bytes in place of a file's contents, at the same size (corruption the size check cannot see)."""
    path.write_bytes(np.random.default_rng(seed).bytes(path.stat().st_size))


def without_checksums(version: Path) -> None:
    """Make a version's manifest look like one built before checksums were recorded."""
    manifest = json.loads((version / "manifest.json").read_text())
    manifest.pop("checksums")
    (version / "manifest.json").write_text(json.dumps(manifest))


KEYWORDS = ["fever", "cough", "rash", "pain"]


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    """Four documents, each about one keyword; one query per keyword in each split."""
    corpus = [{"_id": f"d{i}", "title": "", "text": f"advice about {word} at home"} for i, word in enumerate(KEYWORDS)]
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(KEYWORDS)]
    queries += [{"_id": f"t{i}", "text": f"{word} remedies"} for i, word in enumerate(KEYWORDS)]
    qrels = {
        "test": [(f"q{i}", f"d{i}", 1) for i in range(len(KEYWORDS))],
        "train": [(f"t{i}", f"d{i}", 1) for i in range(len(KEYWORDS))],
    }
    return write_beir(tmp_path / "tiny", corpus, queries, qrels)


@pytest.fixture
def keyword_encoder() -> KeywordEncoder:
    return KeywordEncoder(KEYWORDS)


@pytest.fixture(autouse=True, scope="session")
def _offline():
    """No hub in tests: every model comes from a local path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
