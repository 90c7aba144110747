"""``mrl bench strategies``: the pure helpers exactly, and one whole run on the bundled sample.

The run trains every strategy of the tiny random model (``tiny_model``: two layers, so one is
frozen) for two steps, each in its own ``mrl train`` process as the benchmark does, and checks
what the comparison promises: the parameter counts order as the strategies say, the LoRA artifact
is a small adapter, the base row equals a direct evaluation, and a second run reuses the models
while a changed recipe is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.strategies import (
    StrategiesBenchConfig,
    check_config,
    expected_settings,
    scored_subset,
    settings_mismatch,
    train_arguments,
)
from core.data import DataError, load_beir
from mrl.cli import main
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS


def test_scored_subset_keeps_every_judged_document_and_fills_with_drawn_ones():
    dataset = load_beir(SAMPLE, ["test"])
    subset = scored_subset(dataset, "test", max_queries=10, max_docs=30, seed=1)
    qrels = subset.split("test")
    assert len(qrels) == 10 and set(subset.queries) == set(qrels)
    judged = {doc for docs in qrels.values() for doc in docs}
    assert judged <= set(subset.corpus) and len(subset.corpus) == 30
    assert list(qrels) == [q for q in dataset.split("test") if q in qrels]  # file order kept
    again = scored_subset(dataset, "test", max_queries=10, max_docs=30, seed=1)
    assert again.corpus.keys() == subset.corpus.keys() and again.queries == subset.queries
    whole = scored_subset(dataset, "test", None, None, seed=1)
    assert whole.corpus == dataset.corpus and whole.split("test") == dataset.split("test")


def test_each_strategy_gets_its_own_flags_on_the_shared_recipe(tmp_path: Path):
    config = StrategiesBenchConfig(data=SAMPLE, epochs=3, max_train_pairs=50, learning_rates={"lora": 1e-3})
    full = train_arguments(config, "full", tmp_path / "f")
    assert full[full.index("--lr") + 1] == "0.0001" and "--max-train-pairs" in full and "--lora" not in full
    lora = train_arguments(config, "lora", tmp_path / "l")
    assert lora[lora.index("--lr") + 1] == "0.001" and lora[lora.index("--lora-rank") + 1] == "16"
    freeze = train_arguments(config, "freeze", tmp_path / "z")
    assert freeze[freeze.index("--freeze-layers") + 1] == "3"
    assert "--gradual-unfreeze" in train_arguments(config, "gradual", tmp_path / "g")
    assert all(args[args.index("--epochs") + 1] == "3" for args in (full, lora, freeze))


def test_a_model_trained_with_another_recipe_is_named_by_what_differs():
    config = StrategiesBenchConfig(data=SAMPLE, epochs=2)
    report = {"settings": expected_settings(config, "full") | {"data": str(SAMPLE)}}
    report["settings"].pop("gradual_unfreeze")  # an older report without the switch: it was off
    assert settings_mismatch(report, config, "full") == []
    assert settings_mismatch(report, StrategiesBenchConfig(data=SAMPLE, epochs=3), "full") == ["epochs"]
    assert settings_mismatch(report, config, "freeze") == ["freeze_layers"]
    assert settings_mismatch(report, StrategiesBenchConfig(data=SAMPLE.parent, epochs=2), "full") == ["data"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategies": ["full", "adapters"]}, "--strategies takes some of full, freeze, lora, gradual"),
        ({"learning_rates": {"lora": 0.0}}, "--lr takes STRATEGY=RATE"),
        ({"max_docs": 0}, "--max-docs must be positive, got 0"),
    ],
)
def test_impossible_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(StrategiesBenchConfig(data=SAMPLE, **overrides))


def test_a_folder_that_is_not_beir_is_refused(tmp_path: Path):
    with pytest.raises(DataError, match="not a BEIR folder"):
        check_config(StrategiesBenchConfig(data=SAMPLE, ood=tmp_path))


def test_cli_refuses_a_bad_learning_rate_in_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "strategies", "--data", str(SAMPLE), "--lr", "lora", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "expected STRATEGY=RATE (e.g. lora=5e-4), got 'lora'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.benchmark
def test_every_strategy_trains_and_is_scored_in_and_out_of_domain(
    tiny_beir: Path, tmp_path: Path, tiny_model: Path, capsys
):
    from core.models import SentenceTransformerEncoder, load_model
    from training.evaluate import evaluate

    out, models = tmp_path / "report", tmp_path / "models"
    argv = ["bench", "strategies", "--data", str(SAMPLE), "--ood", str(tiny_beir), "--out", str(out),
            "--models-dir", str(models), "--base-model", str(tiny_model), "--strategies", "full,freeze,lora",
            "--epochs", "1", "--batch-size", "16", "--max-train-pairs", "32", "--freeze-layers", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "strategies.json").read_text())
    rows = {row["strategy"]: row for row in report["strategies"]}
    assert list(rows) == ["base", "full", "freeze", "lora"]
    dims = report["dims"]
    assert dims == TINY_DIMS
    for row in rows.values():
        assert set(row["scores"]) == {"in_domain", "out_of_domain"}
        assert all(set(row["scores"][role]) == {str(d) for d in dims} for role in row["scores"])

    # What each strategy trains, and what it ships.
    total = rows["full"]["total_parameters"]
    assert rows["full"]["trainable_parameters"] == total
    assert 0 < rows["lora"]["trainable_parameters"] < rows["freeze"]["trainable_parameters"] < total
    assert rows["lora"]["artifact"]["kind"] == "adapter"
    assert rows["lora"]["artifact"]["bytes"] < rows["full"]["artifact"]["bytes"] / 10
    assert rows["lora"]["artifact"]["merged_weights_bytes"] == rows["full"]["artifact"]["bytes"]
    for name in ("full", "freeze", "lora"):
        assert rows[name]["trained_now"] and rows[name]["train_seconds"] > 0 and rows[name]["rss_peak_mb"] > 0
        assert (models / f"sample_medical-{name}" / "training_report.json").is_file()

    # The base row is exactly what a direct evaluation of the base model gives.
    direct = evaluate(SentenceTransformerEncoder(load_model(str(tiny_model)), "base", 64, False),
                      load_beir(SAMPLE, ["test"]), "test", dims)  # fmt: skip
    for dim in dims:
        assert rows["base"]["scores"]["in_domain"][str(dim)]["ndcg@10"] == round(direct.metric(dim), 4)

    markdown = (out / "strategies.md").read_text()
    assert "| lora |" in markdown and "## Out of domain, NDCG@10 per dim" in markdown
    assert (out / "strategies.png").stat().st_size > 10_000
    assert "wrote strategies.json, strategies.md, strategies.png" in capsys.readouterr().out

    # A second run reuses the trained models and scores them from the cache: the same figures.
    assert main(argv) == 0
    again = json.loads((out / "strategies.json").read_text())
    assert not any(row.get("trained_now") for row in again["strategies"])
    assert [r["scores"] for r in again["strategies"]] == [r["scores"] for r in report["strategies"]]

    # Another recipe is refused rather than mixed with the old models.
    capsys.readouterr()
    assert main([*argv, "--lr", "full=0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mrl: error: {models / 'sample_medical-full'} was trained with other learning_rate; "
                   "pass --retrain to replace it"]  # fmt: skip
