"""The query-embedding cache on its own: keys, eviction order, one encode per distinct missing text."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from service.cache import QueryCache


def make_cache(size: int) -> tuple[QueryCache, Counter, list[list[str]]]:
    lookups = Counter("lookups", "test", ["result"], registry=CollectorRegistry())
    return QueryCache(size, lookups), lookups, []


def encoder(calls: list[list[str]]):
    async def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        batch = np.array([[len(text), ord(text[0])] for text in texts], dtype=np.float32)
        return batch  # rows are views of one array: the cache must keep copies

    return encode


def run(cache: QueryCache, calls: list[list[str]], texts: list[str], fingerprint: str = "m1", prompt: str = ""):
    return asyncio.run(cache.encode(texts, fingerprint, prompt, encoder(calls)))


def count(lookups: Counter, result: str) -> float:
    return lookups.labels(result=result)._value.get()


def test_only_distinct_missing_texts_are_encoded_and_rows_keep_their_order():
    cache, lookups, calls = make_cache(10)
    first = run(cache, calls, ["bb", "a", "bb"])
    second = run(cache, calls, ["a", "ccc", "bb"])
    assert calls == [["bb", "a"], ["ccc"]]
    assert first.tolist() == [[2, 98], [1, 97], [2, 98]] and second.tolist() == [[1, 97], [3, 99], [2, 98]]
    assert (count(lookups, "hit"), count(lookups, "miss")) == (3, 3)


def test_the_least_recently_used_entry_goes_first():
    cache, _, calls = make_cache(2)
    run(cache, calls, ["a"])
    run(cache, calls, ["b"])
    run(cache, calls, ["a"])  # a is now the most recent
    run(cache, calls, ["c"])  # evicts b
    run(cache, calls, ["a", "b"])
    assert calls == [["a"], ["b"], ["c"], ["b"]] and len(cache) == 2


def test_another_model_or_prompt_is_another_entry():
    cache, _, calls = make_cache(10)
    run(cache, calls, ["a"], fingerprint="m1")
    run(cache, calls, ["a"], fingerprint="m2")
    run(cache, calls, ["a"], fingerprint="m1", prompt="query: ")
    run(cache, calls, ["a"], fingerprint="m1")
    assert calls == [["a"], ["a"], ["a"]]


def test_a_failed_encode_caches_nothing():
    cache, lookups, calls = make_cache(10)

    async def failing(texts: list[str]) -> np.ndarray:
        raise RuntimeError("encoder down")

    try:
        asyncio.run(cache.encode(["a"], "m1", "", failing))
    except RuntimeError:
        pass
    run(cache, calls, ["a"])
    assert calls == [["a"]] and len(cache) == 1
