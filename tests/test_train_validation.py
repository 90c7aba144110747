"""Validation during training (best checkpoint published), experiment tracking and the forgetting check.

The runs train the tiny random model (``tiny_model``): what is under test is which checkpoint is
published, what is logged and what the reports say, not how good the model becomes.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.data import RetrievalDataset, load_beir
from mrl.cli import main
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS
from training.adaptor import MIN_GAIN
from training.evaluate import EvalResult
from training.train import (
    TrainConfig,
    check_tracking,
    forgetting_markdown,
    forgetting_report,
    load_training_data,
    train,
)
from training.validation import VALIDATION_SPLIT, rule_objective, split_folds, split_validation


def small_config(output: Path, **overrides) -> TrainConfig:
    settings = {"max_steps": 1, "batch_size": 8, "mini_batch_size": 8, "progress": False, "eval_split": None}
    return TrainConfig(data=SAMPLE, output=output, **(settings | overrides))


def test_validation_queries_come_from_training_and_leave_it(tmp_path: Path, caplog):
    with caplog.at_level("WARNING", logger="training.train"):
        data = load_training_data(small_config(tmp_path / "out", validation_fraction=0.1, eval_split="test"))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "training.train"]
    assert warning.startswith("only 12 validation questions: the checkpoint chosen on them follows their noise")
    assert "up to 0.08" in warning and "without --validation-fraction" in warning
    dataset = load_beir(SAMPLE)
    validation = data.validation.queries
    assert len(validation) == 12 and len(set(validation)) == 12
    training = {p.query for p in data.pairs}
    test = {dataset.queries[qid] for qid in dataset.split("test")}
    train_split = {dataset.queries[qid] for qid in dataset.split("train")}
    assert set(validation) <= train_split
    assert not set(validation) & training and not set(validation) & test
    assert len(training) == 108 and len(data.pairs) == 108
    # Seeded: the same seed holds out the same queries, another seed other ones.
    again = split_validation(dataset, "train", 0.1, 42).dataset.split(VALIDATION_SPLIT)
    assert list(again) == list(data.validation.dataset.split(VALIDATION_SPLIT))
    assert list(split_validation(dataset, "train", 0.1, 7).dataset.split(VALIDATION_SPLIT)) != list(again)
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.train"):
        load_training_data(small_config(tmp_path / "out", validation_fraction=0.5, eval_split="test"))
    assert not [r for r in caplog.records if r.name == "training.train"]  # 60 held out: enough to choose


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--validation-fraction", "1.5"], "mrl: error: --validation-fraction must be in (0, 1), got 1.5"),
        (["--validation-fraction", "0"], "mrl: error: --validation-fraction must be in (0, 1), got 0.0"),
        (["--early-stopping-patience", "2"], "mrl: error: --early-stopping-patience needs --validation-fraction"),
        (["--eval-steps", "5"], "mrl: error: --eval-steps needs --validation-fraction"),
        (
            ["--validation-fraction", "0.1", "--early-stopping-metric", "f1"],
            "mrl: error: --early-stopping-metric 'f1' is not one of ndcg@10",
        ),
        (["--report-to", "mlflow"], "mrl: error: --report-to 'mlflow' is not one of none, tensorboard, wandb"),
        (["--folds", "1"], "mrl: error: --folds must be at least 2, got 1"),
        (
            ["--folds", "3", "--validation-fraction", "0.1"],
            "mrl: error: --folds and --validation-fraction are two ways to choose the checkpoint: pass one",
        ),
        (["--folds", "3", "--hard-negatives"], "mrl: error: --folds chooses the epochs of one training stage"),
        (["--folds", "3", "--epochs", "2.5"], "mrl: error: --folds chooses among whole epochs: --epochs must be"),
        (["--folds", "3", "--eval-steps", "5"], "mrl: error: --eval-steps needs --validation-fraction"),
    ],
)
def test_cli_rejects_bad_validation_options_in_one_line(tiny_beir: Path, tmp_path: Path, capsys, args, message):
    assert main(["train", "--data", str(tiny_beir), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()


def test_early_stopping_publishes_the_best_checkpoint(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    config = small_config(
        output,
        model=str(tiny_model),
        max_steps=8,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        validation_fraction=0.1,
        eval_steps=1,
        early_stopping_patience=1,
        keep_checkpoints=True,
    )
    report = train(config).report

    validation = report["validation"]
    assert validation["queries"] == 12 and validation["metric"] == "ndcg@10" and validation["dim"] is None
    assert report["data"]["training_queries"] == 108
    record = validation["stages"]["stage1"]
    assert record["stopped_early"] and record["steps_run"] < 8
    history = record["history"]
    assert [entry["step"] for entry in history] == list(range(1, record["steps_run"] + 1))
    assert all(entry["ndcg@10"].keys() == {str(dim) for dim in TINY_DIMS} for entry in history)
    # The never-worse rule, recomputed from the history and the input model's validation scores.
    baseline = {int(d): v for d, v in validation["input"].items()}

    def objective(entry: dict) -> float:
        return rule_objective({int(d): v for d, v in entry["ndcg@10"].items()}, baseline, 0.005)

    best = max(history, key=objective)
    assert record["best_step"] == best["step"] and record["best_metric"] == pytest.approx(objective(best), abs=1e-3)
    # Patience 1: the run ends at the first evaluation that did not beat the best, so the last is not the best.
    assert objective(history[-1]) <= record["best_metric"] + 1e-3 and record["best_step"] < record["steps_run"]
    assert validation["kept_input"] == (record["best_metric"] <= 0)

    checkpoint = tmp_path / ".model.checkpoints" / "stage1" / record["best_checkpoint"]
    assert record["best_checkpoint"] == f"checkpoint-{record['best_step']}"
    if validation["kept_input"]:  # the input model is what was published
        checkpoint = tiny_model
    published, best_weights = load_file(output / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert published.keys() == best_weights.keys()
    assert all(torch.equal(published[k], best_weights[k]) for k in published)
    markdown = (output / "training_report.md").read_text()
    assert "## Validation (12 training queries held out, 10%)" in markdown
    assert re.search(rf"### stage1: best step {record['best_step']} ", markdown)


def test_a_run_that_loses_a_dim_on_validation_publishes_its_input(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    # A learning rate that wrecks the tiny model at the first step: no checkpoint keeps every dim.
    config = small_config(output, model=str(tiny_model), max_steps=2, learning_rate=5.0, warmup_ratio=0.0,
                          validation_fraction=0.1, eval_steps=1)  # fmt: skip
    validation = train(config).report["validation"]
    assert validation["kept_input"] and validation["stages"]["stage1"]["best_metric"] < 0
    published, original = load_file(output / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert published.keys() == original.keys() and all(torch.equal(published[k], original[k]) for k in published)
    assert "**The input model was published:**" in (output / "training_report.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_logs_losses_and_validation_into_the_output(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    tracking = {"validation_fraction": 0.1, "eval_steps": 1, "report_to": "tensorboard"}
    config = small_config(output, model=str(tiny_model), max_steps=1, **tracking)
    report = train(config).report

    assert report["tracking"] == {"report_to": "tensorboard", "log_dir": str(output / "runs"), "run_url": None}
    events = list((output / "runs" / "stage1").rglob("events.out.tfevents.*"))
    assert events and sum(p.stat().st_size for p in events) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for folder in {p.parent for p in events}:
        tags |= set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
    assert "train/loss" in tags and "eval/dim_32_ndcg@10" in tags
    assert json.loads((output / "training_report.json").read_text())["tracking"]["report_to"] == "tensorboard"


def test_missing_tracker_package_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=re.escape("--report-to wandb: the wandb package is not installed")):
        check_tracking("wandb")


def test_forgetting_report_puts_the_in_domain_change_next_to_the_out_of_domain_one():
    def result(ndcg: dict[int, float], dataset: str = "other") -> EvalResult:
        return EvalResult("m", dataset, "test", 3, 9, 0.0, {dim: {"ndcg@10": v} for dim, v in ndcg.items()})

    out_before, out_after = result({64: 0.5, 32: 0.4}), result({64: 0.45, 32: 0.41})
    in_before, in_after = result({64: 0.3, 32: 0.2}, "in"), result({64: 0.5, 32: 0.4}, "in")
    report = forgetting_report(out_before, out_after, in_before, in_after)
    assert report["ndcg@10"] == {
        "64": {"before": 0.5, "after": 0.45, "change": -0.05, "in_domain_change": 0.2},
        "32": {"before": 0.4, "after": 0.41, "change": 0.01, "in_domain_change": 0.2},
    }
    assert (report["dataset"], report["queries"], report["documents"]) == ("other", 3, 9)
    markdown = "\n".join(forgetting_markdown(report))
    assert "| 64 | 0.5000 | 0.4500 | -0.0500 | +0.2000 |" in markdown


def test_forgetting_section_reports_out_of_domain_ndcg_before_and_after(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    # The sample stands in for the out-of-domain data: the mechanics, not the finding, are under test.
    schedule = {"learning_rate": 1e-3, "warmup_ratio": 0.0}
    config = small_config(output, model=str(tiny_model), forgetting_data=SAMPLE, **schedule)
    result = train(config)

    forgetting = json.loads((output / "training_report.json").read_text())["forgetting"]
    assert forgetting == result.report["forgetting"]
    assert (forgetting["dataset"], forgetting["split"], forgetting["queries"]) == ("sample_medical", "test", 120)
    assert forgetting["ndcg@10"].keys() == {str(dim) for dim in TINY_DIMS}
    for dim, row in forgetting["ndcg@10"].items():
        assert row["before"] == pytest.approx(forgetting["before"]["by_dim"][dim]["ndcg@10"], abs=1e-4)
        assert row["after"] == pytest.approx(forgetting["after"]["by_dim"][dim]["ndcg@10"], abs=1e-4)
        assert row["change"] == pytest.approx(row["after"] - row["before"], abs=2e-4)
    assert any(row["change"] != 0 for row in forgetting["ndcg@10"].values())  # the weights moved
    assert {"forgetting_before", "forgetting_after"} <= result.seconds.keys()
    markdown = (output / "training_report.md").read_text()
    assert "## Forgetting: NDCG@10 on out-of-domain `sample_medical` split `test`" in markdown
    assert "| dim | before | after | change |" in markdown


def test_lora_with_early_stopping_publishes_the_merge_of_the_best_checkpoint(tmp_path: Path, tiny_model: Path,
                                                                             monkeypatch):  # fmt: skip
    from core.adapters import merge_lora
    from core.models import load_model
    from training.strategies import add_lora, load_lora_checkpoint

    output = tmp_path / "model"
    # At this rate the tiny model's validation score rises for a step, then falls: the best is neither end.
    schedule = {"max_steps": 6, "learning_rate": 2e-2, "warmup_ratio": 0.0, "keep_checkpoints": True}
    validation = {"validation_fraction": 0.1, "eval_steps": 1, "early_stopping_patience": 1}
    config = small_config(output, model=str(tiny_model), lora=True, lora_rank=4, **schedule, **validation)
    # Under test is the merge, not the never-worse rule: a tiny random model often loses a dim at every
    # step (its input would be published), so any step qualifies here.
    monkeypatch.setattr("training.train.TOLERANCE", 1.0)
    report = train(config).report["validation"]
    record = report["stages"]["stage1"]
    assert not report["kept_input"], record
    assert record["best_step"] < record["steps_run"]  # the last checkpoint is not the best one

    # Base model + LoRA layers + the best checkpoint's weights, merged, is exactly the published model.
    rebuilt = load_model(str(tiny_model))
    lora = add_lora(rebuilt, config, "base")
    load_lora_checkpoint(rebuilt, tmp_path / ".model.checkpoints" / "stage1" / record["best_checkpoint"])
    merge_lora(rebuilt, lora)
    published = load_file(output / "model.safetensors")
    expected = rebuilt[0].auto_model.state_dict()
    assert published.keys() == expected.keys()
    assert all(torch.equal(published[k], expected[k]) for k in published)


def test_validation_questions_share_no_positive_with_training():
    """A random tenth leaves validation questions whose relevant documents are training positives: a
    checkpoint that memorises them then looks better on validation than on a clean test view."""
    # 40 questions in 10 webs of 4 (each web shares one document) and 20 loners.
    qrels = {f"q{i}": {f"web{i // 4}": 1, f"own{i}": 1} for i in range(40)}
    qrels |= {f"q{i}": {f"own{i}": 2} for i in range(40, 60)}
    qrels["q59"]["web0"] = 0  # a grade-0 judgement joins no group
    queries = {qid: f"question {qid}" for qid in qrels}
    dataset = RetrievalDataset(Path("."), {}, queries, {"train": qrels})
    for seed in range(5):
        held = split_validation(dataset, "train", 0.2, seed)
        validation = held.dataset.split(VALIDATION_SPLIT)
        assert len(validation) == 12 and not set(validation) & set(held.training_qrels)
        inside = {doc for docs in validation.values() for doc, grade in docs.items() if grade > 0}
        outside = {doc for docs in held.training_qrels.values() for doc, grade in docs.items() if grade > 0}
        assert not inside & outside, seed
    assert list(split_validation(dataset, "train", 0.2, 3).dataset.split(VALIDATION_SPLIT)) == list(
        split_validation(dataset, "train", 0.2, 3).dataset.split(VALIDATION_SPLIT)
    )


def test_validation_falls_back_to_random_questions_when_all_share_positives(caplog):
    qrels = {f"q{i}": {"common": 1} for i in range(20)}
    dataset = RetrievalDataset(Path("."), {}, {qid: qid for qid in qrels}, {"train": qrels})
    with caplog.at_level("WARNING", logger="training.validation"):
        held = split_validation(dataset, "train", 0.1, 42)
    assert len(held.dataset.split(VALIDATION_SPLIT)) == 2 and len(held.training_qrels) == 18
    assert "every training question shares a relevant document" in caplog.text


def test_folds_partition_the_training_questions_and_share_no_positive():
    qrels = {f"q{i}": {f"web{i // 4}": 1, f"own{i}": 1} for i in range(40)}  # 10 webs of 4 questions
    qrels |= {f"q{i}": {f"own{i}": 2} for i in range(40, 60)}
    dataset = RetrievalDataset(Path("."), {}, {qid: f"question {qid}" for qid in qrels}, {"train": qrels})
    folds = split_folds(dataset, "train", 5, seed=42)
    held = [set(fold.dataset.split(VALIDATION_SPLIT)) for fold in folds]
    assert len(folds) == 5 and sorted(map(len, held)) == [12] * 5
    assert set.union(*held) == set(qrels) and sum(map(len, held)) == 60  # every question validates once
    for fold, questions in zip(folds, held, strict=True):
        assert set(fold.training_qrels) == set(qrels) - questions
        inside = {doc for qid in questions for doc in qrels[qid]}
        assert not inside & {doc for docs in fold.training_qrels.values() for doc in docs}
    again = split_folds(dataset, "train", 5, seed=42)
    assert [set(f.dataset.split(VALIDATION_SPLIT)) for f in again] == held  # seeded
    assert [set(f.dataset.split(VALIDATION_SPLIT)) for f in split_folds(dataset, "train", 5, seed=7)] != held


def test_folds_choose_the_epochs_by_the_never_worse_rule_then_train_on_every_question(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    config = small_config(output, model=str(tiny_model), max_steps=-1, epochs=2, learning_rate=2e-4,
                          warmup_ratio=0.0, folds=2)  # fmt: skip
    result = train(config)
    folds = result.report["cross_validation"]
    assert folds["folds"] == 2 and folds["queries"] == 120 and folds["epochs_tried"] == 2
    assert [row["epoch"] for row in folds["by_epoch"]] == [1, 2]
    assert folds["input"].keys() == {str(dim) for dim in TINY_DIMS}
    # The choice, recomputed from the fold means: the best mean gain among the epochs that hold every dim.
    holding = [row for row in folds["by_epoch"] if row["holds"]]
    assert all(row["gain"] is not None and row["gain"] >= MIN_GAIN for row in holding)
    for row in folds["by_epoch"]:
        dropped = any(row["ndcg@10"][d] < folds["input"][d] - 0.005 for d in folds["input"])
        assert not (dropped and row["holds"])
    expected = max(holding, key=lambda row: row["gain"])["epoch"] if holding else 0
    assert folds["epochs"] == expected and folds["kept_input"] == (expected == 0)
    assert result.report["data"]["training_queries"] == 120  # the published run trains on every question
    markdown = (output / "training_report.md").read_text()
    assert "## Cross-validation (2 grouped folds of 120 training questions)" in markdown
    if expected:
        assert result.report["settings"]["epochs"] == expected and result.report["training_loss"]["stage1"]
        assert f"**Chosen: {expected} of 2 epochs**" in markdown
    assert not (tmp_path / ".model.folds").exists()  # the fold runs leave nothing behind


def test_folds_that_lose_a_dim_publish_the_input_without_training_it(tmp_path: Path, tiny_model: Path, capsys):
    output = tmp_path / "model"
    # A learning rate that wrecks the tiny model in every fold: no number of epochs keeps every dim.
    args = ["train", "--data", str(SAMPLE), "--model", str(tiny_model), "--output", str(output), "--folds", "2",
            "--epochs", "1", "--lr", "5", "--warmup-ratio", "0", "--batch-size", "8", "--mini-batch-size", "8",
            "--eval-split", "none", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "mrl train: published the input model: no number of epochs kept every dim" in capsys.readouterr().out
    report = json.loads((output / "training_report.json").read_text())
    folds = report["cross_validation"]
    assert folds["kept_input"] and folds["epochs"] == 0 and not folds["by_epoch"][0]["holds"]
    assert report["training_loss"]["stage1"] == []  # nothing trained on every question
    published, original = load_file(output / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert published.keys() == original.keys() and all(torch.equal(published[k], original[k]) for k in published)
    assert "**The input model was published:** no number of epochs" in (output / "training_report.md").read_text()
