"""Metadata filters (index/filters.py): the grammar and its errors, the row mask's semantics (missing fields
included), the Milvus expression and its escaping, and filtered search equal to brute force (mask, then exact
inner-product top-k) on FAISS Flat at several dims, HNSW and IVF, the GPU fallback, Milvus Lite and the real
Milvus 2.3.5 server, directly and through ``staged_search`` with two-stage re-scoring.

One hand-made table of metadata (``ROWS``) is the ground truth: every case lists the rows it allows, and the
larger corpora of the search tests repeat it (row ``i`` has ``ROWS[i % len(ROWS)]``).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.matryoshka import truncate_normalize
from index.backends import FaissIndex, get_backend, gpu_count
from index.filters import (
    MAX_EXPRESSION_DEPTH,
    FilterError,
    MetadataTable,
    SearchFilter,
    metadata_fields,
    milvus_string,
    parse_filter,
)
from index.loaded import open_index
from index.manifest import IndexManifest
from index.params import IndexPlan
from index.search import staged_search
from tests.helpers.service import build_keyword_index, write_data
from tests.helpers.vectors import clustered_vectors, filtered_brute_force

INJECTION = 'x" or metadata["year"] > 0 or metadata["topic"] == "'
ODD = 'quote " back \\ newline \n tab \t return \r nul \x00 end\\'
ROWS = [
    {"topic": "Gout", "year": 2001, "flag": True, "source": "nhs"},
    {"topic": "Flu", "year": 1999.5, "source": "cdc"},
    {},
    {"year": 2000},
    {"topic": ODD, "year": 1985},
    {"topic": "naïve 😀 \u2028", "flag": False},
    {"topic": None, "year": None},
    {"topic": "gout", "year": 2010, "tags": ["a"], "source": "nhs"},
    {"topic": "Gout", "year": float("nan"), "extra": {"x": 1}},
    {"topic": "Flu", "year": 2**60, "flag": True, "kind": 1},
    {"kind": "one", "source": "who"},
    {"topic": INJECTION, "year": 2000.0},
]
EVERY = set(range(len(ROWS)))
FIELDS = {
    "extra": "object",
    "flag": "bool",
    "kind": "mixed",
    "source": "string",
    "tags": "list",
    "topic": "string",
    "year": "number",
}
CASES = [
    ({"topic": "Gout"}, {0, 8}),
    ({"topic": {"$eq": "Gout"}}, {0, 8}),
    ({"topic": {"$ne": "Gout"}}, EVERY - {0, 8}),  # rows without a topic match $ne
    ({"topic": {"$in": ["Gout", "Flu"]}}, {0, 1, 8, 9}),
    ({"topic": {"$nin": ["Gout", "Flu"]}}, EVERY - {0, 1, 8, 9}),
    ({"year": {"$gt": 2000}}, {0, 7, 9}),
    ({"year": {"$gte": 2000}}, {0, 3, 7, 9, 11}),
    ({"year": {"$lt": 2000}}, {1, 4}),
    ({"year": {"$lte": 2000}}, {1, 3, 4, 11}),
    ({"year": {"$gte": 1990, "$lt": 2001}}, {1, 3, 11}),
    ({"year": 2000}, {3, 11}),  # 2000 and 2000.0
    ({"year": 1999.5}, {1}),
    ({"year": {"$in": [2000, 1985]}}, {3, 4, 11}),
    ({"year": {"$nin": [2000]}}, EVERY - {3, 11}),
    ({"year": {"$gte": 2**60 - 1}}, {9}),  # beyond 2**53: compared as floats on every engine
    ({"flag": True}, {0, 9}),
    ({"flag": False}, {5}),
    ({"flag": {"$ne": True}}, EVERY - {0, 9}),
    ({"topic": "Gout", "source": "nhs"}, {0}),
    ({"$or": [{"topic": "Flu"}, {"year": {"$lt": 1990}}]}, {1, 4, 9}),
    ({"$and": [{"source": {"$ne": "nhs"}}, {"$or": [{"flag": True}, {"year": 2000}]}]}, {3, 9, 11}),
    ({"$or": [{"topic": {"$nin": ["Gout"]}, "year": {"$gt": 2005}}, {"source": "who"}]}, {7, 9, 10}),
    ({"$or": [{"$and": [{"$or": [{"year": 1985}]}]}, {"flag": {"$nin": [False]}, "source": "nhs"}]}, {0, 4, 7}),
    ({"topic": ODD}, {4}),
    ({"topic": "naïve 😀 \u2028"}, {5}),
    ({"topic": INJECTION}, {11}),
    ({"topic": INJECTION[1:]}, set()),  # a value never becomes expression syntax
    ({"topic": {"$ne": INJECTION[1:]}}, EVERY),
    ({"source": {"$in": ["nhs", "who", 'a"b']}, "topic": {"$nin": ["gout"]}}, {0, 10}),
]
CASE_IDS = [json.dumps(case, ensure_ascii=True)[:60] for case, _ in CASES]


def rows_allowed(raw) -> set[int]:
    return {int(row) for row in np.flatnonzero(parse_filter(raw, FIELDS).mask(MetadataTable.build(ROWS)))}


def allowed_in(raw, count: int) -> np.ndarray:
    """The mask of ``raw`` over ``count`` rows that repeat ``ROWS``."""
    return np.isin(np.arange(count) % len(ROWS), sorted(rows_allowed(raw)))


def nested(levels: int) -> dict:
    """A filter ``levels`` $or lists deep."""
    raw: dict = {"topic": "Gout"}
    for _ in range(levels):
        raw = {"$or": [raw, {"year": 1}]}
    return raw


# --- fields and the grammar --------------------------------------------------------------------


def test_metadata_fields_gives_each_key_its_type():
    assert metadata_fields(ROWS) == FIELDS
    assert metadata_fields([{"a": 1}, {"a": 2.5}, {"a": None}, {"b": True}, {"b": 1}, {"c": None}]) == {
        "a": "number",
        "b": "mixed",  # a boolean is not a number
    }
    assert metadata_fields([]) == {}


@pytest.mark.parametrize(("raw", "expected"), CASES, ids=CASE_IDS)
def test_every_operator_allows_the_rows_the_semantics_say(raw, expected):
    assert rows_allowed(raw) == expected


def test_no_filter_is_none():
    assert parse_filter(None, FIELDS) is None and parse_filter({}, FIELDS) is None


def test_a_filter_on_a_field_of_another_index_is_absent_everywhere():
    """A table that lacks a field (or holds it as another type) has it on no row: $eq false, $ne true."""
    table = MetadataTable.build([{"topic": 1}, {}])
    assert table.fields == {"topic": "number"}
    assert parse_filter({"topic": "a"}, FIELDS).mask(table).tolist() == [False, False]
    assert parse_filter({"source": {"$nin": ["a"]}}, FIELDS).mask(table).tolist() == [True, True]


def test_old_manifests_load_with_no_fields_and_new_ones_round_trip(tmp_path: Path):
    folder = build_keyword_index(write_data(tmp_path / "data"), tmp_path / "index")
    manifest = IndexManifest.read(folder)
    assert manifest.metadata_fields == {"topic": "string"}
    assert IndexManifest.from_dict(manifest.to_dict()).metadata_fields == {"topic": "string"}
    raw = manifest.to_dict()
    del raw["metadata_fields"]
    assert IndexManifest.from_dict(raw).metadata_fields == {}
    (folder / "manifest.json").write_text(json.dumps(raw))  # a folder built before filters
    loaded = open_index(folder, device="cpu", lease=False)
    try:
        assert loaded.metadata_fields == {"topic": "string"}  # read from its documents
    finally:
        loaded.close()


ERRORS = [
    ({"topc": "x"}, "filter.topc: unknown field 'topc'; fields: extra, flag, kind, source, tags, topic, year"),
    ({"year": {"$gt": "2000"}}, 'filter.year.$gt: expects a number (year holds numbers), got "2000"'),
    ({"$or": []}, "filter.$or: expects a non-empty list of filters"),
    ({"$and": {"topic": "a"}}, "filter.$and: expects a non-empty list of filters"),
    (
        {"topic": {"$like": "G%"}},
        "filter.topic.$like: unknown operator; operators: $eq, $ne, $in, $nin, $gt, $gte, $lt, $lte",
    ),
    ({"topic": {"$gt": "A"}}, "filter.topic.$gt: ranges ($gt, $gte, $lt, $lte) apply to numbers, and topic holds"),
    ({"topic": {"$in": []}}, "filter.topic.$in: expects a non-empty list of at most 1000 strings"),
    ({"topic": {"$nin": "Gout"}}, "filter.topic.$nin: expects a non-empty list of at most 1000 strings"),
    ({"topic": {"$in": ["a"] * 1001}}, "filter.topic.$in: expects a non-empty list of at most 1000 strings"),
    ({"topic": {"$in": ["Gout", 3]}}, "filter.topic.$in[1]: expects a string (topic holds strings), got 3"),
    ({"topic": ["Gout"]}, 'filter.topic: expects a string (topic holds strings), got ["Gout"]'),
    ({"flag": 1}, "filter.flag: expects true or false (flag holds booleans (true or false)), got 1"),
    ({"year": True}, "filter.year: expects a number (year holds numbers), got true"),
    ({"year": float("inf")}, "filter.year: expects a number (year holds numbers), got Infinity"),
    ({"tags": "a"}, "filter.tags: field 'tags' holds lists, which cannot be filtered on"),
    ({"extra": {"$eq": 1}}, "filter.extra: field 'extra' holds objects, which cannot be filtered on"),
    ({"kind": 1}, "filter.kind: field 'kind' holds values of several types, which cannot be filtered on"),
    ({"$not": {"topic": "a"}}, "filter.$not: unknown operator here; use $and, $or or a field name"),
    ({"$and": [{}]}, "filter.$and[0]: expects an object of conditions"),
    ({"$or": [{"topic": "a"}, "b"]}, 'filter.$or[1]: expects an object of conditions such as {"topic": "Gout"}'),
    ("topic", 'filter: expects an object of conditions such as {"topic": "Gout"}, got "topic"'),
    ({"topic": {}}, "filter.topic: expects a value or an object of operators"),
    (nested(9), "filter" + ".$or[0]" * 9 + ": nested deeper than 8 levels of $and / $or"),
    ({"$or": [{"year": i} for i in range(1001)]}, "filter: 1001 conditions, at most 1000"),
]


@pytest.mark.parametrize(("raw", "message"), ERRORS, ids=[message[:50] for _, message in ERRORS])
def test_bad_filters_say_where_and_what_is_allowed(raw, message):
    with pytest.raises(FilterError) as caught:
        parse_filter(raw, FIELDS)
    assert str(caught.value).startswith(message), str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_depth_limits():
    assert parse_filter(nested(8), FIELDS) is not None
    assert "fields: none (the documents of this index have no metadata)" in str(
        pytest.raises(FilterError, parse_filter, {"topic": "a"}, {}).value
    )
    # Wide lists at every level nest the Milvus expression too deep for the server, even under 1000 conditions.
    raw: dict = {"topic": {"$nin": [str(i) for i in range(1000)]}}
    for level in range(8):
        raw = {"$and" if level % 2 else "$or": [raw, *({"year": level * 100 + i} for i in range(15))]}
    with pytest.raises(FilterError, match=r"filter: nested too deeply once its lists are paired up \(44 levels"):
        parse_filter(raw, FIELDS)


# --- the Milvus expression ----------------------------------------------------------------------


def test_milvus_expressions_read_as_the_semantics_say():
    def expr(raw) -> str:
        return parse_filter(raw, FIELDS).milvus_expr("metadata")

    assert expr({"topic": "Gout"}) == 'metadata["topic"] == "Gout"'
    assert expr({"year": {"$gte": 2000}}) == 'metadata["year"] >= 2000'
    assert expr({"year": {"$lt": 1999.5}}) == 'metadata["year"] < 1999.5'
    assert expr({"year": 2**60}) == 'metadata["year"] == 1.152921504606847e+18'
    assert expr({"flag": False}) == 'metadata["flag"] == false'
    assert expr({"topic": {"$ne": "a"}}) == 'not ((exists metadata["topic"]) and (metadata["topic"] == "a"))'
    assert expr({"topic": {"$in": ["a", "b", "c"]}}) == (
        '(metadata["topic"] == "a") or ((metadata["topic"] == "b") or (metadata["topic"] == "c"))'
    )
    assert expr({"topic": "a", "$or": [{"year": 1}, {"flag": True}]}) == (
        '(metadata["topic"] == "a") and ((metadata["year"] == 1) or (metadata["flag"] == true))'
    )
    with pytest.raises(ValueError, match="not a Milvus field name"):
        parse_filter({"topic": "a"}, FIELDS).milvus_expr('metadata"] or 1 == 1 or x["')


def test_string_values_are_escaped_and_never_become_syntax():
    assert milvus_string('a"b\\c') == '"a\\"b\\\\c"'
    assert milvus_string("l1\nl2\tt\rr") == '"l1\\nl2\\tt\\rr"'
    assert milvus_string("naïve 😀") == '"naïve 😀"'  # Milvus reads no \u escapes: kept as they are
    expression = parse_filter({"topic": INJECTION}, FIELDS).milvus_expr("metadata")
    assert expression == 'metadata["topic"] == "x\\" or metadata[\\"year\\"] > 0 or metadata[\\"topic\\"] == \\""'
    assert parse_filter({"topic": "a\\"}, FIELDS).milvus_expr("m") == 'm["topic"] == "a\\\\"'  # no escaped quote
    odd_key = parse_filter({'k"ey': 1}, {'k"ey': "number"}).milvus_expr("m")
    assert odd_key == 'm["k\\"ey"] == 1'


# --- FAISS ---------------------------------------------------------------------------------------

N, FULL, DIMS, NQ, K = 600, 64, (8, 32, 64), 4, 10


@pytest.fixture(scope="module")
def corpus():
    """``N`` unit vectors at ``FULL`` dims, queries, and the rows' metadata (``ROWS`` repeated)."""
    rng = np.random.default_rng(7)
    docs = rng.normal(size=(N, FULL)).astype(np.float32)
    queries = rng.normal(size=(NQ, FULL)).astype(np.float32)
    return docs, queries, [ROWS[row % len(ROWS)] for row in range(N)]


