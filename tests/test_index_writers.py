"""Writers of one index root: concurrent adds and builds lose nothing, and a failed write is one line.

The hardening issue's defects 1-4, with the keyword encoder standing in for the model (exact and
fast): two ``mrl index add`` at once, publish and prune interleaved, a full disk and a read-only
root during a build (real tmpfs mounts, so the system's own errors), and a corpus that is not UTF-8.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import index.layout as layout
from index.build import add_documents
from index.layout import CURRENT, VERSIONS, WriterLock, new_version_name, publish_version, resolve_version
from index.loaded import open_index
from index.manifest import IndexManifest
from mrl.cli import main
from tests.helpers.service import (
    DIMS,
    MODEL_NAME,
    ServiceKeywordEncoder,
    build_keyword_index,
    keyword_model,
    write_data,
)


def documents_file(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"_id": i, "text": f"cough advice {i}"}) + "\n" for i in ids))
    return path


def current_ids(root: Path) -> set[str]:
    loaded = open_index(root, device="cpu")
    try:
        return loaded.store.ids()
    finally:
        loaded.close()


@pytest.fixture
def keyword_root(tmp_path: Path) -> Path:
    root = tmp_path / "index"
    build_keyword_index(write_data(tmp_path / "data"), root)
    return root


# --- 1. two adds at once ------------------------------------------------------------------


def test_two_concurrent_adds_both_stay_live(keyword_root: Path, tmp_path: Path, caplog):
    """The first add is held inside its encoding (after it read ``current``); the second must wait for
    it and append to its version, not to the one both started from."""
    before = current_ids(keyword_root)
    encoder = ServiceKeywordEncoder()
    encoder.hold_next_call()
    first_file = documents_file(tmp_path / "first.jsonl", ["a1", "a2"])
    second_file = documents_file(tmp_path / "second.jsonl", ["b1", "b2", "b3"])
    errors: list[BaseException] = []

    def add(data: Path) -> None:
        try:
            add_documents(keyword_root, data, MODEL_NAME, device="cpu", progress=False)
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="index.layout")
    with keyword_model(encoder):
        first = threading.Thread(target=add, args=(first_file,))
        first.start()
        assert encoder.entered.wait(30), "the first add never started encoding"
        second = threading.Thread(target=add, args=(second_file,))
        second.start()
        second.join(timeout=2)  # without the lock, the second add finishes here, from the old version
        encoder.release.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert not errors
    assert current_ids(keyword_root) == before | {"a1", "a2", "b1", "b2", "b3"}
    assert any("waiting for another writer" in record.getMessage() for record in caplog.records)


def test_an_add_and_a_build_at_once_keep_a_consistent_current(keyword_root: Path, tmp_path: Path):
    """A build that publishes while an add is encoding waits for the add; ``current`` is then the build."""
    encoder = ServiceKeywordEncoder()
    encoder.hold_next_call()
    extra = documents_file(tmp_path / "extra.jsonl", ["a1"])
    added = threading.Thread(
        target=add_documents, args=(keyword_root, extra, MODEL_NAME), kwargs={"device": "cpu", "progress": False}
    )
    with keyword_model(encoder):
        added.start()
        assert encoder.entered.wait(30)
        new_data = write_data(tmp_path / "data2", extra=2)
        built = threading.Thread(target=build_keyword_index, args=(new_data, keyword_root))
        built.start()
        built.join(timeout=2)
        assert built.is_alive(), "the build published while an add held the root"
        encoder.release.set()
        added.join(timeout=60)
        built.join(timeout=60)
    manifest = IndexManifest.read(resolve_version(keyword_root))
    assert manifest.history == []  # the build came last and replaced the whole corpus
    assert current_ids(keyword_root) >= {"n0", "n1"}


# --- 2. publish and prune interleaved -----------------------------------------------------


def test_a_prune_never_deletes_the_version_another_writer_is_publishing(
    keyword_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """Writer A renames its version into place; before it swaps ``current``, writer B publishes and prunes
    with keep=1. Without the lock B deletes A's new folder and A points ``current`` at nothing."""
    (keyword_root / VERSIONS / ".a").mkdir()
    (keyword_root / VERSIONS / ".b").mkdir()
    older, newer = new_version_name(), new_version_name()
    a_renamed, a_may_go_on = threading.Event(), threading.Event()
    real_symlink = os.symlink

    def symlink(target, link, *args, **kwargs):
        if Path(target).name == older:  # A, between its rename and its swap of `current`
            a_renamed.set()
            a_may_go_on.wait(10)
        return real_symlink(target, link, *args, **kwargs)

    monkeypatch.setattr(layout.os, "symlink", symlink)

    def writer(staging: str, name: str) -> None:
        with WriterLock(keyword_root) as lock:
            publish_version(lock, keyword_root / VERSIONS / staging, name, keep=1)

    a = threading.Thread(target=writer, args=(".a", older))
    a.start()
    assert a_renamed.wait(10)
    b = threading.Thread(target=writer, args=(".b", newer))
    b.start()
    b.join(timeout=1)
    a_may_go_on.set()
    a.join(timeout=10)
    b.join(timeout=10)
    assert (keyword_root / CURRENT).resolve().is_dir(), "current points at a deleted version"
    assert (keyword_root / CURRENT).resolve().name == newer


