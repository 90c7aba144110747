"""Index versions kept in Milvus (index/milvus_store.py), on Milvus Lite: builds, the live version, leases,
pruning, killed builds, refusals, and the same top-10 as the FAISS backend at every dim.

The version logic runs with the keyword encoder behind the real ``build_index`` (exact, fast);
one test builds the bundled sample with the real model (and the session's encode cache) into
Milvus Lite and compares its hits with a FAISS index of the sample. The same index on the real
Milvus server, served by two replicas, is in ``tests/test_service_milvus_real.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import index.build as build_module
from core.errors import ConfigError
from index.build import BuildConfig, build_index
from index.manifest import IndexFolderError
from index.milvus_store import BUILDING, LIVE, MilvusIndexStore, version_tag
from index.search import staged_search
from tests.conftest import SAMPLE, KeywordEncoder
from tests.helpers.milvus import assert_same_hits_as_faiss
from tests.helpers.service import DIMS, FINGERPRINT, MODEL_NAME, VOCABULARY, keyword_model

pytestmark = pytest.mark.slow  # Milvus Lite: an engine per module, builds of several collections


def keyword_build(data: Path, uri: str, name: str, tmp: Path, **overrides):
    """The real ``build_index`` into Milvus, with the keyword encoder standing in for the model."""
    settings = {"model": MODEL_NAME, "dims": DIMS, "progress": False, "cache_dir": tmp / "cache", **overrides}
    config = BuildConfig(data=data, backend="milvus", milvus_uri=uri, index_name=name, **settings)
    with keyword_model():
        return build_index(config)


def store_for(backend, name: str) -> MilvusIndexStore:
    return MilvusIndexStore(backend, name)


def collections_of(backend, name: str) -> set[str]:
    return {c for c in backend.all_collections() if c.startswith(f"{name}_v")}


def test_a_build_goes_live_with_every_dim_and_its_documents(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    location, manifest = keyword_build(keyword_data, milvus_lite_uri, "live", tmp_path)
    store = store_for(lite_backend, "live")
    assert location == f"milvus-lite://{milvus_lite_uri}/live (version {manifest.version})"  # no made-up path
    assert store.current() == manifest.version
    assert store.versions() == {manifest.version: LIVE}
    assert collections_of(lite_backend, "live") == {
        store.docs_collection(manifest.version),
        *(store.dim_collection(manifest.version, dim) for dim in DIMS),
    }
    loaded = store.open(manifest.version, expected_fingerprint=FINGERPRINT)
    try:
        assert loaded.location == manifest.version and loaded.dims == DIMS
        assert loaded.manifest.to_dict() == manifest.to_dict()
        loaded.check_health()  # every collection loaded: ready
        encoder = KeywordEncoder(VOCABULARY)
        query = encoder.encode_queries([f"what helps with {VOCABULARY[0]}"])  # the leading coordinate: every dim
        for dim in DIMS:
            hits = staged_search(loaded.indexes[dim], loaded.vectors, query, dim, 3)
            assert loaded.store.get(hits.rows[0].tolist())[0].id == "d0"
        two_stage = staged_search(loaded.indexes[min(DIMS)], loaded.vectors, query, min(DIMS), 3, max(DIMS), 2)
        assert loaded.store.get(two_stage.rows[0].tolist())[0].id == "d0"
        full = np.asarray(loaded.vectors[np.array([3, 0])])
        assert full.shape == (2, manifest.model.full_dim)
        np.testing.assert_allclose(full[0], encoder.encode_documents([loaded.store.get([3])[0].passage])[0], atol=1e-6)
    finally:
        loaded.close()
    assert not store._scan("lease/")  # closed: its lease is gone


def test_a_version_in_milvus_is_searched_through_its_filter(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    """The manifest records the metadata's fields; every dim's collection carries each row's metadata, and Milvus
    searches only the rows a filter allows (a row without the field matches $nin)."""
    _, manifest = keyword_build(keyword_data, milvus_lite_uri, "filtered", tmp_path)
    assert manifest.metadata_fields == {"topic": "string"}
    loaded = store_for(lite_backend, "filtered").open(manifest.version)
    try:
        assert loaded.metadata is None and loaded.metadata_fields == {"topic": "string"}
        where = loaded.search_filter({"topic": {"$nin": ["fever", "rash"]}})
        assert where is not None and where.rows is None  # Milvus evaluates the filter itself
        query = KeywordEncoder(VOCABULARY).encode_queries(["fever cough rash"])
        allowed = {"d1", "d3", "d4", "d5", "d6", "d7", "d8"}
        for dim in DIMS:
            rows = staged_search(loaded.indexes[dim], loaded.vectors, query, dim, 9, where=where).rows[0]
            assert {d.id for d in loaded.store.get(rows[rows >= 0].tolist())} == allowed
        low, high = min(DIMS), max(DIMS)
        two_stage = staged_search(loaded.indexes[low], loaded.vectors, query, low, 3, high, 2, where=where)
        assert [d.id for d in loaded.store.get(two_stage.rows[0][:2].tolist())] == ["d8", "d1"]
    finally:
        loaded.close()


def test_long_documents_are_stored_in_parts_and_read_back_whole(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    from tests.conftest import write_beir

    text = "é" * 40_000 + " the end"  # over 65,535 bytes: more than one VARCHAR
    corpus = [{"_id": "long", "title": "t", "text": text, "metadata": {"kind": "x"}}]
    long = write_beir(tmp_path / "long", corpus, [{"_id": "q", "text": "fever"}], {})
    _, manifest = keyword_build(long, milvus_lite_uri, "long", tmp_path, dims=[4, 2])
    loaded = store_for(lite_backend, "long").open(manifest.version)
    try:
        [document] = loaded.store.get([0])
        assert (document.id, document.text, document.metadata) == ("long", text, {"kind": "x"})
        assert loaded.store.get([5, -1]) == [None, None]
    finally:
        loaded.close()


def test_passages_come_back_from_milvus_with_their_document_and_span(milvus_lite_uri, lite_backend, tmp_path):
    """A long document is split into passages at build time; every hit read back from Milvus names its
    document and its character span, and the span cut from the document is the passage's text."""
    from tests.conftest import write_beir
    from tests.helpers.service import corpus

    paragraph = (
        "A fever is common in children and usually passes within a few days. Give fluids, let them rest, and "
        "watch for a rash or a stiff neck, which need a doctor at once. A fever with cough can mean a chest "
        "infection; a fever after travel needs a doctor too."
    )
    text = "\n\n".join(f"Part {number}. {paragraph}" for number in range(12))
    documents = [*corpus(), {"_id": "long", "title": "The long leaflet", "text": text, "metadata": {"topic": "x"}}]
    data = write_beir(tmp_path / "data", documents, [{"_id": "q", "text": "fever"}], {})
    _, manifest = keyword_build(data, milvus_lite_uri, "passages", tmp_path)
    loaded = store_for(lite_backend, "passages").open(manifest.version)
    try:
        query = KeywordEncoder(VOCABULARY).encode_queries(["fever"])
        low, high = min(DIMS), max(DIMS)
        for dim, rerank_dim in [*((dim, None) for dim in DIMS), (low, high)]:
            rows = staged_search(loaded.indexes[dim], loaded.vectors, query, dim, 12, rerank_dim, 2).rows[0]
            hits = loaded.store.get(rows[rows >= 0].tolist())
            passages = [hit for hit in hits if hit.doc_id == "long"]
            assert len(passages) >= 2, (dim, rerank_dim)  # several passages of the long document outscore d0
            for hit in passages:
                assert hit.id.startswith("long#") and hit.parent == "long"
                assert (hit.title, hit.metadata) == ("The long leaflet", {"topic": "x"})
                start, end = hit.span
                assert 0 <= start < end <= len(text) and text[start:end] == hit.text
        row = {document.id: row for row, document in enumerate(loaded.store.get(list(range(40)))) if document}
        assert sum(1 for id in row if id.startswith("long#")) > 2  # split into several passages
        whole = loaded.store.get([row["d0"]])[0]
        assert (whole.parent, whole.doc_id, whole.span) == (None, "d0", (0, len(whole.text)))
    finally:
        loaded.close()