@pytest.fixture(scope="module")
def faiss_flat(corpus):
    docs, _, _ = corpus
    return {dim: FaissIndex.build(truncate_normalize(docs, dim), IndexPlan("Flat")) for dim in DIMS}


def check_against_brute_force(indexes, corpus, where_of) -> None:
    """Every case at every dim: the allowed set whole (k = N), and the top ``K`` with their scores."""
    docs, queries, _ = corpus
    for raw, _ in CASES:
        where, allowed = where_of(raw), allowed_in(raw, N)
        for dim, index in indexes.items():
            reduced_docs, reduced_queries = truncate_normalize(docs, dim), truncate_normalize(queries, dim)
            _, every = index.search(reduced_queries[:1], N, where)
            assert set(every[every >= 0].tolist()) == set(np.flatnonzero(allowed).tolist()), (raw, dim)
            scores, ids = index.search(reduced_queries, K, where)
            truth_ids, truth_scores = filtered_brute_force(reduced_docs, reduced_queries, K, allowed)
            assert np.array_equal(ids, truth_ids), (raw, dim)
            found = truth_ids >= 0
            np.testing.assert_allclose(scores[found], truth_scores[found], atol=1e-5)


def test_faiss_flat_filtered_equals_brute_force_at_every_dim(faiss_flat, corpus):
    table = MetadataTable.build(corpus[2])
    check_against_brute_force(faiss_flat, corpus, lambda raw: SearchFilter.over(parse_filter(raw, FIELDS), table))


