"""``mrl bench agreement`` on two tiny keyword datasets, and its prediction errors on hand-made points.

The keyword encoder stands in for the model (``tests.helpers.service.keyword_model``): what is checked is
the measurement (a sampled dataset, every plan's ratio beside each label-free figure, leave-one-dataset-out
fits, the report and the plot), not the figures of a real model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import core.models as models_module
from benchmarks.agreement import (
    AgreementConfig,
    agreement_markdown,
    plot_agreement,
    prediction_errors,
    run_agreement,
    sample_dataset,
)
from tests.conftest import KeywordEncoder, write_beir
from tests.helpers.service import MODEL_NAME, VOCABULARY, keyword_model, stand_in_model, write_data


def points(dataset: str, xs: list[float]) -> list[dict]:
    """Plans of one dataset whose ratio is exactly 0.4 + 0.6 × agreement (overlap: the agreement itself)."""
    return [
        {"dataset": dataset, "model": "m", "plan": str(i), "ndcg_at_10": 0.5, "ratio": 0.4 + 0.6 * x,
         "label_free": {"random-held": {"agreement": x, "overlap": x}}}
        for i, x in enumerate(xs)
    ]  # fmt: skip


def test_prediction_errors_raw_and_fitted_on_the_other_datasets():
    rows = points("a", [1.0, 0.5, 0.2]) + points("b", [1.0, 0.8]) + points("c", [0.9, 0.3])
    errors = {e["measure"]: e for e in prediction_errors(rows)}
    agreement = errors["agreement"]
    raw = [abs(x - (0.4 + 0.6 * x)) for x in (1.0, 0.5, 0.2, 1.0, 0.8, 0.9, 0.3)]
    assert agreement["points"] == 7 and agreement["raw_mae"] == pytest.approx(sum(raw) / 7, abs=1e-4)
    assert agreement["mapped_mae"] == pytest.approx(0.0, abs=1e-4)  # the same line on every dataset: fits exactly
    assert agreement["fit_all"] == {"intercept": 0.4, "slope": 0.6} and agreement["correlation"] == 1.0
    skewed = points("a", [1.0, 0.5]) + points("b", [1.0, 0.5])
    skewed[1]["ratio"] = 0.9  # dataset a alone is off the line: only its own points are mispredicted
    fitted = {e["measure"]: e for e in prediction_errors(skewed)}["agreement"]
    assert fitted["mapped_mae"] is None  # two points per side: too few to fit on the others


def test_a_dataset_sample_keeps_the_judged_documents(tmp_path: Path):
    source = write_data(tmp_path / "source", extra=20)
    target = tmp_path / "sample"
    assert sample_dataset(source, target, max_queries=3, max_docs=10, seed=0) == 10
    qrels = (target / "qrels" / "test.tsv").read_text().splitlines()[1:]
    corpus = {json.loads(line)["_id"] for line in (target / "corpus.jsonl").read_text().splitlines()}
    assert len(qrels) == 3 and {line.split("\t")[1] for line in qrels} <= corpus


def write_keyword_dataset(folder: Path, seed: int) -> Path:
    """30 documents of two or three keywords each (distinct sentences), 8 questions of one keyword each."""
    rng = random.Random(seed)
    docs = []
    for i in range(30):
        a, b, c = rng.sample(VOCABULARY, 3)
        docs.append({"_id": f"d{i}", "title": f"Leaflet about {a} number {i}",
                     "text": f"Notes on {a} and {b} for day {i}. More words about {c} {c} here today."})  # fmt: skip
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(VOCABULARY)]
    qrels = [(f"q{i}", doc["_id"], 1) for i, word in enumerate(VOCABULARY) for doc in docs if word in doc["text"]]
    return write_beir(folder, docs, queries, {"test": qrels})


def test_agreement_benchmark_on_two_keyword_datasets(tmp_path: Path, monkeypatch):
    root = tmp_path / "datasets"
    for seed, name in enumerate(("one", "two")):
        write_keyword_dataset(root / name, seed)
    monkeypatch.setattr(models_module, "load_model", lambda *a, **k: stand_in_model())
    monkeypatch.setattr(models_module, "SentenceTransformerEncoder", lambda *a, **k: KeywordEncoder(VOCABULARY))
    config = AgreementConfig(root, ["one", "two"], ["base"], max_queries=8, max_docs=30, pseudo_queries=20,
                             dims=[8, 4, 2], out=tmp_path / "out", progress=False)  # fmt: skip
    with keyword_model():
        report = run_agreement(config)
    rows = report["rows"]
    assert {row["dataset"] for row in rows} == {"one", "two"} and {row["model"] for row in rows} == {"base"}
    full = [row for row in rows if row["plan"] == "8"]
    assert all(row["ratio"] == 1.0 for row in full)
    assert set(rows[0]["label_free"]) >= {"random-held", "random", "first-held", "first", "title-held", "title"}
    for row in rows:
        for figures in row["label_free"].values():
            assert 0 <= figures["overlap"] <= 1 and 0 <= figures["agreement"] <= 1
    assert {e["variant"] for e in report["errors"]} == set(rows[0]["label_free"])
    assert all(e["mapped_mae"] is not None for e in report["errors"])  # two datasets: each fitted on the other
    table = agreement_markdown(report)
    assert table.startswith("# Label-free agreement against the real NDCG@10 ratio")
    assert "| one | base | 8 |" in table and "| random-held | agreement |" in table
    assert plot_agreement(report, tmp_path / "out" / "agreement.png").stat().st_size > 0
    assert MODEL_NAME == "keywords"  # the stand-in named in every manifest
