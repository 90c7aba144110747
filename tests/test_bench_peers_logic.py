"""``mrl bench peers`` without servers: settings checks, peer choice, answer parsing, ratios, the table."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest

from benchmarks import peers
from benchmarks.latency import CellResult, Outcome
from benchmarks.peers import APIS, OURS, SENTENCE_TRANSFORMERS, TXTAI, PeersConfig, check_config
from core.matryoshka import DimensionError

MANIFEST = SimpleNamespace(dims=[384, 128, 64], model=SimpleNamespace(full_dim=384))


def config(**overrides) -> PeersConfig:
    return PeersConfig(**{"index": "index", "data": "data", **overrides})


@pytest.fixture
def txtai_installed(monkeypatch):
    monkeypatch.setattr(peers, "txtai_missing", lambda: None)


def test_default_plan_is_full_and_64_with_both_peers(txtai_installed):
    plan = check_config(config(), MANIFEST)
    assert (plan.dims, plan.peers, plan.skipped) == ([384, 64], [TXTAI, SENTENCE_TRANSFORMERS], {})
    assert check_config(config(dims=[128]), MANIFEST).dims == [384, 128]  # the full dim is always measured
    no_64 = SimpleNamespace(dims=[384, 128], model=SimpleNamespace(full_dim=384))
    assert check_config(config(), no_64).dims == [384]


def test_txtai_is_skipped_by_default_but_required_when_named(monkeypatch):
    monkeypatch.setattr(peers, "txtai_missing", lambda: "txtai is not installed (pip install ...)")
    plan = check_config(config(), MANIFEST)
    assert plan.peers == [SENTENCE_TRANSFORMERS] and plan.skipped == {TXTAI: "txtai is not installed (pip install ...)"}
    assert check_config(config(peers=[SENTENCE_TRANSFORMERS]), MANIFEST).skipped == {}
    with pytest.raises(ValueError, match="--peers asks for txtai, but txtai is not installed"):
        check_config(config(peers=[TXTAI]), MANIFEST)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dims": [100]}, DimensionError, r"dims \[100\] are not in the index"),
        ({"peers": ["elasticsearch"]}, ValueError, r"unknown peers \['elasticsearch'\]"),
        ({"concurrency": [0]}, ValueError, "--concurrency must list positive numbers"),
        ({"requests": 0}, ValueError, "--requests must be positive"),
        ({"k": 101}, ValueError, "--k must be at most 100"),
        ({"warmup": -1}, ValueError, "--warmup must be 0 or more"),
        ({"max_queries": 0}, ValueError, "--max-queries must be positive"),
        ({"build_timeout_s": 0}, ValueError, "--build-timeout must be positive"),
        ({"device": "tpu"}, ValueError, "--device must be auto, cpu or gpu"),
    ],
)
def test_bad_settings_are_one_line_errors(txtai_installed, overrides, error, message):
    with pytest.raises(error, match=message):
        check_config(config(**overrides), MANIFEST)


def test_each_server_answer_shape_gives_ids_best_first():
    ours = {"results": [{"query": "q", "hits": [{"id": "d2", "score": 0.9}, {"id": "d1", "score": 0.5}]}]}
    assert APIS[OURS].hit_ids(ours) == ["d2", "d1"]
    assert APIS[SENTENCE_TRANSFORMERS].hit_ids({"hits": [{"id": "d2", "score": 0.9, "text": "t"}]}) == ["d2"]
    assert APIS[TXTAI].hit_ids([{"id": "d2", "text": "t", "score": 0.9}, ["d1", 0.5]]) == ["d2", "d1"]
    assert APIS[OURS].params("fever", 10, 64) == {"q": "fever", "k": 10, "dim": 64}
    assert APIS[TXTAI].params("fever", 100, 64) == {"query": "fever", "limit": 100}  # no dims: full only
    with pytest.raises(TypeError):
        APIS[SENTENCE_TRANSFORMERS].hit_ids({"hits": "none"})


def test_one_request_function_for_all_servers():
    def answer(request: httpx.Request) -> httpx.Response:
        q = request.url.params["q"]
        if q == "fails":
            return httpx.Response(503, json={"error": "overloaded"})
        body = {"hits": [{"id": "d1"}]} if q == "plain" else {"results": [{"hits": []}], "timings_ms": {"encode_ms": 2}}
        return httpx.Response(200, json=body if q != "empty" else {"detail": "nothing"})

    async def outcomes(api, queries: list[str]) -> list[Outcome]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://test") as client:
            return [await peers.request_sender(api)(client, api.params(q, 10)) for q in queries]

    plain, fails, empty = asyncio.run(outcomes(APIS[SENTENCE_TRANSFORMERS], ["plain", "fails", "empty"]))
    assert plain.error is None and plain.timings is None and plain.seconds >= 0
    assert fails.error.startswith("HTTP 503") and empty.error.startswith("HTTP 200 without hits")
    (ours,) = asyncio.run(outcomes(APIS[OURS], ["timed"]))
    assert ours.error is None and ours.timings == {"encode_ms": 2}


def cell(system: str, dim: int, concurrency: int, p50: float | None, rps: float) -> CellResult:
    return CellResult(system, dim, None, concurrency, 10, 10, 0, p50, p50, p50, p50, rps, 1.0, {}, None)


def test_ratios_compare_with_ours_at_full_dim_and_same_concurrency():
    results = [cell(OURS, 384, 1, 20.0, 50.0), cell(OURS, 384, 16, 100.0, 160.0), cell(OURS, 64, 1, 10.0, 100.0)]
    results += [cell(TXTAI, 384, 1, 40.0, 25.0), cell(TXTAI, 384, 16, None, 0.0)]
    systems = {
        OURS: {"build_s": 12.0, "quality": {"384": {"ndcg@10": 0.9, "recall@100": 1.0}, "64": {"ndcg@10": 0.8}}},
        TXTAI: {"build_s": 8.0, "quality": {"384": {"ndcg@10": 0.9, "recall@100": 1.0}}},
    }
    rows = peers.result_rows(results, systems, full_dim=384)
    assert [(r["system"], r["dim"], r["p50_ratio"], r["rps_ratio"]) for r in rows] == [
        (OURS, 384, 1.0, 1.0),
        (OURS, 384, 1.0, 1.0),
        (OURS, 64, 0.5, 2.0),
        (TXTAI, 384, 2.0, 0.5),
        (TXTAI, 384, None, 0.0),
    ]
    assert rows[2]["ndcg@10"] == 0.8 and rows[2]["recall@100"] is None and rows[3]["build_s"] == 8.0


def test_markdown_has_one_row_per_cell_and_says_why_a_peer_was_skipped():
    results = [cell(OURS, 384, 1, 20.0, 50.0), cell(SENTENCE_TRANSFORMERS, 384, 1, 30.0, 40.0)]
    quality = {"384": {"ndcg@10": 0.92, "recall@100": 1.0, "errors": 0, "not_asked": 0}}
    measured = {"status": "measured", "served_by": "x", "build_s": 3.0, "build_note": "n", "quality": quality}
    systems = {OURS: measured, SENTENCE_TRANSFORMERS: measured, TXTAI: {"status": "skipped", "reason": "not here"}}
    report = {
        "settings": {"quality_k": 100, "k": 10, "requests": 10, "warmup": 2},
        "machine": {"cpus_usable": 2, "load_average_1m": 1.0, "gpu": None},
        "index": {"model": "m", "num_vectors": 120, "path": "p"},
        "dataset": {"num_queries": 120, "name": "sample", "split": "test"},
        "systems": systems,
        "results": peers.result_rows(results, systems, full_dim=384),
    }
    text = peers.peers_markdown(report)
    assert "| ours | 384 | 1 | 20.0 | 20.0 | 20.0 | 50.0 | 0 | 1.00× | 1.00× | 0.920 | 1.000 | 3.0 |" in text
    assert "| sentence-transformers | 384 | 1 | 30.0 | 30.0 | 30.0 | 40.0 | 0 | 1.50× | 0.80× |" in text
    assert "- **txtai**: skipped: not here" in text
