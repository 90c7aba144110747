"""A living corpus on Milvus (index/milvus_live.py): writes go into the current version's collections, are searched
at once by the writer and within a bound by every replica, one writer at a time, and a writer killed mid-upsert
leaves no hit without its document.

Each test builds a tiny index with the keyword encoder (exact scores) on Milvus Lite and on the real 2.3.5 server;
the tests that need a second process (a replica elsewhere, a killed writer) run on the server only.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.data import Document
from index.build import BuildConfig, add_documents, build_index
from index.live import InvalidWrite
from index.locator import IndexLocator
from index.manifest import IndexFolderError
from index.milvus import MilvusBackend
from index.milvus_docs import DOC_ID_FIELD, DOC_ROW_FIELD
from index.milvus_live import MilvusLive, open_milvus_live
from index.milvus_store import (
    RECORD_TTL_S,
    WRITER_KEY,
    WRITER_TTL_S,
    MilvusIndexStore,
    MilvusWriterHeld,
    WriterRecord,
)
from index.search import staged_search
from tests.conftest import REPO, KeywordEncoder
from tests.helpers.service import DIMS, FINGERPRINT, MODEL_NAME, VOCABULARY, keyword_model

pytestmark = pytest.mark.slow  # a build into Milvus per test

ENGINES = ["lite", "server"]
# What no engine changes runs on Lite alone, in the Lite group: a Lite client left idle while the server tests run
# gets a GOAWAY (too_many_pings: pymilvus pings every 10 s, more than a gRPC server allows an idle client).
LITE_ONLY = pytest.mark.parametrize("uri", ["lite"], indirect=True)
ENCODER = KeywordEncoder(VOCABULARY)
REPLICA_LAG_S = 5.0  # a write reaches another process's searches within this (0.25-0.55 s measured on 2.3.5)
NEW_TEXT = "fever fever fever cough"  # leads at every dim: (3, 1, 0, ...) is only its own best match
NAMES = itertools.count()


def passages_of(doc: str, texts: list[str], metadata: dict | None = None) -> list[Document]:
    """A document as the caller's chunker hands it over: one passage, or several with ``parent`` set."""
    if len(texts) == 1:
        return [Document(doc, texts[0], "Leaflet", metadata or {})]
    return [
        Document(f"{doc}#{i}", text, "Leaflet", metadata or {}, parent=doc, start=10 * i, end=10 * i + len(text))
        for i, text in enumerate(texts)
    ]


def encode(passages: list[Document]) -> np.ndarray:
    return ENCODER.encode_documents([passage.passage for passage in passages])


def hits(view, text: str, dim: int, k: int = 20, rerank_dim: int | None = None, where=None) -> list[Document]:
    """Passages of the top ``k`` for ``text`` (every row of these tiny indexes, by default)."""
    found = view.search(ENCODER.encode_queries([text]), dim, k, rerank_dim, 2, where)
    rows = [int(row) for row in found.rows[0] if row >= 0]
    documents = view.documents(rows)
    assert all(document is not None for document in documents), "a hit without its document"
    return documents


def replica_rows(loaded, query: np.ndarray, dim: int, k: int = 20) -> list[int]:
    """The top ``k`` rows of a version opened through the store (what a read-only replica serves)."""
    rows = staged_search(loaded.indexes[dim], loaded.vectors, query, dim, k).rows[0]  # k: above its rows at open
    return [int(row) for row in rows if row >= 0]


def every_plan() -> list[tuple[int, int | None]]:
    return [(dim, None) for dim in DIMS] + [(min(DIMS), max(DIMS))]


def stored_rows(store: MilvusIndexStore, version: str, doc: str) -> list[int]:
    """The docs collection's rows of document ``doc`` (read at Strong)."""
    client = store.backend.client
    found = client.query(
        store.docs_collection(version),
        filter=f'{DOC_ID_FIELD} == "{doc}"',
        output_fields=[DOC_ROW_FIELD],
        consistency_level="Strong",
    )
    return sorted({int(hit[DOC_ROW_FIELD]) for hit in found})


@pytest.fixture(scope="module", params=ENGINES)
def uri(request) -> str:
    return request.getfixturevalue("milvus_lite_uri" if request.param == "lite" else "milvus_server_uri")


