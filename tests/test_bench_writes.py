"""``mrl bench writes`` on the sample indexed with the tiny random model: a real writable server, a few writes.

Structure and sanity only (counts, positive rates, p50 ≤ p99, the report), never timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.writes import WritesConfig, run_writes, writes_markdown
from tests.helpers.sample import build_sample

pytestmark = pytest.mark.benchmark


def test_a_small_run_reports_ingestion_and_both_search_runs(tmp_path: Path, encode_cache: Path, tiny_model: Path):
    build_sample(tmp_path / "index", encode_cache, model=str(tiny_model))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"_id": f"n{i}", "title": f"Note {i}", "text": f"note {i} about gout"}) + "\n"
                            for i in range(16)))  # fmt: skip
    report = run_writes(WritesConfig(index=tmp_path / "index", data=data, documents=8, batch=4, searches=10))
    assert report["ingestion"]["documents"] == 8 and report["ingestion"]["passages"] == 8
    assert report["ingestion"]["documents_per_s"] > 0
    for run in ("idle", "under_writes"):
        figures = report["searches"][run]
        assert figures["count"] == 10 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert report["live_counts"]["documents"] >= 120 + 8
    assert "documents/s" in writes_markdown(report)
    assert not (tmp_path / "index" / "wal").exists()  # the original index is never written
