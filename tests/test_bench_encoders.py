"""``mrl bench encoders``: input checks and pure helpers without a model, then smoke runs of the real one.

The smoke runs encode a few ``data/sample_medical`` queries with torch and ONNX (exported into
the session's ONNX cache, which ``tests/test_service_real.py`` shares): structure and sanity of the
outputs, never timings. The index they read is built with the session's encode cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.encoders import CellResult, EncodersConfig, add_speedups, benchmark_texts, check_config, cosine_drift
from core.data import DataError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample_medical"  # as tests/conftest.py's SAMPLE


def bench(*argv: str) -> int:
    """Run ``mrl bench encoders ...`` through the benchmark's parser, registered as benchmarks/cli.py will."""
    from benchmarks.encoders import add_encoders_parser

    parser = argparse.ArgumentParser(prog="mrl")
    commands = parser.add_subparsers(dest="command", required=True)
    add_encoders_parser(commands.add_parser("bench").add_subparsers(dest="action", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


# --- without a model --------------------------------------------------------------------------


def test_texts_are_cycled_in_file_order():
    assert benchmark_texts(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert benchmark_texts(["a", "b", "c"], 2) == ["a", "b"]


def test_cosine_drift_is_zero_for_the_same_vectors_and_grows_with_noise():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((20, 64)).astype(np.float32)
    same = cosine_drift(reference, reference * 3.0, [64, 16])  # scale does not matter: both are normalised
    assert set(same) == {"64", "16"} and all(v["max"] < 1e-6 and v["mean"] <= v["max"] for v in same.values())
    noisy = cosine_drift(reference, reference + 0.3 * rng.standard_normal((20, 64)).astype(np.float32), [64])
    assert 0 < noisy["64"]["mean"] <= noisy["64"]["max"] < 1


def _cell(encoder: str, batch_size: int, queries_per_s: float) -> CellResult:
    return CellResult(encoder, batch_size, 8, 8 // batch_size, 1.0, queries_per_s, 1.0, 1.0, 1.0, 1.0)


def test_speedups_are_relative_to_torch_at_batch_size_1():
    results = [_cell("torch", 1, 10.0), _cell("torch", 4, 25.0), _cell("onnx", 1, 20.0)]
    add_speedups(results)
    assert [r.speedup_vs_torch_batch1 for r in results] == [1.0, 2.5, 2.0]
    without_reference = [_cell("onnx", 4, 20.0)]
    add_speedups(without_reference)
    assert without_reference[0].speedup_vs_torch_batch1 is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"encoders": ["torch", "tensorrt"]},
            r"unknown encoders \['tensorrt'\] \(choose from torch, onnx, onnx-int8, onnx-padded, torch-bf16\)",
        ),
        ({"encoders": []}, "unknown encoders"),
        ({"batch_sizes": [1, 0]}, "--batch-sizes must list positive numbers"),
        ({"texts": 0}, "--texts must be positive"),
        ({"threads": 0}, "--threads must be positive"),
        ({"warmup": -1}, "--warmup must be 0 or more"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_config(EncodersConfig(queries=SAMPLE, **overrides))
    assert "\n" not in str(caught.value)


def test_bad_command_line_input_is_refused_before_a_model_loads(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown encoders"):
        bench("encoders", "--queries", str(SAMPLE), "--encoders", "torch,tflite", "--out", str(tmp_path))
    with pytest.raises(DataError, match="file not found"):
        bench("encoders", "--queries", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path))
    with pytest.raises(DataError, match="file not found"):
        bench("encoders", "--queries", str(tmp_path), "--out", str(tmp_path))  # a folder without queries.jsonl
    assert not list(tmp_path.glob("encoders.*"))


# --- with the real default model --------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    """The session's ONNX exports (one per model and worker), as ``tests/test_service_real.py`` keeps them."""
    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.mark.benchmark
@pytest.mark.slow
def test_encoders_smoke_run(onnx_cache: Path, tmp_path: Path, capsys):
    argv = ["--queries", str(SAMPLE), "--texts", "8", "--batch-sizes", "4,1", "--encoders", "torch,onnx"]
    argv += ["--warmup", "1", "--threads", "1", "--device", "cpu", "--onnx-cache", str(onnx_cache)]
    assert bench("encoders", *argv, "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "encoders.json").read_text())
    cells = [(row["encoder"], row["batch_size"], row["calls"]) for row in report["results"]]
    assert cells == [("torch", 1, 8), ("torch", 4, 2), ("onnx", 1, 8), ("onnx", 4, 2)]
    for row in report["results"]:
        assert row["texts"] == 8 and row["queries_per_s"] > 0 and row["seconds"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["ms_per_query"] > 0 and row["speedup_vs_torch_batch1"] > 0
    assert report["results"][0]["speedup_vs_torch_batch1"] == 1.0
    model = report["model"]
    assert model["full_dim"] == 384 and model["dims"] == [384, 256, 128, 64, 32]
    assert model["fingerprint"].startswith("sha256:")
    torch_info, onnx_info = report["encoders"]["torch"], report["encoders"]["onnx"]
    assert torch_info["device"] == "cpu" and torch_info["torch_threads"] == 1 and torch_info["load_s"] > 0
    assert "cosine_drift_vs_torch" not in torch_info
    drift = onnx_info["cosine_drift_vs_torch"]
    assert set(drift) == {"384", "256", "128", "64", "32"}
    assert all(0 <= v["mean"] <= v["max"] < 1e-3 for v in drift.values())  # float32 ONNX agrees with torch
    assert report["settings"]["threads"] == 1 and report["settings"]["distinct_texts"] == 8
    assert list(onnx_cache.glob("*/model.onnx"))
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "# Query encoder speed"
    assert (tmp_path / "encoders.md").read_text() in printed and "| torch | 1 | 8 |" in printed
    assert "## Embedding drift vs torch" in printed and "| onnx |" in printed


@pytest.mark.benchmark
@pytest.mark.slow
def test_onnx_alone_packed_and_padded(onnx_cache: Path, tmp_path: Path):
    """Without torch the model's facts come from the ONNX encoder (it has no torch model to read them from)."""
    argv = ["--queries", str(SAMPLE), "--texts", "8", "--batch-sizes", "4", "--encoders", "onnx,onnx-padded"]
    argv += ["--warmup", "1", "--threads", "1", "--device", "cpu", "--onnx-cache", str(onnx_cache)]
    assert bench("encoders", *argv, "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "encoders.json").read_text())
    assert [(row["encoder"], row["batch_size"]) for row in report["results"]] == [("onnx", 4), ("onnx-padded", 4)]
    model = report["model"]
    assert model["full_dim"] == 384 and model["dims"] == [384, 256, 128, 64, 32] and model["max_seq_length"] == 256
    assert list(onnx_cache.glob("*/model_packed.onnx"))


@pytest.mark.benchmark
@pytest.mark.slow
def test_encoders_take_the_model_and_dims_from_an_index(tmp_path: Path, encode_cache: Path):
    from benchmarks.encoders import run_encoders
    from tests.helpers.sample import build_sample

    index = tmp_path / "index"
    build_sample(index, encode_cache, data=SAMPLE, dims=[384, 64])
    config = EncodersConfig(
        queries=SAMPLE / "queries.jsonl",
        index=index,
        encoders=["torch"],
        batch_sizes=[2],
        texts=4,
        threads=1,
        device="cpu",
    )
    report = run_encoders(config)
    assert report["model"]["dims"] == [384, 64] and report["model"]["full_dim"] == 384
    assert [(row["encoder"], row["batch_size"], row["calls"]) for row in report["results"]] == [("torch", 2, 2)]
    assert report["results"][0]["speedup_vs_torch_batch1"] is None  # batch size 1 was not measured
    assert "cosine_drift_vs_torch" not in report["encoders"]["torch"]