@contextmanager
def keyword_index(uri: str, data: Path, tmp: Path) -> Iterator[tuple[MilvusIndexStore, str]]:
    """A fresh index of the nine keyword documents: ``(its store, its version)``; dropped afterwards."""
    name = f"live{next(NAMES)}"
    config = BuildConfig(
        data=data, backend="milvus", milvus_uri=uri, index_name=name, model=MODEL_NAME, dims=DIMS,
        progress=False, cache_dir=tmp / "cache",
    )  # fmt: skip
    with keyword_model():
        _, manifest = build_index(config)
    store = MilvusIndexStore(MilvusBackend(uri), name)
    try:
        yield store, manifest.version
    finally:
        for collection in store.backend.all_collections():
            if collection.startswith(f"{name}_"):
                store.backend.drop(collection)
        store.close()


@pytest.fixture
def built(uri, keyword_data, tmp_path) -> Iterator[tuple[MilvusIndexStore, str]]:
    with keyword_index(uri, keyword_data, tmp_path) as index:
        yield index


@pytest.fixture
def on_server(milvus_server_uri, keyword_data, tmp_path) -> Iterator[tuple[MilvusIndexStore, str]]:
    """The same on the real server: a second process cannot open a Milvus Lite file the first one serves."""
    with keyword_index(milvus_server_uri, keyword_data, tmp_path) as index:
        yield index


@contextmanager
def writing(store: MilvusIndexStore, version: str) -> Iterator[MilvusLive]:
    writer = open_milvus_live(store, store.open(version, expected_fingerprint=FINGERPRINT))
    try:
        yield writer
    finally:
        writer.close()


@pytest.fixture
def live(built) -> Iterator[MilvusLive]:
    with writing(*built) as writer:
        yield writer


def test_an_upsert_is_found_at_every_dim_and_in_two_stage(live):
    result = live.upsert(passages_of("new", [NEW_TEXT]), encode(passages_of("new", [NEW_TEXT])))
    assert (result.documents, result.passages, result.replaced, result.seq) == (["new"], 1, [], 1)
    with live.view() as view:  # read your own writes: at once, no polling
        for dim, rerank_dim in every_plan():
            found = hits(view, NEW_TEXT, dim, rerank_dim=rerank_dim)
            assert found[0].id == "new" and found[0].text == NEW_TEXT, (dim, rerank_dim)
            assert len(found) == 10
        grouped = view.search(ENCODER.encode_queries([NEW_TEXT]), min(DIMS), 3, group=True)
        assert view.doc_ids(grouped.rows[0].tolist())[0] == "new"
    counts = live.counts()
    assert (counts.documents, counts.passages, counts.unmerged_passages, counts.tombstones) == (10, 10, 0, 0)
    assert live.manifest.num_vectors == 9 and not live.should_compact(1, 0.0)
    assert live.compact() == live.version


def test_an_upsert_replaces_every_old_passage_at_every_dim(live):
    before = live.counts()
    texts = ["sleep sleep pain", "diet stress", "allergy"]
    result = live.upsert(passages_of("d0", texts, {"topic": "rest"}), encode(passages_of("d0", texts)))
    assert result.replaced == ["d0"] and result.passages == 3
    with live.view() as view:
        for dim, rerank_dim in every_plan():
            found = hits(view, "fever sleep diet allergy", dim, rerank_dim=rerank_dim)
            mine = [document for document in found if document.doc_id == "d0"]
            assert sorted(document.id for document in mine) == ["d0#0", "d0#1", "d0#2"], (dim, rerank_dim)
            assert all(document.metadata == {"topic": "rest"} for document in mine)
            assert "advice about fever at home" not in {document.text for document in found}
        assert view.documents([0]) == [None]  # d0's old row is gone from the docs collection too
    after = live.counts()
    assert (after.documents, after.passages) == (before.documents, before.passages + 2)
    again = live.upsert(passages_of("d0", ["pain"]), encode(passages_of("d0", ["pain"])))
    assert again.replaced == ["d0"] and stored_rows(live.store, live.version, "d0") == [12]  # rows 9-11 replaced


