"""The bundled sample in a real Milvus 2.3.5 server, served by two ``mrl serve`` replicas, end to end.

One index is built into the session's server with the real model; two replicas serve it on
their own ports. They answer identically, and as the FAISS backend does; a rebuild under
load, then a reload of each replica, moves both to the new version without a failed request;
a killed build is cleaned up by the next; the served version is not pruned until the replicas
let go of it; a Milvus outage is a 503 (never a 500) with readyz false, and the replicas recover
when Milvus returns. Start-up failures are one line and exit code 2.
"""

from __future__ import annotations

import os
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
from tests.helpers.servers import wait_for_ready

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


def serve_env(uri: str, port: int, index: str = NAME) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MRL_")},
        "MRL_BACKEND": "milvus",
        "MRL_MILVUS_URI": uri,
        "MRL_INDEX": index,
        "MRL_PORT": str(port),
        "MRL_DEVICE": "cpu",
        "MRL_MILVUS_TIMEOUT_S": "2",
        "HF_HUB_OFFLINE": "1",
    }


class Replica:
    """``mrl serve --backend milvus`` in a subprocess, its log in a file."""

    def __init__(self, uri: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mrl", "serve"],
            cwd=REPO,
            env=serve_env(uri, self.port),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", params=params, timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self._log_file.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encode-cache")


@pytest.fixture(scope="module")
def first_version(milvus_server_uri, cache) -> str:
    return build(milvus_server_uri, cache)


@pytest.fixture(scope="module")
def store(milvus_server_uri) -> Iterator[MilvusIndexStore]:
    backend = MilvusBackend(milvus_server_uri)
    yield MilvusIndexStore(backend, NAME)
    backend.close()


@pytest.fixture(scope="module")
def replicas(first_version, milvus_server_uri, tmp_path_factory) -> Iterator[list[Replica]]:
    logs = tmp_path_factory.mktemp("replicas")
    started = [Replica(milvus_server_uri, logs / f"replica{i}.log") for i in range(2)]  # load side by side
    try:
        for replica in started:
            wait_for_ready(replica.base, replica.process, replica.log)
        yield started
    finally:
        for replica in started:
            replica.stop()


def hits(response: httpx.Response) -> list:
    assert response.status_code == 200, response.text
    return [[(h["id"], round(h["score"], 5)) for h in result["hits"]] for result in response.json()["results"]]


def test_the_server_gives_the_same_top_10_as_faiss_at_every_dim(first_version, store, tmp_path):
    assert_same_hits_as_faiss(store, first_version, tmp_path)


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
    cache,
):
    killed = kill_a_build(milvus_server_uri)
    assert store.versions()[killed] == "building"
    outcomes: list[tuple[int, int, str]] = []  # (replica, status, version)
    stop = threading.Event()

    def load(number: int) -> None:
        replica = replicas[number % 2]
        plans = [{"dim": 64}, {"dim": 384}, {"dim": 32, "rerank_dim": 384}]
        while not stop.is_set():
            response = replica.get("/search", q=QUERY, k=5, **plans[len(outcomes) % 3])
            version = response.json().get("index_version", "") if response.status_code == 200 else response.text
            outcomes.append((number % 2, response.status_code, version))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        second = build(milvus_server_uri, cache)
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
    print(f"rebuild and reload under load: {len(outcomes)} searches, statuses {Counter(s for _, s, _ in outcomes)}")
    assert outcomes and all(status == 200 for _, status, _ in outcomes), [o for o in outcomes if o[1] != 200][:3]
    for number in (0, 1):
        versions = [version for replica, _, version in outcomes if replica == number]
        assert versions[-1] == second and set(versions) == {first_version, second}
        assert versions == sorted(versions, key=lambda v: v == second)  # never back to the old one
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
            assert time.monotonic() < deadline, replica.log.read_text()[-3000:]
            time.sleep(0.5)
        print(f"replica {replica.port}: ready {time.monotonic() - back:.1f} s after Milvus was back")
        answers = {dim: hits(replica.get("/search", q=QUERY, dim=dim)) for dim in (384, 256, 128, 64, 32)}
        assert answers[384][0][0][0] == "d022"
    log = replicas[0].log.read_text()
    assert "Traceback" not in log, log[-3000:]


def run_mrl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mrl", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrl: error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_start_up_failures_are_one_line_and_exit_2(first_version, milvus_server_uri):
    down = f"http://127.0.0.1:{free_port()}"
    assert_one_line(run_mrl("serve", env=serve_env(down, free_port())), f"Milvus at {down}: connecting failed")
    unknown = serve_env(milvus_server_uri, free_port(), index="nothing_here")
    assert_one_line(run_mrl("serve", env=unknown), "index 'nothing_here'")
    build_args = ["index", "build", "--data", str(SAMPLE), "--backend", "milvus", "--milvus-uri", down]
    assert_one_line(run_mrl(*build_args, "--index", "x", env=serve_env(down, 0)), f"Milvus at {down}")
