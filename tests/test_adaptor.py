"""The Matryoshka adaptor and the PCA rotation: exact properties on synthetic vectors, then the plumbing of
``mrl adapt`` on the tiny random model (``tiny_model``): what is fitted, published, reloaded and reported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.data import load_beir
from core.errors import ConfigError
from core.matryoshka import truncate_normalize
from mrl.cli import main
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIM, TINY_DIMS
from training.adaptor import (
    STARTS,
    AdaptorConfig,
    Judged,
    append_adaptor,
    fit_adaptor,
    grouped_folds,
    pca_rotation,
    score_mapped,
)
from training.evaluate import SplitEmbeddings, score_dims
from training.validation import positive_groups


def hidden_signal(seed: int = 0, docs: int = 400, queries: int = 240, d: int = 64, signal: int = 8):
    """Documents whose identity lives in ``signal`` coordinates at the END of the vector, noise in front.

    A query is its document's signal plus small noise, behind fresh noise, so full-dim search is near
    perfect and 8-dim search (the leading noise) is near chance: exactly what an adaptor must fix by
    moving the signal forward.
    """
    rng = np.random.default_rng(seed)
    corpus = np.concatenate([0.15 * rng.normal(size=(docs, d - signal)), rng.normal(size=(docs, signal))], axis=1)
    targets = rng.choice(docs, size=queries, replace=False)
    vectors = np.concatenate(
        [
            0.15 * rng.normal(size=(queries, d - signal)),
            corpus[targets, d - signal :] + 0.1 * rng.normal(size=(queries, signal)),
        ],
        axis=1,
    )
    relevant = [{int(t): 1} for t in targets]
    half = queries // 2
    train = Judged(vectors[:half].astype(np.float32), relevant[:half])
    valid = Judged(vectors[half:].astype(np.float32), relevant[half:])
    return corpus.astype(np.float32), train, valid


def test_pca_rotation_is_orthogonal_keeps_full_dim_and_orders_by_variance():
    rng = np.random.default_rng(1)
    scales = np.array([0.1, 3.0, 0.5, 1.0, 2.0, 0.2])
    corpus = (rng.normal(size=(200, 6)) * scales).astype(np.float32)
    w = pca_rotation(corpus)
    np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-5)
    mapped = corpus @ w.T
    np.testing.assert_allclose(
        truncate_normalize(mapped, 6) @ truncate_normalize(mapped, 6).T,
        truncate_normalize(corpus, 6) @ truncate_normalize(corpus, 6).T,
        atol=1e-5,
    )
    spread = (mapped**2).mean(axis=0)
    assert list(np.argsort(-spread)) == list(range(6))
    assert pca_rotation(corpus[:3]).shape == (6, 6)  # fewer documents than dims: still a full rotation


def test_score_mapped_without_a_map_matches_the_evaluator():
    corpus, _, valid = hidden_signal()
    qrels = {f"q{i}": {f"d{doc}": grade for doc, grade in rel.items()} for i, rel in enumerate(valid.relevant)}
    embeddings = SplitEmbeddings([f"d{i}" for i in range(len(corpus))], corpus, list(qrels), valid.vectors, 0.0)
    expected = score_dims(embeddings, qrels, [64, 8])
    assert score_mapped(None, corpus, valid, [64, 8]) == expected


def test_adaptor_moves_the_signal_into_the_leading_dims():
    corpus, train, valid = hidden_signal(docs=200, queries=160)
    # From the identity, with the ranking term alone: the regularisers hold the map near its start, the opposite
    # of what this data needs.
    config = AdaptorConfig(
        dims=[64, 32, 16, 8],
        init="identity",
        steps=60,
        learning_rate=1e-2,
        eval_every=10,
        orthogonal=False,
        similarity_weight=0,
        reconstruction_weight=0,
        tolerance=1.0,  # the mechanics: any dim may be traded for the smallest one
        select_dim=8,
    )
    before = score_mapped(None, corpus, valid, config.dims, "ndcg@10")
    fit = fit_adaptor(corpus, train, valid, config)
    after = score_mapped(fit.weight, corpus, valid, config.dims, "ndcg@10")
    assert before[64]["ndcg@10"] > 0.9 and before[8]["ndcg@10"] < 0.1
    assert after[8]["ndcg@10"] > before[8]["ndcg@10"] + 0.4
    assert after[64]["ndcg@10"] > 0.8
    gain = after[8]["ndcg@10"] - before[8]["ndcg@10"]
    assert fit.best_metric == pytest.approx(gain, abs=1e-4)  # the kept step is the best validated
    assert fit.history[0]["step"] == 0 and fit.best_step > 0


def test_an_orthogonal_adaptor_is_a_rotation_that_keeps_the_full_dim_and_still_moves_the_signal():
    """A full-dim cosine cannot change under a rotation: the full dim is the input model's at every step,
    whatever the labels; only which directions the leading dims keep is learned."""
    corpus, train, valid = hidden_signal(docs=200, queries=160)
    config = AdaptorConfig(dims=[64, 32, 16, 8], init="identity", steps=60, learning_rate=2e-2, eval_every=10,
                           similarity_weight=0, reconstruction_weight=0, tolerance=1.0, select_dim=8,
                           orthogonal=True)  # fmt: skip
    fit = fit_adaptor(corpus, train, valid, config)
    np.testing.assert_allclose(fit.weight @ fit.weight.T, np.eye(64), atol=1e-4)
    before = score_mapped(None, corpus, valid, config.dims, "ndcg@10")
    after = score_mapped(fit.weight, corpus, valid, config.dims, "ndcg@10")
    assert after[64] == pytest.approx(before[64], abs=1e-6)  # the same rankings at the full dim
    assert fit.best_step > 0 and after[8]["ndcg@10"] > before[8]["ndcg@10"] + 0.2
    for entry in fit.history:  # every validated step, not only the kept one
        assert entry["ndcg@10"]["64"] == pytest.approx(round(before[64]["ndcg@10"], 4), abs=2e-4)
    free = fit_adaptor(corpus, train, valid, replace(config, orthogonal=False))
    assert not np.allclose(free.weight @ free.weight.T, np.eye(64), atol=1e-2)  # unconstrained, it is no rotation


def test_the_never_worse_rule_refuses_to_trade_a_dim_for_another():
    corpus, train, valid = hidden_signal(docs=200, queries=160)
    config = AdaptorConfig(dims=[64, 32, 16, 8], init="identity", steps=60, learning_rate=1e-2, eval_every=10,
                           similarity_weight=0, reconstruction_weight=0, orthogonal=False)  # fmt: skip
    before = score_mapped(None, corpus, valid, config.dims, "ndcg@10")
    fit = fit_adaptor(corpus, train, valid, config)  # the default tolerance, 0.005
    after = score_mapped(fit.weight, corpus, valid, config.dims, "ndcg@10")
    for dim in config.dims:  # on the data it was chosen on, no dim is worse than the input's by more than 0.005
        assert after[dim]["ndcg@10"] >= before[dim]["ndcg@10"] - 0.005
    assert fit.input_scores == {dim: before[dim]["ndcg@10"] for dim in config.dims}
    if fit.kept_input:  # no step qualified: the published map is the identity, the input model unchanged
        np.testing.assert_array_equal(fit.weight, np.eye(corpus.shape[1], dtype=np.float32))
        assert fit.best_metric == 0.0 and fit.to_dict()["kept_input"]
    else:
        assert fit.best_metric == pytest.approx(np.mean([after[d]["ndcg@10"] - before[d]["ndcg@10"]
                                                         for d in config.dims]), abs=1e-4)  # fmt: skip
    assert set(fit.to_dict()["validation_by_dim"]) == {"64", "32", "16", "8"}


def test_cross_validation_chooses_on_every_training_query_and_states_the_spread():
    corpus, train, _ = hidden_signal(docs=200, queries=160)
    config = AdaptorConfig(dims=[64, 32, 16, 8], init="auto", steps=40, learning_rate=1e-2, eval_every=10,
                           folds=4, orthogonal=False)  # fmt: skip
    fit = fit_adaptor(corpus, train, None, config)  # no held-out split: the folds are the validation
    cross = fit.folds
    assert cross["folds"] == 4 and cross["queries"] == len(train.relevant)
    assert cross["groups"] == len(positive_groups(train.relevant))
    assert set(fit.starts) == {"pca", "identity"}
    if not fit.kept_input:
        assert cross["start"] == fit.init and cross["step"] == fit.best_step
        assert len(cross["gain_by_fold"]) == 4 and cross["gain_std"] >= 0
        assert cross["gain_mean"] == pytest.approx(np.mean(cross["gain_by_fold"]), abs=1e-3)
        assert all(fit.chosen_scores[d] >= fit.input_scores[d] - config.tolerance for d in config.dims)
    assert fit_adaptor(corpus, train, None, config).weight.tobytes() == fit.weight.tobytes()  # reproducible
    with pytest.raises(ConfigError, match="--folds must be at least 2"):
        fit_adaptor(corpus, train, None, AdaptorConfig(dims=[64, 8], folds=1))


def test_folds_keep_questions_that_share_a_relevant_document_together():
    """Random folds let a fold be scored on documents the others trained on as positives: memorising them
    then looks like a gain (on SciFact's clean view the step so chosen cost 0.018 at 384 dims)."""
    relevant = [{0: 1}, {0: 2, 1: 1}, {1: 1}, {2: 1}, {3: 0, 5: 1}, {4: 1}, {3: 1}, {6: 1, 7: 0}, {7: 1}]
    groups = positive_groups(relevant)
    assert sorted(sorted(g) for g in groups) == [[0, 1, 2], [3], [4], [5], [6], [7], [8]]  # grade 0 joins none
    folds = grouped_folds(groups, 3, seed=42)
    assert sorted(int(r) for fold in folds for r in fold) == list(range(9))
    assert any({0, 1, 2} <= set(fold.tolist()) for fold in folds)
    assert sorted(len(fold) for fold in folds) == [3, 3, 3]
    for fold in folds:  # no relevant document is a positive on both sides of a fold
        inside = {d for r in fold for d, g in relevant[r].items() if g > 0}
        outside = {d for r in set(range(9)) - set(fold.tolist()) for d, g in relevant[r].items() if g > 0}
        assert not inside & outside
    assert [f.tolist() for f in grouped_folds(groups, 3, seed=42)] == [f.tolist() for f in folds]  # seeded


def test_adaptor_fit_is_reproducible_and_checks_its_options():
    corpus, train, valid = hidden_signal(docs=100, queries=60)
    config = AdaptorConfig(dims=[64, 8], steps=20, eval_every=10)
    first, second = fit_adaptor(corpus, train, valid, config), fit_adaptor(corpus, train, valid, config)
    np.testing.assert_array_equal(first.weight, second.weight)
    with pytest.raises(ConfigError, match="--init 'svd' is not one of pca, identity, auto"):
        fit_adaptor(corpus, train, valid, AdaptorConfig(dims=[64, 8], init="svd"))
    with pytest.raises(ConfigError, match="--dim-weights has 1 values for the 2 dims"):
        fit_adaptor(corpus, train, valid, AdaptorConfig(dims=[64, 8], weights=[1.0]))


def test_init_auto_keeps_the_start_that_validates_better():
    corpus, train, valid = hidden_signal(docs=100, queries=60)
    config = AdaptorConfig(dims=[64, 8], steps=20, eval_every=5, similarity_weight=0, orthogonal=False)
    fits = {start: fit_adaptor(corpus, train, valid, replace(config, init=start)) for start in STARTS}
    assert fits["pca"].best_metric != fits["identity"].best_metric  # a real choice on this data
    auto = fit_adaptor(corpus, train, valid, config)
    assert config.init == "auto"
    winner = max(fits, key=lambda start: fits[start].best_metric)
    assert auto.init == winner and auto.starts == {start: fit.best_metric for start, fit in fits.items()}
    np.testing.assert_array_equal(auto.weight, fits[winner].weight)
    assert auto.to_dict()["init"] == winner and set(auto.to_dict()["starts"]) == {"pca", "identity"}
    with pytest.raises(ConfigError, match="--init auto picks the start on validation queries"):
        fit_adaptor(corpus, train, None, config)


def test_appended_map_is_what_the_model_now_encodes(tmp_path: Path, tiny_model: Path):
    from core.models import load_model

    model = load_model(str(tiny_model))
    rng = np.random.default_rng(2)
    weight = np.linalg.qr(rng.normal(size=(TINY_DIM, TINY_DIM)))[0].astype(np.float32)
    texts = ["gout attacks the big toe", "a fever with a rash"]
    base = model.encode_document(texts, convert_to_numpy=True)
    adapted = append_adaptor(model, weight)
    adapted.save(str(tmp_path / "m"))
    reloaded = load_model(str(tmp_path / "m"))
    got = reloaded.encode_document(texts, convert_to_numpy=True)
    np.testing.assert_allclose(got, truncate_normalize(base @ weight.T, TINY_DIM), atol=1e-5)


def test_mrl_adapt_publishes_a_model_the_index_builder_and_eval_load(tmp_path: Path, tiny_model: Path, capsys):
    out = tmp_path / "adapted"
    argv = ["adapt", "--data", str(SAMPLE), "--model", str(tiny_model), "--output", str(out), "--steps", "30"]
    argv += ["--no-progress", "--folds", "0"]  # the held-out tenth chooses (cross-validation: the next test)
    assert main(argv) == 0
    assert "adaptor fitted in" in capsys.readouterr().out
    report = json.loads((out / "adaptor_report.json").read_text())
    assert report["validation_queries"] == 12 and report["training_queries"] == 108
    assert report["settings"]["init"] == "auto" and set(report["fit"]["starts"]) == {"pca", "identity"}
    # 120 labelled questions, fewer than ROTATE_BELOW: a rotation by default, so the full dim is the input's
    assert report["settings"]["orthogonal"] is None and report["fit"]["orthogonal"] is True
    full = str(max(TINY_DIMS))
    assert report["after"]["by_dim"][full]["ndcg@10"] == pytest.approx(report["before"]["by_dim"][full]["ndcg@10"],
                                                                       abs=1e-3)  # fmt: skip
    assert report["fit"]["init"] == max(report["fit"]["starts"], key=report["fit"]["starts"].get)
    assert "chosen by --init auto" in (out / "adaptor_report.md").read_text()
    assert "The map is a rotation of its start" in (out / "adaptor_report.md").read_text()
    assert report["before"]["by_dim"].keys() == report["after"]["by_dim"].keys() == {str(d) for d in TINY_DIMS}
    card = json.loads((out / "mrl.json").read_text())
    assert card["dims"] == TINY_DIMS and card["extra"]["adaptor"]["method"] == "adaptor"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-written left
    assert main(argv) == 2  # the output exists: refused, not replaced
    assert "already exists" in capsys.readouterr().err

    from core.models import SentenceTransformerEncoder, load_model
    from training.evaluate import evaluate

    scored = evaluate(
        SentenceTransformerEncoder(load_model(str(out)), "m", progress=False), load_beir(SAMPLE), "test", TINY_DIMS
    )
    assert scored.metric(32) == pytest.approx(report["after"]["by_dim"]["32"]["ndcg@10"], abs=1e-3)


def test_mrl_adapt_cross_validates_a_small_training_split_and_says_what_it_kept(
    tmp_path: Path, tiny_model: Path, capsys
):
    out = tmp_path / "adapted"
    argv = ["adapt", "--data", str(SAMPLE), "--model", str(tiny_model), "--output", str(out), "--steps", "20"]
    assert main([*argv, "--no-progress"]) == 0  # 120 training questions: under 1,000, so 5 folds choose
    report = json.loads((out / "adaptor_report.json").read_text())
    assert report["training_queries"] == 120 and report["validation_queries"] == 0  # every question trains
    assert report["rule"] == {
        "tolerance": 0.005,
        "chosen_by": "cross-validation",
        "kept_input": report["fit"]["kept_input"],
    }
    cross = report["fit"]["cross_validation"]
    assert cross["folds"] == 5 and cross["queries"] == 120
    by_dim = report["fit"]["validation_by_dim"]
    assert set(by_dim) == {str(d) for d in TINY_DIMS}
    assert all(v["chosen"] >= v["input"] - 0.005 for v in by_dim.values())  # never worse on the folds
    markdown = (out / "adaptor_report.md").read_text()
    assert "mean of 5 cross-validation folds over the 120 training queries" in markdown
    printed = capsys.readouterr().out
    if report["fit"]["kept_input"]:
        assert "mrl adapt: kept the input model: no step of the adaptor kept every dim within 0.005" in printed
        assert "**The input model was kept:**" in markdown
    assert main([*argv, "--overwrite", "--folds", "-1"]) == 2
    assert "--folds must be 0 (never) or at least 2, got -1" in capsys.readouterr().err


def test_mrl_adapt_scores_the_clean_view_apart(tmp_path: Path, tiny_model: Path):
    """Half the sample's training questions: the test questions whose passages they judge are the shared view."""
    from tests.helpers.sample import half_shared_sample

    data, shared = half_shared_sample(tmp_path / "half")
    dataset = load_beir(data)
    out = tmp_path / "adapted"
    argv = ["adapt", "--data", str(data), "--model", str(tiny_model), "--output", str(out), "--steps", "10"]
    assert main([*argv, "--folds", "0", "--no-progress"]) == 0
    report = json.loads((out / "adaptor_report.json").read_text())
    for side in ("before", "after"):
        views = report[side]["views"]
        assert views["shared"]["num_queries"] == len(shared)
        assert views["clean"]["num_queries"] == len(dataset.split("test")) - len(shared)
        assert set(views["clean"]["by_dim"]) == {str(d) for d in TINY_DIMS}
    assert (
        "## Clean view: questions whose answers were never training positives"
        in (out / "adaptor_report.md").read_text()
    )


def test_adapt_refuses_an_unknown_method_in_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["adapt", "--data", str(SAMPLE), "--output", str(tmp_path / "o"), "--method", "svd"])
    assert stopped.value.code == 2
    assert "invalid choice: 'svd'" in capsys.readouterr().err


