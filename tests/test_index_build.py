"""Index folders built with the real default model: contents, atomicity, checks on load, add.

The sample is the session's ``sample_index`` (read-only); another build of it reuses the session's
encode cache. The four-document index is built once per module and copied for each test that
damages or grows it.
Two encoding worker processes are checked against one on the tiny random model (``tiny_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import index.build as build_module
from core.data import DataError
from core.matryoshka import truncate_normalize
from index.build import BuildConfig, add_documents, build_index
from index.cli import info_table
from index.layout import CURRENT, VERSIONS, resolve_version
from index.loaded import open_index
from index.manifest import IndexFolderError, IndexManifest
from index.plans import Plan
from mrl.cli import main
from tests.conftest import SAMPLE, scramble, without_checksums, write_beir, write_tiny_beir
from tests.helpers.models import TINY_DIMS
from tests.helpers.sample import DIMS, build_sample, copy_index
from tests.helpers.service import keyword_model

pytestmark = pytest.mark.slow


def build(data: Path, output: Path, **overrides) -> tuple[Path, IndexManifest]:
    """A build without the encode cache: every text is encoded."""
    return build_index(BuildConfig(data=data, output=output, device="cpu", progress=False, **overrides))


def test_sample_index_contents_and_search(sample_index: Path):
    loaded = open_index(sample_index, device="cpu")
    manifest = loaded.manifest
    assert manifest.dims == DIMS and manifest.num_vectors == 120
    assert manifest.model.full_dim == 384 and manifest.model.fingerprint.startswith("sha256:")
    assert manifest.normalization == "truncate-then-l2"
    assert all(manifest.indexes[d].factory == "Flat" and manifest.indexes[d].recall_at_10 is None for d in DIMS)
    assert manifest.files["vectors.npy"] > 120 * 384 * 4
    assert set(manifest.library_versions) >= {"faiss", "torch", "sentence_transformers", "numpy"}
    assert loaded.vectors.shape == (120, 384)
    for dim in DIMS:
        # Each document's own vector finds itself first; the hit maps back to its stored passage.
        scores, rows = loaded.indexes[dim].search(truncate_normalize(loaded.vectors[:5], dim), 3)
        assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    docs = loaded.store.get([0, 119, -1])
    assert docs[0].id == "d001" and docs[0].title.startswith("Type 2 diabetes")
    assert docs[1].id == "d120" and docs[2] is None
    loaded.close()


def test_info_command_prints_a_table(sample_index: Path, capsys):
    assert main(["index", "info", "--index", str(sample_index), "--check"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | Flat | 0.03 MiB |" in out
    assert "check: every part of the version loads and matches the manifest" in out
    assert "passages  120 documents, each one passage (none longer than 254 tokens)" in out


def test_info_reports_documents_cut_by_the_window_when_chunking_is_off(tmp_path: Path, capsys):
    long = " ".join(["Gout causes sudden pain in the big toe at night."] * 60)
    data = write_beir(tmp_path / "data", [{"_id": "long", "text": long}, {"_id": "short", "text": "gout"}],
                      [{"_id": "q", "text": "gout"}], {"test": [("q", "long", 1)]})  # fmt: skip
    with keyword_model():
        assert main(["index", "build", "--data", str(data), "--index", str(tmp_path / "i"), "--chunk-size", "0",
                     "--dims", "8,4", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert main(["index", "info", "--index", str(tmp_path / "i")]) == 0
    assert "chunking off: 1 of 2 documents are longer than the model's window (254 tokens)" in capsys.readouterr().out


def test_failed_build_leaves_current_version_untouched(tmp_path: Path, tiny_beir: Path, monkeypatch):
    root = tmp_path / "index"
    first, _ = build(tiny_beir, root)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the build were stopped mid-way

    monkeypatch.setattr(build_module, "build_dim_indexes", crash)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_beir, root)
    assert resolve_version(root) == first.resolve()
    assert [p.name for p in (root / VERSIONS).iterdir()] == [first.name]  # no half-built folder left
    open_index(root, device="cpu").close()


def test_new_build_becomes_current_and_old_versions_are_pruned(tmp_path: Path, tiny_beir: Path):
    import os

    root = tmp_path / "index"
    killed = root / VERSIONS / ".building-killed"  # what a build killed yesterday left behind
    killed.mkdir(parents=True)
    os.utime(killed, (0, 0))
    versions = [build(tiny_beir, root, keep_versions=2)[0] for _ in range(3)]
    assert (root / CURRENT).resolve() == versions[-1].resolve()
    assert sorted(p.name for p in (root / VERSIONS).iterdir()) == [v.name for v in versions[1:]]
    assert not (root / ".encode-cache").exists()


def test_approximate_index_reports_recall(tmp_path: Path, encode_cache: Path):
    _, manifest = build_sample(tmp_path / "index", encode_cache, index_type="HNSW32,Flat", dims=[384, 64])
    for dim in (384, 64):
        assert manifest.indexes[dim].factory == "HNSW32,Flat"
        assert manifest.indexes[dim].search_params == {"efSearch": 128}
        assert 0.9 <= manifest.indexes[dim].recall_at_10 <= 1.0
    assert "| 64 | HNSW32,Flat |" in info_table(manifest, tmp_path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_beir(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def built_tiny_index(tiny_data: Path, tmp_path_factory) -> Path:
    """The four documents indexed at dims 384 and 64, plans scored on their judged queries; never changed."""
    root = tmp_path_factory.mktemp("tiny-index") / "index"
    build(tiny_data, root, dims=[384, 64], eval_data=tiny_data)
    return root


@pytest.fixture
def tiny_index(built_tiny_index: Path, tmp_path: Path) -> Path:
    """This test's own copy of the four-document index, to damage or add to."""
    return copy_index(built_tiny_index, tmp_path / "index")


