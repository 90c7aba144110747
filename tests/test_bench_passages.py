"""``mrl bench passages`` on a tiny long-document set with answer spans, with the tiny random model.

The model's vectors mean nothing; what is checked is the measurement: spans, coverage, grouping,
the report and the plot. ``answer_in_context`` is checked exactly on hand-made rankings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.passages import (
    PassagesConfig,
    answer_in_context,
    passages_markdown,
    run_passages,
    write_passages_report,
)
from core.data import Document
from tests.conftest import write_beir

SECTION = "Symptoms include pain and swelling in the joint, often at night, with redness and warmth around it."


def write_pages(root: Path) -> Path:
    pages, queries, qrels, answers = [], [], [], []
    for page in range(4):
        sections = [f"Part {part} of topic {page}. " + SECTION * 3 for part in range(6)]
        text = "\n\n".join(sections)
        pages.append({"_id": f"P{page}", "title": f"Topic {page}", "text": text})
        for part in (0, 5):  # an answer at the top and one at the bottom of each page
            start = text.index(f"Part {part} of topic {page}.")
            qid = f"Q{page}_{part}"
            queries.append({"_id": qid, "text": f"part {part} topic {page} symptoms"})
            qrels.append((qid, f"P{page}", 1))
            answers.append({"query-id": qid, "corpus-id": f"P{page}", "start": start, "end": start + 120})
    folder = write_beir(root, pages, queries, {"test": qrels})
    (folder / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return folder


def test_answer_in_context_counts_coverage_of_at_least_half_the_answer():
    passages = [
        Document("P#0", "x" * 100, parent="P", start=0, end=100),
        Document("P#1", "x" * 100, parent="P", start=90, end=190),
        Document("Q", "y" * 50),
    ]
    spans = [p.span for p in passages]
    answers = {"a": ("P", 150, 200), "b": ("P", 0, 40), "c": ("Q", 0, 10)}
    rows = np.array([[2, 0, 1], [1, 2, 0], [2, 0, 1]])  # a: covered 40/50 by the third hit; b: by the third
    found = answer_in_context(rows, ["a", "b", "c"], answers, passages, spans)
    assert found == {"1": round(1 / 3, 4), "3": 1.0, "5": 1.0}


@pytest.mark.benchmark
def test_a_run_on_tiny_pages_reports_every_setting_and_plan(tmp_path: Path, tiny_model: Path):
    data = write_pages(tmp_path / "pages")
    config = PassagesConfig(data=data, model=str(tiny_model), chunk_sizes=[0, 48], overlap=8, distractors=0,
                            out=tmp_path / "out", progress=False)  # fmt: skip
    report = run_passages(config)
    whole, split = report["chunk_settings"]
    assert whole["vectors"] == 4 and whole["chunking"]["over_window"] == 4  # the tiny model reads 126 tokens
    assert split["vectors"] > 4 and split["chunking"]["split_documents"] == 4
    for setting in report["chunk_settings"]:
        plans = [row["plan"] for row in setting["results"]]
        assert plans == ["64", "32", "32>64x10"]
        for row in setting["results"]:
            shares = [row["answer_in_context"][k] for k in ("1", "3", "5")]
            assert shares == sorted(shares) and all(0 <= share <= 1 for share in shares)
            assert 0 < row["page_ndcg_at_10"] <= 1
    paths = write_passages_report(report, config.out)
    assert [path.name for path in paths] == ["passages.json", "passages.md", "passages.png"]
    assert "≤ 48 tokens" in passages_markdown(report) and "whole pages" in passages_markdown(report)
