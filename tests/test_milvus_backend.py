"""The index-backend contract on Milvus: Milvus Lite and a real standalone Milvus 2.3.5 server.

The cases of ``tests/test_index_backends.py`` (results match brute-force NumPy search; exact
``Flat`` to 1e-5 with recall 1.0, IVF and HNSW with recall ≥ 0.95; ``add`` extends; ``k`` larger
than the index), run on both engines, plus what is particular to Milvus: a collection reopened by
its name (no file stands for it), FAISS's padding of missing hits, concurrent searches, and the mapping of
FAISS factory strings onto Milvus index types. Skipped without the ``milvus`` extra, except in CI.

Each build on the 2.3 server takes several seconds whatever its size (flush, index, load), nearly
all of it waiting on the server's own schedule, so the indexes are built once per engine, side by
side: each plan's index of all the documents, shared by the tests that only read it, and each
plan's index of all but the last ``ADDED``, which ``test_add_extends_the_index`` extends.

The local server's port choice is tested without Milvus: a stand-in binary in its place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.metrics import neighbour_recall
from index.manifest import IndexFolderError
from index.milvus import MISSING_ROW, MISSING_SCORE, MilvusBackend, MilvusIndex, milvus_layout
from index.milvus_server import LocalMilvusServer, MilvusServerError
from index.params import HNSW_EF_CONSTRUCTION, IndexPlan
from tests.conftest import REPO
from tests.helpers.milvus import require_module  # the Milvus fixtures come from tests.conftest's plugin
from tests.helpers.vectors import brute_force, clustered_vectors

N, D, NQ, K = 2000, 32, 100, 10
ADDED = 500  # rows that test_add_extends_the_index appends after the build

PLANS = {
    "flat": IndexPlan("Flat"),
    "hnsw": IndexPlan("HNSW32,Flat", {"efSearch": 128}),
    "ivf": IndexPlan("IVF32,Flat", {"nprobe": 16}),
}
# Every test on an engine is slow: the server starts in about 7 s, and builds there take several seconds each.
ENGINES = [pytest.param(name, marks=pytest.mark.slow) for name in ("lite", "server")]


@pytest.fixture(scope="module")
def synthetic():
    return clustered_vectors(N, D, NQ)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(engine, request):
    """A :class:`MilvusBackend` on Milvus Lite or on the real server, closed afterwards."""
    uri = request.getfixturevalue("milvus_lite_uri" if engine == "lite" else "milvus_server_uri")
    backend = MilvusBackend(uri)
    assert backend.available() and backend.is_lite == (engine == "lite")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def side_by_side(backend, synthetic):
    """Per engine, the indexes the tests build, built side by side on first use: ``(plan, rows) -> index``.

    Each is ``backend.build`` of the first ``rows`` synthetic documents (flushed, indexed and loaded
    when it returns), all at once on the backend's one client. The ones of all but the last
    ``ADDED`` rows that a test has not dropped are dropped afterwards.
    """
    docs, _ = synthetic
    indexes: dict[tuple[str, int], MilvusIndex] = {}

    def get(plan_name: str, rows: int) -> MilvusIndex:
        if not indexes:
            jobs = [(name, count) for count in (N, N - ADDED) for name in PLANS]
            assert backend.client is not None  # connected once, before the threads share it
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                built = pool.map(lambda job: backend.build(docs[: job[1]], PLANS[job[0]]), jobs)
                indexes.update(dict(zip(jobs, built, strict=True)))
        return indexes[(plan_name, rows)]

    yield get
    for (_, rows), index in indexes.items():
        if rows != N:
            backend.drop(index.collection)


@pytest.fixture(scope="module")
def built(side_by_side):
    """Each plan's index of all the synthetic documents, read (never changed) by several tests."""
    return lambda plan_name: side_by_side(plan_name, N)


