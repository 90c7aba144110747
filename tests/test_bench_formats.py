"""``mrl bench formats`` on the bundled sample with the tiny random model, and the formats' own similarities."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.formats import FormatsConfig, formats_markdown, measure, top_rows
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS


def test_each_format_ranks_by_its_own_similarity():
    docs = np.packbits(np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]]), axis=1)
    query = np.packbits(np.array([[1, 1, 1, 0, 0, 0, 0, 0]]), axis=1)
    assert top_rows(query, docs, "ubinary", k=3).tolist() == [[0, 1, 2]]  # 7, 4 and 1 bits agree
    codes = np.array([[10, -5], [-3, 20], [0, 0]], dtype=np.int8)
    assert top_rows(np.array([[1, 2]], dtype=np.int8), codes, "int8", k=3).tolist() == [[1, 0, 2]]  # 37, then 0s


def test_formats_on_the_sample(tmp_path: Path, tiny_model: Path):
    report = measure(FormatsConfig(SAMPLE, model=str(tiny_model), out=tmp_path, progress=False))
    assert [row["dim"] for row in report["rows"]] == TINY_DIMS and report["queries"] == 120
    for row in report["rows"]:
        assert all(0 <= row[fmt] <= 1 for fmt in ("float", "int8", "ubinary"))
        assert (row["float_bytes"], row["int8_bytes"], row["ubinary_bytes"]) == (4 * row["dim"], row["dim"],
                                                                                  row["dim"] // 8)  # fmt: skip
    assert formats_markdown(report).startswith("# Quantised embeddings: NDCG@10 per dim and format")
