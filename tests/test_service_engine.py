"""Unit tests of the service's parts without HTTP: index slot, micro-batcher, re-ranking, errors, settings, CLI."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest

from core.matryoshka import truncate_normalize
from index.search import rerank
from service.batching import EncoderFault, MicroBatcher
from service.cli import ServeError, add_serve_parser, run_serve, settings_from_args
from service.errors import (
    InvalidRequest,
    NotReady,
    Overloaded,
    ReloadFailed,
    Unauthorized,
    UnknownDimension,
    describe_validation_errors,
    error_kind,
)
from service.limits import RequestLimits
from service.settings import ServiceSettings
from service.slot import IndexSlot


class FakeLoaded:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


# --- index slot ---------------------------------------------------------------------------


def test_swapped_index_closes_after_its_last_search():
    old, new = FakeLoaded("old"), FakeLoaded("new")
    slot = IndexSlot(old)
    with slot.acquire() as first, slot.acquire() as second:
        assert first is second is old
        assert slot.swap(new) is old
        with slot.acquire() as third:
            assert third is new  # new searches see the new version at once
        assert old.closed == 0  # two searches still run on the old one
    assert old.closed == 1 and new.closed == 0


def test_idle_index_closes_on_swap_and_a_closed_slot_refuses():
    old, new = FakeLoaded("old"), FakeLoaded("new")
    slot = IndexSlot(old)
    slot.swap(new)
    assert old.closed == 1
    slot.close()
    slot.close()
    assert new.closed == 1
    with pytest.raises(NotReady):
        with slot.acquire():
            pass


# --- micro-batcher ------------------------------------------------------------------------


def recording_encoder(calls: list[tuple[str, list[str]]]):
    def encode(texts: list[str], kind: str) -> np.ndarray:
        calls.append((kind, list(texts)))
        return np.array([[len(text), kind == "query"] for text in texts], dtype=np.float32)

    return encode


def run_batcher(batcher: MicroBatcher, *requests: tuple[list[str], str]) -> list[np.ndarray]:
    async def main() -> list[np.ndarray]:
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.encode(texts, kind) for texts, kind in requests))
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_batches_up_to_the_maximum_one_text_of_each_in_turn():
    calls: list = []
    sizes: list[int] = []
    batcher = MicroBatcher(recording_encoder(calls), max_batch=2, max_wait_s=0, on_batch=lambda n, s: sizes.append(n))
    results = run_batcher(batcher, (["a", "bb"], "query"), (["ccc"], "query"), (["dddd", "e"], "query"))
    assert [texts for _, texts in calls] == [["a", "ccc"], ["dddd", "bb"], ["e"]]  # round robin
    assert sizes == [2, 2, 1]
    # Every request gets its own rows back, in order.
    assert [r[:, 0].tolist() for r in results] == [[1, 2], [3], [4, 1]]


def test_a_request_that_finds_the_encoder_idle_is_encoded_at_once(monkeypatch):
    import service.batching as batching

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds, *args):
        slept.append(seconds)
        return await real_sleep(seconds, *args)

    monkeypatch.setattr(batching.asyncio, "sleep", recording_sleep)
    calls: list = []
    run_batcher(MicroBatcher(recording_encoder(calls)), (["alone"], "query"))
    assert calls == [("query", ["alone"])] and slept == []  # no wait for texts that may never come
    assert ServiceSettings(index=Path("x")).batch_max_wait_ms == 0


def test_texts_that_arrive_while_the_encoder_is_busy_form_the_next_batch():
    import threading

    release, calls = threading.Event(), []

    def slow(texts: list[str], kind: str) -> np.ndarray:
        calls.append(list(texts))
        if len(calls) == 1:
            release.wait(5)
        return np.ones((len(texts), 2), dtype=np.float32)

    async def main():
        batcher = MicroBatcher(slow)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.encode(["first"], "query"))
            while not calls:
                await asyncio.sleep(0.001)
            later = [asyncio.ensure_future(batcher.encode([f"t{i}"], "query")) for i in range(5)]
            await asyncio.sleep(0.01)
            release.set()
            await asyncio.gather(first, *later)
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert calls == [["first"], ["t0", "t1", "t2", "t3", "t4"]]


def test_token_counts_noted_while_encoding_reach_each_request_of_a_shared_batch():
    def counting(texts: list[str], kind: str):
        return np.ones((len(texts), 2), dtype=np.float32), [len(text) for text in texts]

    async def main():
        batcher = MicroBatcher(counting)
        await batcher.start()
        try:
            return await asyncio.gather(
                batcher.encode_counted(["ab", "cde"], "query"), batcher.encode_counted(["f"], "query")
            )
        finally:
            await batcher.stop()

    (first, first_tokens), (second, second_tokens) = asyncio.run(main())
    assert (first.shape, first_tokens, second.shape, second_tokens) == ((2, 2), 5, (1, 2), 1)
    plain = run_batcher(MicroBatcher(recording_encoder([])), (["x"], "query"))  # an encoder that does not count
    assert plain[0].shape == (1, 2)


def test_an_encoder_that_miscounts_fails_its_request():
    def wrong(texts: list[str], kind: str):
        return np.ones((len(texts), 2), dtype=np.float32), [1]

    async def main():
        batcher = MicroBatcher(wrong)
        await batcher.start()
        try:
            return await batcher.encode(["a", "b"], "query")
        finally:
            await batcher.stop()

    with pytest.raises(EncoderFault, match="2 texts"):
        asyncio.run(main())


def test_a_query_is_not_kept_waiting_behind_a_large_embedding_request():
    """The search's query goes into the next encoder call; that call and the documents' calls stay within budget."""
    import threading

    release, calls = threading.Event(), []

    def encode(texts: list[str], kind: str) -> np.ndarray:
        calls.append((kind, list(texts)))
        if len(calls) == 1:
            release.wait(5)
        return np.ones((len(texts), 2), dtype=np.float32)

    async def main():
        batcher = MicroBatcher(encode, max_batch=32, max_tokens=1000, cost=lambda text: min(len(text) // 4, 256))
        await batcher.start()
        try:
            long = {name: [f"{name}{i} " + "x" * 2000 for i in range(64)] for name in "ab"}  # 256 tokens each
            big = [asyncio.ensure_future(batcher.encode(texts, "document")) for texts in long.values()]
            while not calls:
                await asyncio.sleep(0.001)
            query = asyncio.ensure_future(batcher.encode(["gout"], "query"))
            await asyncio.sleep(0.01)
            release.set()
            await asyncio.gather(query, *big)
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert calls[1] == ("query", ["gout"])  # right after the call that was running when it arrived
    documents = [texts for kind, texts in calls if kind == "document"]
    assert max(len(texts) for texts in documents) == 3  # 3 × 256 tokens ≤ 1000 < 4 × 256
    assert sum(len(texts) for texts in documents) == 128
    assert all({text[0] for text in texts} == {"a", "b"} for texts in documents[:-1])  # both requests in turn


def test_queries_and_documents_are_encoded_separately():
    calls: list = []
    results = run_batcher(MicroBatcher(recording_encoder(calls)), (["q1", "q2"], "query"), (["doc"], "document"))
    assert sorted(calls) == [("document", ["doc"]), ("query", ["q1", "q2"])]
    assert results[0][:, 1].tolist() == [1, 1] and results[1][:, 1].tolist() == [0]


def run_requests(encode, requests: list[list[str]], *, on_batch=None, max_wait_s: float = 0.01):
    """Encode ``requests`` concurrently (one batch, thanks to the wait), then one more request; outcomes of both."""

    async def main():
        batcher = MicroBatcher(encode, max_wait_s=max_wait_s, on_batch=on_batch)
        await batcher.start()
        try:
            outcomes = await asyncio.gather(
                *(batcher.encode(texts, "query") for texts in requests), return_exceptions=True
            )
            after = await asyncio.wait_for(batcher.encode(["fine"], "query"), 5)
            return outcomes, after, batcher.alive
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_an_encoder_failure_fails_only_its_own_request_and_the_batcher_goes_on():
    calls: list[list[str]] = []

    def encode(texts: list[str], kind: str) -> np.ndarray:
        calls.append(texts)
        if "bad" in texts:
            raise RuntimeError("model crashed")
        return np.ones((len(texts), 2), dtype=np.float32)

    outcomes, after, alive = run_requests(encode, [["fine", "also fine"], ["bad"], ["fine too"]])
    assert calls[0] == ["fine", "bad", "fine too", "also fine"]  # one batch at first (one text per request in turn)
    assert outcomes[0].shape == (2, 2) and outcomes[2].shape == (1, 2)  # the neighbours are answered
    assert isinstance(outcomes[1], RuntimeError)
    assert after.shape == (1, 2) and alive


def test_an_encoder_returning_too_few_rows_fails_the_batch_not_the_worker():
    def encode(texts: list[str], kind: str) -> np.ndarray:
        return np.ones((max(len(texts) - 1, 1), 2), dtype=np.float32)  # one row short for any batch of two or more

    outcomes, after, alive = run_requests(encode, [["a", "b"], ["c"]])
    assert isinstance(outcomes[0], EncoderFault) and "1 rows for 2 texts" in str(outcomes[0])
    assert outcomes[1].shape == (1, 2)  # encoded again on its own
    assert after.shape == (1, 2) and alive


def test_a_failing_batch_observer_fails_nothing():
    def observer(size: int, seconds: float) -> None:
        raise ValueError("metrics broke")

    outcomes, after, alive = run_requests(
        lambda texts, kind: np.ones((len(texts), 2), dtype=np.float32), [["a"], ["b"]], on_batch=observer
    )
    assert [o.shape for o in outcomes] == [(1, 2), (1, 2)] and after.shape == (1, 2) and alive


def test_a_dead_worker_answers_not_ready_instead_of_hanging():
    async def main():
        batcher = MicroBatcher(lambda texts, kind: np.ones((len(texts), 2), dtype=np.float32), max_wait_s=0)
        await batcher.start()
        try:
            batcher._worker.cancel()  # the worker task ends, as an escaped BaseException would end it
            await asyncio.sleep(0)
            assert not batcher.alive
            with pytest.raises(NotReady, match="encoder is not running"):
                await asyncio.wait_for(batcher.encode(["a"], "query"), 5)
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_encoding_before_start_is_not_ready():
    with pytest.raises(NotReady):
        asyncio.run(MicroBatcher(recording_encoder([])).encode(["a"], "query"))


# --- two-stage re-ranking -----------------------------------------------------------------


def test_rerank_of_all_candidates_equals_exact_search():
    rng = np.random.default_rng(0)
    documents, queries = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(3, 16)).astype(np.float32)
    shortlist = np.tile(rng.permutation(50), (3, 1))
    scores, rows = rerank(documents, queries, shortlist, dim=8, k=5)
    exact = truncate_normalize(queries, 8) @ truncate_normalize(documents, 8).T
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :5], rtol=1e-5)


class CountingVectors:
    """Full vectors that count their reads, as an engine that keeps them (Milvus) serves them: by row arrays."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors, self.reads = vectors, []

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.reads.append(np.asarray(rows).tolist())
        return self.vectors[rows]


