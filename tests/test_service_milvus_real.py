"""The bundled sample in a real Milvus 2.3.5 server, served by two ``mrl serve`` replicas, end to end.

One index is built into the session's server with the real model; two replicas serve it on
their own ports. They answer identically, and as the FAISS backend does; a rebuild under
load, then a reload of each replica, moves both to the new version without a failed request;
a killed build is cleaned up by the next; the served version is not pruned until the replicas
let go of it; a Milvus outage is a 503 (never a 500) with readyz false, and the replicas recover
when Milvus returns. Start-up failures are one line and exit code 2 (``mrl`` run in this process).
Builds use the session's encode cache: the sample is encoded at most once per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.servers import free_port
from index.build import BuildConfig, build_index
from index.milvus import MilvusBackend
from index.milvus_store import MilvusIndexStore, version_tag
from tests.conftest import REPO, SAMPLE
from tests.helpers.milvus import assert_same_hits_as_faiss
from tests.helpers.servers import ServeProcess, assert_one_line_error, mrl_in_process

pytestmark = pytest.mark.slow

NAME = "replicated"
QUERY = "sudden painful swollen big toe joint at night"
RECOVERY_TIMEOUT_S = 60  # a restarted server may take a while to load the session's many collections again


def build(uri: str, cache: Path) -> str:
    _, manifest = build_index(
        BuildConfig(
            data=SAMPLE,
            backend="milvus",
            milvus_uri=uri,
            index_name=NAME,
            keep_versions=1,
            progress=False,
            cache_dir=cache,
        )
    )
    return manifest.version


def milvus_settings(uri: str, index: str = NAME) -> dict[str, object]:
    """``mrl serve --backend milvus`` of ``index`` at ``uri``, as ``MRL_*`` settings."""
    return {"backend": "milvus", "milvus_uri": uri, "index": index, "device": "cpu", "milvus_timeout_s": 2}


def serve_flags(uri: str, index: str = NAME) -> list[str]:
    """The same settings as ``mrl serve`` flags."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in milvus_settings(uri, index).items()]


@pytest.fixture(scope="module")
def first_version(milvus_server_uri, encode_cache: Path) -> str:
    return build(milvus_server_uri, encode_cache)


@pytest.fixture(scope="module")
def store(milvus_server_uri) -> Iterator[MilvusIndexStore]:
    backend = MilvusBackend(milvus_server_uri)
    yield MilvusIndexStore(backend, NAME)
    backend.close()


@pytest.fixture(scope="module")
def replicas(first_version, milvus_server_uri, tmp_path_factory) -> Iterator[list[ServeProcess]]:
    logs = tmp_path_factory.mktemp("replicas")
    settings = milvus_settings(milvus_server_uri)
    started = [ServeProcess(logs / f"replica{i}.log", **settings) for i in range(2)]  # load side by side
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def hits(response: httpx.Response) -> list:
    assert response.status_code == 200, response.text
    return [[(h["id"], round(h["score"], 5)) for h in result["hits"]] for result in response.json()["results"]]


FILTERS = [{"topic": {"$in": ["Gout", "Asthma", "Migraine"]}}, {"topic": {"$ne": "Gout"}}, {"topic": "Gout"}]


def test_the_server_gives_the_same_top_10_as_faiss_at_every_dim(first_version, store, sample_index):
    assert_same_hits_as_faiss(store, first_version, sample_index, filters=FILTERS)


def test_a_replica_filters_in_milvus(replicas):
    one, _ = replicas
    for where in FILTERS:
        response = one.get("/search", q=QUERY, k=10, dim=64, filter=json.dumps(where), group_by="document")
        assert response.status_code == 200, response.text
        topics = [hit["metadata"]["topic"] for hit in response.json()["results"][0]["hits"]]
        allowed = {"$in": set(where["topic"].get("$in", [])) if isinstance(where["topic"], dict) else {"Gout"}}
        if isinstance(where["topic"], dict) and "$ne" in where["topic"]:
            assert topics and "Gout" not in topics
        else:
            assert topics and set(topics) <= allowed["$in"]
    refused = one.get("/search", q=QUERY, filter=json.dumps({"colour": "red"}))
    assert refused.status_code == 422 and "unknown field 'colour'" in refused.text


def test_two_replicas_answer_identically_at_every_dim_and_two_stage(replicas, first_version):
    one, two = replicas
    dims = one.get("/dims").json()
    assert dims == two.get("/dims").json()
    assert dims["index_version"] == first_version
    served = [entry["dim"] for entry in dims["dims"]]
    assert served == [384, 256, 128, 64, 32]
    plans = [{"dim": dim} for dim in served] + [{"dim": 32, "rerank_dim": 384}, {"dim": 64, "rerank_dim": 256}]
    for plan in plans:
        first = hits(one.get("/search", q=QUERY, k=10, **plan))
        assert first == hits(two.get("/search", q=QUERY, k=10, **plan)), plan
        assert len(first[0]) == 10
        if plan == {"dim": 384}:
            assert first[0][0][0] == "d022"  # the gout leaflet
    body = {"queries": [QUERY, "how is asthma treated"], "dim": 64, "k": 5}
    posted = [httpx.post(f"{r.base}/search", json=body, timeout=30) for r in replicas]
    assert hits(posted[0]) == hits(posted[1])
    assert one.get("/search", q=QUERY, dim=48).status_code == 422  # same errors as over FAISS