def test_no_allowed_row_answers_without_searching(faiss_flat, corpus, monkeypatch):
    index = faiss_flat[8]
    monkeypatch.setattr(index, "_filtered_search", None)  # calling it would fail
    where = SearchFilter(parse_filter({"topic": "nothing"}, FIELDS), np.array([], dtype=np.int64))
    scores, ids = index.search(truncate_normalize(corpus[1], 8), K, where)
    assert ids.shape == (NQ, K) and (ids == -1).all() and (scores == np.finfo(np.float32).min).all()
    with pytest.raises(ValueError, match="selects rows by id"):
        index.search(truncate_normalize(corpus[1], 8), K, SearchFilter(where.filter))


@pytest.mark.parametrize(
    "plan", [IndexPlan("HNSW32,Flat", {"efSearch": 128}), IndexPlan("IVF32,Flat", {"nprobe": 16})], ids=str
)
def test_approximate_faiss_indexes_return_only_allowed_rows(plan):
    docs, queries = clustered_vectors(4000, 32, 50)
    metadata = [ROWS[row % len(ROWS)] for row in range(len(docs))]
    index = FaissIndex.build(docs, plan)
    for raw in ({"topic": {"$in": ["Gout", "Flu"]}}, {"year": {"$gte": 2000}}):
        allowed = allowed_in(raw, len(docs))
        where = SearchFilter.over(parse_filter(raw, FIELDS), MetadataTable.build(metadata))
        _, ids = index.search(queries, K, where)
        assert allowed[ids[ids >= 0]].all()
        truth, _ = filtered_brute_force(docs, queries, K, allowed)
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
        assert recall >= 0.98, (raw, recall)  # with FAISS's defaults (nprobe 1, efSearch 16): 0.77 and 0.96


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="FAISS sees no GPU")
@pytest.mark.parametrize("plan", [IndexPlan("Flat"), IndexPlan("IVF32,Flat", {"nprobe": 32})], ids=str)
def test_the_gpu_index_filters_on_a_cpu_copy_with_the_same_answers(plan):
    docs, queries = clustered_vectors(4000, 32, 20)
    metadata = [ROWS[row % len(ROWS)] for row in range(len(docs))]
    gpu, cpu = get_backend("faiss-gpu").build(docs[:3000], plan), FaissIndex.build(docs[:3000], plan)
    where = SearchFilter.over(parse_filter({"topic": "Gout"}, FIELDS), MetadataTable.build(metadata))
    assert np.array_equal(gpu.search(queries, K, where)[1], cpu.search(queries, K, where)[1])
    gpu.add(docs[3000:])  # the CPU copy follows
    _, ids = gpu.search(queries, K, where)
    assert np.array_equal(ids, filtered_brute_force(docs, queries, K, allowed_in({"topic": "Gout"}, 4000))[0])