def test_publish_and_prune_refuse_to_run_without_the_lock(keyword_root: Path, tmp_path: Path):
    lock = WriterLock(keyword_root)
    with pytest.raises(RuntimeError, match="WriterLock"):
        publish_version(lock, tmp_path, new_version_name(), keep=1)
    with pytest.raises(RuntimeError, match="WriterLock"):
        layout.prune_versions(lock, keep=1)


# --- 3. a full disk and a read-only root ------------------------------------------------------


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real, small tmpfs at ``where`` (root with CAP_SYS_ADMIN, as in CI; skipped elsewhere)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def build_cli(data: Path, root: Path) -> int:
    with keyword_model():
        return main(
            ["index", "build", "--data", str(data), "--index", str(root), "--model", MODEL_NAME, "--dims",
             ",".join(map(str, DIMS)), "--device", "cpu", "--no-progress"]
        )  # fmt: skip


def fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    with (folder / "filler").open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def assert_one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mrl: error: cannot write "), err
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


@contextmanager
def index_on_tmpfs(tmp_path: Path, capsys) -> Iterator[tuple[Path, Path, Path]]:
    """A keyword index built on a small tmpfs of its own: (the mount, the index root, its served version)."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        root = disk / "index"
        assert build_cli(write_data(tmp_path / "data"), root) == 0
        capsys.readouterr()
        yield disk, root, resolve_version(root)


def test_a_full_disk_during_a_build_is_one_line_and_current_stays(tmp_path: Path, capsys):
    with index_on_tmpfs(tmp_path, capsys) as (disk, root, served):
        fill(disk)
        assert build_cli(write_data(tmp_path / "data2", extra=3), root) == 2
        assert_one_line_error(capsys, "No space left on device", str(root))
        assert resolve_version(root) == served
        open_index(root, device="cpu").close()  # still whole
        assert not list((root / VERSIONS).glob(".building-*"))


def test_a_read_only_root_is_one_line_for_build_and_add(tmp_path: Path, capsys):
    with index_on_tmpfs(tmp_path, capsys) as (disk, root, served):
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert build_cli(write_data(tmp_path / "data2", extra=3), root) == 2
        assert_one_line_error(capsys, "Read-only file system", str(root))
        extra = documents_file(tmp_path / "extra.jsonl", ["a1"])
        with keyword_model():
            code = main(["index", "add", "--index", str(root), "--data", str(extra), "--model", MODEL_NAME,
                         "--device", "cpu", "--no-progress"])  # fmt: skip
        assert code == 2
        assert_one_line_error(capsys, "Read-only file system")
        assert resolve_version(root) == served


def test_a_missing_index_for_add_is_named_and_not_created(tmp_path: Path, capsys):
    extra = documents_file(tmp_path / "extra.jsonl", ["a1"])
    assert main(["index", "add", "--index", str(tmp_path / "nowhere"), "--data", str(extra)]) == 2
    assert capsys.readouterr().err.strip() == f"mrl: error: {tmp_path / 'nowhere'}: index not found"
    assert not (tmp_path / "nowhere").exists()


# --- 4. a corpus that is not UTF-8 ------------------------------------------------------------


def test_a_corpus_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path: Path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"_id": "d1", "text": "fine"}\n{"_id": "d2", "text": "caf\xe9 au lait"}\n')
    assert main(["index", "build", "--data", str(corpus), "--index", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"mrl: error: {corpus}:2: not valid UTF-8 (byte 0xe9 at column 27); save the file as UTF-8"
    ]
    assert not (tmp_path / "index").exists()


def test_qrels_that_are_not_utf8_name_their_line(tmp_path: Path):
    from core.data import DataError, load_beir

    data = write_data(tmp_path / "data")
    qrels = data / "qrels" / "test.tsv"
    qrels.write_bytes(qrels.read_bytes() + b"q0\td\xff0\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:10: not valid UTF-8 \(byte 0xff at column 5\)"):
        load_beir(data, ["test"])

