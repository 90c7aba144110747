"""The index store contract, one test run over every registered store: a folder, Milvus Lite, a real Milvus server.

Each store is reached through its locator only (``index.stores.open_store``), and the index is
built and extended by the real builder with the keyword encoder standing in for the model, so
every search can be checked against brute force exactly: build, current and manifest, open and
search top-10 (every dim), add (a new version with the old documents and the new ones), a lease
that keeps a version through a prune and its release, and refusals of another model's version and
of a damaged one, each in one clear error.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from index.build import BuildConfig, add_documents, build_index
from index.layout import LEASES, held_versions, resolve_version
from index.locator import IndexLocator, parse_locator
from index.manifest import IndexFolderError, IndexManifest
from index.stores import STORES, IndexStore, open_store
from index.versions import (
    LEASE_TTL_SECONDS,
    DocumentCount,
    LeaseRecord,
    check_counts,
    held_by_live_processes,
    lease_holder,
)
from tests.conftest import scramble, without_checksums
from tests.helpers.service import DIMS, MODEL_NAME, VOCABULARY, keyword_model, write_data
from tests.helpers.vectors import brute_force

ENGINES = ["folder", "milvus-lite", "milvus-server"]


@pytest.fixture(params=ENGINES)
def locator(request, tmp_path: Path) -> IndexLocator:
    name = f"contract_{secrets.token_hex(3)}"
    if request.param == "folder":
        return IndexLocator.folder(tmp_path / "index")
    if request.param == "milvus-lite":
        return parse_locator(f"milvus-lite://{request.getfixturevalue('milvus_lite_uri')}/{name}")
    uri = request.getfixturevalue("milvus_server_uri")
    return parse_locator(f"milvus://{uri.removeprefix('http://')}/{name}")


def build(locator: IndexLocator, data: Path, cache: Path, keep: int = 3):
    with keyword_model():
        return build_index(
            BuildConfig(
                data=data, index=str(locator), model=MODEL_NAME, dims=DIMS, device="cpu", progress=False,
                keep_versions=keep, cache_dir=cache,
            )
        )  # fmt: skip


def damage(store: IndexStore, version: str) -> Callable[[], None]:
    """Break one part of ``version`` as its engine keeps it: a file's bytes, or a collection dropped."""
    if store.locator.engine == "faiss":
        return lambda: scramble(Path(store.where(version)) / "docs.sqlite")
    return lambda: store.backend.drop(store.dim_collection(version, DIMS[-1]))


def test_every_engine_has_a_store_in_the_contract():
    assert set(STORES) == {"faiss", "milvus"}  # each is tested below through a locator


