"""A living corpus over a FAISS folder index: upserts and deletes are searched at once, survive restarts and
crashes, and compact into a version that answers exactly as base plus overlay did.

The keyword encoder stands in for the model (exact scores); every search is compared with brute force over
the live passages, which the tests keep themselves (:class:`Corpus`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from core.data import Document
from core.matryoshka import truncate_normalize
from index.build import BuildConfig, add_documents, build_index
from index.folder_store import FolderStore
from index.layout import resolve_version
from index.live import InvalidWrite, LiveIndex, VersionBeingWritten, open_live
from index.loaded import open_index
from index.manifest import IndexManifest
from index.wal import LiveLockHeld, check_not_live
from mrl.cli import main
from tests.conftest import REPO, KeywordEncoder, write_beir
from tests.helpers.service import DIMS, MODEL_NAME, VOCABULARY, ServiceKeywordEncoder, corpus, keyword_model

ENCODER = KeywordEncoder(VOCABULARY)
LONG_TEXT = " ".join(["fever cough"] * 90 + ["rash pain"] * 90 + ["sleep"] * 60)  # two passages


def encode(passages: list[Document]) -> np.ndarray:
    return ENCODER.encode_documents([passage.passage for passage in passages])


def query(text: str) -> np.ndarray:
    return ENCODER.encode_queries([text])


def passages_of(doc: str, texts: list[str], metadata: dict | None = None) -> list[Document]:
    """A document as the caller's chunker would hand it over: one passage, or several with ``parent`` set."""
    if len(texts) == 1:
        return [Document(doc, texts[0], "Leaflet", metadata or {})]
    return [
        Document(f"{doc}#{i}", text, "Leaflet", metadata or {}, parent=doc, start=10 * i, end=10 * i + len(text))
        for i, text in enumerate(texts)
    ]


class Corpus:
    """What should be live, kept by the test: passages and vectors per document; brute-force search over them."""

    def __init__(self, passages: list[Document], vectors: np.ndarray) -> None:
        self.docs: dict[str, list[tuple[Document, np.ndarray]]] = {}
        for passage, vector in zip(passages, vectors, strict=True):
            self.docs.setdefault(passage.doc_id, []).append((passage, vector))

    @classmethod
    def of(cls, root: Path) -> Corpus:
        loaded = open_index(root, device="cpu", lease=False)
        try:
            n = loaded.manifest.num_vectors
            return cls(loaded.store.get(range(n)), np.asarray(loaded.vectors))
        finally:
            loaded.close()

    def upsert(self, live: LiveIndex, passages: list[Document]):
        result = live.upsert(passages, encode(passages))
        for doc in {passage.doc_id for passage in passages}:
            self.docs.pop(doc, None)
        for passage, vector in zip(passages, encode(passages), strict=True):
            self.docs.setdefault(passage.doc_id, []).append((passage, vector))
        return result

    def delete(self, live: LiveIndex, docs: list[str]):
        for doc in docs:
            self.docs.pop(doc, None)
        return live.delete(docs)

    @property
    def passages(self) -> list[tuple[Document, np.ndarray]]:
        return [item for items in self.docs.values() for item in items]

    def search(self, text: str, dim: int, allow: Callable[[dict], bool] = lambda m: True, group: bool = False):
        """Passage id -> score at ``dim`` of every allowed live passage (with ``group``, each document's best)."""
        q = truncate_normalize(query(text), dim)[0]
        scored = [(p, float(truncate_normalize(v, dim) @ q)) for p, v in self.passages if allow(p.metadata)]
        if group:
            best: dict[str, tuple[Document, float]] = {}
            for passage, score in scored:
                if passage.doc_id not in best or score > best[passage.doc_id][1]:
                    best[passage.doc_id] = (passage, score)
            scored = list(best.values())
        return {passage.id: score for passage, score in scored}


def found(live: LiveIndex, text: str, dim: int, k: int, where: dict | None = None, **options) -> dict[str, float]:
    """Passage id -> score of the hits of one search (``where``: a filter as a request gives it)."""
    with live.view() as view:
        hits = view.search(query(text), dim, k, where=view.parse_filter(where), **options)
        documents = view.documents(hits.rows[0])
    return {doc.id: float(score) for doc, score in zip(documents, hits.scores[0], strict=True) if doc is not None}


def assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected, abs=1e-5)


