"""Training strategies: full fine-tuning, frozen lower layers (with layer-wise lr decay) and merged LoRA.

The runs train a tiny random model as deep as the real one (six layers of width 64, the fixture
``six_layer_model``): which parameters train, at which rate and when, and what is published, are
the same questions on it, answered in a fraction of the time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.models import load_model, read_model_card
from mrl.cli import main
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIM, TINY_DIMS
from tests.helpers.training import encoder_weights, save_tiny_model_with_layers
from training.strategies import ADAPTER_FOLDER, apply_strategy, check_strategy_options, layer_learning_rates
from training.train import TrainConfig, build_trainer, load_training_data, train
from training.unfreezing import unfreeze_steps


def small_config(output: Path, **overrides) -> TrainConfig:
    # No warm-up: the single step runs at the full learning rate, so the weights move.
    settings = {"max_steps": 1, "warmup_ratio": 0.0, "batch_size": 8, "mini_batch_size": 8, "progress": False}
    settings["eval_split"] = None
    return TrainConfig(data=SAMPLE, output=output, **(settings | overrides))


@pytest.fixture(scope="module")
def six_layer_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the real model's six layers, so the layer arithmetic below is the real model's."""
    return save_tiny_model_with_layers(tiny_model, tmp_path_factory.mktemp("six-layers") / "model", layers=6)