def test_rerank_reads_every_shortlisted_row_once_for_all_queries():
    rng = np.random.default_rng(1)
    documents, queries = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
    shortlist = np.stack([rng.choice(40, size=12, replace=False) for _ in queries])
    shortlist[1, -3:] = -1  # padding
    counting = CountingVectors(documents)
    assert [a.tolist() for a in rerank(counting, queries, shortlist, 8, 5)] == [
        a.tolist() for a in rerank(documents, queries, shortlist, 8, 5)
    ]
    assert counting.reads == [sorted(set(shortlist[shortlist >= 0].tolist()))]  # one read, each row once


def test_rerank_skips_padding_and_pads_short_lists():
    documents = np.eye(4, dtype=np.float32)
    scores, rows = rerank(documents, np.eye(4, dtype=np.float32)[:2], np.array([[2, -1, -1], [-1, -1, -1]]), 4, 2)
    assert rows.tolist() == [[2, -1], [-1, -1]]
    assert scores[0, 0] == pytest.approx(0.0) and np.isinf(scores[0, 1]) and np.isinf(scores[1]).all()


# --- limits and the error table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "at least one query is required"),
        (["a"] * 4, "at most 3 query texts per request, got 4"),
        (["ok", " "], "query 1 is empty"),
        (["x" * 11], "query is 11 characters long; at most 10 are allowed"),
    ],
)
def test_request_limits_say_what_is_allowed(texts: list[str], message: str):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        RequestLimits(max_k=5, max_query_chars=10, max_batch_queries=3).check_texts(texts)