def test_the_store_contract(locator: IndexLocator, tmp_path: Path):
    cache = tmp_path / "cache"
    where, first = build(locator, write_data(tmp_path / "data"), cache)
    store = open_store(locator)
    try:
        # current, manifest, open; every dim's top-10 is brute force's on the exact (Flat) indexes
        assert store.current() == first.version and store.manifest(first.version).to_dict() == first.to_dict()
        assert first.version in str(where)
        loaded = store.open(first.version, device="cpu", expected_fingerprint=first.model.fingerprint)
        try:
            vectors = np.asarray(loaded.vectors, dtype=np.float32)
            queries = np.eye(len(VOCABULARY), dtype=np.float32) + 0.1
            for dim in DIMS:
                reduced, asked = truncate_normalize(vectors, dim), truncate_normalize(queries, dim)
                scores, rows = loaded.indexes[dim].search(asked, 10)
                _, truth = brute_force(reduced, asked, len(vectors))
                np.testing.assert_allclose(scores[:, : len(vectors)], truth, atol=1e-5)  # brute force's top scores
                exact = np.take_along_axis(asked @ reduced.T, rows[:, : len(vectors)], axis=1)
                np.testing.assert_allclose(exact, truth, atol=1e-5)  # and the rows that have them (ties in any order)
            assert loaded.location == first.version and [d.id for d in loaded.store.get([0])] == ["d0"]
        finally:
            loaded.close()

        # add: a new version holding the old documents and the new ones, published as the current one
        extra = tmp_path / "extra.jsonl"
        extra.write_text("".join(json.dumps({"_id": f"x{i}", "text": "fever and rash"}) + "\n" for i in range(2)))
        with keyword_model():
            _, added = add_documents(locator, extra, MODEL_NAME, device="cpu", progress=False, keep_versions=3)
        assert store.current() == added.version != first.version and added.num_vectors == first.num_vectors + 2
        grown = store.open(added.version, device="cpu")
        try:
            assert grown.store.ids() == {f"d{i}" for i in range(9)} | {"x0", "x1"}
            _, rows = grown.indexes[DIMS[0]].search(truncate_normalize(np.eye(8, dtype=np.float32)[:1], DIMS[0]), 3)
            assert {doc.id for doc in grown.store.get(rows[0].tolist())} <= {"d0", "d8", "x0", "x1"}
        finally:
            grown.close()

        # a lease keeps a version through a prune; once released, it goes
        held = store.open(first.version, device="cpu")  # takes a lease
        try:
            _, third = build(locator, write_data(tmp_path / "data3", extra=1), cache, keep=1)
            assert store.current() == third.version
            assert set(v for v, state in store.versions().items() if state == "live") == {first.version, third.version}
        finally:
            held.close()  # releases it
        assert store.prune(1) == [first.version]
        assert [v for v, state in store.versions().items() if state == "live"] == [third.version]

        # refusals, in one line each: another model's version, a damaged one
        with pytest.raises(IndexFolderError, match=r"built with model 'keywords' .*not the model being served"):
            store.open(third.version, device="cpu", expected_fingerprint="sha256:" + "cd" * 32)
        damage(store, third.version)()
        with pytest.raises(IndexFolderError) as refused:
            store.open(third.version, device="cpu")
        assert len(str(refused.value).splitlines()) == 1
    finally:
        store.close()


# --- the rules every store applies, written once (index.versions) ----------------------------------


@pytest.fixture
def folder_index(tmp_path: Path) -> Path:
    """A folder index of the keyword corpus: one version, with no checksums (so a change of its documents is found
    by their count, not by the file's bytes)."""
    build(IndexLocator.folder(tmp_path / "index"), write_data(tmp_path / "data"), tmp_path / "cache")
    without_checksums(resolve_version(tmp_path / "index"))
    return tmp_path / "index"


def test_count_checks_name_the_part_that_disagrees_in_each_stores_words(folder_index: Path):
    """One check of counts against the manifest for every store; each names its part its own way (the folder's
    file, Milvus's collection), in the words each used before the check was shared."""
    manifest = IndexManifest.read(resolve_version(folder_index))
    n, dim = manifest.num_vectors, manifest.dims[0]
    check_counts(manifest, {dim: ("f:", n, dim)}, DocumentCount("docs.sqlite:", n, n))  # all agree: no error
    with pytest.raises(IndexFolderError, match=rf"^v/index_{dim}.faiss: 3 vectors of dim {dim}, expected {n} of dim"):
        check_counts(manifest, {dim: (f"v/index_{dim}.faiss:", 3, dim)})
    with pytest.raises(IndexFolderError, match=rf"^ix: collection 'c' holds {n} vectors of dim 7, expected {n} of "):
        check_counts(manifest, {dim: ("ix: collection 'c' holds", n, 7)}, grown=True)  # a dim is checked even so
    with pytest.raises(IndexFolderError, match=rf"^docs.sqlite: 2 documents, expected {n}$"):
        check_counts(manifest, documents=DocumentCount("docs.sqlite:", 2, n))
    wrote = DocumentCount("ix: collection 'c' holds", 5, 6, "document parts", "version 'v' wrote 6")
    with pytest.raises(IndexFolderError, match=r"^ix: collection 'c' holds 5 document parts, version 'v' wrote 6$"):
        check_counts(manifest, documents=wrote)
    check_counts(manifest, {dim: ("f:", n + 4, dim)}, wrote, grown=True)  # live writes moved the counts on


