"""The crash test of the write path, in the style of Qdrant's crasher: real processes, SIGKILL, no mercy.

A writable ``mrl serve`` (the tiny random model over the bundled sample, so that restarts take seconds)
takes a bounded stream of upserts and deletes while the test kills it with SIGKILL at random moments,
once while a compaction runs, and restarts it each time. At the end every acknowledged upsert is found by
its exact text as the top hit at every dim, every acknowledged delete is gone, and the document count is
the acknowledged one. A write whose answer the kill cut off may or may not have happened: both outcomes
are accepted for that document, nothing else.

It kills ``MRL_CRASH_KILLS`` times (2 by default, the second in a compaction, to keep the suite in its budget;
10 for the recorded run); its one-line figures are printed and, with ``MRL_CRASH_REPORT=FILE``, appended to that
file.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.crash import WriteState, kill_while_writing, report
from tests.helpers.sample import build_sample
from tests.helpers.servers import ServeProcess

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("MRL_CRASH_KILLS", "2"))  # 2 keep the suite in its 10 minutes; the recorded run: 10
SAMPLE_DOCUMENTS = 120


def start(root: Path, log: Path) -> ServeProcess:
    return ServeProcess(
        log, index=root, device="cpu", writable=True, compact_max_unmerged=10_000, compact_max_age_s=3600
    ).wait_ready(120)


@pytest.fixture
def root(tmp_path: Path, encode_cache: Path, tiny_model: Path) -> Path:
    build_sample(tmp_path / "index", encode_cache, model=str(tiny_model))
    return tmp_path / "index"


def test_kills_at_random_moments_lose_no_acknowledged_write(root: Path, tmp_path: Path):
    rng = random.Random(2026)
    state = WriteState()
    compaction_cut = False
    server = start(root, tmp_path / "server-0.log")
    try:
        for kill in range(KILLS):
            if kill == KILLS // 2:  # this round's kill lands while a compaction runs
                compaction_cut = kill_during_compaction(server, root, rng, state)
            else:
                kill_while_writing(server, rng, state)
            server.process.wait(timeout=30)
            server = start(root, tmp_path / f"server-{kill + 1}.log")
        recovered = state.check(server, SAMPLE_DOCUMENTS)
    finally:
        server.stop()
    report(f"crash test: {KILLS} kills, {state.sent} writes sent, {state.acknowledged} acknowledged, "
           f"{state.cut} cut off by a kill, {len(state.history)} documents checked at every dim; "
           f"{recovered.describe()}")  # fmt: skip
    assert state.acknowledged > 3 * KILLS and compaction_cut


def kill_during_compaction(server: ServeProcess, root: Path, rng: random.Random, state: WriteState) -> bool:
    """Write enough to compact, ask for a compaction, kill the server while it runs; True if the kill cut it."""
    for _ in range(40):
        state.write(server, rng, upsert_only=True)
    answered: dict[str, object] = {}

    def compact() -> None:
        try:
            answered["status"] = httpx.post(f"{server.base}/admin/compact", timeout=60).status_code
        except httpx.TransportError:
            answered["status"] = "cut"

    thread = threading.Thread(target=compact)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(root.glob("versions/.building-*")) and time.monotonic() < deadline:
        time.sleep(0.001)  # the compaction has begun writing its version: now
    os.kill(server.process.pid, signal.SIGKILL)
    thread.join(timeout=60)
    return answered.get("status") == "cut" and any(root.glob("versions/.building-*"))
