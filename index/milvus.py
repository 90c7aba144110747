"""A Milvus implementation of the index-backend contract: one collection per Matryoshka dimension.

The same client (``pymilvus``) talks to Milvus Lite (``uri`` a ``.db`` path), to a standalone
server and to a cluster (``http://host:19530``); only the URI changes. Each
:class:`MilvusIndex` is one collection with three fields, an int64 primary key ``row`` (the row
id, as FAISS numbers rows), one ``FLOAT_VECTOR`` field, searched by inner product, and the JSON
field ``metadata``: the row's metadata a filter can test (:func:`index.filters.filterable_metadata`),
which a filtered search hands to Milvus as a boolean expression (:meth:`Filter.milvus_expr`), so
that Milvus searches only the rows it allows. One collection per dimension because Milvus 2.3
refuses a second vector field in a collection (the metadata is therefore kept once per dim).

Consistency: collections are created at ``Strong`` and rows are counted at ``Strong`` (at the
default level a count right after an insert can miss the new rows). Searches run at ``Session``:
they see every row this client wrote (an ``add`` then a search), and a built collection is
flushed before anyone else opens it; a ``Strong`` search on a 2.3 server waits for the next time
tick, about 250 ms each, where ``Session`` takes about 3 ms.

FAISS indexes live in files; a collection lives in the engine. :meth:`MilvusIndex.save` therefore
writes a small JSON pointer (the collection's name, dimension, row count and index type) at the
path it is given, and :meth:`MilvusBackend.open` reads that pointer back, so the index builder's
folder layout works unchanged. :meth:`MilvusBackend.open_collection` opens a collection by name.

Credentials in the URI (``http://user:password@host:19530``) are taken out of it: pymilvus gets the
URI without them, and every message names the URI as :func:`redact_uri` shows it.

``pymilvus`` is imported only when a backend is used: it is the optional ``milvus`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import numpy as np

from core.errors import ConfigError
from index.backends import EngineUnavailable, describe_plan
from index.filters import Filter, FilterError, SearchFilter, filterable_metadata
from index.locator import URI_USERINFO, redact_uri  # a URI's password, as every engine shows it
from index.manifest import IndexFolderError
from index.params import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, IVF_NPROBE, IndexPlan

ROW_FIELD = "row"
VECTOR_FIELD = "vector"
METADATA_FIELD = "metadata"  # JSON: the row's filterable metadata (collections built before filters lack it)
METRIC = "IP"
CONSISTENCY = "Strong"  # creating and counting
SEARCH_CONSISTENCY = "Session"  # reads this client's own writes, without waiting for a time tick
# Rows per insert call: at most this many, and at most INSERT_BYTES of vectors (the server takes
# 64 MiB per gRPC message by default).
INSERT_ROWS = 10_000
INSERT_BYTES = 16 * 2**20
DELETE_ROWS = 1000  # row ids per delete expression
# Milvus's limits on one search request: queries (nq) and results per query (topk).
MAX_QUERIES_PER_REQUEST = 1024
MAX_TOP_K = 16_384
INDEX_WAIT_S = 300
# What FAISS puts in the places of missing hits (inner product): -FLT_MAX and row id -1.
MISSING_SCORE = np.finfo(np.float32).min
MISSING_ROW = -1
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
# Index types of ours that Milvus Lite (3.2) builds; it has no IVF_PQ.
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
SUPPORTED_FACTORIES = "Flat, IVF{nlist},Flat, IVF{nlist},PQ{m}, HNSW{M} or HNSW{M},Flat"
# gRPC retries a lost connection with exponential backoff up to 2 minutes by default: a replica would go on
# answering 503 for that long after Milvus is back. Retry every second or two instead.
RECONNECT_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.min_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 2000,
}
T = TypeVar("T")
# Where credentials come from (never from the command line alone: flags show in `ps`).
CREDENTIAL_VARIABLES = {"token": "MRL_MILVUS_TOKEN", "user": "MRL_MILVUS_USER", "password": "MRL_MILVUS_PASSWORD"}


def split_credentials(uri: str, token: str = "", user: str = "", password: str = "") -> tuple[str, dict[str, str]]:
    """``(uri without its userinfo, credentials for pymilvus)``; the ones given win over the URI's.

    So pymilvus never sees a password inside a URI, which it would repeat in its own errors. Its
    reading of the userinfo is kept: ``user:password``, or a lone name as a token; percent-escapes
    are decoded.
    """
    match = URI_USERINFO.fullmatch(uri)
    if match is None:
        return uri, {"token": token, "user": user, "password": password}
    address = match["scheme"] + match["rest"]
    uri_user, colon, uri_password = (unquote(part) for part in match["userinfo"].partition(":"))
    if not colon and not (token or password):
        return address, {"token": uri_user, "user": user, "password": password}
    return address, {"token": token, "user": user or uri_user, "password": password or uri_password}


def credentials_from_env() -> dict[str, str]:
    """``token``, ``user`` and ``password`` for :class:`MilvusBackend` from ``MRL_MILVUS_*`` (empty if unset)."""
    return {key: os.environ.get(variable, "") for key, variable in CREDENTIAL_VARIABLES.items()}


@contextlib.contextmanager
def engine_errors(uri: str, what: str) -> Iterator[None]:
    """Turn the client's failures (pymilvus and gRPC errors) into :class:`EngineUnavailable`, naming ``what``.

    pymilvus retries a call it could not deliver until the call's timeout; what reaches here is
    a server that is down, unreachable, or refused the call.
    """
    from pymilvus.exceptions import MilvusException

    uri = redact_uri(uri)
    try:
        yield
    except MilvusException as exc:
        raise EngineUnavailable(f"Milvus at {uri}: {what} failed ({_first_line(exc)})") from None
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError):
            raise EngineUnavailable(f"Milvus at {uri}: {what} failed ({_first_line(exc)})") from None
        raise


def reloading(client, collection: str, timeout: float | None, call: Callable[[], T]) -> T:
    """``call()``; if Milvus says ``collection`` is not loaded (a restarted server that has not loaded it
    again yet, or Milvus Lite reopened), load it and call once more."""
    from pymilvus.exceptions import MilvusException

    try:
        return call()
    except MilvusException as exc:
        if "not loaded" not in str(exc) and "released" not in str(exc):
            raise
        client.load_collection(collection, timeout=timeout)
        return call()


def session_after(client, source: str, collections: Iterable[str]) -> None:
    """Make this process's ``Session`` reads of ``collections`` wait for its last write to ``source``.

    pymilvus keeps, per collection, the timestamp of this process's last write there, and a ``Session`` read
    waits until the server has applied everything up to it. A 2.3.5 server answers a delete without a
    timestamp, so a read right after a delete could still return the deleted rows (for a time tick, 200 ms).
    A write to ``source`` made after the deletes returned has a later timestamp from the same clock; recorded
    for ``collections`` (in pymilvus's own bookkeeping), their ``Session`` reads include the deletes too.
    """
    from pymilvus.client import ts_utils

    endpoint = client._get_connection().server_address
    stamp = ts_utils.get_collection_ts(source, endpoint)
    for collection in collections if stamp else ():
        ts_utils.update_collection_ts(collection, stamp, endpoint)


def _quiet_client_logs() -> None:
    """Keep pymilvus's own error logs (each failed call, with a traceback) out of the service's log.

    Every failure reaches the caller as :class:`EngineUnavailable` with one readable line. pymilvus
    sets its logger's level when it is imported, so this runs after the import. Milvus Lite's
    in-process gRPC server logs a traceback for each call it does not implement (pymilvus then
    falls back); those go too.
    """
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def _first_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).strip().splitlines()[0][:300]


@dataclass(frozen=True)
class MilvusLayout:
    """An :class:`IndexPlan` in Milvus's terms: index type, build parameters, search parameters."""

    index_type: str
    build_params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    def search_params_for(self, k: int) -> dict[str, int]:
        """Search parameters for a top-``k`` search (HNSW's ``ef`` may not be below ``k``)."""
        if "ef" in self.search_params:
            return {**self.search_params, "ef": max(self.search_params["ef"], k)}
        return dict(self.search_params)


def milvus_layout(plan: IndexPlan) -> MilvusLayout:
    """Map a FAISS factory string and its search parameters onto a Milvus index type.

    ``Flat`` → FLAT; ``IVF{n},Flat`` → IVF_FLAT (nlist n, nprobe); ``IVF{n},PQ{m}`` → IVF_PQ
    (nlist n, m sub-quantisers of 8 bits, nprobe); ``HNSW{M}[,Flat]`` → HNSW (M, efConstruction;
    efSearch → ef).

    Raises:
        ConfigError: For any other factory string, or a search parameter that type does not take.
    """
    factory = plan.factory.replace(" ", "")
    params = dict(plan.search_params)
    if factory == "Flat":
        layout, allowed = MilvusLayout("FLAT"), set()
    elif match := re.fullmatch(r"IVF(\d+),Flat", factory):
        nprobe = params.get("nprobe", IVF_NPROBE)
        layout, allowed = MilvusLayout("IVF_FLAT", {"nlist": int(match[1])}, {"nprobe": nprobe}), {"nprobe"}
    elif match := re.fullmatch(r"IVF(\d+),PQ(\d+)", factory):
        build = {"nlist": int(match[1]), "m": int(match[2]), "nbits": 8}
        layout, allowed = MilvusLayout("IVF_PQ", build, {"nprobe": params.get("nprobe", IVF_NPROBE)}), {"nprobe"}
    elif match := re.fullmatch(r"HNSW(\d+)(,Flat)?", factory):
        build = {"M": int(match[1]), "efConstruction": HNSW_EF_CONSTRUCTION}
        layout, allowed = MilvusLayout("HNSW", build, {"ef": params.get("efSearch", HNSW_EF_SEARCH)}), {"efSearch"}
    else:
        raise ConfigError(f"index type {plan.factory!r} has no Milvus equivalent here; use {SUPPORTED_FACTORIES}")
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"search parameters {unknown} do not apply to {plan.factory!r} on Milvus")
    return layout