def test_a_delete_removes_every_passage_and_reports_unknown_ids(live):
    live.upsert(passages_of("long", ["cough", "cough rash"]), encode(passages_of("long", ["cough", "cough rash"])))
    result = live.delete(["d1", "long", "nothing"])
    assert (result.documents, result.passages, result.not_found) == (["d1", "long"], 3, ["nothing"])
    with live.view() as view:
        for dim, rerank_dim in every_plan():
            assert {d.doc_id for d in hits(view, "cough", dim, rerank_dim=rerank_dim)} & {"d1", "long"} == set()
    assert live.delete(["d1"]).not_found == ["d1"] and live.delete(["d1"]).seq is None
    assert (live.counts().documents, live.counts().passages) == (8, 8)
    with pytest.raises(InvalidWrite, match="list of document ids"):
        live.delete("d2")


@LITE_ONLY
def test_bad_upserts_are_refused_and_write_nothing(live):
    with pytest.raises(InvalidWrite, match="shape"):
        live.upsert(passages_of("x", ["fever"]), np.zeros((1, 3)))
    with pytest.raises(InvalidWrite, match="already belongs to document 'd1'"):
        live.upsert([Document("d1", "fever", parent="x")], encode([Document("d1", "fever")]))
    with pytest.raises(InvalidWrite, match="JSON"):
        live.upsert([Document("x", "fever", metadata={"when": object()})], encode([Document("x", "fever")]))
    assert live.counts().passages == 9 and live.counts().last_seq == 0


def test_filters_on_metadata_written_over_upsert_work_here_and_on_a_replica(live, built):
    store, version = built
    passages = passages_of("new", [NEW_TEXT], {"year": 2020, "topic": "fever"})
    live.upsert(passages, encode(passages))
    assert live.metadata_fields == {"topic": "string", "year": "number"}
    with live.view() as view:
        where = view.parse_filter({"year": {"$gte": 2000}})
        for dim, rerank_dim in every_plan():
            assert [d.id for d in hits(view, "fever cough", dim, rerank_dim=rerank_dim, where=where)] == ["new"]
        assert view.matching_documents(view.parse_filter({"topic": "fever"})) == ["d0", "new"]
    replica = MilvusIndexStore(MilvusBackend(store.backend.uri), store.name).open(version)
    try:
        assert replica.metadata_fields == {"topic": "string", "year": "number"}  # opened after: read at open
        where = replica.search_filter({"year": 2020})
        found = staged_search(replica.indexes[2], replica.vectors, ENCODER.encode_queries(["fever"]), 2, 5, where=where)
        assert [d.id for d in replica.store.get([r for r in found.rows[0] if r >= 0])] == ["new"]
        more = passages_of("later", ["rash"], {"year": 2021, "source": "web"})
        live.upsert(more, encode(more))
        deadline = time.monotonic() + RECORD_TTL_S + REPLICA_LAG_S
        while "source" not in replica.metadata_fields:  # a field only written over the API, seen without a reload
            assert time.monotonic() < deadline, replica.metadata_fields
            time.sleep(0.1)
        assert replica.search_filter({"source": "web"}) is not None
    finally:
        replica.close()


def test_a_replica_in_this_process_sees_the_writes_within_the_bound(live, built):
    store, version = built
    replica = MilvusIndexStore(MilvusBackend(store.backend.uri), store.name).open(version)
    try:
        passages = passages_of("new", [NEW_TEXT])
        live.upsert(passages, encode(passages))
        written = time.monotonic()
        query = ENCODER.encode_queries([NEW_TEXT])
        for dim in DIMS:
            while True:
                rows = replica_rows(replica, query, dim)
                documents = replica.store.get([row for row in rows if row >= 0])
                if documents[0].id == "new":
                    break
                assert time.monotonic() - written < REPLICA_LAG_S, dim
                time.sleep(0.05)
            assert len(documents) == 10 and None not in documents
        live.delete(["new"])
        deadline = time.monotonic() + REPLICA_LAG_S
        while "new" in {d.id for d in replica.store.get(replica_rows(replica, query, min(DIMS))) if d}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        replica.close()


