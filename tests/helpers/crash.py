"""The crash tests' bookkeeping: random writes to a writable server, and what may be true after kills.

A write the server acknowledged must be there after any kill (or gone, if it was a delete); a write whose
answer a kill cut off may or may not have happened, so its documents may be in any of the states involved,
and nowhere else. :meth:`WriteState.check` searches every document ever written by each text it was ever
sent with, at every dim, on any server that serves the index, and says what it recovered: the acknowledged
writes found, and how many of the cut-off ones ended up applied. :func:`report` prints a test's figures and
appends them to the file ``MRL_CRASH_REPORT`` names, so that a run's figures are kept without ``pytest -s``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass

import httpx

from tests.helpers.servers import ServeProcess

DELETED = None  # the state of a deleted document


def unique_text(rng: random.Random, number: int) -> str:
    words = ["gout", "fever", "rash", "knee", "sleep", "diet", "cough", "asthma", "statin", "migraine"]
    return f"note {number}: " + " ".join(rng.choice(words) for _ in range(12)) + f" marker{number}x{rng.random()}"


def report(line: str) -> None:
    """Print a crash test's one-line figures, and append them to the file ``MRL_CRASH_REPORT`` names (if set)."""
    print(line)
    target = os.environ.get("MRL_CRASH_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


@dataclass(frozen=True)
class Recovery:
    """What one server showed after the kills: acknowledged writes whose effect was there (or was replaced by a
    later write's), and cut-off writes that were applied, not applied, or overwritten before they could be told."""

    found: int
    acknowledged: int
    applied: int
    cut: int
    overwritten: int

    def describe(self) -> str:
        return (
            f"recovered {self.found}/{self.acknowledged} acknowledged writes, {self.applied} of {self.cut} cut writes "
            f"applied ({self.overwritten} overwritten by later writes before they could be told)"
        )


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
        self.writes: list[tuple[bool, dict[str, str | None]]] = []  # (acknowledged, its changes), in order sent
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
            self.writes.append((False, changes))
            for doc, text in changes.items():
                self.unsure.setdefault(doc, {self.acked.get(doc, DELETED)}).add(text)
            return
        assert response.status_code == 200, response.text
        self.acknowledged += 1
        self.writes.append((True, changes))
        for doc, text in changes.items():
            self.acked[doc] = text
            self.unsure.pop(doc, None)  # an acknowledged write after a cut one settles it

    def check(self, server: ServeProcess, base_documents: int) -> Recovery:
        """Each document in one allowed state, the same at every dim; the count of documents as acknowledged.

        Returns:
            What the server recovered (see :meth:`recovery`).
        """
        dims = server.get("/dims").json()
        served = [entry["dim"] for entry in dims["dims"]]
        certain = possible = 0
        states: dict[str, str | None] = {}  # each document's state, as found
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
            states[doc] = seen
            certain += allowed != {DELETED} and DELETED not in allowed
            possible += any(text is not DELETED for text in allowed)
        recovered = self.recovery(states)
        assert recovered.found == self.acknowledged, recovered.describe()  # what the states above already say
        if dims.get("writes") is None:  # a read-only replica: its content is checked, the count on the writer
            return recovered
        documents = dims["writes"]["documents"]
        assert base_documents + certain <= documents <= base_documents + possible, dims["writes"]
        return recovered

    def recovery(self, states: dict[str, str | None]) -> Recovery:
        """Tell each write's fate from the documents' final ``states``. An acknowledged write is found if each of
        its documents is in its state or a later write's; a cut write was applied if every document no later
        write touched is in its state, and cannot be told if later writes touched them all."""
        later: dict[str, set[str | None]] = {}  # the states later writes gave each document
        found = applied = overwritten = 0
        for acknowledged, changes in reversed(self.writes):
            if acknowledged:
                found += all(
                    states[doc] == state or states[doc] in later.get(doc, ()) for doc, state in changes.items()
                )
            else:
                own = [doc for doc in changes if doc not in later]
                overwritten += not own
                applied += bool(own) and all(states[doc] == changes[doc] for doc in own)
            for doc, state in changes.items():
                later.setdefault(doc, set()).add(state)
        return Recovery(found, self.acknowledged, applied, self.cut, overwritten)