def check_collection_name(name: str) -> str:
    """``name`` if Milvus accepts it as a collection name (letters, digits, ``_``; not a digit first).

    Raises:
        ConfigError: Otherwise.
    """
    if not COLLECTION_NAME.fullmatch(name):
        raise ConfigError(
            f"collection name {name!r} is not valid in Milvus: letters, digits and '_' only, "
            "not starting with a digit, at most 255 characters"
        )
    return name


def _index_params(layout: MilvusLayout):
    """pymilvus ``IndexParams`` for the vector field, with the build parameters in both wire shapes.

    pymilvus 3 sends build parameters as flat key-value pairs, which the servers read; Milvus Lite
    (3.2) reads only the older shape, one ``params`` pair holding them as JSON, and silently builds
    with its defaults otherwise. The server stores the extra pair and ignores it.
    """
    from pymilvus.milvus_client.index import IndexParam, IndexParams

    class BothShapes(IndexParam):
        def get_index_configs(self) -> dict:
            return {**super().get_index_configs(), "params": dict(layout.build_params)}

    param = BothShapes(VECTOR_FIELD, layout.index_type, "", metric_type=METRIC, params=dict(layout.build_params))
    return IndexParams([param])


class MilvusIndex:
    """One dimension's inner-product index: one Milvus collection (a :class:`VectorIndex`)."""

    backend = "milvus"
    device = "milvus"
    # pymilvus calls go over one gRPC channel, which takes concurrent calls; the server searches them.
    thread_safe = True

    def __init__(
        self,
        client,
        collection: str,
        plan: IndexPlan,
        dim: int,
        ntotal: int,
        uri: str,
        timeout: float | None = None,
        has_metadata: bool = True,
    ) -> None:
        self._client = client  # pymilvus.MilvusClient, shared with the backend that made it
        self.has_metadata = has_metadata  # whether its rows carry METADATA_FIELD (so that it can be filtered)
        self.collection = collection
        self.plan = plan
        self.layout = milvus_layout(plan)
        self.uri = uri
        self.timeout = timeout  # seconds per call (None: pymilvus's own)
        self._dim = dim
        self._ntotal = ntotal
        self._bound: Callable[[], int] | None = None  # see grows_with

    # --- use ----------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self._ntotal if self._bound is None else max(self._ntotal, self._bound())

    @property
    def dim(self) -> int:
        return self._dim

    def add(self, vectors: np.ndarray, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Append rows; their ids continue from :attr:`ntotal`. ``metadata``: each row's (none: ``{}``)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        self.put(range(self._ntotal, self._ntotal + len(vectors)), vectors, metadata)
        self._ntotal += len(vectors)

    def put(
        self,
        rows: Sequence[int],
        vectors: np.ndarray,
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        replace: bool = False,
    ) -> None:
        """Write ``vectors`` (already of this dim) as rows ``rows``: inserted, or with ``replace`` upserted (a row
        id already there is overwritten, so writing the same rows twice leaves them once)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"vectors of dim {vectors.shape[1]} added to {self.collection!r} of dim {self._dim}")
        if metadata is not None and len(metadata) != len(vectors):
            raise ValueError(f"{len(metadata)} metadata for {len(vectors)} vectors added to {self.collection!r}")
        kept = [filterable_metadata(m) for m in metadata] if metadata is not None else [{}] * len(vectors)
        row_bytes = 4 * self._dim + max((len(json.dumps(m)) for m in kept), default=0)
        batch = max(1, min(INSERT_ROWS, INSERT_BYTES // row_bytes))
        write = self._client.upsert if replace else self._client.insert
        for start in range(0, len(vectors), batch):
            chunk = vectors[start : start + batch]
            ids = rows[start : start + batch]
            entities = [{ROW_FIELD: int(row), VECTOR_FIELD: vector} for row, vector in zip(ids, chunk, strict=True)]
            if self.has_metadata:
                for entity, values in zip(entities, kept[start : start + batch], strict=True):
                    entity[METADATA_FIELD] = values
            with engine_errors(self.uri, f"inserting into {self.collection!r}"):
                write(self.collection, entities, timeout=self.timeout)

    def remove(self, rows: Sequence[int]) -> None:
        """Delete rows ``rows`` (ids not there are no error)."""
        rows = [int(row) for row in rows]
        for start in range(0, len(rows), DELETE_ROWS):
            with engine_errors(self.uri, f"deleting from {self.collection!r}"):
                chunk = rows[start : start + DELETE_ROWS]
                self._client.delete(self.collection, filter=f"{ROW_FIELD} in {chunk}", timeout=self.timeout)

    def grows_with(self, bound: Callable[[], int]) -> None:
        """The collection takes live writes (:mod:`index.milvus_live`): ``bound()`` is above every row id written.

        :attr:`ntotal` is then at least ``bound()`` (an upper bound on the rows, not a count), and a search
        asks Milvus for ``k`` hits whatever the count was at open (rows written since count too).
        """
        self._bound = bound

    def matching_rows(self, where: Filter, below: int, consistency: str = SEARCH_CONSISTENCY) -> list[int]:
        """Every row id under ``below`` whose metadata ``where`` allows, sorted (in ranges of ``MAX_TOP_K`` rows,
        the most one query returns)."""
        found: list[int] = []
        expression = where.milvus_expr(METADATA_FIELD)
        for start in range(0, below, MAX_TOP_K):
            ranged = f"({expression}) and ({ROW_FIELD} >= {start}) and ({ROW_FIELD} < {start + MAX_TOP_K})"
            with engine_errors(self.uri, f"filtering {self.collection!r}"):
                hits = reloading(
                    self._client,
                    self.collection,
                    self.timeout,
                    lambda ranged=ranged: self._client.query(
                        self.collection,
                        filter=ranged,
                        output_fields=[ROW_FIELD],
                        consistency_level=consistency,
                        timeout=self.timeout,
                    ),
                )
            found.extend(int(hit[ROW_FIELD]) for hit in hits)
        return sorted(found)

    def search(self, queries: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product: ``(scores, row ids)``, each ``(n_queries, min(k, ntotal))``, best first.

        As with FAISS, ``k`` is cut to the row count (at least 1; not for a collection that takes live
        writes, see :meth:`grows_with`), and a query with fewer hits is padded with score -FLT_MAX and
        row id -1. With ``where``, Milvus searches only the rows whose metadata its filter allows (the
        filter's expression over ``METADATA_FIELD``).

        Raises:
            ConfigError: If ``k`` exceeds Milvus's limit of ``MAX_TOP_K`` results per query.
            FilterError: A filter on a collection built without metadata.
            EngineUnavailable: Milvus did not answer (within the timeout).
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self._bound is None:
            k = min(k, max(self._ntotal, 1))
        if k > MAX_TOP_K:
            raise ConfigError(f"k={k} is above Milvus's limit of {MAX_TOP_K} results per query")
        if where is not None and not self.has_metadata:
            raise FilterError(f"filter: collection {self.collection!r} was built without metadata; rebuild to filter")
        expression = "" if where is None else where.filter.milvus_expr(METADATA_FIELD)
        scores = np.full((len(queries), k), MISSING_SCORE, dtype=np.float32)
        rows = np.full((len(queries), k), MISSING_ROW, dtype=np.int64)
        search_params = {"metric_type": METRIC, "params": self.layout.search_params_for(k)}
        for start in range(0, len(queries), MAX_QUERIES_PER_REQUEST):
            batch = queries[start : start + MAX_QUERIES_PER_REQUEST]
            if self._client is None:
                raise EngineUnavailable(f"Milvus collection {self.collection!r}: searched after close()")
            with engine_errors(self.uri, f"searching {self.collection!r}"):
                results = reloading(
                    self._client,
                    self.collection,
                    self.timeout,
                    lambda batch=batch: self._client.search(
                        self.collection,
                        data=list(batch),
                        filter=expression,
                        limit=k,
                        search_params=search_params,
                        anns_field=VECTOR_FIELD,
                        consistency_level=SEARCH_CONSISTENCY,
                        timeout=self.timeout,
                    ),
                )
            for offset, hits in enumerate(results):
                found = min(len(hits.ids), k)
                rows[start + offset, :found] = hits.ids[:found]
                scores[start + offset, :found] = hits.distances[:found]
        return scores, rows

    # --- describing and keeping -------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            **describe_plan(self.backend, self.plan, self.device),
            "collection": self.collection,
            "index_type": self.layout.index_type,
            "index_params": dict(self.layout.build_params),
            "milvus_search_params": dict(self.layout.search_params),
        }

    def save(self, path: Path) -> None:
        """Not a file: a collection stays in Milvus, kept by its store (:mod:`index.milvus_store`) by its name."""
        raise NotImplementedError("a Milvus index is kept by its collection; reopen it with open_collection()")

    def close(self) -> None:
        """Stop using the collection; it stays loaded on the server.

        Loading is server-wide: releasing here would fail the searches of every other process
        (another replica) serving the same collection. Whoever drops old versions frees them.
        """
        self._client = None


class MilvusBackend:
    """An :class:`IndexBackend` on one Milvus deployment: Milvus Lite, a standalone server or a cluster.

    It is not registered at import (it needs a URI): ``register_backend(MilvusBackend(uri))``.

    Args:
        uri: A ``.db`` file path for Milvus Lite, or ``http(s)://host:port`` for a server or cluster;
            ``http(s)://user:password@host:port`` carries credentials (see :func:`split_credentials`).
        token: An API token, or ``"user:password"``; alternatively ``user`` and ``password``. These
            win over credentials in ``uri``.
        collection_prefix: Start of the names :meth:`build` gives new collections.
        timeout: Seconds for each call to Milvus (``None``: pymilvus's default).
    """

    name = "milvus"

    def __init__(
        self,
        uri: str | Path,
        *,
        token: str = "",
        user: str = "",
        password: str = "",
        collection_prefix: str = "mrl",
        timeout: float | None = None,
    ) -> None:
        self._address, self._credentials = split_credentials(str(uri), token, user, password)
        self.uri = redact_uri(str(uri))  # what every message shows
        self.collection_prefix = check_collection_name(collection_prefix)
        self.timeout = timeout
        self._client = None

    def __repr__(self) -> str:  # never the credentials
        return f"MilvusBackend(uri={self.uri!r})"

    @property
    def is_lite(self) -> bool:
        """Whether the URI names a Milvus Lite database file rather than a server."""
        return self.uri.endswith(".db")

    def available(self) -> bool:
        """Whether ``pymilvus`` (and, for a ``.db`` URI, ``milvus-lite``) can be imported."""
        import importlib.util

        needed = ["pymilvus", "milvus_lite"] if self.is_lite else ["pymilvus"]
        return all(importlib.util.find_spec(module) is not None for module in needed)

    @property
    def client(self):
        """The ``pymilvus.MilvusClient`` of this backend, connected on first use.

        Raises:
            EngineUnavailable: The engine cannot be reached (or refuses the credentials).
        """
        if self._client is None:
            from pymilvus import MilvusClient

            _quiet_client_logs()
            with engine_errors(self.uri, "connecting"):
                self._client = MilvusClient(
                    uri=self._address, timeout=self.timeout, grpc_options=RECONNECT_OPTIONS, **self._credentials
                )
        return self._client

    def close(self) -> None:
        """Close the connection (indexes opened through it are not searched afterwards)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- the contract ----------------------------------------------------------------
    def build(
        self,
        vectors: np.ndarray,
        plan: IndexPlan,
        *,
        collection: str | None = None,
        seal: bool = True,
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> MilvusIndex:
        """A new collection of ``vectors`` (unit length) indexed as ``plan`` says, flushed and indexed.

        Args:
            vectors: ``(n, dim)`` float vectors; row ``i`` gets primary key ``i``.
            metadata: Row ``i``'s metadata (what filters test), or None for none.
            plan: Index type and search parameters (see :func:`milvus_layout`).
            collection: Its name; a new ``{collection_prefix}_{random hex}`` if ``None``.
            seal: Flush, index and load it before returning; with ``False`` the caller calls
                :meth:`seal` before searching (several collections can be sealed side by side).

        Raises:
            ConfigError: For a plan Milvus cannot take, an invalid name, or a name already in use.
        """
        from pymilvus import DataType, MilvusClient

        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        layout = milvus_layout(plan)
        if self.is_lite and layout.index_type not in LITE_INDEX_TYPES:
            # Milvus Lite 3.2 accepts the index, reports it built, and then cannot load the collection.
            raise ConfigError(
                f"Milvus Lite has no {layout.index_type} index ({plan.factory!r}); "
                f"it builds {', '.join(LITE_INDEX_TYPES)}: use a Milvus server, or another index type"
            )
        name = check_collection_name(collection or f"{self.collection_prefix}_{uuid.uuid4().hex[:16]}")
        with engine_errors(self.uri, f"creating {name!r}"):
            if self.client.has_collection(name):
                raise ConfigError(f"Milvus collection {name!r} already exists at {self.uri}")
            dim = int(vectors.shape[1])
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(ROW_FIELD, DataType.INT64, is_primary=True)
            schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field(METADATA_FIELD, DataType.JSON)
            # Written, sealed and indexed before it is loaded: a collection loaded earlier goes on being
            # searched by brute force over the rows as they arrived (the server until its next handoff,
            # Milvus Lite until a reload), not through the index the plan asks for.
            self.client.create_collection(name, schema=schema, consistency_level=CONSISTENCY)
            self.client.create_index(name, _index_params(layout))
        index = MilvusIndex(self.client, name, plan, dim=dim, ntotal=0, uri=self.uri, timeout=self.timeout)
        index.add(vectors, metadata)
        if seal:
            self.seal(name)
        return index

    def seal(self, collection: str) -> None:
        """Flush ``collection``, wait until every row is indexed, then load it for search."""
        with engine_errors(self.uri, f"indexing {collection!r}"):
            self.client.flush(collection)
            self._wait_until_indexed(collection)
            self.client.load_collection(collection)

    def open(self, path: Path, plan: IndexPlan) -> MilvusIndex:
        """Not a file: see :meth:`open_collection` (an index kept in Milvus is opened by its store)."""
        raise NotImplementedError("a Milvus index is opened by its collection: open_collection(name, plan)")

    def open_collection(self, collection: str, plan: IndexPlan) -> MilvusIndex:
        """The existing collection ``collection``, loaded, with ``plan``'s search parameters.

        Raises:
            IndexFolderError: If it does not exist at this URI or is not laid out as :meth:`build` makes them.
        """
        with engine_errors(self.uri, f"opening {collection!r}"):
            if not self.client.has_collection(check_collection_name(collection)):
                raise IndexFolderError(f"Milvus collection {collection!r} does not exist at {self.uri}")
            fields = {f["name"]: f for f in self.client.describe_collection(collection)["fields"]}
            vector = fields.get(VECTOR_FIELD)
            if ROW_FIELD not in fields or vector is None or "dim" not in vector.get("params", {}):
                raise IndexFolderError(
                    f"Milvus collection {collection!r} has fields {sorted(fields)}, expected {ROW_FIELD!r} and "
                    f"{VECTOR_FIELD!r}"
                )
            self.client.load_collection(collection)
            ntotal = self.count(collection)
        dim, has_metadata = int(vector["params"]["dim"]), METADATA_FIELD in fields
        return MilvusIndex(
            self.client, collection, plan, dim, ntotal, self.uri, timeout=self.timeout, has_metadata=has_metadata
        )

    # --- housekeeping ------------------------------------------------------------------
    def count(self, collection: str) -> int:
        """Rows in ``collection``, counted at strong consistency (so rows just inserted count)."""
        with engine_errors(self.uri, f"counting {collection!r}"):
            result = self.client.query(
                collection, filter="", output_fields=["count(*)"], consistency_level=CONSISTENCY, timeout=self.timeout
            )
        return int(result[0]["count(*)"])

    def drop(self, collection: str) -> None:
        """Delete ``collection`` and its data (nothing if it does not exist)."""
        with engine_errors(self.uri, f"dropping {collection!r}"):
            if self.client.has_collection(collection):
                self.client.drop_collection(collection)

    def all_collections(self) -> list[str]:
        """Names of every collection at this URI."""
        with engine_errors(self.uri, "listing collections"):
            return sorted(self.client.list_collections())

    def collections(self) -> list[str]:
        """Names of the collections at this URI that start with ``collection_prefix``."""
        return [name for name in self.all_collections() if name.startswith(f"{self.collection_prefix}_")]

    def _wait_until_indexed(self, collection: str) -> None:
        """Wait until the server has indexed every sealed row (Milvus builds indexes in the background)."""
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            info = self.client.describe_index(collection, VECTOR_FIELD)
            pending = int(info.get("pending_index_rows", 0))
            if pending == 0 and int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Milvus collection {collection!r} not indexed in {INDEX_WAIT_S} s: {info}")
            time.sleep(0.2)