REPLICA = """
import sys, time
from index.milvus import MilvusBackend
from index.milvus_store import MilvusIndexStore
from index.search import staged_search
from tests.conftest import KeywordEncoder
from tests.helpers.service import VOCABULARY
uri, name, version, text = sys.argv[1:5]
loaded = MilvusIndexStore(MilvusBackend(uri), name).open(version)
query = KeywordEncoder(VOCABULARY).encode_queries([text])
print("ready", flush=True)
for line in sys.stdin:
    wanted, dim = line.split()
    while True:
        rows = staged_search(loaded.indexes[int(dim)], loaded.vectors, query, int(dim), 3).rows[0]
        top = loaded.store.get([int(rows[0])])[0]
        if top is not None and top.id == wanted:
            print(time.time(), flush=True)
            break
        time.sleep(0.005)
"""


def test_a_replica_in_another_process_sees_each_write_within_the_bound(on_server):
    store, version = on_server
    live = open_milvus_live(store, store.open(version))
    replica = subprocess.Popen(
        [sys.executable, "-c", REPLICA, store.backend.uri, store.name, version, NEW_TEXT],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert replica.stdout.readline().strip() == "ready"
        lags = []
        for number, dim in enumerate(DIMS * 2):
            doc = f"new{number}"
            replica.stdin.write(f"{doc} {dim}\n")
            replica.stdin.flush()
            time.sleep(0.2)  # the replica polls already
            live.upsert(passages_of(doc, [NEW_TEXT]), encode(passages_of(doc, [NEW_TEXT])))
            done = time.time()
            lags.append(float(replica.stdout.readline()) - done)
            live.delete([doc])  # so that the next one is the only best match
        assert max(lags) < REPLICA_LAG_S, lags
        print(f"replica lags after a write returned: {[round(lag, 3) for lag in lags]} s")
    finally:
        replica.kill()
        replica.wait()
        live.close()


@LITE_ONLY
def test_one_writer_per_index_a_second_and_a_build_are_refused(built):
    store, version = built
    live = open_milvus_live(store, store.open(version))
    second = MilvusIndexStore(MilvusBackend(store.backend.uri), store.name)
    loaded = second.open(version)
    try:
        with pytest.raises(MilvusWriterHeld, match=rf"pid {os.getpid()}\) writes into it") as refused:
            open_milvus_live(second, loaded)
        assert "\n" not in str(refused.value) and store.label in str(refused.value)
        with pytest.raises(MilvusWriterHeld):
            second.begin("20991231T000000000000Z-beef")  # a build would leave the writes behind
        live.close()
        elsewhere = WriterRecord("otherhost~4242~beef", version, "writable server", time.time())
        store._put({WRITER_KEY: elsewhere.to_json()})  # another host's writer, heartbeat just now: held
        with pytest.raises(MilvusWriterHeld, match="a writable server on otherhost \\(pid 4242\\)"):
            open_milvus_live(second, loaded)
        store._put({WRITER_KEY: replace(elsewhere, at=time.time() - WRITER_TTL_S - 1).to_json()})  # gone quiet
        taken = open_milvus_live(second, loaded)
        taken.close()
        assert store.writer() is None  # given up on close
        reused = replace(WriterRecord.mine(version, "writable server"), started="1")  # this pid, an earlier process
        store._put({WRITER_KEY: reused.to_json()})  # as a restarted container's first process finds it
        assert store.writer() is None
        open_milvus_live(second, loaded).close()
    finally:
        loaded.close()
        second.close()


@LITE_ONLY
def test_only_the_current_version_of_a_build_with_document_ids_is_written(built):
    store, version = built
    loaded = store.open(version)
    try:
        loaded.store.writable = False  # as a version built before live writes reads
        with pytest.raises(IndexFolderError, match="built before live writes .* rebuild the index"):
            open_milvus_live(store, loaded)
        loaded.store.writable = True
        store._put({"current": json.dumps({"version": "20991231T000000000000Z-beef"})})
        with pytest.raises(IndexFolderError, match="is not current"):
            open_milvus_live(store, loaded)
        store._put({"current": json.dumps({"version": version})})
        build = store.begin("20991231T000000000000Z-cafe")  # a build in progress would go live without the writes
        with pytest.raises(MilvusWriterHeld, match="20991231T000000000000Z-cafe is being built"):
            open_milvus_live(store, loaded)
        build.abort()
        assert store.writer() is None  # a refused writer leaves no record
    finally:
        loaded.close()


@LITE_ONLY
def test_mrl_index_add_after_live_writes_carries_them_and_waits_for_no_writer(built, tmp_path):
    store, version = built
    locator = IndexLocator("milvus", uri=store.backend.uri, name=store.name)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"_id": "x0", "text": "rash and pain"}) + "\n")
    with writing(store, version) as live:
        live.upsert(passages_of("new", [NEW_TEXT]), encode(passages_of("new", [NEW_TEXT])))
        live.upsert(passages_of("d0", ["sleep", "diet"]), encode(passages_of("d0", ["sleep", "diet"])))
        live.delete(["d1"])
        with pytest.raises(MilvusWriterHeld, match="writes into it"), keyword_model() as encoder:
            encoder.encode_documents = None  # refused before encoding anything
            add_documents(locator, extra, MODEL_NAME, device="cpu", progress=False)
    with keyword_model():
        _, added = add_documents(locator, extra, MODEL_NAME, device="cpu", progress=False)
    grown = store.open(added.version)
    try:
        passages = grown.store.get(range(added.num_vectors))
        assert [p.id for p in passages] == [*(f"d{i}" for i in range(2, 9)), "new", "d0#0", "d0#1", "x0"]  # row order
        assert added.num_vectors == 11 and added.history[-1]["added"] == 1
        np.testing.assert_allclose(np.asarray(grown.vectors[np.array([8])])[0], encode(passages[8:9])[0])
    finally:
        grown.close()


