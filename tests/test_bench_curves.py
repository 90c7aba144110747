"""``mrl bench curves`` on the bundled sample with the tiny random model: the measurement, not the figures.

Checked: one sample for every row (the clean and shared test views split by training positives), the
adaptor, fine-tuning and both at each size, each row's scores at every dim, the never-worse mark, the
report and the plot; the regularisation study's extra adaptor rows; the report written after each dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.curves import (
    ROTATED_FINETUNE_ROW,
    SANDWICH_ROW,
    CurvesConfig,
    curves_markdown,
    draw_sample,
    never_worse,
    plot_curves,
    question_scores,
    regularised_recipe,
    run_curves,
    verdict,
    view_means,
)
from core.data import load_beir, shared_positives
from mrl.cli import main
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS


def test_the_sample_splits_test_questions_by_shared_training_positives():
    dataset = load_beir(SAMPLE, ["train", "test"])
    sample = draw_sample(dataset, CurvesConfig([SAMPLE], sizes=[10, 30], max_test_queries=200, max_docs=50))
    shared = shared_positives(dataset.split("train"), dataset.split("test"))
    assert set(sample["views"]["shared"]) == shared and not set(sample["views"]["clean"]) & shared
    assert len(sample["order"]) == 30 and len(set(sample["order"])) == 30
    judged = {doc for q in sample["order"] for doc in dataset.split("train")[q]}
    assert judged <= set(sample["docs"])  # every training positive is in the corpus, whatever the cap
    assert draw_sample(dataset, CurvesConfig([SAMPLE], sizes=[10, 30], max_docs=50))["order"] == sample["order"]


def test_curves_on_the_sample_with_the_tiny_model(tmp_path: Path, tiny_model: Path):
    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[12, 24], max_finetune=12, epochs=1,
                          max_test_queries=40, max_docs=80, adaptor_steps=20, out=tmp_path, progress=False,
                          regularisation=[(0.0, 0.0)])  # fmt: skip
    written = []
    report = run_curves(config, after_each=written.append)
    assert written == [report]  # after each dataset (here one)
    [data] = report["datasets"]
    assert data["dims"] == TINY_DIMS and data["documents"] == 80
    recipes = [(row["recipe"], row["questions"]) for row in data["rows"]]
    unregularised = regularised_recipe((0.0, 0.0))
    assert unregularised == "adaptor, similarity 0, reconstruction 0"
    assert recipes == [("base", 0), ("adaptor", 12), (unregularised, 12), ("fine-tune", 12),
                       ("fine-tune + adaptor", 12), ("adaptor", 24), (unregularised, 24)]  # fmt: skip
    assert report["config"]["regularisation"] == [[0.0, 0.0]]
    base = data["rows"][0]
    for row in data["rows"]:
        for view, scores in row["scores"].items():
            assert set(scores) == {str(d) for d in TINY_DIMS} and all(0 <= v <= 1 for v in scores.values())
            assert never_worse(row, base, view) == all(scores[d] >= base["scores"][view][d] - 0.005 for d in scores)
        if row["recipe"] != "base" and "adaptor" in row["recipe"]:
            assert row["cross_validation"]["folds"] == 5  # under 1,000 questions: mrl adapt's default
    for row in data["rows"][1:]:  # paired standard errors of every change
        assert row["change_se"].keys() == row["scores"].keys()
        assert all(e.keys() == row["scores"][v].keys() and min(e.values()) >= 0 for v, e in row["change_se"].items())
    table = curves_markdown(report)
    assert table.startswith("# Learning curves") and "| adaptor" in table and "| fine-tune | 12 |" in table
    assert plot_curves(report, tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("value", "message"),
    [("4", "expected SIMILARITY:RECONSTRUCTION weight pairs such as 0:0,4:4, got '4'"),
     ("1:-1", "weights must be zero or more, got '1:-1'")],
)  # fmt: skip
def test_a_bad_regularisation_is_one_line_and_exit_code_2(value: str, message: str, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "curves", "--data", str(SAMPLE), "--regularisation", value, "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_the_regularisation_rows_and_a_size_beyond_the_questions_means_all(
    tmp_path: Path, tiny_model: Path, capsys
):
    argv = ["bench", "curves", "--data", str(SAMPLE), "--model", str(tiny_model), "--sizes", "12,500",
            "--max-finetune", "0", "--max-test-queries", "20", "--max-docs", "60", "--adaptor-steps", "10",
            "--regularisation", "0:1,2:0", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "curves.json").read_text())
    rows = [(row["recipe"], row["questions"]) for row in report["datasets"][0]["rows"]]
    fits = ["adaptor", regularised_recipe((0, 1)), regularised_recipe((2, 0))]
    assert rows == [("base", 0), *((f, 12) for f in fits), *((f, 120) for f in fits)]  # 500 > 120: all of them
    data = report["datasets"][0]
    base, *fitted = data["rows"]
    for row in fitted:  # the report's per-question scores give back its means and standard errors
        for view, by_dim in row["question_scores"].items():
            assert all(len(scores) == len(data["view_questions"][view]) for scores in by_dim.values())
            for dim, scores in by_dim.items():
                change = np.array(scores) - np.array(base["question_scores"][view][dim])
                assert np.mean(scores) == pytest.approx(row["scores"][view][dim], abs=1e-4)
                se = change.std(ddof=1) / np.sqrt(len(change))
                assert se == pytest.approx(row["change_se"][view][dim], abs=2e-4)
    assert (tmp_path / "curves.png").stat().st_size > 0 and "similarity 2, reconstruction 0" in capsys.readouterr().out


def test_recipes_choose_the_rows_and_a_bad_name_is_one_line(tmp_path: Path, tiny_model: Path, capsys):
    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[12], max_finetune=12, epochs=1,
                          max_test_queries=20, max_docs=60, adaptor_steps=10, out=tmp_path, progress=False,
                          recipes=["fine-tune", "both-orthogonal"])  # fmt: skip
    [data] = run_curves(config)["datasets"]
    assert [(row["recipe"], row["questions"]) for row in data["rows"]] == [
        ("base", 0), ("fine-tune", 12), ("fine-tune + adaptor, orthogonal", 12)]  # fmt: skip
    tuned, rotated = data["rows"][1:]
    for view in rotated["scores"]:  # a rotation of the tuned model: its full dim is the tuned model's
        assert rotated["scores"][view]["64"] == pytest.approx(tuned["scores"][view]["64"], abs=1e-6)
    with pytest.raises(SystemExit) as exited:
        main(["bench", "curves", "--data", str(SAMPLE), "--recipes", "adaptor,lora", "--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    expected = "both-orthogonal, orthogonal-fine-tune, got 'adaptor,lora'"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_loss_within_two_standard_errors_is_told_apart_from_a_real_one():
    base = {"scores": {"clean": {"64": 0.500, "32": 0.400}}}

    def row(score: float, error: float | None) -> dict:
        errors = {} if error is None else {"change_se": {"clean": {"64": error, "32": 0.0}}}
        return {"scores": {"clean": {"64": score, "32": 0.400}}, **errors}

    assert verdict(row(0.496, 0.001), base, "clean") == "✓"  # within the 0.005 tolerance
    assert verdict(row(0.490, 0.010), base, "clean") == "✗ (within 2 SE)"  # -0.010 >= -0.005 - 0.020
    assert verdict(row(0.490, 0.002), base, "clean") == "✗"  # -0.010 < -0.005 - 0.004
    assert verdict(row(0.490, None), base, "clean") == "✗"  # an old report without errors


def test_question_scores_average_to_the_view_scores(tmp_path: Path, tiny_model: Path):
    from benchmarks.curves import Encoded
    from training.adaptor import score_mapped

    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[12], max_test_queries=20, max_docs=60,
                          out=tmp_path, progress=False)  # fmt: skip
    dataset = load_beir(SAMPLE, ["train", "test"])
    sample = draw_sample(dataset, config)
    encoded = Encoded(str(tiny_model), dataset, sample, tmp_path / "cache", False)
    weight = np.linalg.qr(np.random.default_rng(0).normal(size=(TINY_DIMS[0],) * 2))[0].astype(np.float32)
    for mapped in (None, weight):
        questions = question_scores(mapped, encoded, sample)
        means = view_means(questions)
        for view in questions:  # against the trec_eval path (score_rankings)
            ids = sample["views"][view]
            judged = encoded.judged(sample["test"], ids)
            for dim, value in score_mapped(mapped, encoded.docs, judged, encoded.dims, "ndcg@10").items():
                assert len(questions[view][str(dim)]) == len(ids)
                assert float(questions[view][str(dim)].mean()) == pytest.approx(value["ndcg@10"], abs=1e-4)
                assert means[view][str(dim)] == pytest.approx(value["ndcg@10"], abs=1e-4)


def test_every_data_folder_is_measured_whether_listed_once_or_repeated():
    """``--data a --data b`` measured only b (argparse's default action replaces a repeated option)."""
    from mrl.cli import build_parser

    for argv in (["--data", "a", "b"], ["--data", "a", "--data", "b"]):
        args = build_parser().parse_args(["bench", "curves", *argv])
        assert args.data == [Path("a"), Path("b")]


def test_fine_tuning_with_a_validation_fraction_holds_questions_out_in_its_own_model(tmp_path: Path,
                                                                                     tiny_model: Path, capsys):
    """The fine-tuned rows of ``--validation-fraction`` are mrl train's with that hold-out, never a model tuned
    without it that an earlier run left in OUT/work."""
    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[40], max_finetune=40, epochs=1,
                          max_test_queries=20, max_docs=60, adaptor_steps=10, out=tmp_path, progress=False,
                          recipes=["fine-tune"], validation_fraction=0.25)  # fmt: skip
    run_curves(config)
    tuned = tmp_path / "work" / SAMPLE.name / "model-40-validation-0.25"
    report = json.loads((tuned / "training_report.json").read_text())
    assert report["validation"]["fraction"] == 0.25 and report["validation"]["queries"] == 10
    assert main(["bench", "curves", "--data", str(SAMPLE), "--validation-fraction", "1.5", "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--validation-fraction must be in (0, 1), got 1.5" in capsys.readouterr().err


def test_fine_tuning_with_train_folds_chooses_its_epochs_by_cross_validation_in_its_own_model(
    tmp_path: Path, tiny_model: Path, capsys
):
    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[40], max_finetune=40, epochs=1,
                          max_test_queries=20, max_docs=60, adaptor_steps=10, out=tmp_path, progress=False,
                          recipes=["fine-tune"], train_folds=2)  # fmt: skip
    run_curves(config)
    report = json.loads((tmp_path / "work" / SAMPLE.name / "model-40-folds-2" / "training_report.json").read_text())
    assert report["cross_validation"]["folds"] == 2 and report["cross_validation"]["queries"] == 40
    assert report["validation"] is None  # nothing held out of the published run
    assert main(["bench", "curves", "--data", str(SAMPLE), "--train-folds", "1", "--out", str(tmp_path / "o")]) == 2
    assert "mrl: error: --train-folds must be at least 2, got 1" in capsys.readouterr().err


def test_fine_tuning_from_the_rotated_model(tmp_path: Path, tiny_model: Path):
    """orthogonal-fine-tune: the rotation fitted on the base model, appended, then fine-tuned from there."""
    from core.models import load_model

    config = CurvesConfig([SAMPLE], model=str(tiny_model), sizes=[12], max_finetune=12, epochs=1,
                          max_test_queries=20, max_docs=60, adaptor_steps=10, out=tmp_path, progress=False,
                          recipes=["orthogonal-fine-tune"])  # fmt: skip
    [data] = run_curves(config)["datasets"]
    assert [(row["recipe"], row["questions"]) for row in data["rows"]] == [
        ("base", 0), (ROTATED_FINETUNE_ROW, 12), (SANDWICH_ROW, 12)]  # fmt: skip
    assert data["rows"][1]["rotation"]["init"] in ("pca", "identity")
    work = tmp_path / "work" / SAMPLE.name
    rotated, tuned = load_model(str(work / "rotated-12")), load_model(str(work / "model-12-rotated"))
    modules = [type(m).__name__ for m in tuned]
    assert modules == [type(m).__name__ for m in rotated] and "Dense" in modules  # tuned from the rotated model