def test_a_folder_version_missing_a_document_is_refused_by_the_shared_count_check(folder_index: Path):
    folder = resolve_version(folder_index)
    n = IndexManifest.read(folder).num_vectors
    with sqlite3.connect(folder / "docs.sqlite") as db:  # a row fewer, the file the same size
        db.execute("DELETE FROM documents WHERE rowid = (SELECT MAX(rowid) FROM documents)")
    db.close()
    with pytest.raises(
        IndexFolderError, match=rf"^{re.escape(str(folder))}/docs.sqlite: {n - 1} documents, expected {n}$"
    ):
        open_store(IndexLocator.folder(folder_index)).open(folder.name, device="cpu")


def test_one_sweep_keeps_the_versions_live_processes_lease_and_deletes_the_rest_at_once():
    """Every store's held_versions is this sweep over its own lease records (files, Milvus records)."""
    here, gone_pid, old = socket.gethostname(), 2**22 + 1, time.time() - LEASE_TTL_SECONDS - 1
    leases = [
        LeaseRecord("mine", "v1", lease_holder(), old),  # this process, however old its last refresh
        LeaseRecord("dead", "v2", f"{here}~{gone_pid}~ab", time.time()),  # a process that is gone
        LeaseRecord("far", "v3", "elsewhere~12~ab", time.time()),  # another host, refreshed lately
        LeaseRecord("far-old", "v4", "elsewhere~12~cd", old),  # another host, not refreshed for the TTL
        LeaseRecord("went", "v5", lease_holder(), None),  # deleted while being listed
    ]
    deleted: list[list] = []
    assert held_by_live_processes(leases, deleted.append) == {"v1", "v3"}
    assert deleted == [["dead", "far-old", "went"]]
    assert held_by_live_processes(leases[:1], deleted.append) == {"v1"} and len(deleted) == 1  # nothing stale


def test_a_folder_stores_stale_lease_files_go_in_the_sweep(folder_index: Path):
    version = resolve_version(folder_index).name
    leases = folder_index / LEASES
    leases.mkdir(exist_ok=True)
    (leases / f"{version}~{socket.gethostname()}~{2**22 + 1}~ab").touch()  # its process is gone
    (leases / f"{version}~{lease_holder()}").touch()
    assert held_versions(folder_index) == {version}
    assert [p.name.split("~")[2] for p in leases.iterdir()] == [str(os.getpid())]


class _QueueLocators:
    """A third engine's locator forms, for the test below: ``queue://HOST/NAME``."""

    @staticmethod
    def parse(scheme: str, text: str) -> IndexLocator:
        host, _, name = text.removeprefix(scheme).partition("/")
        return IndexLocator("queue", uri=f"tcp://{host}", name=name)

    @staticmethod
    def format(locator: IndexLocator) -> str:
        return f"queue://{locator.uri.removeprefix('tcp://')}/{locator.name}"

    @staticmethod
    def shown(text: str) -> str:
        return text


QUEUE_LOCATORS = _QueueLocators()


def test_a_third_engines_locators_are_one_registration(monkeypatch: pytest.MonkeyPatch):
    """The locator is table-driven: an engine's schemes and its parse/format hooks are one entry of
    index.locator.LOCATORS, and a locator's text comes from its engine (Milvus's too, through its own hooks)."""
    import index.locator as locator_module

    monkeypatch.setitem(locator_module.LOCATORS, "queue", (("queue://",), f"{__name__}:QUEUE_LOCATORS"))
    parsed = parse_locator("queue://h:1/idx")
    assert parsed == IndexLocator("queue", uri="tcp://h:1", name="idx") and str(parsed) == "queue://h:1/idx"
    assert parse_locator("runs/queue-idx") == IndexLocator.folder("runs/queue-idx")  # still a folder
    with pytest.raises(ConfigError, match="unknown index locator scheme in 'queue2://h/idx'"):
        parse_locator("queue2://h/idx")
    assert str(parse_locator("milvus+https://db:443/m")) == "milvus+https://db:443/m"
