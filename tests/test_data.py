from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import DataError, Pair, load_beir, load_pairs
from tests.conftest import write_beir


def test_load_beir_reads_everything(tiny_beir: Path):
    dataset = load_beir(tiny_beir)
    assert dataset.name == "tiny"
    assert list(dataset.corpus) == ["d0", "d1", "d2", "d3"]
    assert set(dataset.qrels) == {"test", "train"}
    assert dataset.split("train")["t2"] == {"d2": 1}
    assert dataset.pairs("train")[0] == Pair("fever remedies", "advice about fever at home")


def test_passage_joins_title_and_text(tmp_path: Path):
    root = write_beir(
        tmp_path / "d",
        [{"_id": "a", "title": "Gout", "text": "Joint pain."}],
        [{"_id": "q", "text": "toe"}],
        {"train": [("q", "a", 1)]},
    )
    assert load_beir(root).corpus["a"].passage == "Gout Joint pain."


def test_pairs_skip_zero_relevance(tmp_path: Path):
    corpus = [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}]
    root = write_beir(tmp_path / "d", corpus, [{"_id": "q", "text": "z"}], {"train": [("q", "a", 1), ("q", "b", 0)]})
    assert load_beir(root).pairs("train") == [Pair("z", "x")]


def test_only_requested_splits_are_read(tiny_beir: Path):
    (tiny_beir / "qrels" / "dev.tsv").write_text("garbage\n")
    assert set(load_beir(tiny_beir, ["test"]).qrels) == {"test"}
    with pytest.raises(DataError, match="no split 'dev' "):
        load_beir(tiny_beir, ["test"]).split("dev")


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("file", "line", "content", "message"),
    [
        ("corpus.jsonl", 2, '{"_id": "d1", "text": ', "invalid JSON"),
        ("corpus.jsonl", 3, json.dumps({"_id": "d0", "text": "again"}), "duplicate id 'd0'"),
        ("corpus.jsonl", 4, json.dumps({"_id": "d3", "text": "  "}), "field 'text' is missing or empty"),
        ("corpus.jsonl", 1, json.dumps(["not", "an", "object"]), "expected a JSON object"),
        ("queries.jsonl", 2, json.dumps({"text": "no id"}), "field '_id' is missing"),
        ("queries.jsonl", 3, json.dumps({"_id": "q2", "text": ""}), "field 'text' is missing or empty"),
        ("qrels/test.tsv", 3, "q1\tnope\t1", "unknown corpus id 'nope'"),
        ("qrels/test.tsv", 2, "missing\td0\t1", "unknown query id 'missing'"),
        ("qrels/test.tsv", 4, "q2\td2\thigh", "score 'high' is not an integer"),
        ("qrels/test.tsv", 5, "q3\td3", "expected 3 tab-separated columns, got 2"),
        ("qrels/test.tsv", 3, "q0\td0\t1", r"duplicate judgement for \('q0', 'd0'\)"),
    ],
)
def test_bad_data_names_file_and_line(tiny_beir: Path, file, line, content, message):
    _replace_line(tiny_beir / file, line, content)
    with pytest.raises(DataError, match=rf"{file}:{line}: {message}"):
        load_beir(tiny_beir)


def test_missing_files_are_named(tiny_beir: Path, tmp_path: Path):
    with pytest.raises(DataError, match="nowhere: dataset folder not found"):
        load_beir(tmp_path / "nowhere")
    (tiny_beir / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"queries.jsonl: file not found"):
        load_beir(tiny_beir)


def test_missing_split_file(tiny_beir: Path):
    with pytest.raises(DataError, match=r"qrels/dev.tsv: file not found"):
        load_beir(tiny_beir, ["dev"])


def test_load_pairs(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n\n")
    assert load_pairs(path) == [Pair("q", "p", "n")]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"query": "q"}], r"pairs.jsonl:1: field 'positive' is missing or empty"),
        (
            [{"query": "q", "positive": "p"}, {"query": "q2", "positive": "p", "negative": "n"}],
            r"pairs.jsonl:2: either every pair has a 'negative' or none has",
        ),
        ([], r"pairs.jsonl: no pairs"),
    ],
)
def test_bad_pairs(tmp_path: Path, lines, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError, match=message):
        load_pairs(path)


def test_sampled_training_pairs_are_seeded_and_keep_file_order():
    from training.train import sample_pairs

    pairs = [Pair(f"q{i}", f"p{i}") for i in range(50)]
    first, again, other = sample_pairs(pairs, 10, 1), sample_pairs(pairs, 10, 1), sample_pairs(pairs, 10, 2)
    assert first == again and first != other and len(first) == 10
    assert [pairs.index(p) for p in first] == sorted(pairs.index(p) for p in first)
    with pytest.raises(ValueError, match="at least 1"):
        sample_pairs(pairs, 0, 1)
