"""``mrl bench writes`` on the sample indexed with the tiny random model: a real writable server, a few writes.

Structure and sanity only (counts, positive rates, p50 ≤ p99, the report), never timings; and that the index
benchmarked is never written (a folder is copied; an index in Milvus is copied into a scratch index).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.writes import WritesConfig, run_writes, writes_markdown
from index.build import BuildConfig, build_index
from index.locator import parse_locator
from index.stores import open_store
from tests.helpers.sample import SAMPLE, build_sample

pytestmark = pytest.mark.benchmark

SAMPLE_DOCUMENTS = 120


def notes(tmp_path: Path) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"_id": f"n{i}", "title": f"Note {i}", "text": f"note {i} about gout"}) + "\n"
                            for i in range(16)))  # fmt: skip
    return data


def check_report(report: dict, engine: str) -> None:
    assert report["engine"] == engine
    assert report["ingestion"]["documents"] == 8 and report["ingestion"]["passages"] == 8
    assert report["ingestion"]["documents_per_s"] > 0
    for run in ("idle", "under_writes"):
        figures = report["searches"][run]
        assert figures["count"] == 10 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert report["live_counts"]["documents"] >= SAMPLE_DOCUMENTS + 8
    markdown = writes_markdown(report)
    assert "documents/s" in markdown and markdown.startswith(f"# Writes on {engine}:")


def test_a_small_run_reports_ingestion_and_both_search_runs(tmp_path: Path, encode_cache: Path, tiny_model: Path):
    build_sample(tmp_path / "index", encode_cache, model=str(tiny_model))
    report = run_writes(WritesConfig(index=tmp_path / "index", data=notes(tmp_path), documents=8, batch=4, searches=10))
    check_report(report, "FAISS")
    assert not (tmp_path / "index" / "wal").exists()  # the original index is never written


def test_a_small_run_on_milvus_lite_writes_a_scratch_copy_and_leaves_the_index_as_it_was(
    tmp_path: Path, encode_cache: Path, tiny_model: Path, milvus_lite_uri: str
):
    """The index is copied into a Milvus Lite file of the run's own (a second process cannot open the user's
    while this one holds it), served from there and removed with it: the user's index keeps its version, its
    records and its collections, takes no writer and no lease, and holds the passages it was built with."""
    locator = f"milvus-lite://{milvus_lite_uri}/benched"
    build_index(BuildConfig(data=SAMPLE, index=locator, model=str(tiny_model), keep_versions=1, progress=False,
                            cache_dir=encode_cache))  # fmt: skip
    store = open_store(parse_locator(locator))
    try:
        before = (store.current(), store.versions(), store.backend.all_collections())
        report = run_writes(WritesConfig(index=locator, data=notes(tmp_path), documents=8, batch=4, searches=10))
        check_report(report, "Milvus Lite")
        scratch = parse_locator(report["scratch_index"])
        assert scratch.uri != milvus_lite_uri and not Path(scratch.uri).exists()  # its own file, removed
        assert (store.current(), store.versions(), store.backend.all_collections()) == before
        assert store.writer() is None
        loaded = store.open(store.current(), lease=False)
        try:
            assert len(loaded.rows()) == loaded.manifest.num_vectors  # no write reached it
        finally:
            loaded.close()
    finally:
        store.close()


def test_a_failed_run_on_milvus_lite_leaves_no_scratch_copy_behind(
    tmp_path: Path, encode_cache: Path, tiny_model: Path, milvus_lite_uri: str, monkeypatch: pytest.MonkeyPatch
):
    """A run that fails once the copy is served (a dim the index does not have: the first search answers 422)
    still removes the copy, and the index keeps its collections."""
    import tempfile

    from core.errors import ConfigError

    locator = f"milvus-lite://{milvus_lite_uri}/failed"
    build_index(BuildConfig(data=SAMPLE, index=locator, model=str(tiny_model), keep_versions=1, progress=False,
                            cache_dir=encode_cache))  # fmt: skip
    store = open_store(parse_locator(locator))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    try:
        before = store.backend.all_collections()
        with pytest.raises(ConfigError, match="search 0 answered 422"):
            run_writes(WritesConfig(index=locator, data=notes(tmp_path), documents=8, batch=4, searches=10, dim=7))
        assert list(work.iterdir()) == []
        assert store.backend.all_collections() == before and store.writer() is None
    finally:
        store.close()
