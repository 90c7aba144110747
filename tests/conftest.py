from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Under pytest-xdist (`make test` runs `-n 3`) each worker gets its share of the cores as BLAS and torch
# threads (at least one), before numpy or torch is imported here or in a subprocess it starts: two workers
# with two spinning threads each on two cores run slower than one worker alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from core.machine import usable_cpus

    _threads = str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

import numpy as np
import pytest

# The Milvus fixtures (a real server for the session, Milvus Lite per module), for every test module.
pytest_plugins = ["tests.helpers.milvus"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with ``slow`` tests first, the rest after, each group in file order.

    ``make test`` hands whole modules to its workers in collection order
    (``--dist loadfile --no-loadscope-reorder``): the long modules start at once and the many
    short ones fill the gaps, instead of a long module starting last and running alone.
    """
    heavy = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in heavy)

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


def write_tiny_beir(root: Path) -> Path:
    """Four documents, each about one keyword; one query per keyword in each split (``test`` and ``train``)."""
    corpus = [{"_id": f"d{i}", "title": "", "text": f"advice about {word} at home"} for i, word in enumerate(KEYWORDS)]
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(KEYWORDS)]
    queries += [{"_id": f"t{i}", "text": f"{word} remedies"} for i, word in enumerate(KEYWORDS)]
    qrels = {
        "test": [(f"q{i}", f"d{i}", 1) for i in range(len(KEYWORDS))],
        "train": [(f"t{i}", f"d{i}", 1) for i in range(len(KEYWORDS))],
    }
    return write_beir(root, corpus, queries, qrels)


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    """Four documents, each about one keyword; one query per keyword in each split."""
    return write_tiny_beir(tmp_path / "tiny")


@pytest.fixture
def keyword_encoder() -> KeywordEncoder:
    return KeywordEncoder(KEYWORDS)


@pytest.fixture(autouse=True, scope="session")
def _offline():
    """No hub in tests: every model comes from a local path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- built once per session (per xdist worker), as sentence-transformers' own conftest does ---------


@pytest.fixture(autouse=True, scope="session")
def _index_builds_load_each_model_once():
    """``mrl index build`` and ``add`` in this process load a given model once per worker.

    The first load of each (model, prompts, sequence length) is the real one; later builds get
    the same object (a build never changes its model). Tests that stand another encoder in for
    the model patch ``index.build.load_model`` over this, as before.
    """
    import index.build as build_module

    real = build_module.load_model
    loaded: dict[tuple, object] = {}

    def load_once(name_or_path, **options):
        key = (str(name_or_path), tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = real(name_or_path, **options)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "load_model", load_once)
        yield


@pytest.fixture(scope="session")
def encode_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encode cache (``--cache-dir``) shared by the session's builds, across xdist workers too: a second
    build of the same texts with the same model encodes nothing."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    (shared / "encode-cache").mkdir(exist_ok=True)
    return shared / "encode-cache"


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory: pytest.TempPathFactory, encode_cache: Path) -> Path:
    """The bundled sample indexed with the real default model, its plans scored on its judged queries.

    Read-only: a test that damages, prunes, adds to or builds into an index works on
    ``tests.helpers.sample.copy_index(sample_index, ...)``.
    """
    from tests.helpers.sample import build_sample

    root = tmp_path_factory.mktemp("sample-index") / "index"
    build_sample(root, encode_cache, eval_data=SAMPLE)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised BERT (width 64, dims 64 and 32) with MiniLM's tokenizer, for training mechanics."""
    from tests.helpers.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