def top_scores(got: dict[str, float], k: int) -> list[float]:
    return sorted(got.values(), reverse=True)[:k]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The keyword index (one document split into two passages), its plans scored on judged queries; copied
    by every test."""
    folder = tmp_path_factory.mktemp("live-template")
    docs = [*corpus(), {"_id": "long", "title": "Long leaflet", "text": LONG_TEXT, "metadata": {"topic": "mixed"}}]
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(VOCABULARY)]
    data = write_beir(folder / "data", docs, queries, {"test": [(f"q{i}", f"d{i}", 1) for i in range(8)]})
    with keyword_model():
        config = BuildConfig(data=data, output=folder / "index", model=MODEL_NAME, dims=DIMS, device="cpu",
                             progress=False, eval_data=data)  # fmt: skip
        build_index(config)
    return folder / "index"


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template, tmp_path / "index", symlinks=True)
    return tmp_path / "index"


@pytest.fixture
def live(root: Path):
    opened = open_live(root)
    yield opened
    opened.close()


def test_the_template_splits_one_document(root: Path):
    assert sorted(p.id for p, _ in Corpus.of(root).docs["long"]) == ["long#0", "long#1"]


# --- writes are searched at once ----------------------------------------------------------------


def test_an_upserted_document_is_found_at_once_at_every_dim(root: Path, live: LiveIndex):
    expected = Corpus.of(root)
    result = expected.upsert(live, passages_of("new", ["fever fever cough"], {"topic": "new"}))
    assert (result.seq, result.documents, result.passages, result.replaced) == (1, ["new"], 1, [])
    for dim in DIMS:
        assert_same(found(live, "fever", dim, 100), expected.search("fever", dim))
    assert next(iter(found(live, "fever cough", 8, 1))) == "new"
    counts = live.counts()
    assert (counts.documents, counts.passages, counts.unmerged_passages, counts.tombstones) == (11, 12, 1, 0)
    assert counts.last_seq == 1 and counts.wal_bytes > 0 and counts.applied_seq == 0


def test_a_replaced_document_never_shows_its_old_passages(root: Path, live: LiveIndex):
    expected = Corpus.of(root)
    old_text = expected.docs["d0"][0][0].text
    result = expected.upsert(live, passages_of("d0", ["cough only now", "and rash"], {"topic": "cough"}))
    assert result.replaced == ["d0"] and result.passages == 2
    expected.upsert(live, passages_of("long", ["pain pain"]))  # a split base document, now one passage
    for dim in DIMS:
        assert_same(found(live, "fever", dim, 100), expected.search("fever", dim))
    two_stage = found(live, "fever cough", 2, 100, rerank_dim=8, candidates=50)
    assert_same(two_stage, expected.search("fever cough", 8))
    with live.view() as view:
        every = view.documents(range(view.base_rows + view.overlay.count))
        hits = view.search(query("fever"), 8, 100)
        shown = view.documents(hits.rows[0])
    assert old_text not in {doc.text for doc in shown if doc is not None}
    assert {doc.id for doc in every if doc is not None} >= {"d0", "d0#0", "long#0", "long"}  # dead rows still resolve
    assert live.counts().tombstones == 3 and live.counts().documents == 10


def test_a_delete_removes_every_passage_and_reports_unknown_ids(root: Path, live: LiveIndex):
    expected = Corpus.of(root)
    expected.upsert(live, passages_of("split", ["rash rash", "rash pain", "pain"]))
    expected.upsert(live, passages_of("d5", ["rash"], {"topic": "rash"}))
    for raw in (None, {"topic": "rash"}):  # searches before the delete, whose answers must not linger
        with live.view() as view:
            view.search(query("rash"), 8, 5, where=view.parse_filter(raw))
    result = expected.delete(live, ["long", "split", "d3", "nope"])
    assert (result.documents, result.passages, result.not_found) == (["long", "split", "d3"], 6, ["nope"])
    assert live.delete(["nope", "d3"]).seq is None  # nothing live: nothing logged
    rash = expected.search("rash", 8, lambda metadata: metadata.get("topic") == "rash")
    assert_same(found(live, "rash", 8, 100, where={"topic": "rash"}), rash)
    for dim in DIMS:
        assert_same(found(live, "rash pain", dim, 100), expected.search("rash pain", dim))
    assert not any(key.startswith(("long", "split")) for key in found(live, "rash pain fever", 8, 100))
    counts = live.counts()
    assert (counts.documents, counts.passages, counts.last_seq) == (8, 8, 3)


def test_writes_that_cannot_be_applied_are_refused_before_the_log(live: LiveIndex):
    good = passages_of("x", ["fever"])
    with pytest.raises(InvalidWrite, match=r"need vectors of shape \(1, 8\)"):
        live.upsert(good, np.zeros((1, 4)))
    with pytest.raises(InvalidWrite, match="NaN"):
        live.upsert(good, np.full((1, 8), np.nan))
    with pytest.raises(InvalidWrite, match="passage id 'd1' already belongs to document 'd1'"):
        live.upsert([Document("d1", "fever", parent="x")], encode(good))
    with pytest.raises(InvalidWrite, match="not JSON"):
        live.upsert([Document("x", "fever", metadata={"when": object()})], encode(good))
    with pytest.raises(InvalidWrite, match="list of document ids"):
        live.delete("d1")
    assert live.counts().last_seq == 0 and live.counts().wal_bytes == 0


# --- filters and grouping across base and delta -------------------------------------------------

FILTERS = [
    ({"topic": "fever"}, lambda m: m.get("topic") == "fever"),
    ({"topic": {"$in": ["rash", "new"]}}, lambda m: m.get("topic") in ("rash", "new")),
    ({"topic": {"$ne": "cough"}}, lambda m: m.get("topic") != "cough"),
    ({"year": {"$gte": 2020}}, lambda m: isinstance(m.get("year"), int) and m["year"] >= 2020),
    ({"$or": [{"topic": "mixed"}, {"year": 2019}]}, lambda m: m.get("topic") == "mixed" or m.get("year") == 2019),
]


def live_filter(live: LiveIndex, raw: dict):
    with live.view() as view:
        return view.parse_filter(raw)


def written(root: Path, live: LiveIndex) -> Corpus:
    expected = Corpus.of(root)
    expected.upsert(live, passages_of("d0", ["fever rash", "cough"], {"topic": "rash", "year": 2021}))
    expected.upsert(live, passages_of("n1", ["fever fever"], {"topic": "new", "year": 2019}))
    expected.upsert(live, passages_of("n2", ["rash fever pain", "rash"], {"topic": "fever", "year": 2024}))
    expected.delete(live, ["d2"])
    expected.upsert(live, passages_of("n1", ["fever cough"], {"topic": "fever", "year": 2020}))
    return expected


@pytest.mark.parametrize("raw, allow", FILTERS)
def test_a_filtered_search_equals_brute_force_over_the_live_rows(root: Path, live: LiveIndex, raw, allow):
    expected = written(root, live)
    for dim in DIMS:
        assert_same(found(live, "fever rash", dim, 100, where=raw), expected.search("fever rash", dim, allow))
    wanted = expected.search("fever rash", 8, allow)
    assert_same(found(live, "fever rash", 4, 100, where=raw, rerank_dim=8), wanted)
    hits, _ = live.search(query("fever rash"), 4, 100, rerank_dim=8, where=live_filter(live, raw))  # one call
    assert len([row for row in hits.rows[0] if row >= 0]) == len(wanted)
    top = found(live, "fever rash", 8, 2, where=raw)
    assert len(top) == min(2, len(wanted)) and top_scores(top, 2) == pytest.approx(top_scores(wanted, 2))


def test_grouped_search_returns_each_document_once_across_base_and_delta(root: Path, live: LiveIndex):
    expected = written(root, live)
    expected.upsert(live, passages_of("split", ["rash", "rash rash fever", "pain"], {"topic": "rash"}))
    for dim in DIMS:
        got = found(live, "rash fever", dim, 100, group=True)
        assert_same(got, expected.search("rash fever", dim, group=True))
    top = found(live, "rash fever", 8, 3, group=True, rerank_dim=8, candidates=1)
    assert len(top) == 3 and len({key.split("#")[0] for key in top}) == 3
    assert top_scores(top, 3) == pytest.approx(top_scores(expected.search("rash fever", 8, group=True), 3))


def test_a_search_never_sees_a_document_half_replaced(root: Path, live: LiveIndex):
    """One thread replaces a two-passage document over and over (past the delta's first buffers); searches at
    two dims within one view always see both passages of one and the same write."""
    stop, seen, errors = threading.Event(), [], []

    def replace_forever() -> None:
        for round_ in range(1, 150):
            live.upsert(*_flip(round_))
        stop.set()

    def search_until_stopped() -> None:
        try:
            while not stop.is_set():
                with live.view() as view:
                    rounds = set()
                    for dim in (8, 2):
                        hits = view.search(query("fever"), dim, 100)
                        flips = [d for d in view.documents(hits.rows[0]) if d is not None and d.doc_id == "flip"]
                        assert len(flips) == 2, flips
                        rounds |= {d.metadata["round"] for d in flips}
                    assert len(rounds) == 1, rounds
                    seen.append(rounds)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    live.upsert(*_flip(0))
    threads = [threading.Thread(target=replace_forever), threading.Thread(target=search_until_stopped)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and seen and live.counts().unmerged_passages == 2


def _flip(round_: int) -> tuple[list[Document], np.ndarray]:
    passages = passages_of("flip", ["fever " * (1 + round_ % 3), "cough fever"], {"round": round_})
    return passages, encode(passages)


# --- restarts, torn lines, compaction -------------------------------------------------------------


def test_a_restart_replays_every_write(root: Path):
    live = open_live(root)
    expected = written(root, live)
    before = {dim: found(live, "fever rash", dim, 100) for dim in DIMS}
    counts = live.counts()
    live.close()
    again = open_live(root)
    try:
        assert {dim: found(again, "fever rash", dim, 100) for dim in DIMS} == before
        assert again.counts() == counts and counts.last_seq == 5
        assert again.upsert(passages_of("n3", ["pain"]), encode(passages_of("n3", ["pain"]))).seq == 6
        assert_same(found(again, "fever", 8, 100), {**expected.search("fever", 8), "n3": 0.0})
    finally:
        again.close()


def test_a_torn_last_line_is_ignored_on_reopen(root: Path, caplog):
    live = open_live(root)
    expected = written(root, live)
    live.close()
    log = root / "wal" / "log.jsonl"
    with log.open("ab") as handle:
        handle.write(b'{"seq": 6, "op": "upsert", "passages": [{"id": "ghost"')
    caplog.set_level(logging.WARNING, logger="index.wal")
    again = open_live(root)
    try:
        assert "ignoring a torn last line" in caplog.text
        assert_same(found(again, "fever rash", 8, 100), expected.search("fever rash", 8))
        assert again.delete(["n2"]).seq == 6
        assert all(json.loads(line)["seq"] <= 6 for line in log.read_text().splitlines())
    finally:
        again.close()


def test_compaction_keeps_every_live_document_and_answers_the_same(root: Path, live: LiveIndex):
    expected = written(root, live)
    searches = [
        ("fever rash", dim, options)
        for dim in DIMS
        for options in ({}, {"group": True}, {"rerank_dim": 8, "candidates": 3}, {"where": {"topic": "fever"}})
    ]

    def answers() -> list[dict[str, float]]:
        with live.view() as view:
            results = []
            for text, dim, options in searches:
                options = {**options, "where": view.parse_filter(options.get("where"))}
                hits = view.search(query(text), dim, 100, **options)
                docs = view.documents(hits.rows[0])
                pairs = zip(docs, hits.scores[0], strict=True)
                results.append({d.id: round(float(s), 5) for d, s in pairs if d is not None})
            return results

    before, counts, old = answers(), live.counts(), live.manifest
    version = live.compact()
    assert version == live.manifest.version != old.version and answers() == before
    after = live.counts()
    assert (after.documents, after.passages, after.unmerged_passages, after.tombstones) == (
        counts.documents, counts.passages, 0, 0)  # fmt: skip
    assert (after.applied_seq, after.last_seq, after.wal_bytes) == (5, 5, 0)
    manifest = IndexManifest.read(resolve_version(root))
    event = manifest.history[-1]
    assert (event["compacted"], event["dropped"], event["wal_seq"], event["from"]) == (5, 3, 5, old.version)
    assert manifest.num_vectors == counts.passages and manifest.plans == old.plans and manifest.plans
    assert event["plans_measured_on"] == old.version and manifest.chunking["documents"] == counts.documents
    assert manifest.metadata_fields == {"topic": "string", "year": "number"}
    assert {p.id for p, _ in Corpus.of(root).passages} == {p.id for p, _ in expected.passages}
    assert live.upsert(passages_of("n9", ["pain"]), encode(passages_of("n9", ["pain"]))).seq == 6


def test_writes_during_compaction_are_kept(root: Path, live: LiveIndex, monkeypatch):
    import index.live as live_module

    expected = written(root, live)
    real = live_module.write_compacted

    def write_then_more(*args, **kwargs):
        manifest = real(*args, **kwargs)  # published; the live index has not switched yet
        expected.upsert(live, passages_of("late", ["fever fever fever"]))
        expected.delete(live, ["n2", "d4"])
        return manifest

    monkeypatch.setattr(live_module, "write_compacted", write_then_more)
    live.compact()
    assert_same(found(live, "fever rash", 8, 100), expected.search("fever rash", 8))
    assert [record.seq for record in live.wal.records()] == [6, 7]
    assert live.counts().applied_seq == 5 and live.counts().unmerged_passages == 1
    live.close()
    again = open_live(root)
    try:
        assert_same(found(again, "fever rash", 8, 100), expected.search("fever rash", 8))
    finally:
        again.close()


def test_one_writer_per_root(root: Path, live: LiveIndex, capsys):
    with pytest.raises(LiveLockHeld, match=r"a writable server \(pid \d+\) owns this index: write through its API"):
        open_live(root)
    with pytest.raises(LiveLockHeld, match="or stop it first"):
        check_not_live(root)
    assert main(["index", "compact", "--index", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mrl: error: ") and "a writable server (pid" in err[0]
    data = root.parent / "more"
    write_beir(
        data, [{"_id": "x1", "text": "fever again"}], [{"_id": "q", "text": "fever"}], {"test": [("q", "x1", 1)]}
    )
    with keyword_model():
        for argv in (
            ["index", "add", "--index", str(root), "--data", str(data), "--no-progress"],
            ["index", "build", "--index", str(root), "--data", str(data), "--dims", "8,4", "--no-progress"],
        ):
            assert main(argv) == 2, argv  # fmt: skip
            assert "a writable server (pid" in capsys.readouterr().err.splitlines()[-1]


@contextmanager
def paused_in_encoding(action: Callable[[], object], what: str) -> Iterator[list[BaseException]]:
    """Run ``action`` (a build or an add) in a thread with the keyword encoder, and hold it inside its
    encoding while the block runs; then let it finish. Yields the list its exception, if any, lands in."""
    encoder = ServiceKeywordEncoder()
    encoder.hold_next_call()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    with keyword_model(encoder):
        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert encoder.entered.wait(30), f"the {what} never started encoding"
            yield errors
        finally:
            encoder.release.set()
            thread.join(timeout=60)


def test_a_writable_server_is_refused_while_a_version_is_being_written(root: Path, tmp_path: Path):
    """``mrl index add`` holds the writer lock from reading ``current`` to publishing. A writable server opened
    meanwhile would take writes over the version the add replaces: they would be lost once it publishes."""
    data = tmp_path / "more"
    write_beir(
        data, [{"_id": "x1", "text": "fever again"}], [{"_id": "q", "text": "fever"}], {"test": [("q", "x1", 1)]}
    )
    adding = functools.partial(add_documents, root, data, MODEL_NAME, device="cpu", progress=False)
    with paused_in_encoding(adding, "add") as errors:  # the writer lock held
        with pytest.raises(VersionBeingWritten) as refused:
            open_live(root)
    assert not errors
    message = str(refused.value)
    assert message.startswith(f"{root}: ") and "\n" not in message
    assert "is writing a new version of this index (it holds .writer.lock)" in message
    if Path("/proc/locks").is_file():  # Linux names the holder
        assert f"(pid {os.getpid()})" in message
    check_not_live(root)  # the refusal let the live lock go
    live = open_live(root)  # the add has published: the server takes writes over its version
    try:
        assert "x1" in found(live, "fever", 8, 100)
    finally:
        live.close()


def test_a_build_that_finishes_under_a_writable_server_does_not_publish(root: Path, tmp_path: Path):
    """A full build takes the writer lock only to publish. A writable server started while it encoded has
    taken writes over the current version; publishing would lose them at its next restart, so the build
    refuses then, and the server's writes stay."""
    data = tmp_path / "rebuilt"
    documents, queries = [{"_id": "r1", "text": "fever rebuilt"}], [{"_id": "q", "text": "fever"}]
    write_beir(data, documents, queries, {"test": [("q", "r1", 1)]})
    before = resolve_version(root)
    config = BuildConfig(data=data, output=root, model=MODEL_NAME, dims=DIMS, device="cpu", progress=False)
    with paused_in_encoding(lambda: build_index(config), "build") as errors:
        live = open_live(root)  # the build holds no lock yet: the server starts
    try:
        assert len(errors) == 1 and isinstance(errors[0], LiveLockHeld), errors
        assert "a writable server (pid" in str(errors[0])
        assert resolve_version(root) == before  # nothing was published
        assert not list((root / "versions").glob(".building-*"))  # and nothing left half-written
    finally:
        live.close()


def test_a_version_published_while_the_server_opens_is_refused(root: Path, monkeypatch):
    """A version that goes live between the server reading ``current`` and serving it would replace the one it
    serves behind its back (every compaction would then fail). The server refuses to start instead."""
    real_open = FolderStore.open

    def open_then_publish(self, version, **kwargs):
        loaded = real_open(self, version, **kwargs)
        shutil.copytree(root / "versions" / version, root / "versions" / "published-meanwhile")
        (root / "current.new").symlink_to(Path("versions") / "published-meanwhile")
        (root / "current.new").replace(root / "current")
        return loaded

    monkeypatch.setattr(FolderStore, "open", open_then_publish)
    with pytest.raises(VersionBeingWritten, match="a new version went live while .* was opened for writes; try again"):
        open_live(root)
    assert not list((root / "leases").glob("*"))  # the version it opened is closed
    check_not_live(root)  # and the live lock let go


def test_mrl_index_compact_merges_the_log(root: Path, capsys):
    live = open_live(root)
    expected = written(root, live)
    live.close()
    assert main(["index", "info", "--index", str(root)]) == 0
    assert "writes    5 logged writes not yet compacted (" in capsys.readouterr().out
    assert main(["index", "compact", "--index", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("merged 5 passages and dropped 3 dead rows (write-ahead log up to seq 5) -> ")
    assert {p.id for p, _ in Corpus.of(root).passages} == {p.id for p, _ in expected.passages}
    assert main(["index", "compact", "--index", str(root)]) == 0
    assert capsys.readouterr().out.startswith("nothing to compact")
    assert main(["index", "info", "--index", str(root)]) == 0
    info = capsys.readouterr().out
    assert "compacted 5 passages at " in info and "writes    none unmerged" in info


# --- crashes during compaction --------------------------------------------------------------------

CHILD = """
import os, signal, sys
from pathlib import Path
import numpy as np
import index.folder_store, index.wal
from core.data import Document
from index.live import open_live

root, point = Path(sys.argv[1]), sys.argv[2]
live = open_live(root)
late = [Document("late", "fever fever", "Leaflet", {"topic": "late"})]
live.upsert(late, np.eye(8, dtype=np.float32)[:1] * 2)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def replaced_then_die(self, temporary):
    os.replace(temporary, self.path)
    die()

if point == "before_publish":
    index.folder_store.FolderWriter.publish = die
elif point == "after_publish":
    index.wal.WriteAheadLog.trim = die
elif point == "trim_before_rename":
    index.wal.WriteAheadLog._install = die
elif point == "trim_after_rename":
    index.wal.WriteAheadLog._install = replaced_then_die
live.compact()
print("not killed")
"""


@pytest.mark.parametrize("point", ["before_publish", "after_publish", "trim_before_rename", "trim_after_rename"])
def test_a_crash_during_compaction_loses_no_write(root: Path, point: str):
    live = open_live(root)
    expected = written(root, live)
    live.close()
    expected.docs["late"] = [(Document("late", "fever fever", "Leaflet", {"topic": "late"}), np.eye(8)[0] * 2)]
    base = resolve_version(root).name
    child = subprocess.run([sys.executable, "-c", CHILD, str(root), point], cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (resolve_version(root).name == base) == (point == "before_publish")
    log = root / "wal" / "log.jsonl"
    left = {"before_publish": 6, "after_publish": 6, "trim_before_rename": 6, "trim_after_rename": 0}[point]
    assert len(log.read_text().splitlines()) == left
    assert bool(list((root / "wal").glob(".log.jsonl.*.tmp"))) == (point == "trim_before_rename")
    again = open_live(root)
    try:
        for dim in DIMS:
            assert_same(found(again, "fever rash", dim, 100), expected.search("fever rash", dim))
        counts = again.counts()
        assert counts.last_seq == 6 and counts.applied_seq == (0 if point == "before_publish" else 6)
        assert [record.seq for record in again.wal.records()] == ([1, 2, 3, 4, 5, 6] if counts.applied_seq == 0 else [])
        again.compact()
        assert_same(found(again, "fever rash", 8, 100), expected.search("fever rash", 8))
    finally:
        again.close()
    assert {p.id for p, _ in Corpus.of(root).passages} == {p.id for p, _ in expected.passages}