def staged_reference(docs, queries, allowed, dim, rerank_dim, k, candidates):
    """Shortlist exactly among the allowed rows at ``dim``, re-score the shortlist at ``rerank_dim``."""
    shortlist, _ = filtered_brute_force(
        truncate_normalize(docs, dim), truncate_normalize(queries, dim), k * candidates, allowed
    )
    rows = []
    for query, short in zip(truncate_normalize(queries, rerank_dim), shortlist, strict=True):
        short = short[short >= 0]
        order = np.argsort(-(truncate_normalize(docs, rerank_dim)[short] @ query), kind="stable")[:k]
        rows.append(np.pad(short[order], (0, k - len(order)), constant_values=-1))
    return np.array(rows)


def test_staged_search_filters_the_first_stage_and_reranks_only_allowed_rows(faiss_flat, corpus):
    docs, queries, metadata = corpus
    table = MetadataTable.build(metadata)
    for raw in ({"topic": {"$ne": "Gout"}}, {"year": {"$gte": 2000}, "flag": True}, {"topic": "nothing"}):
        where = SearchFilter.over(parse_filter(raw, FIELDS), table)
        hits = staged_search(faiss_flat[8], docs, queries, 8, 5, rerank_dim=64, candidates=3, where=where)
        expected = staged_reference(docs, queries, allowed_in(raw, N), 8, 64, 5, 3)
        assert np.array_equal(hits.rows, expected), raw


