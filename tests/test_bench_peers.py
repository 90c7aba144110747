"""Smoke run of ``mrl bench peers`` on the bundled sample: real servers, structure and sanity, never timings.

One index of ``data/sample_medical`` (dims 384 and 64) is built per module, from the session's encode
cache when another build has encoded the sample already; the benchmark then runs once
through the ``mrl bench`` argument parser with the sentence-transformers peer, and txtai when it is
installed. Same model, same passages, exact search: at the full dim all three must rank alike, which
checks that the peers are set up correctly (prompts, passages, normalisation, id mapping).

infinity runs only where ``MRL_INFINITY_VENV`` names a ready venv of it (``mrl bench peers`` makes one in
``runs/peers-venvs/infinity-0.0.78``): creating it downloads hundreds of MB, too much for every test run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import httpx
import pytest

from benchmarks.peer_servers import infinity
from benchmarks.peers import (
    INFINITY,
    INFINITY_ONNX,
    INFINITY_TORCH,
    OURS,
    SENTENCE_TRANSFORMERS,
    TXTAI,
    PeersConfig,
    add_peers_parser,
    run_peers,
)
from core.matryoshka import DimensionError
from tests.conftest import SAMPLE
from tests.helpers.sample import build_sample

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]

DIMS = [384, 64]
CONCURRENCY = [1, 2]
REQUESTS = 4
NDCG_TOLERANCE = 0.01  # same weights and exact search: only float noise of batched encoding may differ
WITH_TXTAI = importlib.util.find_spec("txtai") is not None


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory) -> Path:
    """The sample at ``DIMS`` (not the session's five), encoded by this build: the benchmark reports our index's
    build time next to the peers', and a build from the session's encode cache would take next to nothing."""
    folder = tmp_path_factory.mktemp("peers")
    build_sample(folder / "index", folder / "own-cache", dims=DIMS)
    return folder / "index"


def bench_peers(*argv: str) -> tuple[int, str]:
    """Run ``mrl bench peers ...`` through the parser the benchmark registers; return its code and its output."""
    parser = argparse.ArgumentParser(prog="mrl")
    bench = parser.add_subparsers(dest="command", required=True).add_parser("bench")
    add_peers_parser(bench.add_subparsers(dest="action", required=True))
    args = parser.parse_args(["bench", "peers", *argv])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = args.handler(args)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def peers_run(sample_index: Path, tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("peers-report")
    peers = [SENTENCE_TRANSFORMERS, TXTAI] if WITH_TXTAI else [SENTENCE_TRANSFORMERS]
    argv = ["--index", str(sample_index), "--data", str(SAMPLE), "--max-queries", "40", "--peers", ",".join(peers)]
    argv += ["--concurrency", ",".join(map(str, CONCURRENCY)), "--requests", str(REQUESTS), "--warmup", "1"]
    argv += ["--device", "cpu", "--encoder-threads", "1", "--ready-timeout", "180", "--out", str(out), "--no-onnx"]
    code, printed = bench_peers(*argv)
    assert code == 0
    return json.loads((out / "peers.json").read_text()), out, printed


def test_every_system_is_measured_without_errors(peers_run):
    report, out, printed = peers_run
    peers = [SENTENCE_TRANSFORMERS, TXTAI] if WITH_TXTAI else [SENTENCE_TRANSFORMERS]
    cells = [(row["system"], row["dim"], row["concurrency"]) for row in report["results"]]
    expected = [(OURS, dim, level) for dim in DIMS for level in CONCURRENCY]
    assert cells == expected + [(peer, 384, level) for peer in peers for level in CONCURRENCY]
    for row in report["results"]:
        assert row["errors"] == 0 and row["first_error"] is None and row["sent"] == REQUESTS
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["throughput_rps"] > 0
        assert row["p50_ratio"] > 0 and row["rps_ratio"] > 0 and row["build_s"] > 0
    assert all(row["p50_ratio"] == 1.0 for row in report["results"] if row["system"] == OURS and row["dim"] == 384)
    assert [(row["system"], row["concurrency"]) for row in report["embeddings"]] == [(OURS, c) for c in CONCURRENCY]
    assert all(row["errors"] == 0 and row["sent"] == REQUESTS for row in report["embeddings"])
    assert report["systems"][OURS]["norm_at_dim"]["min"] == pytest.approx(1.0, abs=1e-3)  # re-normalised at 64
    for name in [OURS, *peers]:
        system = report["systems"][name]
        assert system["status"] == "measured" and system["url"].startswith("http://127.0.0.1:")
        assert all(q["errors"] == 0 and q["not_asked"] == 0 and q["queries"] == 40 for q in system["quality"].values())
        with pytest.raises(httpx.TransportError):  # every server process is gone
            httpx.get(f"{system['url']}/docs", timeout=2)
    assert report["index"]["num_vectors"] == 120 and report["dataset"]["num_queries"] == 40
    assert report["settings"]["dims"] == DIMS and report["machine"]["cpu_count"] >= 1
    assert "ours-onnx" not in report["systems"]  # --no-onnx
    if not WITH_TXTAI:
        assert TXTAI not in report["systems"]  # not asked for: neither run nor skipped
    assert not set(INFINITY) & set(report["systems"])  # not asked for: no venv made
    table = (out / "peers.md").read_text()
    assert table.startswith("# Peers: the same model and corpus, served side by side") and table in printed
    assert f"wrote {out / 'peers.json'}, {out / 'peers.md'}, {out / 'peers.png'}" in printed
    assert (out / "peers.png").read_bytes()[:4] == b"\x89PNG" and "## Embeddings endpoints" in table
    assert (out / "peers-server-ours-torch.log").is_file() and (
        out / "peers-server-sentence-transformers.log"
    ).is_file()


def full_dim_quality(report: dict, system: str) -> dict:
    return report["systems"][system]["quality"]["384"]


def test_sentence_transformers_peer_ranks_like_ours(peers_run):
    report = peers_run[0]
    ours, peer = full_dim_quality(report, OURS), full_dim_quality(report, SENTENCE_TRANSFORMERS)
    assert ours["ndcg@10"] > 0.5  # the base model is good on this sample; a broken id mapping gives ~0
    assert peer["ndcg@10"] == pytest.approx(ours["ndcg@10"], abs=NDCG_TOLERANCE)
    assert peer["recall@100"] == pytest.approx(ours["recall@100"], abs=NDCG_TOLERANCE)
    assert report["systems"][SENTENCE_TRANSFORMERS]["index_factories"] == {"384": "IndexFlatIP"}


def test_txtai_peer_ranks_like_ours(peers_run):
    pytest.importorskip("txtai")
    report = peers_run[0]
    ours, peer = full_dim_quality(report, OURS), full_dim_quality(report, TXTAI)
    assert peer["ndcg@10"] == pytest.approx(ours["ndcg@10"], abs=NDCG_TOLERANCE)
    assert peer["recall@100"] == pytest.approx(ours["recall@100"], abs=NDCG_TOLERANCE)
    settings = report["systems"][TXTAI]["settings"]["embeddings"]
    assert settings["path"] == report["index"]["model_folder"] and settings["faiss"] == {"components": "IDMap,Flat"}


@pytest.fixture
def infinity_venvs() -> Path:
    """The ``--peer-venvs`` folder of the ready venv that ``MRL_INFINITY_VENV`` names; skips the test without one."""
    named = os.environ.get("MRL_INFINITY_VENV")
    folder = Path(named) if named else None
    if folder is None or folder.name != infinity.venv_folder(folder.parent).name or not infinity.venv_ready(folder):
        pytest.skip(
            "MRL_INFINITY_VENV does not name a ready infinity venv (`mrl bench peers` makes one in "
            "runs/peers-venvs/infinity-0.0.78; creating it here would download hundreds of MB)"
        )
    return folder.parent


def test_infinity_agrees_with_ours_and_is_timed_on_embeddings(infinity_venvs: Path, sample_index: Path, tmp_path: Path):
    argv = ["--index", str(sample_index), "--data", str(SAMPLE), "--max-queries", "20", "--no-onnx"]
    argv += ["--peers", f"{INFINITY_TORCH},{INFINITY_ONNX}", "--peer-venvs", str(infinity_venvs)]
    argv += ["--out", str(tmp_path)]
    argv += ["--concurrency", ",".join(map(str, CONCURRENCY)), "--requests", str(REQUESTS), "--warmup", "1"]
    argv += ["--device", "cpu", "--encoder-threads", "1", "--ready-timeout", "180"]
    code, _ = bench_peers(*argv)
    report = json.loads((tmp_path / "peers.json").read_text())
    assert code == 0
    for name in INFINITY:
        system = report["systems"][name]
        assert system["status"] == "measured", system.get("reason")
        assert system["check"]["passed"] and system["check"]["min_cosine"] >= 0.999 and system["check"]["queries"] == 20
        assert system["norm_at_dim"]["dim"] == 64 and system["versions"]["infinity-emb"] == infinity.VERSION
        with pytest.raises(httpx.TransportError):  # stopped
            httpx.get(f"{system['url']}/health", timeout=2)
    cells = [(row["system"], row["concurrency"]) for row in report["embeddings"]]
    assert cells == [(name, level) for name in (OURS, *INFINITY) for level in CONCURRENCY]
    assert all(row["errors"] == 0 and row["rps_vs_best_infinity"] > 0 for row in report["embeddings"])
    assert {row["system"] for row in report["results"]} == {OURS}  # infinity has no search
    assert not (Path(report["index"]["model_folder"]) / infinity.ONNX_FILE).exists()  # exported into a copy
    assert (tmp_path / "peers.png").is_file() and (tmp_path / f"peers-server-{INFINITY_ONNX}.log").is_file()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dims": [100]}, DimensionError, r"dims \[100\] are not in the index"),
        ({"peers": ["elasticsearch"]}, ValueError, "unknown peers"),
        ({"requests": 0}, ValueError, "--requests must be positive"),
        ({"split": "dev"}, ValueError, r"qrels/dev.tsv: file not found"),
    ],
)
def test_bad_input_is_refused_before_any_server_starts(sample_index: Path, tmp_path: Path, overrides, error, message):
    settings = {"index": sample_index, "data": SAMPLE, "peers": [SENTENCE_TRANSFORMERS], "out": tmp_path}
    with pytest.raises(error, match=message):
        run_peers(PeersConfig(**{**settings, **overrides}))
    assert not list(tmp_path.iterdir())  # no server log: nothing was started


def test_an_index_without_the_judged_documents_is_refused(sample_index: Path, tiny_beir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="none of the judged documents"):
        run_peers(PeersConfig(index=sample_index, data=tiny_beir, peers=[SENTENCE_TRANSFORMERS], out=tmp_path))


MEASURED = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "wall_s", "sent")  # the ratios are recomputed


def test_rounds_start_every_server_again_and_each_cell_reports_its_median_round(sample_index: Path, tmp_path: Path):
    report = run_peers(
        PeersConfig(
            index=sample_index, data=SAMPLE, peers=[], onnx=False, rounds=2, concurrency=[1], requests=3, warmup=1,
            max_queries=5, device="cpu", encoder_threads=1, ready_timeout_s=180, out=tmp_path,
        )
    )  # fmt: skip
    assert [measured["round"] for measured in report["rounds"]] == [1, 2]
    for measured in report["rounds"]:
        assert [(row["system"], row["dim"]) for row in measured["results"]] == [(OURS, 384), (OURS, 64)]
        assert [(row["system"], row["sent"]) for row in measured["embeddings"]] == [(OURS, 3)]
    for key in ("results", "embeddings"):  # of two rounds, the slower one: a real measurement, whole
        for position, row in enumerate(report[key]):
            runs = [measured[key][position] for measured in report["rounds"]]
            slower = min(runs, key=lambda run: run["throughput_rps"])
            assert [row[name] for name in MEASURED] == [slower[name] for name in MEASURED]
    assert set(report["systems"][OURS]["quality"]) == {"384", "64"}  # scored in the first round only
    assert "## Rounds" in (tmp_path / "peers.md").read_text()