def engine_params(params: dict) -> dict[str, str]:
    """Index parameters as strings (the server reports them so, Milvus Lite as numbers)."""
    return {key: str(value) for key, value in params.items()}


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("plan_name", PLANS)
def test_results_match_brute_force(backend, built, plan_name, synthetic, tmp_path: Path):
    docs, queries = synthetic
    plan = PLANS[plan_name]
    index = built(plan_name)
    assert (index.ntotal, index.dim) == (N, D)
    scores, ids = index.search(queries, K)
    assert (scores.dtype, ids.dtype, scores.shape, ids.shape) == (np.float32, np.int64, (NQ, K), (NQ, K))
    truth_ids, truth_scores = brute_force(docs, queries, K)
    if plan.exact:
        np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
        assert neighbour_recall(ids, truth_ids) == 1.0
    else:
        assert neighbour_recall(ids, truth_ids) >= 0.95

    # The engine builds with the plan's parameters (Milvus Lite drops them unless sent in its shape too).
    reported = backend.client.describe_index(index.collection, "vector")
    assert reported["index_type"] == index.layout.index_type and reported["metric_type"] == "IP"
    assert engine_params(reported.get("params", {})) == engine_params(index.layout.build_params)

    # The collection is the index: the backend opens it again by name (as its store does), same answers.
    reloaded = backend.open_collection(index.collection, plan)
    np.testing.assert_array_equal(reloaded.search(queries, K)[1], ids)
    description = reloaded.describe()
    assert description["backend"] == backend.name and description["factory"] == plan.factory
    assert description["search_params"] == plan.search_params
    assert description["collection"] == index.collection
    reloaded.close()


@pytest.mark.parametrize("plan_name", PLANS)
def test_add_extends_the_index(backend, side_by_side, plan_name, synthetic):
    docs, _ = synthetic
    index = side_by_side(plan_name, N - ADDED)  # backend.build(docs[: N - ADDED], plan), with the others
    index.add(docs[N - ADDED :])
    assert index.ntotal == N and backend.count(index.collection) == N
    _, ids = index.search(docs[N - 10 :], 1)
    assert ids[:, 0].tolist() == list(range(N - 10, N))
    backend.drop(index.collection)


def test_k_larger_than_index_and_single_query(built, synthetic):
    docs, _ = synthetic
    scores, ids = built("flat").search(docs[1], N + 10)  # one query as a 1-D vector
    assert scores.shape == ids.shape == (1, N)
    assert ids[0, 0] == 1 and sorted(ids[0].tolist()) == list(range(N))
    assert np.all(np.diff(scores[0]) <= 1e-6)  # best first


# --- what is particular to Milvus ------------------------------------------------------------


def test_missing_hits_are_padded_as_faiss_pads_them(backend, built, synthetic):
    """IVF probing one list of 32 finds fewer than k rows: the rest is -FLT_MAX and -1, as in FAISS."""
    _, queries = synthetic
    collection = built("ivf").collection
    one_list = backend.open_collection(collection, IndexPlan("IVF32,Flat", {"nprobe": 1}))
    scores, ids = one_list.search(queries[:5], 1000)
    assert ids.shape == (5, 1000)
    missing = ids == MISSING_ROW
    assert missing.any(axis=1).all() and np.all(scores[missing] == MISSING_SCORE)
    for row in range(5):
        found = ids[row][~missing[row]]
        assert len(set(found.tolist())) == len(found) and np.all(ids[row, : len(found)] >= 0)


