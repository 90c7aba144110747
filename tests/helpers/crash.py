"""The crash tests' bookkeeping: random writes to a writable server, and what may be true after kills.

A write the server acknowledged must be there after any kill (or gone, if it was a delete); a write whose
answer a kill cut off may or may not have happened, so its documents may be in any of the states involved,
and nowhere else. :meth:`WriteState.check` searches every document ever written by each text it was ever
sent with, at every dim, on any server that serves the index.
"""

from __future__ import annotations

import os
import random
import signal
import threading

import httpx

from tests.helpers.servers import ServeProcess

DELETED = None  # the state of a deleted document


def unique_text(rng: random.Random, number: int) -> str:
    words = ["gout", "fever", "rash", "knee", "sleep", "diet", "cough", "asthma", "statin", "migraine"]
    return f"note {number}: " + " ".join(rng.choice(words) for _ in range(12)) + f" marker{number}x{rng.random()}"


def kill_while_writing(
    server: ServeProcess, rng: random.Random, state: WriteState, within_s: tuple[float, float] = (0.2, 1.2)
) -> None:
    """Write until a timer kills ``server`` with SIGKILL at a random moment (often mid-request)."""
    stop = threading.Event()

    def kill() -> None:
        stop.set()
        os.kill(server.process.pid, signal.SIGKILL)

    killer = threading.Timer(rng.uniform(*within_s), kill)
    killer.start()
    while not stop.is_set():
        state.write(server, rng)
    killer.join()


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

    def check(self, server: ServeProcess, base_documents: int) -> None:
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
        if dims.get("writes") is None:  # a read-only replica: its content is checked, the count on the writer
            return
        documents = dims["writes"]["documents"]
        assert base_documents + certain <= documents <= base_documents + possible, dims["writes"]