def test_other_model_is_refused(tiny_index: Path):
    with pytest.raises(IndexFolderError, match="not the model being served"):
        open_index(tiny_index, device="cpu", expected_fingerprint="sha256:" + "0" * 64)


def test_unknown_dimension_is_refused(tiny_index: Path):
    with pytest.raises(IndexFolderError, match=r"no index for dims \[100\] \(this index has \[384, 64\]\)"):
        open_index(tiny_index, device="cpu", dims=[100])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: (v / "index_64.faiss").unlink(), "index_64.faiss: missing file"),
        (lambda v: (v / "index_64.faiss").write_bytes(b"short"), "index_64.faiss: 5 bytes, the manifest says"),
        (
            lambda v: (v / "index_64.faiss").write_bytes(b"\0" * (v / "index_64.faiss").stat().st_size),
            "index_64.faiss: contents differ from the manifest's checksum",
        ),
        (lambda v: scramble(v / "docs.sqlite"), "docs.sqlite: contents differ from the manifest's checksum"),
        (lambda v: (v / "manifest.json").write_text("{not json"), "corrupt manifest"),
        (lambda v: (v / "docs.sqlite").unlink(), "docs.sqlite: missing file"),
    ],
)
def test_damaged_files_give_one_clear_error(tiny_index: Path, damage, message):
    damage(resolve_version(tiny_index))
    with pytest.raises(IndexFolderError, match=message):
        open_index(tiny_index, device="cpu")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda v: (v / "index_64.faiss").write_bytes(b"\0" * (v / "index_64.faiss").stat().st_size),
            "index_64.faiss: unreadable FAISS index",
        ),
        (lambda v: scramble(v / "docs.sqlite"), "docs.sqlite: not a readable document store"),
    ],
)
def test_damage_is_found_without_checksums_too(tiny_index: Path, damage, message):
    folder = resolve_version(tiny_index)
    without_checksums(folder)
    damage(folder)
    with pytest.raises(IndexFolderError, match=message):
        open_index(tiny_index, device="cpu")


def test_not_an_index(tmp_path: Path):
    with pytest.raises(IndexFolderError, match="index not found"):
        open_index(tmp_path / "nothing")
    with pytest.raises(IndexFolderError, match="not an index"):
        open_index(tmp_path)


def test_add_appends_without_re_encoding_old_documents(tiny_index: Path, tmp_path: Path, monkeypatch):
    before = open_index(tiny_index, device="cpu")
    old_vectors = np.array(before.vectors)
    new_docs = tmp_path / "more.jsonl"
    new_docs.write_text(
        "".join(
            json.dumps({"_id": f"n{i}", "text": t}) + "\n"
            for i, t in enumerate(["sprained ankle swelling and ice", "sunburn blisters"])
        )
    )
    encoded = []
    original = build_module.encode_documents
    monkeypatch.setattr(
        build_module,
        "encode_documents",
        lambda encoder, docs, cache=None: encoded.append(len(docs)) or original(encoder, docs, cache),
    )
    path, manifest = add_documents(tiny_index, new_docs, device="cpu", progress=False)
    assert encoded == [2]
    assert manifest.num_vectors == 6 and manifest.history[-1]["added"] == 2
    after = open_index(tiny_index, device="cpu")
    assert after.path == path.resolve() != before.path
    np.testing.assert_array_equal(np.asarray(after.vectors[:4]), old_vectors)
    _, rows = after.indexes[64].search(truncate_normalize(after.vectors[4:], 64), 1)
    assert rows[:, 0].tolist() == [4, 5]
    assert [d.id for d in after.store.get([4, 5])] == ["n0", "n1"]
    # the plans were scored again on the grown corpus: the unrelated new documents outrank no judged one
    keys = [Plan.from_dict(raw).key for raw in manifest.plans]
    assert keys == [Plan.from_dict(raw).key for raw in before.manifest.plans] == ["384", "64", "64>384x1"]
    assert all(raw["ndcg_at_10"] == 1.0 for raw in manifest.plans if raw["dim"] == 384)

    with pytest.raises(DataError, match="2 document ids are already indexed"):
        add_documents(tiny_index, new_docs, device="cpu", progress=False)