def test_error_table_maps_each_exception_to_one_status():
    assert (error_kind(UnknownDimension(7, [8, 4])).status, error_kind(UnknownDimension(7, [8])).type) == (
        422,
        "unknown_dimension",
    )
    assert str(UnknownDimension(7, [8, 4])) == "dim 7 is not served; allowed: 8, 4"
    assert [error_kind(e()).status for e in (InvalidRequest, Unauthorized, ReloadFailed, Overloaded, NotReady)] == [
        422,
        401,
        409,
        429,
        503,
    ]
    assert (error_kind(KeyError("x")).status, error_kind(KeyError("x")).type) == (500, "internal_error")


def test_validation_errors_read_as_one_sentence():
    errors = [
        {"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}},
        {"type": "int_parsing", "loc": ("query", "k"), "msg": "Input should be a valid integer"},
        {"type": "value_error", "loc": ("body",), "msg": "Value error, give one"},
    ]
    assert describe_validation_errors(errors) == (
        "the request body is not valid JSON (Expecting value); "
        "query parameter 'k': Input should be a valid integer; body: give one"
    )


# --- settings and the serve command --------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mrl")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_flags_override_environment_settings(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MRL_INDEX", str(tmp_path / "from-env"))
    monkeypatch.setenv("MRL_MAX_K", "7")
    monkeypatch.setenv("MRL_API_KEY", "env-key")
    args = serve_args("--port", "9001", "--max-k", "9", "--encoder", "onnx", "--onnx-quantize")
    assert args.handler is run_serve
    settings = settings_from_args(args)
    assert settings.index == str(tmp_path / "from-env") and settings.port == 9001 and settings.max_k == 9
    assert settings.encoder == "onnx" and settings.onnx_quantize is True
    assert settings.api_key.get_secret_value() == "env-key" and "env-key" not in repr(settings)
    assert settings_from_args(serve_args("--index", "elsewhere")).locator().path == Path("elsewhere")


def test_every_setting_is_a_flag_generated_from_its_field(monkeypatch, capsys):
    """A setting is one field: its flag, type, help and default come from it (credentials: environment only)."""
    flags = serve_args("--index", "x")
    environment_only = {"milvus_token", "milvus_user", "milvus_password", "write_key"}
    assert set(ServiceSettings.model_fields) - set(vars(flags)) == environment_only
    settings = settings_from_args(serve_args("--index", "x", "--rerank-candidates", "4", "--no-onnx-quantize"))
    assert settings.rerank_candidates == 4 and settings.onnx_quantize is False  # rerank_candidates had no flag
    monkeypatch.setenv("MRL_LOG_QUERIES", "true")
    assert settings_from_args(serve_args("--index", "x")).log_queries is True  # a flag not given leaves the env
    assert settings_from_args(serve_args("--index", "x", "--no-log-queries")).log_queries is False
    with pytest.raises(SystemExit):
        serve_args("--index", "x", "--encoder", "tensorflow")
    assert "argument --encoder: invalid choice: 'tensorflow'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_args("--help")
    shown = " ".join(capsys.readouterr().out.split())
    for name in set(ServiceSettings.model_fields) - environment_only:
        assert f"[MRL_{name.upper()}]" in shown
    assert "(default: 100) [MRL_MAX_K]" in shown and "(default: 64 KiB) [MRL_MAX_HEADER_BYTES]" in shown
    assert "--milvus-password" not in shown


def test_missing_or_invalid_settings_are_one_line(monkeypatch):
    monkeypatch.delenv("MRL_INDEX", raising=False)
    monkeypatch.delenv("MRL_MODEL", raising=False)
    with pytest.raises(ValueError, match=r"invalid settings \(nothing to serve: give --index LOCATOR .* or --model"):
        settings_from_args(serve_args())
    with pytest.raises(ValueError, match="max_k: Input should be greater than 0"):
        settings_from_args(serve_args("--index", "x", "--max-k", "0"))


def test_serve_refuses_a_missing_index_before_starting_the_server(tmp_path: Path):
    with pytest.raises(ServeError, match="cannot serve: .*nothing: index not found"):
        run_serve(serve_args("--index", str(tmp_path / "nothing")))


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("MRL_API_KEY", "")
    assert ServiceSettings(index=Path("x")).api_key is None
