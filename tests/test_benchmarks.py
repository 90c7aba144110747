"""Smoke runs of both benchmarks on the bundled sample: structure and sanity of the outputs, never timings.

One index of ``data/sample_medical`` with one dim pair (384, 64) and no measured plans is built per
module with ``index.build.build_index`` and the session's encode cache (no text is encoded twice in a
session). The latency benchmark starts a real ``mrl serve`` process; the two-stage benchmark runs
through the ``mrl bench`` argument parser.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from benchmarks.cli import add_bench_parser
from benchmarks.latency import Cell, LatencyConfig, Outcome, plan_cells, run_latency, summarize
from benchmarks.latency import running_server as start_server
from core.matryoshka import DimensionError
from core.servers import ServerError
from tests.conftest import SAMPLE
from tests.helpers.sample import build_sample

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]

DIMS = [384, 64]
QUALITY_METRICS = ("ndcg@10", "mrr@10", "recall@100")


@pytest.fixture(scope="module")
def bench_index(tmp_path_factory, encode_cache: Path) -> Path:
    """The sample at dims 384 and 64 without plans (the session's ``sample_index`` has all five dims, and plans)."""
    root = tmp_path_factory.mktemp("bench") / "index"
    build_sample(root, encode_cache, dims=DIMS)
    return root


def bench(*argv: str) -> int:
    """Run ``mrl bench ...`` through the benchmarks' own parser (as mrl/cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="mrl")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


def smoke_config(index: Path, out: Path, **overrides) -> LatencyConfig:
    settings = dict(
        index=index,
        queries=SAMPLE,
        dims=[64],
        concurrency=[1, 2],
        requests=4,
        warmup=1,
        encoders=["torch"],
        rerank=True,
        device="cpu",
        time_limit_s=120.0,
        ready_timeout_s=180.0,
        out=out,
    )
    return LatencyConfig(**{**settings, **overrides})


# --- two-stage quality ----------------------------------------------------------------------


def test_two_stage_quality_on_the_sample(bench_index: Path, tmp_path: Path, capsys):
    # 12 candidates x k=10 = the whole 120-document corpus: re-scoring it at 384 must give exactly 384's ranking.
    argv = ["--index", str(bench_index), "--data", str(SAMPLE), "--candidates", "12", "--device", "cpu"]
    assert bench("two-stage", *argv, "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "two_stage.json").read_text())
    single, staged = report["single_stage"], report["two_stage"]
    assert list(single) == ["384", "64"] and list(staged) == ["64"]
    assert report["full_dim"] == 384 and report["shortlist"] == 120 and staged["64"]["rerank_dim"] == 384
    assert report["dataset"]["num_queries"] == 120 and report["dataset"]["judged_documents_missing_from_index"] == 0
    assert report["encode"]["queries"] == 120 and report["machine"]["cpu_count"] >= 1
    for values in [*single.values(), *staged.values()]:
        assert all(0.0 <= values[name] <= 1.0 for name in QUALITY_METRICS)
        assert 0.0 <= values["ms_per_query_p50"] and 0.0 <= values["ms_per_query_mean"]
    for name in QUALITY_METRICS:
        assert staged["64"][name] == pytest.approx(single["384"][name], abs=1e-4)
    assert single["384"]["ndcg@10"] > 0.5  # the base model is good on this sample; a broken id mapping gives ~0
    printed = capsys.readouterr().out
    assert "| dim | single-stage NDCG@10 | two-stage (→384) NDCG@10 | Δ | two-stage % of full |" in printed
    assert printed.splitlines()[0] == "# Two-stage search quality"
    assert (tmp_path / "two_stage.md").read_text() in printed


def test_two_stage_refuses_an_index_without_the_judged_documents(bench_index: Path, tiny_beir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="none of the judged documents"):
        bench("two-stage", "--index", str(bench_index), "--data", str(tiny_beir), "--device", "cpu")


# --- HTTP latency ---------------------------------------------------------------------------


def test_latency_against_a_real_server(bench_index: Path, tmp_path: Path):
    report = run_latency(smoke_config(bench_index, tmp_path, targets=["latency_budget_ms=10000"]))
    cells = [(r["dim"], r["rerank_dim"], r["concurrency"], r["target"]) for r in report["results"]]
    target = "latency_budget_ms=10000"
    assert cells == [(64, None, 1, None), (64, None, 2, None), (64, 384, 1, None), (64, 384, 2, None),
                     (0, None, 1, target), (0, None, 2, target)]  # fmt: skip
    # the sample index has no measured plans: the budget, which every dim fits, gets the largest
    assert report["results"][-1]["plans"] == {"384": 4} and report["results"][0]["plans"] is None
    for row in report["results"]:
        assert row["encoder"] == "torch" and row["errors"] == 0 and row["first_error"] is None
        assert row["sent"] == row["requested"] == 4 and not row["cut_short"]
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["throughput_rps"] > 0
        assert set(row["server_ms"]) == {"encode_ms", "search_ms", "rerank_ms", "total_ms"}
        assert all(value >= 0 for value in row["server_ms"].values())
    server = report["servers"]["torch"]
    assert server["encoder"] == "torch" and server["num_vectors"] == 120 and server["full_dim"] == 384
    assert server["url"].startswith("http://127.0.0.1:") and 0 < server["healthz_p50_ms"] < row["p50_ms"]
    in_process = report["in_process"]["torch"]
    assert in_process["texts"] == 4 and 0 < in_process["p50_ms"] <= in_process["p95_ms"]
    assert in_process["queries_per_s"] > 0 and in_process["batch_16_queries_per_s"] > 0
    assert report["settings"]["dims"] == [64] and report["machine"]["libraries"]["aiohttp"]
    with pytest.raises(httpx.TransportError):  # the server process is gone
        httpx.get(f"{server['url']}/healthz", timeout=2)
    assert json.loads((tmp_path / "latency.json").read_text())["results"] == report["results"]
    table = (tmp_path / "latency.md").read_text()
    assert table.startswith("# Search latency over HTTP") and "| torch | 64 | →384 | 2 | 4 | 0 |" in table
    assert "| torch | latency_budget_ms=10000 → 384 (4) | – | 2 | 4 | 0 |" in table
    ratio = report["results"][0]["p50_ms"] / in_process["p50_ms"]
    assert f"| {ratio:.2f}× |" in table and "- torch: in this process, one query per call, p50" in table


def test_server_variants_are_every_combination_each_with_its_flags(bench_index: Path, tmp_path: Path):
    from benchmarks.latency import server_command, server_variants

    config = smoke_config(bench_index, tmp_path, workers=[1, 2], http=["httptools", "h11"])
    variants = server_variants(config)
    assert [variant.label("onnx") for variant in variants] == [
        "onnx workers=1 http=httptools", "onnx workers=1 http=h11",
        "onnx workers=2 http=httptools", "onnx workers=2 http=h11",
    ]  # fmt: skip
    command = server_command(config, "onnx", 8000, variants[-1])
    assert command[command.index("--workers") + 1] == "2" and command[command.index("--http") + 1] == "h11"
    assert [variant.label("torch") for variant in server_variants(smoke_config(bench_index, tmp_path))] == ["torch"]
    assert "--workers" not in server_command(smoke_config(bench_index, tmp_path), "torch", 8000)


def test_each_benchmark_encoder_starts_its_server_with_the_settings_that_select_it(bench_index: Path, tmp_path: Path):
    from benchmarks import ENCODERS, encoder_settings
    from benchmarks.latency import server_command
    from mrl.cli import build_parser

    for encoder in ENCODERS:
        command = server_command(smoke_config(bench_index, tmp_path), encoder, 8000)
        args = build_parser().parse_args(command[command.index("serve") :])  # the flags `mrl serve` has
        assert {name: getattr(args, name) for name in encoder_settings(encoder)} == encoder_settings(encoder)
    padded = server_command(smoke_config(bench_index, tmp_path), "onnx-padded", 8000)
    assert padded[padded.index("--onnx-pack-tokens") + 1] == "0" and "--onnx-quantize" not in padded


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dims": [100]}, DimensionError, r"dims \[100\] are not in the index"),
        ({"encoders": ["tensorflow"]}, ValueError, "unknown encoders"),
        ({"concurrency": [0]}, ValueError, "--concurrency must list positive numbers"),
        ({"requests": 0}, ValueError, "--requests must be positive"),
        ({"dims": [384]}, ValueError, "--rerank needs a dim below the full dimension 384"),
        ({"targets": ["min_quality=high"]}, ValueError, "--targets takes min_quality=NUMBER or latency_budget_ms"),
        ({"targets": ["dim=64"]}, ValueError, "got 'dim=64'"),
        ({"workers": [0]}, ValueError, "--workers must list counts from 1 to 64"),
        ({"http": ["curl"]}, ValueError, "--http must list parsers from auto, httptools, h11"),
    ],
)
def test_latency_refuses_bad_settings_before_starting_a_server(
    bench_index: Path, tmp_path: Path, overrides, error, message
):
    with pytest.raises(error, match=message):
        run_latency(smoke_config(bench_index, tmp_path, **overrides))
    assert not list(tmp_path.iterdir())  # no server log: nothing was started


def test_a_server_that_cannot_start_is_reported_with_its_error(tmp_path: Path):
    config = smoke_config(tmp_path / "no-index", tmp_path, ready_timeout_s=60.0)
    log = tmp_path / "server.log"
    with pytest.raises(ServerError, match="exited with code 2") as caught:
        with start_server(config, "torch", log):
            pass
    assert "index not found" in str(caught.value) and str(log) in str(caught.value)


def test_summary_counts_failures_apart_from_latencies():
    outcomes = [Outcome(0.010, {"encode_ms": 4.0, "search_ms": 1.0}), Outcome(0.030, {"encode_ms": 6.0})]
    outcomes.append(Outcome(5.0, None, "HTTP 503: not ready"))
    result = summarize("torch", Cell(64, 2), requested=4, outcomes=outcomes, wall_s=0.5)
    assert (result.sent, result.errors, result.first_error, result.cut_short) == (3, 1, "HTTP 503: not ready", True)
    assert result.p50_ms == pytest.approx(20.0) and result.p99_ms <= 30.0 and result.throughput_rps == 4.0
    assert result.server_ms["encode_ms"] == 5.0 and result.server_ms["search_ms"] == 0.5
    assert plan_cells([384, 64], [1, 16], rerank_dim=384)[-2:] == [Cell(64, 1, 384), Cell(64, 16, 384)]


def test_fairness_against_a_real_server(bench_index: Path, tmp_path: Path, capsys):
    """`mrl bench fairness`: large embedding requests alone, then with searches meanwhile; figures from the run."""
    assert bench("fairness", "--index", str(bench_index), "--large", "2", "--texts", "8", "--chars", "300",
                 "--out", str(tmp_path)) == 0  # fmt: skip
    report = json.loads((tmp_path / "fairness.json").read_text())
    assert len(report["large_alone_s"]) == len(report["large_with_searches_s"]) == 2
    assert all(seconds > 0 for seconds in report["large_alone_s"] + report["large_with_searches_s"])
    assert report["large_growth"] == round(max(report["large_with_searches_s"]) / max(report["large_alone_s"]) - 1, 4)
    if report["searches"]:
        assert 0 < report["search_p50_ms"] <= report["search_p95_ms"] <= report["search_max_ms"]
    printed = capsys.readouterr().out
    assert "| 2 × 8 × 300 chars |" in printed and (tmp_path / "fairness.md").read_text() in printed


def test_fairness_texts_are_distinct_and_exactly_as_long_as_asked():
    from benchmarks.fairness import FairnessConfig, large_texts

    texts = large_texts(3, FairnessConfig(index=Path("x"), texts=5, chars=1990))
    assert len(set(texts)) == 5 and {len(text) for text in texts} == {1990}
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="--texts must be positive"):
        bench("fairness", "--index", "x", "--texts", "0")


def test_each_shadow_fraction_gets_its_own_server_flag(tmp_path: Path):
    from benchmarks.latency import ServerVariant, server_command

    config = LatencyConfig(index=tmp_path, queries=tmp_path, shadow_fractions=[0, 0.02])
    command = server_command(config, "onnx", 8000, ServerVariant(shadow_fraction=0.02))
    assert command[command.index("--shadow-fraction") + 1] == "0.02"
    assert "--shadow-fraction" not in server_command(config, "onnx", 8000)  # None: the server's default
