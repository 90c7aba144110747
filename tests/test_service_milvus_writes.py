"""The crash test of the write path on a real Milvus 2.3.5 server, with a writable replica and a reader.

The sample, indexed with the tiny random model into the session's Milvus server, is served by two
replicas: one writable, one read-only. The writable one takes random upserts, replacements and deletes and
is killed with SIGKILL at random moments, six times, restarted each time, while a thread searches the
reader and every search must answer 200. At the end every acknowledged write is found (or gone) by its
exact text at every dim on both replicas, and the writer counts the acknowledged documents.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from index.build import BuildConfig, build_index
from tests.conftest import SAMPLE
from tests.helpers.crash import WriteState, kill_while_writing
from tests.helpers.servers import ServeProcess

pytestmark = pytest.mark.slow

KILLS = 6  # each restart loads the server anew (about 15 s on 2 cores): six keep the suite in its budget
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


def test_kills_of_the_writer_lose_no_acknowledged_write_and_the_reader_never_fails(locator: str, tmp_path: Path):
    rng = random.Random(29)
    state = WriteState()
    reader = replica(locator, tmp_path / "reader.log", writable=False)
    writer = replica(locator, tmp_path / "writer-0.log", writable=True)
    answers: list[int] = []
    stop = threading.Event()

    def read() -> None:
        with httpx.Client(base_url=reader.base, timeout=30) as client:
            while not stop.is_set():
                answers.append(client.get("/search", params={"q": "gout at night", "k": 5}).status_code)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for kill in range(KILLS):
            kill_while_writing(writer, rng, state, within_s=WRITING_S)
            writer.process.wait(timeout=30)
            writer = replica(locator, tmp_path / f"writer-{kill + 1}.log", writable=True)
        stop.set()
        thread.join(timeout=60)
        time.sleep(STALENESS_S)  # the reader's view catches up with the last writes
        state.check(writer, SAMPLE_DOCUMENTS)
        state.check(reader, SAMPLE_DOCUMENTS)
    finally:
        stop.set()
        writer.stop()
        reader.stop()
    print(f"Milvus crash test: {KILLS} kills, {state.sent} writes sent, {state.acknowledged} acknowledged, "
          f"{state.cut} cut off, {len(answers)} reader searches {sorted(set(answers))}")  # fmt: skip
    assert state.acknowledged > 15 and answers and set(answers) == {200}