def test_add_with_another_model_is_refused(tiny_index: Path, tiny_data: Path, monkeypatch):
    monkeypatch.setattr(build_module, "model_fingerprint", lambda model: "sha256:another")
    with pytest.raises(IndexFolderError, match="built with another model"):
        add_documents(tiny_index, tiny_data, device="cpu", progress=False)


def test_version_names_sort_in_build_order():
    from index.layout import new_version_name

    names = [new_version_name() for _ in range(50)]
    assert [n.split("-")[0] for n in names] == sorted(n.split("-")[0] for n in names)
    assert len({n.split("-")[0] for n in names}) > 1  # microseconds, not seconds


def test_each_dim_is_charged_its_own_build_and_store_time(monkeypatch):
    """Dims are built first, then stored and measured: a dim's time is not its successors' builds or measuring."""
    import index.build as build_module

    clock = {"now": 0.0}
    monkeypatch.setattr(build_module.time, "perf_counter", lambda: clock["now"])

    class Writer:  # build takes 1 s per dim, storing 0.5 s (an engine finishing it)
        def build(self, dim, vectors, plan):
            clock["now"] += 1.0
            return dim

        def keep(self, index, dim):
            clock["now"] += 0.5
            return f"index_{dim}", 0

    charged = {}

    def describe(index, dim, vectors, probes, stored, seconds):
        clock["now"] += 10.0  # measuring recall and search time
        charged[dim] = seconds
        return seconds

    monkeypatch.setattr(build_module, "describe_index", describe)
    vectors = np.ones((4, 8), dtype=np.float32)
    build_module.build_dim_indexes(vectors, vectors, [8, 4, 2], lambda dim: None, Writer())
    assert charged == {8: 1.5, 4: 1.5, 2: 1.5}


def test_two_encoding_workers_give_the_vectors_and_the_index_of_one(tiny_model: Path, tmp_path: Path):
    """The tiny random model: its vectors mean nothing, but each passage has its own, as with the real model."""
    _, manifest_one = build(SAMPLE, tmp_path / "one", model=str(tiny_model))
    folder, manifest = build(SAMPLE, tmp_path / "two", model=str(tiny_model), workers=2)
    one, two = open_index(tmp_path / "one", device="cpu"), open_index(folder, device="cpu")
    try:
        assert manifest.dims == manifest_one.dims == TINY_DIMS
        # the tiny model reads 126 tokens, so some sample documents are split: no two passages alike
        assert manifest.chunking["documents"] == 120 and manifest.chunking["split_documents"] > 0
        assert len({row.tobytes() for row in np.asarray(one.vectors)}) == manifest.num_vectors
        np.testing.assert_allclose(np.asarray(two.vectors), np.asarray(one.vectors), atol=1e-5)
        probes = one.probes()
        for dim in manifest.dims:
            _, rows_one = one.indexes[dim].search(truncate_normalize(probes, dim), 10)
            _, rows_two = two.indexes[dim].search(truncate_normalize(probes, dim), 10)
            assert (rows_one == rows_two).mean() > 0.999, dim  # only exact ties may swap
    finally:
        one.close()
        two.close()
    assert manifest.num_vectors == manifest_one.num_vectors == manifest.chunking["passages"]


def test_workers_must_be_positive(tmp_path: Path, capsys):
    assert main(["index", "build", "--data", str(SAMPLE), "--index", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers must be positive, got 0" in capsys.readouterr().err


def test_an_index_opens_through_the_interpreters_spurious_ast_depth_error(tiny_index: Path, monkeypatch):
    """CPython 3.11.7 (gh-106905): ``np.load`` parses a .npy header with ``ast.literal_eval``, which can fail while
    another thread parses; a reload was refused for it once. The load is tried once more."""
    import numpy

    from index.loaded import open_index

    real, calls = numpy.load, []

    def racing(path, **options):
        calls.append(path)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=45, after=41)")
        return real(path, **options)

    monkeypatch.setattr(numpy, "load", racing)
    loaded = open_index(tiny_index, device="cpu")
    try:
        assert loaded.manifest.num_vectors > 0 and len(calls) >= 2
    finally:
        loaded.close()

    def broken(path, **options):
        raise SystemError("another interpreter error")

    monkeypatch.setattr(numpy, "load", broken)
    with pytest.raises(SystemError, match="another interpreter error"):  # only the race is tried again
        open_index(tiny_index, device="cpu")
