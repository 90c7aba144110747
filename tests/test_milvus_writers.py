"""Writers of one index in Milvus (Milvus Lite): concurrent adds and builds never report success for data that
is not live, and a prune never leaves ``current`` naming a dropped version.

The hardening issue's defects 1 and 2 on a Milvus index. Milvus has no lock and no compare-and-set, so an
add checks at publish time that ``current`` is still the version it started from, and publishing and
pruning take turns through ``publishing/`` records (:meth:`MilvusIndexStore.publishing`). The races are
run in their bad order: the second writer runs inside the first one's encoding, or while the first one is
paused between marking its version live and making it current.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import index.build as build_module
from index.build import BuildConfig, add_documents, build_index
from index.locator import parse_locator
from index.milvus_store import CURRENT_KEY, LIVE, MilvusIndexStore, WriterRecord, version_tag
from mrl.cli import main
from tests.helpers.service import DIMS, MODEL_NAME, keyword_model, write_data

pytestmark = pytest.mark.slow  # Milvus Lite: an engine per module, builds of several collections


def locator_of(uri: str, name: str):
    return parse_locator(f"milvus-lite://{uri}/{name}")


def keyword_config(data: Path, uri: str, name: str, tmp: Path, keep: int = 3) -> BuildConfig:
    return BuildConfig(
        data=data, index=f"milvus-lite://{uri}/{name}", model=MODEL_NAME, dims=DIMS, device="cpu", progress=False,
        cache_dir=tmp / "cache", keep_versions=keep, calibration="none",
    )  # fmt: skip


def keyword_build(data: Path, uri: str, name: str, tmp: Path, keep: int = 3):
    """The real ``build_index`` into Milvus Lite, with the keyword encoder standing in for the model.

    Not from two threads at once: each would patch the builder and restore it out of order, leaving the
    stand-in model in place for every later test of the worker. Threads share one ``keyword_model()``.
    """
    with keyword_model():
        return build_index(keyword_config(data, uri, name, tmp, keep))


def keyword_add(uri: str, name: str, ids: list[str], tmp: Path):
    with keyword_model():
        return add_documents(locator_of(uri, name), documents_file(tmp, ids), MODEL_NAME, device="cpu", progress=False)


def documents_file(folder: Path, ids: list[str]) -> Path:
    path = folder / f"{ids[0]}.jsonl"
    path.write_text("".join(json.dumps({"_id": i, "text": f"cough advice {i}"}) + "\n" for i in ids))
    return path


def live_ids(store: MilvusIndexStore) -> set[str]:
    loaded = store.open(store.current(), device="cpu", lease=False)
    try:
        return {document.id for document in loaded.store.get(loaded.rows().tolist())}
    finally:
        loaded.close()


def collections_of(backend, name: str, version: str) -> list[str]:
    return [c for c in backend.all_collections() if version_tag(version) in c and c.startswith(f"{name}_")]


@pytest.fixture
def during_the_first_encoding(monkeypatch: pytest.MonkeyPatch):
    """Runs a callable inside the next ``add``'s encoding: after that add read ``current``, before it publishes."""
    real = build_module.encode_documents
    pending: list = []

    def encode(*args, **kwargs):
        if pending:
            pending.pop()()
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "encode_documents", encode)
    return pending.append


# --- 1. an add whose current moved meanwhile ------------------------------------------------------------