def kill_a_build(uri: str) -> str:
    """Start a build in another process and kill it after it has written documents; returns its version."""
    version = "20000101T000000000000Z-dead"
    script = (
        "import os, numpy as np\n"
        "from core.data import Document\n"
        "from index.milvus import MilvusBackend\n"
        "from index.milvus_store import MilvusIndexStore\n"
        f"writer = MilvusIndexStore(MilvusBackend({uri!r}), {NAME!r}).begin({version!r})\n"
        "docs = [Document(f'x{i}', 'text') for i in range(10)]\n"
        "writer.write_corpus(docs, np.ones((10, 384), np.float32), np.ones((1, 384), np.float32))\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    return version


def test_a_rebuild_and_a_reload_under_load_move_both_replicas_without_a_failure(
    replicas,
    first_version,
    store,
    milvus_server_uri,
    encode_cache,
):
    killed = kill_a_build(milvus_server_uri)
    assert store.versions()[killed] == "building"
    outcomes: list[tuple[int, int, str, float, float]] = []  # (replica, status, version, sent, answered)
    stop = threading.Event()

    def load(number: int) -> None:
        replica = replicas[number % 2]
        plans = [{"dim": 64}, {"dim": 384}, {"dim": 32, "rerank_dim": 384}]
        while not stop.is_set():
            sent = time.monotonic()
            response = replica.get("/search", q=QUERY, k=5, **plans[len(outcomes) % 3])
            version = response.json().get("index_version", "") if response.status_code == 200 else response.text
            outcomes.append((number % 2, response.status_code, version, sent, time.monotonic()))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        second = build(milvus_server_uri, encode_cache)
        assert store.current() == second
        assert set(store.versions()) == {first_version, second}  # killed build gone; first kept: both serve it
        assert not any(version_tag(killed) in c for c in store.backend.all_collections())
        for replica in replicas:
            reloaded = httpx.post(f"{replica.base}/admin/reload", timeout=120).json()
            assert reloaded == {"previous_version": first_version, "version": second, "changed": True}
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(f"rebuild and reload under load: {len(outcomes)} searches, statuses {Counter(o[1] for o in outcomes)}")
    assert outcomes and all(o[1] == 200 for o in outcomes), [o for o in outcomes if o[1] != 200][:3]
    for number in (0, 1):
        mine = sorted((o for o in outcomes if o[0] == number), key=lambda o: o[3])
        assert {o[2] for o in mine} == {first_version, second} and mine[-1][2] == second
        # Never back to the old one: a search sent after this replica first answered from the new
        # version is answered from the new version too. (Searches run concurrently, so the order in
        # which answers arrive says nothing; the time each was sent does.)
        switched = min(o[4] for o in mine if o[2] == second)
        assert all(o[2] == second for o in mine if o[3] > switched), [o for o in mine if o[3] > switched][:3]
    assert store.prune(1) == [first_version]  # no replica holds it any more
    assert set(store.versions()) == {second}


def test_a_milvus_outage_is_a_503_and_the_replicas_recover(replicas, milvus_server):
    milvus_server.stop()
    try:
        for replica in replicas:
            started = time.monotonic()
            response = replica.get("/search", q=QUERY, dim=64)
            print(f"Milvus down: {response.status_code} in {time.monotonic() - started:.2f} s: {response.text}")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "not_ready"
            assert "index engine did not answer" in response.json()["error"]["message"]
            assert replica.get("/readyz").status_code == 503
            assert replica.get("/healthz").status_code == 200  # alive: a restart would not help
    finally:
        milvus_server.start()
    back = time.monotonic()
    deadline = back + RECOVERY_TIMEOUT_S
    for replica in replicas:
        # The restarted server loads its collections again one at a time; ready means all of them.
        while replica.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, replica.output()[-3000:]
            time.sleep(0.5)
        print(f"replica {replica.port}: ready {time.monotonic() - back:.1f} s after Milvus was back")
        answers = {dim: hits(replica.get("/search", q=QUERY, dim=dim)) for dim in (384, 256, 128, 64, 32)}
        assert answers[384][0][0][0] == "d022"
    log = replicas[0].output()
    assert "Traceback" not in log, log[-3000:]


def test_start_up_failures_are_one_line_and_exit_2(first_version, milvus_server_uri, capsys, caplog, monkeypatch):
    def mrl(*argv: str):
        return mrl_in_process(list(argv), capsys, caplog, monkeypatch)

    down = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(mrl("serve", *serve_flags(down)), f"Milvus at {down}: connecting failed")
    assert_one_line_error(mrl("serve", *serve_flags(milvus_server_uri, "nothing_here")), "index 'nothing_here'")
    build_args = ["index", "build", "--data", str(SAMPLE), "--backend", "milvus", "--milvus-uri", down]
    assert_one_line_error(mrl(*build_args, "--index", "x"), f"Milvus at {down}")
