"""``mrl bench backends``: the comparison arithmetic exactly, bad input in one line, and one tiny real run.

The real run builds the bundled sample and 2,000 synthetic vectors on FAISS and on the session's real
Milvus 2.3.5 server (``--milvus-uri``, so the benchmark starts no second one), with the session's encode
cache (``--cache``: the sample's documents are encoded once per session), serves each with
``mrl serve`` and checks the report's structure and sanity: exact indexes find the exact top 10 on
both backends, latencies are positive and ordered, every ratio is the quotient of the report's own
figures, and nothing is left running or stored. Never timings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.backends import (
    BACKENDS,
    backends_markdown,
    build_totals,
    comparison_rows,
    placeholder_documents,
    ratio,
    synthetic_vectors,
)
from benchmarks.cli import add_bench_parser
from mrl.cli import main
from tests.conftest import SAMPLE  # the Milvus fixtures come from tests.conftest's plugin

pytestmark = pytest.mark.benchmark

DIMS = [384, 64]
SYNTHETIC = 2000
REQUESTS = 20


def bench(*argv: str) -> int:
    """Run ``mrl bench ...`` through the benchmarks' own parser (as mrl/cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="mrl")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


# --- pure logic -----------------------------------------------------------------------------


def hand_made_report() -> dict:
    """Two corpora; the synthetic one measured on FAISS only (Milvus failed to answer its dim 64)."""

    def backend(total: float, per_dim: dict[str, float], recall: dict[str, float]) -> dict:
        dims = {dim: {"factory": "Flat", "build_seconds": seconds} for dim, seconds in per_dim.items()}
        return {"build": {"total_s": total, "corpus_s": 0.1, "dims": dims}, "recall_at_10": recall}

    def cell(corpus: str, name: str, dim: int, p50: float, p99: float) -> dict:
        server = {"search_ms": 0.4 if name == "faiss" else 3.5, "total_ms": p50 - 1.0}
        row = {"corpus": corpus, "backend": name, "dim": dim, "concurrency": 1, "p50_ms": p50, "p99_ms": p99}
        return {**row, "server_ms": server}

    corpora = {
        "real": {
            "num_vectors": 120,
            "backends": {
                "faiss": backend(2.0, {"384": 0.5, "64": 0.25}, {"384": 1.0, "64": 1.0}),
                "milvus": backend(8.0, {"384": 4.0, "64": 3.0}, {"384": 1.0, "64": 0.9}),
            },
        },
        "synthetic": {"num_vectors": 2000, "backends": {"faiss": backend(1.0, {"64": 0.2}, {"64": 1.0})}},
    }
    results = [cell("real", "faiss", 384, 10.0, 20.0), cell("real", "milvus", 384, 15.0, 50.0)]
    results += [cell("real", "faiss", 64, 8.0, 16.0), cell("real", "milvus", 64, 12.0, 40.0)]
    results += [cell("synthetic", "faiss", 64, 9.0, 18.0)]
    for row in results:
        row["errors"] = 0
    return {"corpora": corpora, "results": results}


def test_comparison_rows_pair_the_backends_and_divide_milvus_by_faiss():
    rows = comparison_rows(hand_made_report())
    assert [(r["corpus"], r["dim"], r["concurrency"]) for r in rows] == [
        ("real", 384, 1),
        ("real", 64, 1),
        ("synthetic", 64, 1),
    ]
    first = rows[0]
    assert (first["faiss_p50_ms"], first["milvus_p50_ms"], first["p50_ratio"]) == (10.0, 15.0, 1.5)
    assert (first["faiss_p99_ms"], first["milvus_p99_ms"], first["p99_ratio"]) == (20.0, 50.0, 2.5)
    assert (first["faiss_build_s"], first["milvus_build_s"], first["build_ratio"]) == (0.5, 4.0, 8.0)
    assert rows[1]["milvus_recall_at_10"] == 0.9 and rows[1]["build_ratio"] == 12.0
    missing = rows[2]  # nothing measured on Milvus: figures and ratios are None, never 0
    assert missing["milvus_p50_ms"] is None and missing["p50_ratio"] is None and missing["build_ratio"] is None
    assert missing["faiss_recall_at_10"] == 1.0 and missing["milvus_recall_at_10"] is None
    server = [first[f"{name}_server_{figure}_ms"] for name in ("faiss", "milvus") for figure in ("search", "total")]
    assert server == [0.4, 9.0, 3.5, 14.0]


def test_build_totals_and_markdown():
    report = hand_made_report()
    totals = build_totals(report)
    assert totals[0] == {
        "corpus": "real",
        "num_vectors": 120,
        "factories": ["Flat"],
        "faiss_total_s": 2.0,
        "milvus_total_s": 8.0,
        "ratio": 4.0,
    }
    assert totals[1]["milvus_total_s"] is None and totals[1]["ratio"] is None
    report |= {
        "comparison": comparison_rows(report),
        "settings": {"num_query_texts": 5, "data": "q", "device": "cpu", "k": 10, "requests": 20, "warmup": 2},
        "machine": {"cpus_usable": 2, "load_average_1m": 0.5, "gpu": None},
        "milvus": {"uri": "http://127.0.0.1:1", "started_by_benchmark": True, "server_version": "v2.3.5"},
        "model": {"name": "m", "full_dim": 384},
    }
    text = backends_markdown(report)
    assert text.startswith("# FAISS against Milvus: latency, recall and build time\n")
    real = "| real | 384 | 1 | 10.0 | 20.0 | 15.0 | 50.0 | 1.50× | 2.50× | 1.0000 | 1.0000 | 0.500 | 4.00 | 8.00× |"
    assert f"{real} 0.400 / 3.500 | 0/0 |" in text
    assert (
        "| synthetic | 64 | 1 | 9.000 | 18.0 | – | – | – | – | 1.0000 | – | 0.200 | – | – | 0.400 / – | 0/– |" in text
    )
    assert "| real | 120 | `Flat` | 2.00 | 8.00 | 4.00× |" in text