def test_layer_learning_rates_decay_from_the_top_and_skip_frozen_parts():
    assert layer_learning_rates(3, 1.0, 0.5) == {
        r"\.embeddings\.": 0.125,
        r"\.encoder\.layer\.0\.": 0.25,
        r"\.encoder\.layer\.1\.": 0.5,
        r"\.encoder\.layer\.2\.": 1.0,
    }
    assert layer_learning_rates(3, 1.0, 0.5, frozen=1) == {r"\.encoder\.layer\.1\.": 0.5, r"\.encoder\.layer\.2\.": 1.0}
    assert layer_learning_rates(2, 0.1, 1.0, frozen=0) == {r"\.encoder\.layer\.0\.": 0.1, r"\.encoder\.layer\.1\.": 0.1}
    assert not re.search(r"\.encoder\.layer\.1\.", "model.0.auto_model.encoder.layer.11.output.dense.weight")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_lr_decay": 0.0}, "--layer-lr-decay must be in (0, 1], got 0.0"),
        ({"layer_lr_decay": 1.5}, "--layer-lr-decay must be in (0, 1], got 1.5"),
        ({"freeze_layers": -1}, "--freeze-layers must be 0 or more, got -1"),
        ({"lora": True, "freeze_layers": 2}, "--lora cannot be combined with --freeze-layers, --layer-lr-decay"),
        ({"lora": True, "lora_rank": 0}, "--lora-rank must be at least 1, got 0"),
        ({"lora": True, "lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
    ],
)
def test_impossible_options_are_refused(tmp_path: Path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_strategy_options(small_config(tmp_path / "out", **overrides))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer-lr-decay", "0"], "mrl: error: --layer-lr-decay must be in (0, 1], got 0.0"),
        (["--lora", "--freeze-layers", "2"], "mrl: error: --lora cannot be combined with --freeze-layers"),
    ],
)
def test_cli_rejects_bad_strategy_in_one_line(tiny_beir: Path, tmp_path: Path, capsys, args, message):
    assert main(["train", "--data", str(tiny_beir), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_freezing_every_layer(tiny_beir: Path, tmp_path: Path, six_layer_model: Path, capsys):
    args = ["--model", str(six_layer_model), "--freeze-layers", "6"]
    assert main(["train", "--data", str(tiny_beir), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err  # above the error: the library's weight-loading progress bar
    assert err.strip().splitlines()[-1] == (
        "mrl: error: --freeze-layers 6: the model has 6 transformer layers; freeze between 0 and 5"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_optimizer_groups_carry_the_decayed_rates(tmp_path: Path, six_layer_model: Path):
    rates = {"freeze_layers": 2, "layer_lr_decay": 0.5, "learning_rate": 1e-3}
    config = small_config(tmp_path / "out", model=str(six_layer_model), **rates)
    model = load_model(config.model)
    strategy, _ = apply_strategy(model, config, "base")
    trainer = build_trainer(model, load_training_data(config).pairs, TINY_DIMS, config, tmp_path / "ckpt", 1, 1e-3)
    optimizer = trainer.create_optimizer()

    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    layers = model[0].auto_model.encoder.layer
    for layer, expected in [(2, 1.25e-4), (3, 2.5e-4), (4, 5e-4), (5, 1e-3)]:
        rates = {rate_of[id(p)] for p in layers[layer].parameters()}
        assert len(rates) == 1 and rates.pop() == pytest.approx(expected)
    frozen = [*model[0].auto_model.embeddings.parameters(), *layers[0].parameters(), *layers[1].parameters()]
    assert not any(p.requires_grad or id(p) in rate_of for p in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert strategy["name"] == "freeze" and strategy["trainable_parameters"] == trainable
    assert trainable < strategy["total_parameters"]


def test_frozen_layers_stay_bit_identical_while_the_top_moves(tmp_path: Path, six_layer_model: Path):
    output = tmp_path / "model"
    train(small_config(output, model=str(six_layer_model), freeze_layers=2, layer_lr_decay=0.8))

    before, after = encoder_weights(six_layer_model), encoder_weights(output)
    for name, weight in before.items():
        if name.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1.")):
            assert torch.equal(weight, after[name]), name
    assert not torch.equal(before["encoder.layer.5.output.dense.weight"], after["encoder.layer.5.output.dense.weight"])
    strategy = json.loads((output / "training_report.json").read_text())["strategy"]
    assert strategy["frozen_layers"] == 2 and strategy["layer_lr_decay"] == 0.8
    assert 0 < strategy["trainable_parameters"] < strategy["total_parameters"]
    assert read_model_card(output).extra["strategy"] == strategy
    assert (
        "- Strategy: embeddings and lowest 2 layers frozen, layer-wise lr decay 0.8; trainable parameters"
        in (output / "training_report.md").read_text()
    )


def test_lora_publishes_a_merged_plain_model_and_its_adapter(tmp_path: Path, six_layer_model: Path):
    output = tmp_path / "model"
    train(small_config(output, model=str(six_layer_model), lora=True, lora_rank=4, lora_alpha=8))

    adapter = output / ADAPTER_FOLDER
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    adapter_weights = load_file(adapter / "adapter_model.safetensors")
    assert adapter_weights and all(".lora_A." in k or ".lora_B." in k for k in adapter_weights)
    strategy = json.loads((output / "training_report.json").read_text())["strategy"]
    # Only the adapter trained: its size is the trainable count.
    assert strategy["name"] == "lora"
    assert strategy["trainable_parameters"] == sum(w.numel() for w in adapter_weights.values())
    assert strategy["trainable_parameters"] < strategy["total_parameters"] / 20
    assert read_model_card(output).extra["strategy"] == strategy

    merged = load_file(output / "model.safetensors")
    assert not any("lora" in k for k in merged)
    before, after = encoder_weights(six_layer_model), encoder_weights(output)
    assert before.keys() == after.keys()
    # LoRA touched the targeted linear weights only; embeddings, LayerNorms and biases are untouched.
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "encoder.layer.0.attention.self.query.weight" in changed
    assert all(name.endswith(".weight") and re.search(r"\.(query|key|value|dense)\.", name) for name in changed)
    tuned = load_model(str(output))
    vectors = tuned.encode(["fever and cough"], convert_to_numpy=True)
    assert vectors.shape == (1, TINY_DIM) and np.isfinite(vectors).all()

    # The adapter is a standard PEFT folder: base model + adapter, merged, is the published model.
    from peft import PeftModel

    rebuilt = load_model(str(six_layer_model))
    rebuilt[0].auto_model = PeftModel.from_pretrained(rebuilt[0].auto_model, str(adapter)).merge_and_unload()
    np.testing.assert_allclose(rebuilt.encode(["fever and cough"], convert_to_numpy=True), vectors, atol=1e-5)

    # The adapter folder is itself a model path (index builder, service): the same weights, bit for bit,
    # so an index built from the merged model is served by the adapter and the other way round.
    from core.models import model_fingerprint

    from_adapter = load_model(str(adapter))
    assert model_fingerprint(from_adapter) == model_fingerprint(tuned)
    assert np.array_equal(from_adapter.encode(["fever and cough"], convert_to_numpy=True), vectors)
    assert read_model_card(adapter).dims == read_model_card(output).dims


def test_unfreeze_steps_release_one_unit_at_a_time_over_the_first_half():
    assert unfreeze_steps(7, 28) == [0, 2, 4, 6, 8, 10, 12]
    assert unfreeze_steps(4, 6) == [0, 1, 2, 2]  # round half to even: 0.75 → 1, 1.5 → 2, 2.25 → 2
    assert unfreeze_steps(3, 1) == [0, 0, 0]


def test_an_adapter_without_a_base_model_is_refused_in_one_line(tmp_path: Path):
    from core.models import ModelError

    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ModelError, match="names no base_model_name_or_path"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"lora": True, "gradual_unfreeze": True}, "--lora cannot be combined with --freeze-layers, --layer-lr-decay or "
      "--gradual-unfreeze")],
)  # fmt: skip
def test_lora_refuses_gradual_unfreezing(tmp_path: Path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_strategy_options(small_config(tmp_path / "out", **overrides))


def test_gradual_unfreezing_releases_the_top_first_and_the_embeddings_last(tmp_path: Path, six_layer_model: Path):
    from transformers import TrainerCallback

    config = small_config(tmp_path / "out", model=str(six_layer_model), gradual_unfreeze=True, max_steps=6)
    model = load_model(config.model)
    strategy, _ = apply_strategy(model, config, "base")
    assert strategy["name"] == "gradual" and strategy["gradual_unfreeze_units"] == 7  # 6 layers + embeddings
    embeddings = model[0].auto_model.embeddings
    layers = model[0].auto_model.encoder.layer
    start = {name: p.detach().clone() for name, p in model[0].auto_model.named_parameters()}
    seen: list[tuple[int, list[bool], bool]] = []

    class Probe(TrainerCallback):
        """At each step: which layers train, and whether the embeddings are still the base model's."""

        def on_step_begin(self, args, state, control, **kwargs):
            trains = [layers[i].attention.self.query.weight.requires_grad for i in range(len(layers))]
            unchanged = torch.equal(embeddings.word_embeddings.weight, start["embeddings.word_embeddings.weight"])
            seen.append((state.global_step, trains, unchanged))

    trainer = build_trainer(model, load_training_data(config).pairs, TINY_DIMS, config, tmp_path / "ckpt", 1, 1e-3)
    trainer.add_callback(Probe())
    trainer.train()

    # 7 units over the first 3 of 6 steps start at steps 0, 0, 1, 1, 2, 2, 3 (top layer first).
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert seen[0][1] == [False, False, False, False, True, True]
    assert seen[1][1] == [False, False, True, True, True, True]
    assert seen[2][1] == [True] * 6
    assert all(unchanged for step, _, unchanged in seen if step <= 3)  # released at step 3, first moved by it
    assert all(p.requires_grad for p in model.parameters())
    moved = {name for name, p in model[0].auto_model.named_parameters() if not torch.equal(p, start[name])}
    assert "embeddings.word_embeddings.weight" in moved
    assert "encoder.layer.0.attention.self.query.weight" in moved


PEAK_PROBE = """
import json, time
import numpy as np
from training.memory import PeakMemory

with PeakMemory(interval_s=0.005) as memory:
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, written
    block += 1
    time.sleep(0.05)
    del block
print(json.dumps(memory.to_dict()))
"""


def test_peak_memory_sees_an_allocation_inside_the_block():
    # A fresh process: in this one, memory freed by earlier tests stays resident and would be reused.
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout)
    assert 60 <= figures["rss_growth_mb"] < 200
    assert figures["rss_peak_mb"] == pytest.approx(figures["rss_start_mb"] + figures["rss_growth_mb"], abs=0.2)
    assert figures["cuda_peak_allocated_mb"] is None or figures["cuda_peak_allocated_mb"] >= 0
