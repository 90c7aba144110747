"""Training end to end on the bundled sample: the real default model once, the mechanics on the tiny model.

``test_train_reload_and_evaluate_every_dimension`` trains the real default model (the one test of
this module that does) and checks its untuned score against the README; prompts, the hard-negative
stage, failure and resume are mechanics, checked on the tiny random model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from core.data import load_beir
from core.matryoshka import DimensionError
from core.models import SentenceTransformerEncoder, load_model, model_dims, read_model_card
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS
from training.evaluate import evaluate
from training.train import TrainConfig, train

DIMS = [384, 256, 128, 64, 32]


def small_config(output: Path, **overrides) -> TrainConfig:
    settings = {"max_steps": 2, "batch_size": 16, "mini_batch_size": 16, "progress": False, "epochs": 1}
    return TrainConfig(data=SAMPLE, output=output, **(settings | overrides))


@pytest.mark.slow
def test_train_reload_and_evaluate_every_dimension(tmp_path: Path):
    output = tmp_path / "model"
    # One step without warm-up (which would give the single step a rate of zero): the weights move.
    weights = {"train_only_dims": [16, 8], "dim_weights": [1, 1, 1, 2, 3, 1, 1]}
    result = train(small_config(output, max_steps=1, warmup_ratio=0.0, **weights))

    assert result.dims == DIMS  # the train-only dims enter the loss, not the card nor the evaluation
    assert result.before.by_dim.keys() == result.after.by_dim.keys() == set(DIMS)
    assert result.after.num_queries == 120 and result.after.num_documents == 120
    assert result.before.metric(384) == pytest.approx(0.921, abs=0.002)  # the README's untuned sample figure
    assert result.before.metric(384) != result.after.metric(384)  # the weights moved
    report = json.loads((output / "training_report.json").read_text())
    assert report["data"]["training_pairs"] == 120
    assert report["loss_dims"] == {"384": 1, "256": 1, "128": 1, "64": 2, "32": 3, "16": 1, "8": 1}
    assert report["data"]["evaluation"]["split"] == "test"
    assert report["data"]["evaluation_queries_seen_in_training"] == 0
    assert {"eval_before", "train_stage1", "eval_after"} <= report["seconds"].keys()
    assert "| 64 |" in (output / "training_report.md").read_text()
    assert (output / "training_report_ndcg.png").stat().st_size > 1000
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging or checkpoints left

    card = read_model_card(output)
    assert card.dims == DIMS
    model = load_model(str(output))
    assert model_dims(model, str(output)) == DIMS
    reloaded = evaluate(SentenceTransformerEncoder(model, "reloaded", progress=False), load_beir(SAMPLE), "test", DIMS)
    for dim in DIMS:
        assert reloaded.metric(dim) == pytest.approx(result.after.metric(dim), abs=1e-4)


def test_prompts_are_used_and_recorded(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    prompts = {"query_prompt": "query: ", "passage_prompt": "passage: "}
    train(small_config(output, model=str(tiny_model), max_steps=1, eval_split=None, **prompts))
    card = read_model_card(output)
    assert (card.query_prompt, card.document_prompt) == ("query: ", "passage: ")
    model = load_model(str(output))
    encoder = SentenceTransformerEncoder(model, "m", progress=False)
    with_prompt = encoder.encode_queries(["fever"])
    without = model.encode(["fever"], convert_to_numpy=True)
    prompted = model.encode(["query: fever"], convert_to_numpy=True)
    np.testing.assert_allclose(with_prompt, prompted, atol=1e-5)
    assert not np.allclose(with_prompt, without, atol=1e-3)


def test_hard_negative_stage_trains_on_mined_triplets(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    # The random model's embeddings all lie within a few percent of each other (cosine about 0.95), so no
    # candidate clears the miner's 5% margin below the positive until a brisk first stage spreads them apart.
    schedule = {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0}
    result = train(small_config(output, model=str(tiny_model), hard_negatives=True, **schedule))
    mining = result.report["data"]["hard_negatives"]
    assert mining["candidates"] == 120 and 0 < mining["triplets"] <= 120
    assert {"eval_stage1", "mine_negatives", "train_stage2"} <= result.seconds.keys()
    assert result.report["stage1"]["by_dim"].keys() == {str(d) for d in TINY_DIMS}
    assert "stage 1 NDCG@10" in (output / "training_report.md").read_text()


def test_failure_leaves_no_output_and_resume_continues(tmp_path: Path, tiny_model: Path, monkeypatch, caplog):
    import training.train as train_module

    output = tmp_path / "model"
    with pytest.raises(DimensionError):
        train(small_config(output, model=str(tiny_model), dims=[64, 512]))  # 512: above the model's 64
    assert not output.exists()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_module, "_publish", crash)
    with pytest.raises(RuntimeError):
        train(small_config(output, model=str(tiny_model), eval_split=None))
    assert not output.exists()
    checkpoints = tmp_path / ".model.checkpoints" / "stage1"
    assert any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="training.train"):
        train(small_config(output, model=str(tiny_model), eval_split=None, resume=True))
    assert "resuming from" in caplog.text
    assert (output / "model.safetensors").is_file()
    assert not (tmp_path / ".model.checkpoints").exists()
