"""The write-ahead log of a living index, and the live lock: records round-trip bit for bit, every append is
synced before it returns, a torn last line is ignored (and cut off before the next append), a damaged line
elsewhere is an error naming the line, trims are atomic, and a second writer is refused naming the first."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import index.wal as wal_module
from core.data import Document
from index.manifest import IndexWriteError
from index.wal import (
    LIVE_LOCK,
    LiveLock,
    LiveLockHeld,
    WalCorruptError,
    WriteAheadLog,
    check_not_live,
    delete_record,
    upsert_record,
)
from tests.conftest import REPO

PASSAGES = [
    Document("a#0", "fever and cough", "A", {"year": 2001, "tags": ["x"]}, parent="a", start=0, end=15),
    Document("a#1", "rash \u00e9t\u00e9", "A", {"year": 2001}, parent="a", start=10, end=None),
    Document("b", "pain", "", {}),
]


def vectors(rows: int = 3, dim: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def test_records_round_trip_passages_and_vectors_bit_for_bit(tmp_path: Path):
    log = WriteAheadLog(tmp_path)
    written = vectors()
    assert log.append(upsert_record(PASSAGES, written)) == 1
    assert log.append(delete_record(["a", "zzz"])) == 2
    upsert, delete = list(WriteAheadLog(tmp_path).records())
    assert (upsert.seq, upsert.op, upsert.passages) == (1, "upsert", PASSAGES)
    assert upsert.vectors.dtype == np.float32 and np.array_equal(upsert.vectors, written)
    assert (delete.seq, delete.op, delete.doc_ids) == (2, "delete", ["a", "zzz"])
    assert [record.seq for record in WriteAheadLog(tmp_path).records(after_seq=1)] == [2]
    line = json.loads((tmp_path / "wal" / "log.jsonl").read_text().splitlines()[0])
    assert set(line) == {"seq", "op", "at", "passages", "dim", "vectors"} and line["dim"] == 5


def test_an_append_returns_only_after_the_line_and_the_new_file_are_synced(tmp_path: Path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(wal_module.os, "fsync", fsync)
    log = WriteAheadLog(tmp_path)
    log.append(delete_record(["a"]))
    assert synced == [str(tmp_path), str(tmp_path / "wal"), str(tmp_path / "wal" / "log.jsonl")]
    synced.clear()
    log.append(delete_record(["b"]))
    assert synced == [str(tmp_path / "wal" / "log.jsonl")]


def test_a_torn_last_line_is_ignored_logged_and_cut_off_before_the_next_append(tmp_path: Path, caplog):
    log = WriteAheadLog(tmp_path)
    log.append(upsert_record(PASSAGES, vectors()))
    log.close()
    path = tmp_path / "wal" / "log.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"seq": 2, "op": "delete", "doc_i')  # killed mid-write: never acknowledged
    caplog.set_level(logging.WARNING, logger="index.wal")
    reopened = WriteAheadLog(tmp_path)
    assert [record.seq for record in reopened.records()] == [1]
    assert f"{path}:2: ignoring a torn last line" in caplog.text
    assert reopened.last_seq == 1
    assert reopened.append(delete_record(["b"])) == 2
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[0] == whole and json.loads(lines[1])["doc_ids"] == ["b"] and len(lines) == 2


def test_a_damaged_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path: Path):
    log = WriteAheadLog(tmp_path)
    for name in "abc":
        log.append(delete_record([name]))
    path = tmp_path / "wal" / "log.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10] + "#garbage\n" + lines[2])
    with pytest.raises(WalCorruptError, match=rf"^{path}:2: corrupt write-ahead log line \(not JSON"):
        list(WriteAheadLog(tmp_path).records())
    path.write_text(lines[0] + lines[2] + lines[1])
    with pytest.raises(WalCorruptError, match=rf"^{path}:3: seq 2 follows 3$"):
        list(WriteAheadLog(tmp_path).records())


def test_trim_keeps_only_later_records_and_numbering_goes_on(tmp_path: Path):
    log = WriteAheadLog(tmp_path)
    for name in "abcd":
        log.append(delete_record([name]))
    assert log.trim(2) == 2
    assert [record.doc_ids for record in log.records()] == [["c"], ["d"]]
    assert log.append(delete_record(["e"])) == 5  # the append descriptor follows the renamed file
    assert [record.seq for record in WriteAheadLog(tmp_path).records()] == [3, 4, 5]
    assert log.trim(5) == 0 and (tmp_path / "wal" / "log.jsonl").read_bytes() == b""
    assert log.append(delete_record(["f"])) == 6
    assert sorted(p.name for p in (tmp_path / "wal").iterdir()) == ["log.jsonl"]


def test_an_empty_log_numbers_on_from_the_applied_seq_and_leftovers_go(tmp_path: Path):
    log = WriteAheadLog(tmp_path, floor_seq=41)
    assert log.last_seq == 41 and log.first_seq is None and log.size_bytes == 0
    assert log.append(delete_record(["a"])) == 42
    leftover = tmp_path / "wal" / ".log.jsonl.999.tmp"
    leftover.write_bytes(b"half a trim")
    log.remove_leftovers()
    assert not leftover.exists()


def test_a_full_disk_is_one_line_and_leaves_the_log_whole(tmp_path: Path, monkeypatch):
    log = WriteAheadLog(tmp_path)
    log.append(delete_record(["a"]))
    before = (tmp_path / "wal" / "log.jsonl").read_bytes()
    real = os.write

    def half_then_full(fd: int, data) -> int:
        if len(data) > 20:
            return real(fd, bytes(data[:20]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wal_module.os, "write", half_then_full)
    with pytest.raises(IndexWriteError) as raised:
        log.append(upsert_record(PASSAGES, vectors()))
    assert str(raised.value) == f"cannot write {tmp_path / 'wal' / 'log.jsonl'}: No space left on device"
    monkeypatch.undo()
    assert (tmp_path / "wal" / "log.jsonl").read_bytes() == before
    assert log.append(delete_record(["b"])) == 2


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path: Path):
    with LiveLock(tmp_path) as first:
        assert first.held
        with pytest.raises(LiveLockHeld) as raised:
            LiveLock(tmp_path, "mrl index compact").acquire()
        owner = f"a writable server (pid {os.getpid()}) owns this index"
        assert str(raised.value) == f"{tmp_path}: {owner}: write through its API, or stop it first"
        with pytest.raises(LiveLockHeld, match="a writable server"):
            check_not_live(tmp_path)
    check_not_live(tmp_path)  # released
    check_not_live(tmp_path / "nowhere")  # no lock file: nobody writes it


def test_the_lock_of_another_process_names_its_pid_and_goes_when_it_dies(tmp_path: Path):
    code = (
        "import sys, time; from pathlib import Path; from index.wal import LiveLock\n"
        "LiveLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LiveLockHeld, match=rf"\(pid {holder.pid}\) owns this index"):
            LiveLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with LiveLock(tmp_path, "mrl index compact"):  # the kernel released it with the process
        assert (tmp_path / LIVE_LOCK).read_text() == f"{os.getpid()} mrl index compact\n"
