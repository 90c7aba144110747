"""Long documents become passages the model reads whole; hits grouped by document.

The tokenizer is the default model's own (no weights needed); one test runs the real model end to end
and finds the last sentence of a long document, which an unsplit index cuts off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.data import Document
from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from core.models import SentenceTransformerEncoder, load_model
from index.backends import FaissIndex
from index.build import BuildConfig, build_index
from index.chunking import ChunkReport, ChunkSettings, chunk_documents
from index.loaded import open_index
from index.params import IndexPlan
from index.search import staged_search
from mrl.cli import main
from tests.conftest import SAMPLE, write_beir
from tests.helpers.service import minilm_tokenizer

WINDOW = 254  # all-MiniLM-L6-v2: 256 tokens less [CLS] and [SEP]
SENTENCES = [
    "Gout is a form of arthritis that causes sudden attacks of pain.",
    "The big toe is often affected first, and the joint becomes red and swollen.",
    "Attacks tend to start at night and can last for days.",
    "Uric acid crystals build up in the joint when levels in the blood stay high.",
    "Drinking water and avoiding large meals rich in purines may help.",
]


def long_text(paragraphs: int = 12, last: str = "") -> str:
    body = "\n\n".join(" ".join(SENTENCES[(p + i) % len(SENTENCES)] for i in range(4)) for p in range(paragraphs))
    return body + ("\n\n" + last if last else "")


def tokens(text: str) -> int:
    return len(minilm_tokenizer()(text, add_special_tokens=False)["input_ids"])


def test_passages_reproduce_their_span_and_fit_the_window_with_their_title():
    document = Document("gout", long_text(), "Gout: a long leaflet", {"topic": "Gout"})
    passages, report = chunk_documents([document], minilm_tokenizer(), WINDOW, ChunkSettings(64, 8))
    assert len(passages) > 3 and report.split_documents == 1 and report.passages == len(passages)
    for number, passage in enumerate(passages):
        assert passage.id == f"gout#{number}" and passage.doc_id == "gout" and passage.parent == "gout"
        assert document.text[passage.start : passage.end] == passage.text  # the span is exact
        assert passage.title == document.title and passage.metadata == {"topic": "Gout"}
        assert tokens(passage.passage) <= 64  # title and text together
    assert passages[0].start == 0 and passages[-1].end == len(document.text)
    for before, after in zip(passages, passages[1:], strict=False):
        assert after.start < before.end  # they overlap: nothing falls between two passages


def test_a_passage_ends_at_a_paragraph_break_when_one_is_in_reach():
    document = Document("gout", long_text())
    passages, _ = chunk_documents([document], minilm_tokenizer(), WINDOW, ChunkSettings(128, 16))
    for passage in passages[:-1]:
        assert document.text[passage.end : passage.end + 2] == "\n\n", passage.text[-60:]


def test_a_document_that_fits_stays_whole_under_its_own_id():
    short = Document("d1", SENTENCES[0], "Gout")
    passages, report = chunk_documents([short], minilm_tokenizer(), WINDOW, ChunkSettings())
    assert passages == [short] and passages[0].doc_id == "d1" and passages[0].span == (0, len(SENTENCES[0]))
    assert report == ChunkReport(size=WINDOW, overlap=32, window=WINDOW, documents=1, passages=1,
                                 split_documents=0, over_window=0)  # fmt: skip


def test_with_chunking_off_long_documents_are_counted_not_cut_silently():
    documents = [Document("long", long_text(30)), Document("short", SENTENCES[1])]
    passages, report = chunk_documents(documents, minilm_tokenizer(), WINDOW, ChunkSettings(0))
    assert passages == documents and report.over_window == 1 and report.size == 0
    assert "1 of 2 documents are longer than the model's window (254 tokens)" in report.describe()


@pytest.mark.parametrize(("size", "overlap"), [(-1, 0), (64, 32), (64, -1)])
def test_bad_chunk_settings_are_refused(size, overlap):
    with pytest.raises(ConfigError, match="--chunk-"):
        ChunkSettings(size, overlap)


def test_the_cli_refuses_bad_chunk_settings_in_one_line(tmp_path: Path, capsys):
    argv = ["index", "build", "--data", str(SAMPLE), "--index", str(tmp_path / "i"), "--chunk-overlap", "200"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar: its window decides
    assert error.startswith("mrl: error: --chunk-overlap must be below half of the passage size (254 tokens)")


def grouped_by_brute_force(vectors, queries, groups, dim, k):
    scores = truncate_normalize(queries, dim) @ truncate_normalize(vectors, dim).T
    expected = []
    for row_scores in scores:
        best: dict[str, tuple[float, int]] = {}
        for row in np.argsort(-row_scores, kind="stable"):
            best.setdefault(groups[row], (row_scores[row], int(row)))
        expected.append([row for _, row in sorted(best.values(), key=lambda item: -item[0])[:k]])
    return expected


@pytest.mark.parametrize("rerank_dim", [None, 32])
def test_grouped_search_returns_the_best_passage_of_k_distinct_documents(rerank_dim):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(600, 32)).astype(np.float32)
    queries = rng.normal(size=(5, 32)).astype(np.float32)
    groups = [f"doc{row // 20}" for row in range(600)]  # 30 documents of 20 passages: many hits share one
    dim = 16
    index = FaissIndex.build(truncate_normalize(vectors, dim), IndexPlan("Flat", {}))
    found = staged_search(index, vectors, queries, dim, 8, rerank_dim, candidates=600,
                          group=lambda rows: [groups[row] for row in rows])  # fmt: skip
    expected = grouped_by_brute_force(vectors, queries, groups, rerank_dim or dim, 8)
    assert [list(rows) for rows in found.rows] == expected
    assert all(len({groups[row] for row in rows}) == 8 for rows in found.rows)


@pytest.mark.slow
def test_the_last_sentence_of_a_long_document_is_found_with_its_span(tmp_path: Path, encode_cache: Path):
    """The real model: the sentence sits past the first 254 tokens; split, it is found; unsplit, it is not."""
    last = "Cherries were once suggested as a remedy, though the evidence for them is weak."
    corpus = [{"_id": "leaflet", "title": "Gout in depth", "text": long_text(14, last)}]
    corpus += [{"_id": f"d{i}", "title": "Other", "text": SENTENCES[i]} for i in range(5)]
    queries = [{"_id": "q", "text": "do cherries help gout"}]
    data = write_beir(tmp_path / "data", corpus, queries, {"test": [("q", "leaflet", 1)]})
    query = "are cherries a remedy for gout?"
    found = {}
    for name, size in (("split", None), ("whole", 0)):
        config = BuildConfig(data=data, output=tmp_path / name, device="cpu", progress=False, cache_dir=encode_cache,
                             chunk_size=size)  # fmt: skip
        folder, manifest = build_index(config)
        loaded = open_index(folder, device="cpu")
        try:
            encoder = SentenceTransformerEncoder(load_model(None), "default", 8, False)
            vector = encoder.encode_queries([query])
            hits = staged_search(loaded.indexes[384], loaded.vectors, vector, 384, 1)
            found[name] = (loaded.store.get([int(hits.rows[0, 0])])[0], float(hits.scores[0, 0]), manifest)
        finally:
            loaded.close()
    passage, score, manifest = found["split"]
    assert passage.doc_id == "leaflet" and last in passage.text
    start, end = passage.span
    assert long_text(14, last)[start:end] == passage.text
    assert manifest.chunking["split_documents"] == 1
    whole, whole_score, whole_manifest = found["whole"]
    assert whole_manifest.chunking["over_window"] == 1  # counted, and reported
    assert score > whole_score + 0.1 or whole.doc_id != "leaflet"