def test_ratio_needs_both_figures():
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_synthetic_corpus_is_seeded_unit_length_and_clustered():
    vectors = synthetic_vectors(3000, 384, seed=7)
    assert vectors.dtype == np.float32 and vectors.shape == (3000, 384)
    np.testing.assert_array_equal(vectors, synthetic_vectors(3000, 384, seed=7))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    nearest = np.sort(vectors[:50] @ vectors.T, axis=1)[:, -2]  # the closest other vector
    assert nearest.min() > 0.5  # each vector has cluster mates (random 384-d vectors would be ~0.15 apart)
    assert [d.id for d in placeholder_documents(2)] == ["synthetic-0", "synthetic-1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "no/such/folder"], "no/such/folder: not found (expected a BEIR folder"),
        (["--index-type", "PQ16"], "index type 'PQ16' has no Milvus equivalent"),
        (["--milvus-uri", "milvus.db"], "--milvus-uri must be a Milvus server"),
        (["--concurrency", "0"], "--concurrency must list positive numbers"),
        (["--synthetic", "-1"], "--synthetic must be 0 or more"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv: list[str], message: str, tmp_path: Path, capsys):
    assert main(["bench", "backends", *argv, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mrl: error: ") and message in error and len(error.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.slow
def test_dims_the_model_does_not_have_are_refused(tmp_path: Path, capsys):
    assert main(["bench", "backends", "--data", str(SAMPLE), "--dims", "500", "--out", str(tmp_path)]) == 2
    assert "dimensions [500] are not between 1 and the model's embedding dimension 384" in capsys.readouterr().err


# --- a tiny real run ------------------------------------------------------------------------


@pytest.mark.slow
def test_faiss_and_milvus_side_by_side(milvus_server_uri: str, encode_cache: Path, tmp_path: Path, capsys):
    argv = ["--data", str(SAMPLE), "--synthetic", str(SYNTHETIC), "--dims", ",".join(map(str, DIMS))]
    argv += ["--requests", str(REQUESTS), "--warmup", "2", "--milvus-uri", milvus_server_uri, "--out", str(tmp_path)]
    argv += ["--cache", str(encode_cache)]  # the session's: the sample's documents, if a build encoded them already
    assert bench("backends", *argv) == 0
    report = json.loads((tmp_path / "backends.json").read_text())
    assert report["milvus"] == {**report["milvus"], "uri": milvus_server_uri, "started_by_benchmark": False}
    assert report["settings"]["dims"] == DIMS and report["encode"]["documents"] == 120
    corpora = report["corpora"]
    assert {name: corpus["num_vectors"] for name, corpus in corpora.items()} == {
        "sample_medical": 120,
        "synthetic": 2000,
    }

    for corpus in corpora.values():
        for backend in BACKENDS:
            measured = corpus["backends"][backend]
            build = measured["build"]
            assert list(build["dims"]) == ["384", "64"] and build["total_s"] > 0
            assert all(d["factory"] == "Flat" and d["build_seconds"] >= 0 for d in build["dims"].values())
            assert measured["recall_at_10"] == {"384": 1.0, "64": 1.0}  # exact on both: the exact top 10
            assert measured["server"]["num_vectors"] == corpus["num_vectors"]
            assert measured["server"]["index_version"] == build["version"]

    results = report["results"]
    assert len(results) == len(corpora) * len(BACKENDS) * len(DIMS)
    for row in results:
        assert row["errors"] == 0 and row["sent"] == row["requested"] == REQUESTS and not row["cut_short"]
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    cells = {(r["corpus"], r["backend"], r["dim"]): r for r in results}
    comparison = report["comparison"]
    assert [(r["corpus"], r["dim"]) for r in comparison] == [(c, d) for c in corpora for d in DIMS]
    for row in comparison:
        faiss, milvus = (cells[(row["corpus"], backend, row["dim"])] for backend in BACKENDS)
        assert row["p50_ratio"] == round(milvus["p50_ms"] / faiss["p50_ms"], 3)
        assert row["p99_ratio"] == round(milvus["p99_ms"] / faiss["p99_ms"], 3)
        builds = [corpora[row["corpus"]]["backends"][b]["build"]["dims"][str(row["dim"])] for b in BACKENDS]
        faiss_s, milvus_s = (build["build_seconds"] for build in builds)  # FAISS may round to 0.0 s: no ratio
        assert row["build_ratio"] == (round(milvus_s / faiss_s, 3) if faiss_s else None) and milvus_s > 0
        assert row["faiss_recall_at_10"] == row["milvus_recall_at_10"] == 1.0

    printed = capsys.readouterr().out
    assert (tmp_path / "backends.md").read_text() in printed
    assert "| corpus | dim | conc. | FAISS p50 ms | FAISS p99 ms | Milvus p50 ms | Milvus p99 ms |" in printed
    assert (tmp_path / "backends.png").stat().st_size > 0
    for corpus in corpora.values():  # every server process is gone
        for backend in BACKENDS:
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{corpus['backends'][backend]['server']['url']}/healthz", timeout=2)
    from index.milvus import MilvusBackend

    client = MilvusBackend(milvus_server_uri)
    try:  # and nothing of the benchmark is left in Milvus
        assert [c for c in client.all_collections() if c.startswith("mrl_bench_")] == []
    finally:
        client.close()