WRITER = """
import sys, time
from core.data import Document
from index.milvus import MilvusBackend, MilvusIndex
from index.milvus_live import MilvusLive, open_milvus_live
from index.milvus_store import MilvusIndexStore
from tests.conftest import KeywordEncoder
from tests.helpers.service import VOCABULARY
uri, name, version, stop_at = sys.argv[1:5]
store = MilvusIndexStore(MilvusBackend(uri), name)
live = open_milvus_live(store, store.open(version))

def halt(where):
    print(where, flush=True)
    time.sleep(3600)

if stop_at == "documents":  # killed after the version record, before any passage is stored
    MilvusLive._insert_docs = lambda *args: halt(stop_at)
else:  # killed with the passages stored and the first dim written, the others not, the old rows not deleted
    put = MilvusIndex.put
    MilvusIndex.put = lambda self, *args, **kwargs: (put(self, *args, **kwargs), halt(stop_at))
passages = [Document(f"d0#{i}", text, "Leaflet", {}, parent="d0", start=i, end=i + 1) for i, text in enumerate(
    ["fever fever fever cough", "sleep"])]
live.upsert(passages, KeywordEncoder(VOCABULARY).encode_documents([p.passage for p in passages]))
"""


@pytest.mark.parametrize("stop_at", ["documents", "dims"])
def test_a_writer_killed_mid_upsert_leaves_no_orphan_hit_and_its_successor_leaves_one_copy(on_server, stop_at):
    store, version = on_server
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, store.backend.uri, store.name, version, stop_at],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == stop_at
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    loaded = store.open(version)
    for dim in DIMS:  # what replicas see meanwhile: every hit has its document
        assert None not in loaded.store.get(replica_rows(loaded, ENCODER.encode_queries(["fever sleep"]), dim)), dim
    live = open_milvus_live(store, loaded)  # the dead writer's record is stale (its pid is gone): taken over
    try:
        # undone (the old d0 stays), or finished (d0 replaced by rows 9 and 10, which the killed write reserved)
        assert stored_rows(store, version, "d0") == ([0] if stop_at == "documents" else [9, 10])
        texts = ["fever fever fever cough", "sleep"]
        result = live.upsert(passages_of("d0", texts), encode(passages_of("d0", texts)))
        assert result.replaced == ["d0"]
        assert stored_rows(store, version, "d0") == [11, 12]  # never rows 9 and 10 again
        with live.view() as view:
            for dim, rerank_dim in every_plan():
                found = [d.id for d in hits(view, "fever sleep", dim, rerank_dim=rerank_dim) if d.doc_id == "d0"]
                assert sorted(found) == ["d0#0", "d0#1"], (dim, rerank_dim)
        assert (live.counts().documents, live.counts().passages) == (9, 10)
    finally:
        live.close()
