"""A least-recently-used cache of query embeddings, at full dimension.

Keyed by the model fingerprint, the prompt and the text: an entry is only ever reused for the
exact input the same weights would encode, so a reload onto another model cannot serve a stale
vector, and truncation to each dim still happens per request. Used from the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np
from prometheus_client import Counter

Key = tuple[str, str, str]  # (model fingerprint, prompt, text)


class QueryCache:
    """At most ``size`` full-dimension vectors; hits and misses counted in ``lookups`` (label ``result``).

    A miss is a text that had to be encoded; every other text of a request is a hit.
    """

    def __init__(self, size: int, lookups: Counter) -> None:
        self.size = size
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._hits = lookups.labels(result="hit")
        self._misses = lookups.labels(result="miss")

    def __len__(self) -> int:
        return len(self._entries)

    async def encode(
        self,
        texts: list[str],
        fingerprint: str,
        prompt: str,
        encode: Callable[[list[str]], Awaitable[np.ndarray]],
    ) -> np.ndarray:
        """Vectors of ``texts``, encoding (once each, through ``encode``) only those not cached."""
        keys = [(fingerprint, prompt, text) for text in texts]
        found = [self._entries.get(key) for key in keys]
        missing = list(dict.fromkeys(key for key, vector in zip(keys, found, strict=True) if vector is None))
        self._misses.inc(len(missing))  # texts encoded; a repeat within the request counts as a hit
        self._hits.inc(len(texts) - len(missing))
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)
        if missing:
            encoded = await encode([text for _, _, text in missing])
            new = {key: vector.copy() for key, vector in zip(missing, encoded, strict=True)}  # not views of a batch
            found = [vector if vector is not None else new[key] for key, vector in zip(keys, found, strict=True)]
            for key, vector in new.items():
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return np.stack(found).astype(np.float32, copy=False)