def test_old_versions_are_pruned_but_never_a_leased_one(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    _, first = keyword_build(keyword_data, milvus_lite_uri, "pruned", tmp_path, keep_versions=1)
    store = store_for(lite_backend, "pruned")
    held = store.open(first.version)  # a server that has not reloaded yet
    _, second = keyword_build(keyword_data, milvus_lite_uri, "pruned", tmp_path, keep_versions=1)
    assert store.current() == second.version
    assert set(store.versions()) == {first.version, second.version}  # kept: leased
    assert store.held_versions() == {first.version}
    query = KeywordEncoder(VOCABULARY).encode_queries(["what helps with fever"])
    assert held.indexes[4].search(query[:, :4], 1)[1].shape == (1, 1)  # still searchable
    held.close()
    _, third = keyword_build(keyword_data, milvus_lite_uri, "pruned", tmp_path, keep_versions=1)
    assert store.versions() == {third.version: LIVE}
    gone = (version_tag(first.version), version_tag(second.version))
    assert not any(tag in c for tag in gone for c in lite_backend.all_collections())
    assert not store._scan(f"manifest/{first.version}/")


def test_a_half_built_version_is_refused_and_never_goes_live(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    _, live = keyword_build(keyword_data, milvus_lite_uri, "half", tmp_path)
    store = store_for(lite_backend, "half")
    writer = store.begin("20991231T000000000000Z-beef")
    writer.write_corpus([], np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32))
    assert store.versions()[writer.version] == BUILDING
    assert store.current() == live.version  # unchanged
    with pytest.raises(IndexFolderError, match=r"version '20991231T000000000000Z-beef' is building"):
        store.manifest(writer.version)
    writer.abort()
    assert writer.version not in store.versions()
    assert not any(version_tag(writer.version) in c for c in lite_backend.all_collections())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_later_build_removes_what_a_killed_build_left(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    import json
    import socket

    _, live = keyword_build(keyword_data, milvus_lite_uri, "killed", tmp_path)
    store = store_for(lite_backend, "killed")
    writer = store.begin("20991231T000000000000Z-dead")
    writer.write_corpus([], np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32))
    writer._sealer.shutdown(wait=True)
    # What a killed build leaves: its record, naming a process that is gone, and its collections.
    store._put(
        {f"version/{writer.version}": json.dumps({**writer.record, "holder": f"{socket.gethostname()}~{dead_pid()}~x"})}
    )
    orphan = f"killed_{version_tag('20991231T000000000001Z-dead')}_d4"  # created, then killed before its record
    lite_backend.build(np.eye(4, dtype=np.float32), build_module.IndexPlan("Flat"), collection=orphan)
    assert writer.version in store.versions() and orphan in lite_backend.all_collections()
    _, after = keyword_build(keyword_data, milvus_lite_uri, "killed", tmp_path)
    assert set(store.versions()) == {live.version, after.version}
    assert orphan not in lite_backend.all_collections()
    assert not any(version_tag(writer.version) in c for c in lite_backend.all_collections())


def test_another_index_whose_name_starts_the_same_is_left_alone(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    _, other = keyword_build(keyword_data, milvus_lite_uri, "same_v2", tmp_path)
    keyword_build(keyword_data, milvus_lite_uri, "same", tmp_path)
    assert store_for(lite_backend, "same_v2").current() == other.version
    store_for(lite_backend, "same_v2").open(other.version).close()


def test_refusals_name_what_is_wrong(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    _, manifest = keyword_build(keyword_data, milvus_lite_uri, "refused", tmp_path)
    store = store_for(lite_backend, "refused")
    with pytest.raises(IndexFolderError, match=r"index 'nothing' at .*: index not found"):
        store_for(lite_backend, "nothing").current()
    with pytest.raises(IndexFolderError, match=r"built with model .*not the model being served"):
        store.open(manifest.version, expected_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(IndexFolderError, match=r"no index for dims \[3\]"):
        store.open(manifest.version, dims=[3])
    with pytest.raises(IndexFolderError, match=r"version '2000' not found"):
        store.manifest("2000")
    missing = store.dim_collection(manifest.version, 4)
    lite_backend.drop(missing)
    with pytest.raises(IndexFolderError, match=rf"incomplete: collections \['{missing}'\] missing"):
        store.open(manifest.version)
    assert not store._scan("lease/")  # a refused open leaves no lease behind
    with pytest.raises(ConfigError, match="collection name"):
        store_for(lite_backend, "no-dashes")


def test_build_options_that_name_no_place_are_refused(keyword_data):
    with pytest.raises(ConfigError, match="--backend milvus needs --milvus-uri"):
        build_index(BuildConfig(data=keyword_data, backend="milvus", index_name="x"))
    with pytest.raises(ConfigError, match="--index is required: a folder"):
        build_index(BuildConfig(data=keyword_data))
    with pytest.raises(ConfigError, match="name the index once"):
        build_index(
            BuildConfig(data=keyword_data, output=Path("x"), backend="milvus", milvus_uri="a.db", index_name="x")
        )
    with pytest.raises(ConfigError, match="name the index once"):
        build_index(BuildConfig(data=keyword_data, index="x", output=Path("x")))


# --- the real model: the same hits as FAISS ----------------------------------------------------


def test_the_sample_gives_the_same_top_10_as_faiss_at_every_dim(
    milvus_lite_uri, lite_backend, encode_cache, sample_index
):
    milvus = {"backend": "milvus", "milvus_uri": milvus_lite_uri, "index_name": "sample", "cache_dir": encode_cache}
    config = BuildConfig(data=SAMPLE, progress=False, **milvus)
    _, manifest = build_index(config)
    assert_same_hits_as_faiss(store_for(lite_backend, "sample"), manifest.version, sample_index)