def test_mrl_adapt_no_orthogonal_fits_a_free_map(tmp_path: Path, tiny_model: Path):
    out = tmp_path / "adapted"
    argv = ["adapt", "--data", str(SAMPLE), "--model", str(tiny_model), "--output", str(out), "--steps", "25",
            "--folds", "0", "--no-orthogonal", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "adaptor_report.json").read_text())
    assert report["settings"]["orthogonal"] is False and report["fit"]["orthogonal"] is False


def test_the_map_is_a_rotation_below_rotate_below_questions_and_free_from_there(monkeypatch):
    """Scarce labels can cost the full dim (a free map lost 0.020 at 384 on a held-out set with 50
    questions); a rotation cannot. With labels to spare the free map can also gain at the full dim."""
    import training.adaptor as adaptor

    corpus, train, valid = hidden_signal(docs=200, queries=160)  # 160 labelled questions
    config = AdaptorConfig(dims=[64, 32, 16, 8], init="identity", steps=20, learning_rate=2e-2, eval_every=10,
                           similarity_weight=0, reconstruction_weight=0, tolerance=1.0)  # fmt: skip
    assert config.orthogonal is None
    rotated = fit_adaptor(corpus, train, valid, config)
    assert rotated.orthogonal and rotated.to_dict()["orthogonal"] is True
    np.testing.assert_allclose(rotated.weight @ rotated.weight.T, np.eye(64), atol=1e-4)
    monkeypatch.setattr(adaptor, "ROTATE_BELOW", 100)
    free = fit_adaptor(corpus, train, valid, config)
    assert not free.orthogonal and not np.allclose(free.weight @ free.weight.T, np.eye(64), atol=1e-2)