def test_concurrent_searches_give_the_serial_answers(built, synthetic):
    _, queries = synthetic
    index = built("flat")
    assert index.thread_safe
    serial = [index.search(queries[i : i + 1], K)[1] for i in range(20)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda i: index.search(queries[i : i + 1], K)[1], range(20)))
    for expected, got in zip(serial, concurrent, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_open_names_a_missing_collection_and_no_file_stands_for_one(backend, built, tmp_path: Path):
    with pytest.raises(IndexFolderError, match="collection 'mrl_gone' does not exist"):
        backend.open_collection("mrl_gone", PLANS["flat"])
    index = built("flat")
    with pytest.raises(NotImplementedError, match="kept by its collection"):
        index.save(tmp_path / "i.faiss")  # no pointer files: the store keeps a version's collections by name
    with pytest.raises(NotImplementedError, match="opened by its collection"):
        backend.open(tmp_path / "i.faiss", PLANS["flat"])


def test_build_refuses_a_collection_name_in_use(backend, built, synthetic):
    docs, _ = synthetic
    with pytest.raises(ConfigError, match="already exists"):
        backend.build(docs[:10], PLANS["flat"], collection=built("flat").collection)


@pytest.mark.slow
def test_ivf_pq_is_refused_on_milvus_lite(request, synthetic):
    backend = MilvusBackend(request.getfixturevalue("milvus_lite_uri"))
    with pytest.raises(ConfigError, match="Milvus Lite has no IVF_PQ"):
        backend.build(synthetic[0], IndexPlan("IVF32,PQ8", {"nprobe": 16}))
    backend.close()


# --- no engine needed ----------------------------------------------------------------------------


def test_factory_strings_map_onto_milvus_index_types():
    flat = milvus_layout(IndexPlan("Flat"))
    assert (flat.index_type, flat.build_params, flat.search_params) == ("FLAT", {}, {})
    ivf = milvus_layout(IndexPlan("IVF64,Flat", {"nprobe": 8}))
    assert (ivf.index_type, ivf.build_params, ivf.search_params) == ("IVF_FLAT", {"nlist": 64}, {"nprobe": 8})
    pq = milvus_layout(IndexPlan("IVF256,PQ16", {"nprobe": 32}))
    assert (pq.index_type, pq.build_params) == ("IVF_PQ", {"nlist": 256, "m": 16, "nbits": 8})
    hnsw = milvus_layout(IndexPlan("HNSW16,Flat", {"efSearch": 64}))
    assert (hnsw.index_type, hnsw.build_params) == ("HNSW", {"M": 16, "efConstruction": HNSW_EF_CONSTRUCTION})
    assert hnsw.search_params_for(10) == {"ef": 64} and hnsw.search_params_for(100) == {"ef": 100}


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (IndexPlan("IVF64,SQ8"), "has no Milvus equivalent here"),
        (IndexPlan("PQ8"), "has no Milvus equivalent here"),
        (IndexPlan("HNSW32,Flat", {"nprobe": 4}), r"\['nprobe'\] do not apply"),
        (IndexPlan("Flat", {"efSearch": 4}), r"\['efSearch'\] do not apply"),
    ],
)
def test_unmapped_plans_are_refused(plan, message):
    with pytest.raises(ConfigError, match=message):
        milvus_layout(plan)


def test_a_milvus_backend_is_one_registered_name(monkeypatch, tmp_path: Path):
    import index.backends as backends
    from index.backends import get_backend, register_backend, registered_backends

    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    milvus = register_backend(MilvusBackend(tmp_path / "m.db", token="secret"))
    assert get_backend("milvus") is milvus and "milvus" in registered_backends()
    assert "secret" not in repr(milvus)
    with pytest.raises(ConfigError, match="not valid in Milvus"):
        MilvusBackend(tmp_path / "m.db", collection_prefix="9-bad")


def test_the_client_reconnects_every_few_seconds_not_on_grpcs_default_backoff(monkeypatch):
    """gRPC's default reconnect backoff grows to 2 minutes: replicas stayed at 503 for 28 s after Milvus was back."""
    import pymilvus

    seen = {}

    class Recording:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(pymilvus, "MilvusClient", Recording)
    assert isinstance(MilvusBackend("http://127.0.0.1:1", timeout=1).client, Recording)
    options = seen["grpc_options"]
    assert options["grpc.max_reconnect_backoff_ms"] <= 2000 and options["grpc.initial_reconnect_backoff_ms"] <= 1000


def test_a_collection_that_is_not_loaded_is_loaded_and_searched_again():
    """A restarted Milvus (or a reopened Milvus Lite file) may not have loaded a collection yet."""
    from pymilvus.exceptions import MilvusException

    from index.milvus import reloading

    calls, loaded = [], []

    class Client:
        def load_collection(self, name, timeout=None):
            loaded.append(name)

    def search():
        calls.append(1)
        if len(calls) == 1:
            raise MilvusException(message="failed to search: collection not loaded[collection=1]")
        return "hits"

    assert reloading(Client(), "c", 2.0, search) == "hits" and loaded == ["c"] and len(calls) == 2
    with pytest.raises(MilvusException, match="other"):
        reloading(Client(), "c", 2.0, lambda: (_ for _ in ()).throw(MilvusException(message="other")))