def test_a_loaded_folder_filters_by_its_documents_metadata(tmp_path: Path):
    from tests.conftest import KeywordEncoder
    from tests.helpers.service import VOCABULARY

    folder = build_keyword_index(write_data(tmp_path / "data"), tmp_path / "index")
    loaded = open_index(folder, device="cpu", lease=False)
    try:
        assert loaded.metadata_fields == {"topic": "string"} and len(loaded.metadata) == 9
        assert loaded.search_filter(None) is None
        where = loaded.search_filter({"topic": {"$ne": "fever"}})
        assert where.rows.tolist() == list(range(1, 9))  # d8 has no topic: $ne allows it
        query = KeywordEncoder(VOCABULARY).encode_queries(["fever cough"])
        hits = staged_search(loaded.indexes[8], loaded.vectors, query, 8, 2, where=where)
        assert [d.id for d in loaded.store.get(hits.rows[0].tolist())] == ["d8", "d1"]
        with pytest.raises(FilterError, match="filter.topic.\\$gt: ranges"):
            loaded.search_filter({"topic": {"$gt": "a"}})
    finally:
        loaded.close()


# --- Milvus: Lite and the real server -------------------------------------------------------------

ENGINES = [pytest.param(name, marks=pytest.mark.slow) for name in ("lite", "server")]


