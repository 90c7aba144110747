"""The crash test of the write path, in the style of Qdrant's crasher: real processes, SIGKILL, no mercy.

A writable ``mrl serve`` (the tiny random model over the bundled sample, so that restarts take seconds)
takes a bounded stream of upserts and deletes while the test kills it with SIGKILL at random moments,
once while a compaction runs, and restarts it each time. At the end every acknowledged upsert is found by
its exact text as the top hit at every dim, every acknowledged delete is gone, and the document count is
the acknowledged one. A write whose answer the kill cut off may or may not have happened: both outcomes
are accepted for that document, nothing else.
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

from tests.helpers.sample import build_sample
from tests.helpers.servers import ServeProcess

pytestmark = pytest.mark.slow

KILLS = 10
SAMPLE_DOCUMENTS = 120
DELETED = None  # the state of a deleted document


def unique_text(rng: random.Random, number: int) -> str:
    words = ["gout", "fever", "rash", "knee", "sleep", "diet", "cough", "asthma", "statin", "migraine"]
    return f"note {number}: " + " ".join(rng.choice(words) for _ in range(12)) + f" marker{number}x{rng.random()}"


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
        state.check(server)
    finally:
        server.stop()
    print(f"crash test: {KILLS} kills, {state.sent} writes sent, {state.acknowledged} acknowledged, "
          f"{state.cut} cut off by a kill, {len(state.history)} documents checked at every dim")  # fmt: skip
    assert state.acknowledged > 50 and compaction_cut


def kill_while_writing(server: ServeProcess, rng: random.Random, state: WriteState) -> None:
    """Write until a timer kills the server at a random moment (often mid-request)."""
    stop = threading.Event()

    def kill() -> None:
        stop.set()
        os.kill(server.process.pid, signal.SIGKILL)

    killer = threading.Timer(rng.uniform(0.2, 1.2), kill)
    killer.start()
    while not stop.is_set():
        state.write(server, rng)
    killer.join()


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


class WriteState:
    """What the server acknowledged, and for writes a kill cut off, every state their documents may be in."""

    def __init__(self) -> None:
        self.acked: dict[str, str | None] = {}  # document id -> its text, or DELETED
        self.unsure: dict[str, set] = {}
        self.history: dict[str, set[str]] = {}  # every text a document was ever sent with
        self.sent = self.acknowledged = self.cut = 0

    def write(self, server: ServeProcess, rng: random.Random, upsert_only: bool = False) -> None:
        self.sent += 1
        known = [doc for doc, text in self.acked.items() if text is not DELETED]
        if known and not upsert_only and rng.random() < 0.25:
            doc = rng.choice(known)
            changes: dict[str, str | None] = {doc: DELETED}
            path, body = "/documents/delete", {"ids": [doc]}
        else:
            count = rng.randint(1, 3)
            docs = [rng.choice(known) if known and rng.random() < 0.3 else f"w{self.sent}-{i}" for i in range(count)]
            changes = {doc: unique_text(rng, self.sent * 10 + i) for i, doc in enumerate(dict.fromkeys(docs))}
            path, body = "/documents", {"documents": [{"id": d, "text": t} for d, t in changes.items()]}
        for doc, text in changes.items():
            if text is not DELETED:
                self.history.setdefault(doc, set()).add(text)
        try:
            response = httpx.post(f"{server.base}{path}", json=body, timeout=30)
        except httpx.TransportError:
            self.cut += 1
            for doc, text in changes.items():
                self.unsure.setdefault(doc, {self.acked.get(doc, DELETED)}).add(text)
            return
        assert response.status_code == 200, response.text
        self.acknowledged += 1
        for doc, text in changes.items():
            self.acked[doc] = text
            self.unsure.pop(doc, None)  # an acknowledged write after a cut one settles it

    def check(self, server: ServeProcess) -> None:
        """Each document in one allowed state, the same at every dim; the count of documents as acknowledged."""
        dims = server.get("/dims").json()
        served = [entry["dim"] for entry in dims["dims"]]
        certain = possible = 0
        for doc, texts in self.history.items():
            allowed = self.unsure.get(doc, {self.acked.get(doc, DELETED)})
            seen = None
            for dim in served:
                found = set()
                for text in texts:
                    hit = server.get("/search", q=text, dim=dim, k=1).json()["results"][0]["hits"][0]
                    if hit["doc_id"] == doc and hit["score"] > 0.999:
                        found.add(text)
                assert len(found) <= 1, (doc, dim, found)  # never two versions of one document
                now = next(iter(found), DELETED)
                assert now in allowed, (doc, dim, now, allowed)  # an acknowledged state, or a cut write's
                assert seen is None or now == seen, (doc, dim, now, seen)  # the same at every dim
                seen = now
            certain += allowed != {DELETED} and DELETED not in allowed
            possible += any(text is not DELETED for text in allowed)
        documents = dims["writes"]["documents"]
        assert SAMPLE_DOCUMENTS + certain <= documents <= SAMPLE_DOCUMENTS + possible, dims["writes"]