# --- the local server's ports: a stand-in binary, no Milvus started ------------------------------

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Stand-ins for `milvus run standalone`: running (and "healthy") until stopped, or exiting as Milvus
# does when a port it binds was taken since it was chosen (the first time it runs in a folder).
RUNS = 'touch "$READY/$METRICS_PORT"; exec sleep 60'
FINDS_A_PORT_TAKEN_ONCE = (
    'if [ ! -e first-metrics-port ]; then echo "$METRICS_PORT" > first-metrics-port; '
    'echo "listen tcp :54325: bind: address already in use"; exit 1; fi; ' + RUNS
)


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch):
    """Start ``LocalMilvusServer`` on a stand-in binary: ``stand_in(script)`` sets what it runs.

    The temporary folder (binaries unpacked, port locks) is the test's own; a server is healthy once
    its stand-in says so.
    """
    milvus = require_module("milvus", "the `milvus` extra: pip install -e '.[milvus]'")
    import index.milvus_server as milvus_server

    ready = tmp_path / "ready"
    ready.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setenv("READY", str(ready))
    monkeypatch.setattr(milvus_server, "_healthy", lambda port: (ready / str(port)).exists())
    monkeypatch.setattr(milvus_server, "_connects", lambda uri: True)

    def use(script: str) -> None:
        def unpack(base: str) -> None:
            binary = Path(base) / "bin" / "milvus"
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text(f"#!/bin/sh\n{script}\n")
            binary.chmod(0o755)

        monkeypatch.setattr(milvus, "_initialize_data_files", unpack)

    return use


@pytest.fixture
def servers(tmp_path: Path):
    """``servers(n)``: ``n`` local servers in folders of their own, stopped afterwards."""
    made: list[LocalMilvusServer] = []

    def make(count: int) -> list[LocalMilvusServer]:
        made.extend(LocalMilvusServer(tmp_path / f"server-{len(made) + i}") for i in range(count))
        return made[-count:]

    yield make
    for server in made:
        server.stop(keep_binary=False)


def test_ports_lie_outside_the_ephemeral_range_and_no_two_servers_share_one(stand_in, servers, monkeypatch):
    """Ports the kernel hands out (``bind`` to port 0, every outgoing connection) can be taken between
    their choice and Milvus's own bind; two servers starting side by side must not pick the same."""
    if not EPHEMERAL_RANGE.is_file():
        pytest.skip(f"no {EPHEMERAL_RANGE} on this system")
    first, last = (int(port) for port in EPHEMERAL_RANGE.read_text().split())
    stand_in(RUNS)
    monkeypatch.setattr("random.randrange", lambda stop: 0)  # every server tries the same ports first
    one, two = servers(2)
    assert one.start() != two.start()
    chosen = [set(one.ports.values()), set(two.ports.values())]
    assert all(len(ports) == 12 for ports in chosen) and not chosen[0] & chosen[1]
    assert not [port for port in chosen[0] | chosen[1] if first <= port <= last]
    # and another process (another test worker), while these run:
    script = "import random; random.randrange = lambda stop: 0; from index.milvus_server import reserve_ports; "
    script += "print(*reserve_ports(12).ports)"
    env = {**os.environ, "TMPDIR": tempfile.gettempdir(), "PYTHONPATH": str(REPO)}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    chosen.append({int(port) for port in other.stdout.split()})
    assert len(chosen[2]) == 12 and not chosen[2] & (chosen[0] | chosen[1])
    assert not [port for port in set.union(*chosen) if first <= port <= last]


def test_a_port_taken_before_the_package_checks_it_is_replaced(stand_in, servers, monkeypatch):
    """The ``milvus`` package binds each port once before it writes the config: ``set query_node_port=54325,
    but bind failed`` was two test workers' servers racing for a port."""
    import milvus

    stand_in(RUNS)
    check = milvus.MilvusServerConfig.try_bind_port
    refused = []

    def taken_once(config, port: int):
        if not refused:
            refused.append(port)
            return None
        return check(config, port)

    monkeypatch.setattr(milvus.MilvusServerConfig, "try_bind_port", taken_once)
    (server,) = servers(1)
    assert server.start() == server.uri and refused and refused[0] not in server.ports.values()


def test_a_port_taken_before_milvus_binds_it_is_replaced(stand_in, servers):
    stand_in(FINDS_A_PORT_TAKEN_ONCE)
    (server,) = servers(1)
    assert server.start() == server.uri and server.process.poll() is None
    first = int((server.base / "first-metrics-port").read_text())  # the first start failed; the second runs
    assert first != server.ports["metrics_port"]


def test_ports_taken_at_every_start_are_one_clear_error(stand_in, servers, monkeypatch):
    import milvus

    stand_in(RUNS)
    monkeypatch.setattr(milvus.MilvusServerConfig, "try_bind_port", lambda config, port: None)
    (server,) = servers(1)
    with pytest.raises(MilvusServerError, match=r"milvus found a port taken at each of 3 starts, each on fresh ports: "
                       r"set \w+_port=\d+, but bind failed; set"):  # fmt: skip
        server.start()
    assert server.ports is None and server.process is None