@pytest.fixture(scope="module", params=ENGINES)
def milvus_flat(request, corpus):
    """Per engine, a Flat collection of the corpus with its metadata at every dim in ``DIMS``."""
    from index.milvus import MilvusBackend

    uri = request.getfixturevalue("milvus_lite_uri" if request.param == "lite" else "milvus_server_uri")
    backend = MilvusBackend(uri, collection_prefix="filters")
    docs, _, metadata = corpus
    indexes = {}
    for dim in DIMS:
        indexes[dim] = backend.build(truncate_normalize(docs, dim), IndexPlan("Flat"), seal=False, metadata=metadata)
    with ThreadPoolExecutor(len(DIMS)) as pool:
        list(pool.map(backend.seal, [index.collection for index in indexes.values()]))
    yield indexes
    for index in indexes.values():
        backend.drop(index.collection)
    backend.close()


def test_milvus_filtered_equals_brute_force_at_every_dim(milvus_flat, corpus):
    """The engine's answer is the mask's, for every case: missing fields, nulls, NaN, odd strings, big numbers."""
    check_against_brute_force(milvus_flat, corpus, lambda raw: SearchFilter(parse_filter(raw, FIELDS)))


def test_milvus_takes_the_deepest_filter_allowed(milvus_flat, corpus):
    raw: dict = {"topic": {"$nin": [str(i) for i in range(1000)]}}
    for level in range(8):  # lists of 16 parts (4 levels), then of 8 (3): 28, and 12 for the $nin
        extra = 15 if level < 4 else 7
        raw = {"$and" if level % 2 else "$or": [raw, *({"year": level * 100 + i} for i in range(extra))]}
    parsed = parse_filter(raw, FIELDS)
    assert parsed.depth == MAX_EXPRESSION_DEPTH
    _, ids = milvus_flat[8].search(truncate_normalize(corpus[1], 8), N, SearchFilter(parsed))
    allowed = parsed.mask(MetadataTable.build(corpus[2]))
    assert set(ids[0][ids[0] >= 0].tolist()) == set(np.flatnonzero(allowed).tolist())


def test_milvus_staged_search_gives_faiss_answers(milvus_flat, faiss_flat, corpus):
    docs, queries, metadata = corpus
    table = MetadataTable.build(metadata)
    for raw in ({"topic": {"$ne": "Gout"}}, {"$or": [{"flag": False}, {"year": {"$lt": 2000}}]}):
        parsed = parse_filter(raw, FIELDS)
        want = staged_search(faiss_flat[8], docs, queries, 8, 5, 64, 3, where=SearchFilter.over(parsed, table))
        got = staged_search(milvus_flat[8], docs, queries, 8, 5, 64, 3, where=SearchFilter(parsed))
        assert np.array_equal(got.rows, want.rows), raw


@pytest.mark.slow
def test_a_collection_built_before_filters_is_searched_but_refuses_a_filter(milvus_lite_uri):
    from pymilvus import DataType, MilvusClient

    from index.milvus import ROW_FIELD, VECTOR_FIELD, MilvusBackend, _index_params, milvus_layout

    backend = MilvusBackend(milvus_lite_uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ROW_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=4)
    backend.client.create_collection("before_filters", schema=schema, consistency_level="Strong")
    backend.client.create_index("before_filters", _index_params(milvus_layout(IndexPlan("Flat"))))
    try:
        index = backend.open_collection("before_filters", IndexPlan("Flat"))
        assert not index.has_metadata
        index.add(np.eye(4, dtype=np.float32), [{"topic": "a"}] * 4)  # no metadata field: kept out of the rows
        backend.seal("before_filters")
        assert index.search(np.eye(4, dtype=np.float32)[:1], 1)[1].tolist() == [[0]]
        with pytest.raises(FilterError, match="built without metadata; rebuild to filter"):
            index.search(np.eye(4, dtype=np.float32)[:1], 1, SearchFilter(parse_filter({"topic": "a"}, FIELDS)))
    finally:
        backend.drop("before_filters")
        backend.close()
