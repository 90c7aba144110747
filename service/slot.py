"""The slot holding the served index version: swapped atomically, closed after its last search.

Each search leases the version it started on, so a reload never closes files under a running
search; the swapped-out version is closed (and its on-disk lease released) by its last user.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from index.loaded import LoadedIndex
from service.errors import NotReady


class _Lease:
    def __init__(self, loaded: LoadedIndex) -> None:
        self.loaded = loaded
        self.users = 0
        self.retired = False


class IndexSlot:
    """Holds the served :class:`LoadedIndex`; a swapped-out one is closed when its last search ends."""

    def __init__(self, loaded: LoadedIndex) -> None:
        self._lock = threading.Lock()
        self._lease = _Lease(loaded)

    @property
    def current(self) -> LoadedIndex:
        return self._lease.loaded

    @contextmanager
    def acquire(self) -> Iterator[LoadedIndex]:
        """The current index, kept open until the ``with`` block ends even if it is swapped meanwhile."""
        with self._lock:
            lease = self._lease
            if lease.retired:
                raise NotReady("the index is closed")
            lease.users += 1
        try:
            yield lease.loaded
        finally:
            self._release(lease)

    def swap(self, loaded: LoadedIndex) -> LoadedIndex:
        """Serve ``loaded`` from now on; return the previous index (closed now or by its last user)."""
        with self._lock:
            old = self._lease
            self._lease = _Lease(loaded)
        self._retire(old)
        return old.loaded

    def close(self) -> None:
        self._retire(self._lease)

    def _retire(self, lease: _Lease) -> None:
        with self._lock:
            if lease.retired:
                return
            lease.retired = True
            idle = lease.users == 0
        if idle:
            lease.loaded.close()

    def _release(self, lease: _Lease) -> None:
        with self._lock:
            lease.users -= 1
            last = lease.retired and lease.users == 0
        if last:
            lease.loaded.close()
