"""The crash test of the write path on a real Milvus 2.3.5 server, with a writable replica and two readers.

The sample, indexed with the tiny random model into the session's Milvus server, is served by a writable
replica and ``MRL_CRASH_READERS`` read-only ones (1 by default; the recorded run has 2). The writable one takes
random upserts, replacements and deletes and is killed with SIGKILL at random moments, ``MRL_CRASH_KILLS``
times (2 by default: each restart is about 15 s of the suite; the recorded run has 10), restarted each time,
while a thread per reader searches it and every search must answer 200. At the end every acknowledged write
is found (or gone) by its exact text at every dim on every replica, and the writer counts the acknowledged
documents. The one-line figures are printed and,
with ``MRL_CRASH_REPORT=FILE``, appended to that file.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from index.build import BuildConfig, build_index
from tests.conftest import SAMPLE
from tests.helpers.crash import WriteState, kill_while_writing, report
from tests.helpers.servers import ServeProcess

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("MRL_CRASH_KILLS", "2"))  # each restart loads the writer anew (about 15 s on 2 cores)
READERS = int(os.environ.get("MRL_CRASH_READERS", "1"))  # each is a server process started and checked
SAMPLE_DOCUMENTS = 120
WRITING_S = (1.5, 4.0)  # a write into Milvus takes about a second: each round lets a few through before the kill
STALENESS_S = 5.0  # how long the reader may lag the writer (Session consistency across processes)


@pytest.fixture(scope="module")
def locator(milvus_server_uri: str, encode_cache: Path, tiny_model: Path) -> str:
    where = f"milvus://{milvus_server_uri.removeprefix('http://')}/crashed"
    config = BuildConfig(data=SAMPLE, index=where, model=str(tiny_model), keep_versions=1, progress=False,
                         cache_dir=encode_cache)  # fmt: skip
    build_index(config)
    return where


def replica(locator: str, log: Path, writable: bool) -> ServeProcess:
    return ServeProcess(log, index=locator, device="cpu", writable=writable, milvus_timeout_s=10).wait_ready(180)


def test_kills_of_the_writer_lose_no_acknowledged_write_and_the_readers_never_fail(locator: str, tmp_path: Path):
    rng = random.Random(29)
    state = WriteState()
    servers: list[ServeProcess] = []  # the readers, then each writer started
    answers: list[list[int]] = [[] for _ in range(READERS)]
    stop = threading.Event()

    def read(reader: ServeProcess, statuses: list[int]) -> None:
        with httpx.Client(base_url=reader.base, timeout=30) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.get("/search", params={"q": "gout at night", "k": 5}).status_code)
                except httpx.HTTPError:
                    statuses.append(0)  # no answer at all: a failure too

    threads: list[threading.Thread] = []
    try:
        for n in range(READERS):
            servers.append(replica(locator, tmp_path / f"reader-{n}.log", writable=False))
        readers = list(servers)
        servers.append(replica(locator, tmp_path / "writer-0.log", writable=True))
        threads = [threading.Thread(target=read, args=pair) for pair in zip(readers, answers, strict=True)]
        for thread in threads:
            thread.start()
        for kill in range(KILLS):
            kill_while_writing(servers[-1], rng, state, within_s=WRITING_S)
            servers[-1].process.wait(timeout=30)
            servers.append(replica(locator, tmp_path / f"writer-{kill + 1}.log", writable=True))
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        time.sleep(STALENESS_S)  # the readers' view catches up with the last writes
        recovered = [state.check(server, SAMPLE_DOCUMENTS).describe() for server in (servers[-1], *readers)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for server in servers:
            server.stop()
    names = ["writer", *(f"reader {n + 1}" for n in range(READERS))]
    where = (
        f"on the writer and each reader: {recovered[0]}"
        if len(set(recovered)) == 1
        else "; ".join(f"on the {name}: {line}" for name, line in zip(names, recovered, strict=True))
    )
    searches = ", ".join(f"{len(statuses)} {sorted(set(statuses))}" for statuses in answers)
    report(f"Milvus crash test: {KILLS} kills, {state.sent} writes sent, {state.acknowledged} acknowledged, "
           f"{state.cut} cut off; {where}; reader searches {searches}")  # fmt: skip
    assert state.acknowledged > 3 * KILLS
    assert all(statuses and set(statuses) == {200} for statuses in answers)