@pytest.mark.parametrize("other", ["add", "build"])
def test_an_add_is_refused_when_another_writer_published_meanwhile(
    keyword_data, milvus_lite_uri, lite_backend, tmp_path, capsys, during_the_first_encoding, other
):
    """Add A reads ``current``; while it encodes, another add (or a build) publishes. A must not publish its
    version (it would hide the other's documents) nor say it added anything: one line, exit code 2."""
    name = f"cas_{other}"
    _, first = keyword_build(keyword_data, milvus_lite_uri, name, tmp_path)
    store = MilvusIndexStore(lite_backend, name)
    before = live_ids(store)
    published: list[str] = []

    def the_other_writer() -> None:
        if other == "add":
            published.append(keyword_add(milvus_lite_uri, name, ["b1", "b2"], tmp_path)[1].version)
        else:
            new_data = write_data(tmp_path / "data2", extra=2)
            published.append(keyword_build(new_data, milvus_lite_uri, name, tmp_path)[1].version)

    during_the_first_encoding(the_other_writer)
    extra = documents_file(tmp_path, ["a1"])
    with keyword_model():
        code = main(["index", "add", "--index", f"milvus-lite://{milvus_lite_uri}/{name}", "--data", str(extra),
                     "--model", MODEL_NAME, "--device", "cpu", "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrl: error: "), err
    assert f"index {name!r}" in lines[0] and first.version in lines[0] and published[0] in lines[0]
    assert "added" not in out
    assert store.current() == published[0]  # the other writer's version stays live
    expected = before | {"b1", "b2"} if other == "add" else {f"d{i}" for i in range(9)} | {"n0", "n1"}
    assert live_ids(store) == expected  # nothing of A, nothing of the other lost
    building = [v for v, state in store.versions().items() if state != LIVE]
    assert not building  # A's version is gone, not left half published
    assert set(store.versions()) == {first.version, published[0]}


def test_two_adds_one_after_the_other_both_land(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    """The check is on the version an add started from: adds in turn each append to the one before."""
    _, first = keyword_build(keyword_data, milvus_lite_uri, "in_turn", tmp_path)
    store = MilvusIndexStore(lite_backend, "in_turn")
    before = live_ids(store)
    keyword_add(milvus_lite_uri, "in_turn", ["a1"], tmp_path)
    keyword_add(milvus_lite_uri, "in_turn", ["b1"], tmp_path)
    assert live_ids(store) == before | {"a1", "b1"}


# --- 2. publish and prune interleaved -----------------------------------------------------------------


class Waiting(logging.Handler):
    """Sets ``seen`` when a writer logs that it waits for another one to publish."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another writer" in record.getMessage():
            self.seen.set()


def test_a_prune_never_drops_the_version_another_writer_is_making_current(
    keyword_data, milvus_lite_uri, lite_backend, tmp_path, monkeypatch, caplog
):
    """Build A marks its version live and pauses before it writes ``current``; build B publishes with keep=1
    meanwhile. Without turns B's prune drops A's version and A then points ``current`` at nothing."""
    name = "interleaved"
    keyword_build(keyword_data, milvus_lite_uri, name, tmp_path, keep=1)
    a_marked, a_may_go_on = threading.Event(), threading.Event()
    real_put = MilvusIndexStore._put

    def put(self, records: dict[str, str]) -> None:
        if CURRENT_KEY in records and threading.current_thread().name == "build-a":
            a_marked.set()  # A's version is live in its record, not yet current
            a_may_go_on.wait(60)
        real_put(self, records)

    monkeypatch.setattr(MilvusIndexStore, "_put", put)
    caplog.set_level(logging.INFO, logger="index.milvus_store")
    waiting = Waiting()
    logging.getLogger("index.milvus_store").addHandler(waiting)
    errors: list[BaseException] = []
    stack = contextlib.ExitStack()

    def build(folder: str) -> None:
        try:
            build_index(keyword_config(write_data(tmp_path / folder, extra=1), milvus_lite_uri, name, tmp_path, 1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    a = threading.Thread(target=build, args=("data_a",), name="build-a")
    b = threading.Thread(target=build, args=("data_b",), name="build-b")
    try:
        stack.enter_context(keyword_model())  # one patch for both threads, undone after both have ended
        a.start()
        assert a_marked.wait(120), "build A never reached its publish"
        b.start()
        for _ in range(1200):  # B either waits for A (turns) or finishes (no turns)
            if waiting.seen.wait(0.1) or not b.is_alive():
                break
        assert waiting.seen.is_set() or not b.is_alive()
        a_may_go_on.set()
        a.join(120)
        b.join(120)
    finally:
        a_may_go_on.set()
        a.join(120)
        b.join(120)
        stack.close()
        logging.getLogger("index.milvus_store").removeHandler(waiting)
    assert not errors
    store = MilvusIndexStore(lite_backend, name)
    current = store.current()
    assert store.versions().get(current) == LIVE, f"current names {current}, which is gone: {store.versions()}"
    assert live_ids(store) >= {"n0"}
    assert collections_of(lite_backend, name, current)


def test_a_prune_on_its_own_waits_for_a_publisher_and_keeps_current(
    keyword_data, milvus_lite_uri, lite_backend, tmp_path
):
    name = "pruned_alone"
    _, first = keyword_build(keyword_data, milvus_lite_uri, name, tmp_path)
    _, second = keyword_build(keyword_data, milvus_lite_uri, name, tmp_path)
    publisher, pruner = MilvusIndexStore(lite_backend, name), MilvusIndexStore(lite_backend, name)
    dropped: list[list[str]] = []
    with publisher.publishing():
        thread = threading.Thread(target=lambda: dropped.append(pruner.prune(1)))
        thread.start()
        thread.join(1.5)
        assert thread.is_alive(), "the prune ran while another writer was publishing"
    thread.join(60)
    assert dropped == [[first.version]]
    assert publisher.versions() == {second.version: LIVE}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_publishers_turn_is_taken_over(keyword_data, milvus_lite_uri, lite_backend, tmp_path):
    """A ``publishing/`` record whose process is gone does not hold anyone up, and is removed."""
    name = "killed_turn"
    keyword_build(keyword_data, milvus_lite_uri, name, tmp_path)
    store = MilvusIndexStore(lite_backend, name)
    dead = WriterRecord(f"{socket.gethostname()}~{dead_pid()}~dead", "-", "publisher", 0.0)
    store._put({f"publishing/{dead.holder}": dead.to_json()})
    keyword_add(milvus_lite_uri, name, ["a1"], tmp_path)
    assert not store._scan("publishing/")
