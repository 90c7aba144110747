"""Index versions kept entirely in Milvus, so that a replica needs only the URI, the index name and the model.

An index ``NAME`` at one Milvus URI is a set of collections:

    NAME_meta             records, one row each: current, version/<V>, manifest/<V>/<part>, lease/<V>/<holder>
    NAME_<tag>_docs       version V's documents and full vectors: one row per document part
    NAME_<tag>_d<dim>     version V's index at one Matryoshka dim (a :class:`~index.milvus.MilvusIndex`),
                          with each row's filterable metadata (what filtered searches test)

``<tag>`` is the version name in the characters Milvus allows. Every Milvus 2.3 collection needs
a vector field, so the meta collection carries a two-dimensional zero vector it never searches.

Versions. A build writes its ``version/<V>`` record (state ``building``) before it creates any
collection, fills and indexes every collection, writes the manifest, marks the record ``live``
and only then rewrites the one ``current`` record: the single-row upsert is the atomic step that
makes a version live, and readers resolve ``current`` once per start or reload, then hold one
version for all its dims. A killed build never reaches ``current``; the next build drops what
it left (its record names its collections, and any collection of the index that no record names
is dropped too). Old versions are pruned like folders (:mod:`index.layout`): all but the newest
``keep`` live versions, never the current one, never one that a live server holds a lease on
(a ``lease/<V>/<host>~<pid>~<tag>`` record, refreshed while it serves).

Writers. Milvus has no lock and no compare-and-set. Writers take turns to mark a version live, rewrite
``current`` and prune (:meth:`MilvusIndexStore.publishing`, one ``publishing/<holder>`` record each), so
a prune never drops a version another writer is making current. An add (:meth:`MilvusIndexStore.writing`)
also checks in its turn that ``current`` is still the version it read; if another writer published
meanwhile, it is refused (:class:`CurrentMoved`) and nothing of it goes live. A build replaces the whole
corpus, so it publishes whatever is current.

Documents: :mod:`index.milvus_docs`. Live writes into the current version: :mod:`index.milvus_live`
(one writer per index, a ``writer`` record; see :class:`WriterRecord`).

Reads of records are at ``Strong`` consistency: a replica that reloads sees the ``current`` the
build wrote, however little time passed. (A served version's own record, which live writes change, is
re-read at ``Session`` every ``RECORD_TTL_S`` seconds: :class:`VersionWatch`.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.data import Document
from core.errors import ConfigError, MrlError
from index.backends import Device, EngineUnavailable, VectorIndex
from index.layout import STALE_STAGING_SECONDS
from index.loaded import LoadedIndex
from index.locator import LOCATOR_FORMS, IndexLocator, index_name, redact_uri, shown
from index.manifest import IndexFolderError, IndexManifest
from index.milvus import (
    CONSISTENCY,
    METRIC,
    SEARCH_CONSISTENCY,
    VECTOR_FIELD,
    MilvusBackend,
    MilvusIndex,
    check_collection_name,
    engine_errors,
    milvus_layout,
)
from index.milvus_docs import (
    FETCH_ROWS,
    KEY_FIELD,
    MAX_PARTS,
    MAX_VARCHAR,
    PART_CHARS,
    MilvusDocuments,
    MilvusVectors,
    docs_schema,
    part_rows,
    passage_parts,
    text_parts,
)
from index.params import IndexPlan
from index.versions import (
    DocumentCount,
    LeaseRecord,
    check_counts,
    check_openable,
    held_by_live_processes,
    lease_holder,
    lease_holder_is_live,
    prune_old_versions,
)

logger = logging.getLogger(__name__)

VALUE_FIELD = "value"
META_VECTOR_DIM = 2  # Milvus 2.3 needs a vector field in every collection; this one is never searched
INSERT_ROWS = 1000
BUILDING, LIVE, PRUNING = "building", "live", "pruning"
CURRENT_KEY = "current"
WRITER_KEY = "writer"  # the one process writing into the current version (index.milvus_live)
WRITER_TTL_S = 60.0  # a writer on another host counts as gone this long after its last heartbeat
PUBLISHING = "publishing/"  # publishing/<holder>: a writer whose turn it is to publish or prune, or who asks
PUBLISH_WAIT_S = 300.0  # a writer gives up waiting for its turn after this long
RECORD_TTL_S = 2.0  # a served version re-reads its record (fields, next row) at most this often
SEALING_THREADS = 8
PING_TIMEOUT_S = 2.0  # readiness probes of load balancers give up after a few seconds


def version_tag(version: str) -> str:
    """``version`` (e.g. ``20261201T224243123456Z-ab12``) in the characters a collection name may hold."""
    return "v" + "".join(c if c.isalnum() else "_" for c in version)


def _quoted(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


# --- locators: milvus://HOST:PORT/NAME, milvus+https://HOST:PORT/NAME, milvus-lite://PATH/FILE.db/NAME -------

URI_PREFIXES = {"milvus://": "http://", "milvus+https://": "https://", "milvus-lite://": ""}
LITE_FILE = re.compile(r"\.db(/|$)")


class MilvusLocators:
    """The Milvus locator forms (:class:`index.locator.LocatorForms`), registered in :data:`index.locator.LOCATORS`."""

    @staticmethod
    def parse(scheme: str, text: str) -> IndexLocator:
        """The index a ``milvus://``, ``milvus+https://`` or ``milvus-lite://`` locator names.

        Raises:
            ConfigError: A locator without a host, a file or an index name, or with credentials in it.
        """
        where, _, name = text[len(scheme) :].rstrip("/").rpartition("/")
        if not where or not name:
            raise ConfigError(f"index locator {shown(text)!r} names no index; give {LOCATOR_FORMS}")
        if scheme == "milvus-lite://":
            if not where.endswith(".db"):
                raise ConfigError(
                    f"index locator {shown(text)!r}: Milvus Lite keeps an index in a .db file (PATH/FILE.db/NAME)"
                )
            return IndexLocator("milvus", uri=where, name=index_name(name, text))
        if "@" in where:
            raise ConfigError(
                f"index locator {scheme}…@…: credentials go in MRL_MILVUS_TOKEN, or MRL_MILVUS_USER and "
                "MRL_MILVUS_PASSWORD, never in the locator"
            )
        if "/" in where or not where:
            raise ConfigError(f"index locator {shown(text)!r}: expected {scheme}HOST:PORT/NAME")
        return IndexLocator("milvus", uri=URI_PREFIXES[scheme] + where, name=index_name(name, text))

    @staticmethod
    def format(locator: IndexLocator) -> str:
        """``milvus-lite://FILE.db/NAME`` for a file, else ``milvus(+https)://HOST:PORT/NAME``."""
        if locator.uri is not None and locator.uri.endswith(".db"):
            return f"milvus-lite://{locator.uri}/{locator.name}"
        uri = redact_uri(locator.uri or "")
        scheme = "milvus+https://" if uri.startswith("https://") else "milvus://"
        return f"{scheme}{uri.split('://', 1)[-1]}/{locator.name}"

    @staticmethod
    def shown(text: str) -> str:
        """A Milvus Lite locator that names a ``.db`` file is a path, where an ``@`` is part of a folder's name: as
        given; any other with its password as ``***``."""
        if text.startswith("milvus-lite://") and LITE_FILE.search(text):
            return text
        return redact_uri(text)


MILVUS_LOCATORS = MilvusLocators()


class MilvusWriterHeld(MrlError):
    """Another process writes into this index in Milvus (a writable server); the message names it."""


class CurrentMoved(MrlError):
    """Another writer made a new version current while an add wrote its own; nothing of the add went live."""


@dataclass(frozen=True)
class WriterRecord:
    """The ``writer`` record: who writes into the index's current version (``host~pid~tag``, and when that
    process started), as what, and its last heartbeat.

    It is gone when its process is (same host: no such pid, or a pid of a process started at another time,
    as after a container restarts), or ``WRITER_TTL_S`` after its last heartbeat (another host).
    """

    holder: str
    version: str
    role: str
    at: float
    started: str | None = None  # the holder's start time (Linux: clock ticks after boot), to tell a reused pid

    @classmethod
    def mine(cls, version: str, role: str) -> WriterRecord:
        """This process's record (a new tag each time)."""
        return cls(lease_holder(), version, role, time.time(), process_started(os.getpid()))

    @classmethod
    def parse(cls, raw: str | None) -> WriterRecord | None:
        if raw is None:
            return None
        fields = json.loads(raw)
        role, started = fields.get("role", "writer"), fields.get("started")
        return cls(fields["holder"], fields["version"], role, float(fields["at"]), started)

    def to_json(self) -> str:
        fields = {"holder": self.holder, "version": self.version, "role": self.role, "at": self.at}
        return json.dumps({**fields, "started": self.started})

    def is_live(self) -> bool:
        host, pid, _ = self.holder.split("~", 2)
        if host == socket.gethostname() and pid.isdigit():
            started = process_started(int(pid))
            return lease_holder_is_live(host, pid, self.at) and (self.started is None or started == self.started)
        return time.time() - self.at < WRITER_TTL_S

    def held_message(self, label: str) -> str:
        """One line: who holds the index's writes, and what to do."""
        host, pid, _ = self.holder.split("~", 2)
        return (
            f"{label}: a {self.role} on {host} (pid {pid}) writes into it (version {self.version}): "
            "write through its API, or stop it first"
        )


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of ``/proc/PID/stat``); None where that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class MilvusIndexStore:
    """The index ``name`` at one Milvus deployment: its versions, their records, documents and dims.

    Args:
        backend: The connection (URI, credentials, timeout).
        name: The index's name: letters, digits and ``_``, not starting with a digit.

    Raises:
        ConfigError: For a name Milvus would not accept in a collection name.
    """

    def __init__(self, backend: MilvusBackend, name: str) -> None:
        self.backend = backend
        self.name = check_collection_name(name)
        self.meta = check_collection_name(f"{name}_meta")
        self._meta_loaded = False
        self.locator = IndexLocator("milvus", uri=backend.uri, name=self.name)  # the URI without its password
        self._writing = False
        self._started_from: str | None = None  # in writing(): the version current() first read
        self._turn: WriterRecord | None = None  # in publishing(): this writer's record

    @classmethod
    def at(
        cls, locator: IndexLocator, timeout: float | None = None, credentials: dict[str, str] | None = None
    ) -> MilvusIndexStore:
        """The index ``locator`` names (credentials default to ``MRL_MILVUS_*``); nothing is connected yet."""
        from index.milvus import credentials_from_env

        backend = MilvusBackend(locator.uri, timeout=timeout, **(credentials or credentials_from_env()))
        return cls(backend, locator.name)

    def where(self, version: str) -> str:
        return f"{self.locator} (version {version})"

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A read of ``current`` and a version built on it (``mrl index add``): the version :meth:`current` first
        returns in the block is checked again when the new one is published, in the publisher's turn.

        Writers do not wait for each other here (Milvus has no lock to hold while an add encodes); an add
        whose starting version is no longer current when it publishes is refused instead, so it never
        reports documents that are not live. A live writer (:mod:`index.milvus_live`) excludes them all.

        Raises:
            MilvusWriterHeld: A live writer writes into the current version.
        """
        self._check_no_writer()
        self._writing, self._started_from = True, None
        try:
            yield
        finally:
            self._writing, self._started_from = False, None

    def _check_no_writer(self) -> None:
        writer = self.writer()
        if writer is not None:  # it writes into the current version: a new one would leave its writes behind
            raise MilvusWriterHeld(writer.held_message(self.label))

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"MilvusIndexStore({self.name!r} at {self.backend.uri})"

    @property
    def label(self) -> str:
        """The index in messages: ``index 'NAME' at URI``."""
        return f"index {self.name!r} at {self.backend.uri}"

    # --- collection names -----------------------------------------------------------------
    def docs_collection(self, version: str) -> str:
        return check_collection_name(f"{self.name}_{version_tag(version)}_docs")

    def dim_collection(self, version: str, dim: int) -> str:
        return check_collection_name(f"{self.name}_{version_tag(version)}_d{dim}")

    def _version_of(self, collection: str) -> str | None:
        """The version tag of one of this index's version collections, else None (another index's, the meta)."""
        match = re.fullmatch(rf"{re.escape(self.name)}_(v\d{{8}}T\d{{12}}Z_[0-9a-f]{{4}})_(docs|d\d+)", collection)
        return match[1] if match else None

    # --- records ------------------------------------------------------------------------
    @property
    def _client(self):
        return self.backend.client

    def exists(self) -> bool:
        """Whether the index has been built here at all; loads its records for reading, once per process.

        (A server keeps collections loaded across restarts; Milvus Lite loads none when it opens a file.)
        """
        with engine_errors(self.backend.uri, f"looking up {self.meta!r}"):
            if not self._client.has_collection(self.meta):
                return False
            if not self._meta_loaded:
                self._client.load_collection(self.meta)
                self._meta_loaded = True
        return True

    def prepare(self) -> None:
        """Milvus answers, the index's records exist and no live writer holds it (an unreachable server, or a
        writable server of the index, fails here, before encoding)."""
        self.ensure_meta()
        self._check_no_writer()

    def ensure_meta(self) -> None:
        """Create the meta collection if it is not there yet (two builds may race to create it)."""
        from pymilvus import DataType, MilvusClient
        from pymilvus.exceptions import MilvusException

        if self.exists():
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=1024)
        schema.add_field(VALUE_FIELD, DataType.VARCHAR, max_length=MAX_VARCHAR)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=META_VECTOR_DIM)
        with engine_errors(self.backend.uri, f"creating {self.meta!r}"):
            try:
                self._client.create_collection(self.meta, schema=schema, consistency_level=CONSISTENCY)
            except MilvusException:
                if not self._client.has_collection(self.meta):  # not a race another build won
                    raise
            self._index_and_load(self.meta, "FLAT", "L2")

    def _index_and_load(self, collection: str, index_type: str, metric: str) -> None:
        params = self._client.prepare_index_params()
        params.add_index(VECTOR_FIELD, index_type=index_type, metric_type=metric)
        described = self._client.list_indexes(collection)
        if not described:
            self._client.create_index(collection, params)
        self._client.load_collection(collection)

    def _put(self, records: dict[str, str]) -> None:
        rows = [{KEY_FIELD: k, VALUE_FIELD: v, VECTOR_FIELD: [0.0] * META_VECTOR_DIM} for k, v in records.items()]
        with engine_errors(self.backend.uri, f"writing records of {self.label}"):
            for start in range(0, len(rows), INSERT_ROWS):
                self._client.upsert(self.meta, rows[start : start + INSERT_ROWS], timeout=self.backend.timeout)

    def _query(self, expression: str, consistency: str = CONSISTENCY) -> dict[str, str]:
        with engine_errors(self.backend.uri, f"reading records of {self.label}"):
            rows = self._client.query(
                self.meta,
                filter=expression,
                output_fields=[KEY_FIELD, VALUE_FIELD],
                consistency_level=consistency,
                timeout=self.backend.timeout,
            )
        return {row[KEY_FIELD]: row[VALUE_FIELD] for row in rows}

    def _get(self, key: str, consistency: str = CONSISTENCY) -> str | None:
        return self._query(f"{KEY_FIELD} == {json.dumps(key)}", consistency).get(key)

    def _scan(self, prefix: str) -> dict[str, str]:
        return self._query(f"{KEY_FIELD} like {json.dumps(prefix + '%')}")

    def _delete(self, keys: Sequence[str]) -> None:
        with engine_errors(self.backend.uri, f"deleting records of {self.label}"):
            for start in range(0, len(keys), FETCH_ROWS):
                chunk = keys[start : start + FETCH_ROWS]
                self._client.delete(self.meta, filter=f"{KEY_FIELD} in {_quoted(chunk)}", timeout=self.backend.timeout)

    def _records(self) -> dict[str, dict[str, Any]]:
        """Every version's record, by version name."""
        return {key.split("/", 1)[1]: json.loads(value) for key, value in self._scan("version/").items()}

    def _record(self, version: str, consistency: str = CONSISTENCY) -> dict[str, Any] | None:
        raw = self._get(f"version/{version}", consistency)
        return None if raw is None else json.loads(raw)

    def writer(self) -> WriterRecord | None:
        """Who writes into the index now (:mod:`index.milvus_live`), if anyone: a record whose writer is gone
        counts as no one."""
        if not self.exists():
            return None
        record = WriterRecord.parse(self._get(WRITER_KEY))
        return record if record is not None and record.is_live() else None

    # --- reading ------------------------------------------------------------------------
    def current(self) -> str:
        """The live version's name.

        Raises:
            IndexFolderError: No such index, or no version of it is live yet. EngineUnavailable: Milvus is down.
        """
        if not self.exists():
            raise IndexFolderError(f"{self.label}: index not found (no collection {self.meta!r}); build it first")
        version = self._current_version()
        if version is None:
            raise IndexFolderError(f"{self.label}: no version is live yet (a build is running or was killed)")
        if self._writing and self._started_from is None:
            self._started_from = version  # what the add in writing() builds on
        return version

    def _current_version(self) -> str | None:
        raw = self._get(CURRENT_KEY)
        return None if raw is None else json.loads(raw)["version"]

    def manifest(self, version: str) -> IndexManifest:
        """Version ``version``'s manifest, if that version is complete.

        Raises:
            IndexFolderError: An unknown, half-built or pruned version, or a corrupt manifest.
        """
        record = self._record(version)
        if record is None:
            raise IndexFolderError(f"{self.label}: version {version!r} not found")
        if record["state"] != LIVE:
            raise IndexFolderError(
                f"{self.label}: version {version!r} is {record['state']} (half-built or being pruned), not live"
            )
        parts = self._scan(f"manifest/{version}/")
        if len(parts) != record["manifest_parts"]:
            raise IndexFolderError(
                f"{self.label}: version {version!r} has {len(parts)} manifest parts, "
                f"expected {record['manifest_parts']}"
            )
        try:
            return IndexManifest.from_dict(json.loads("".join(parts[key] for key in sorted(parts))))
        except (ValueError, TypeError, KeyError) as exc:
            raise IndexFolderError(f"{self.label}: corrupt manifest of version {version!r} ({exc})") from None

    def open(
        self,
        version: str,
        *,
        device: Device = "auto",
        expected_fingerprint: str | None = None,
        dims: list[int] | None = None,
        lease: bool = True,
    ) -> LoadedIndex:
        """Version ``version``, every collection checked against its manifest, with a lease on it.

        Raises:
            IndexFolderError: A half-built version, a missing collection or one that holds other rows,
                a manifest from another model, or dims it does not have.
        """
        manifest = self.manifest(version)
        wanted = check_openable(manifest, f"{self.label}: version {version!r}", expected_fingerprint, dims)
        record = self._record(version) or {}
        needed = [self.docs_collection(version), *(manifest.indexes[dim].file for dim in wanted)]
        present = set(self.backend.all_collections())
        missing = [c for c in needed if c not in present]
        if missing:
            raise IndexFolderError(f"{self.label}: version {version!r} is incomplete: collections {missing} missing")
        held = MilvusLease(self, version) if lease else None  # before opening, so a build cannot prune it meanwhile
        try:
            documents = MilvusDocuments(
                self.backend, self.docs_collection(version), manifest.model.full_dim, manifest.num_vectors
            )
            written = _written(record)  # live writes change its row counts: nothing to check them against
            if not written and documents.parts != record.get("doc_rows"):
                record = self._record(version) or {}  # unless the first live write began since it was read
                written = _written(record)
            wrote = record.get("doc_rows")
            subject = f"{self.label}: collection {documents.collection!r} holds"
            count = DocumentCount(
                subject, documents.parts, wrote, "document parts", f"version {version!r} wrote {wrote}"
            )
            check_counts(manifest, documents=count, grown=written)
            watch = VersionWatch(self, version, record) if documents.writable else None
            indexes: dict[int, VectorIndex] = {}
            for dim in wanted:
                entry = manifest.indexes[dim]
                index = self.backend.open_collection(entry.file, IndexPlan(entry.factory, entry.search_params))
                subject = f"{self.label}: collection {entry.file!r} holds"
                check_counts(manifest, {dim: (subject, index.ntotal, index.dim)}, grown=written)
                if watch is not None:
                    index.grows_with(watch.next_row)
                indexes[dim] = index
        except BaseException:
            if held is not None:
                held.release()
            raise
        return LoadedIndex(
            None,
            manifest,
            MilvusVectors(documents, manifest.num_vectors),
            documents,
            indexes,
            None,
            held,
            location=version,
            health=partial(self.check_loaded, needed),
            fields_source=watch.metadata_fields if watch is not None else None,
            rows_source=partial(self._stored_rows, version, documents) if watch is not None else None,
        )

    def _stored_rows(self, version: str, documents: MilvusDocuments) -> np.ndarray:
        """The rows version ``version`` holds now (all it was built with, until live writes change it)."""
        record = self._record(version) or {}
        if not _written(record):
            return np.arange(documents.count)
        return documents.stored_rows(int(record["next_row"]))

    def check_loaded(self, collections: Sequence[str]) -> None:
        """A served version's health: raises :class:`EngineUnavailable` unless Milvus answers within
        ``PING_TIMEOUT_S`` and none of ``collections`` is still loading.

        A restarted server loads its collections again one by one, for seconds to minutes, and a
        search of one still loading fails; until all are back the replica is not ready, so a load
        balancer does not send it the dims that would fail. (A collection that is not loaded at all
        is loaded by the first search of it, so it does not count against readiness.)
        """
        from pymilvus.client.types import LoadState

        with engine_errors(self.backend.uri, "a health check"):
            for collection in collections:
                state = self._client.get_load_state(collection, timeout=PING_TIMEOUT_S)
                if state["state"] == LoadState.Loading:
                    raise EngineUnavailable(
                        f"Milvus at {self.backend.uri}: collection {collection!r} is still loading "
                        f"({state.get('progress', '?')}%)"
                    )

    # --- writing ------------------------------------------------------------------------
    def begin(self, version: str, keep_versions: int = 3, *, device: Device = "auto") -> MilvusVersionWriter:
        """Start writing version ``version``: its record first (state ``building``), after cleaning up killed builds."""
        self.ensure_meta()
        self._check_no_writer()
        self.remove_abandoned()
        now = time.time()
        record = {"state": BUILDING, "holder": lease_holder(), "started": now, "heartbeat": now, "collections": []}
        self._put({f"version/{version}": json.dumps(record)})
        if self._writing and self._started_from is None:
            self._started_from = self._current_version()
        started_from = self._started_from if self._writing else None  # a build replaces whatever is current
        return MilvusVersionWriter(self, version, record, keep_versions, started_from)

    def remove_abandoned(self) -> list[str]:
        """Drop what killed builds left: their versions, and collections of this index that no record names.

        A build is abandoned when its process is gone (same host) or its record has not been touched
        for ``STALE_STAGING_SECONDS`` (another host). Returns the versions removed.
        """
        collections = [c for c in self.backend.all_collections() if self._version_of(c)]
        records = self._records()  # read after listing: a collection listed was named by a record first
        removed = []
        for version, record in records.items():
            if record["state"] == PRUNING or (record["state"] == BUILDING and self._abandoned(record)):
                logger.info("removing version %s of %s: its build was killed", version, self.label)
                self._drop_version(version, record)
                removed.append(version)
        tags = {version_tag(v) for v in records if v not in removed}
        for orphan in collections:
            if self._version_of(orphan) not in tags:
                logger.info("dropping %s: no version of %s names it", orphan, self.label)
                self.backend.drop(orphan)
        return removed

    @staticmethod
    def _abandoned(record: dict[str, Any]) -> bool:
        host, pid, _ = record["holder"].split("~", 2)
        if host == socket.gethostname():
            return not lease_holder_is_live(host, pid, record["heartbeat"])
        return time.time() - record["heartbeat"] > STALE_STAGING_SECONDS

    def _drop_version(self, version: str, record: dict[str, Any]) -> None:
        """Delete one version: marked first, so that no reader opens it meanwhile; the record goes last."""
        self._put({f"version/{version}": json.dumps({**record, "state": PRUNING})})
        for collection in record.get("collections", []):
            self.backend.drop(collection)
        keys = [*self._scan(f"manifest/{version}/"), *self._scan(f"lease/{version}/"), f"version/{version}"]
        self._delete(keys)

    def publish(
        self,
        version: str,
        record: dict[str, Any],
        manifest: IndexManifest,
        keep: int,
        started_from: str | None = None,
    ) -> None:
        """Write the manifest; then, in this writer's turn, mark ``version`` live, make it ``current`` and prune.

        Args:
            started_from: The version an add built on; if another one is current now, nothing goes live.

        Raises:
            CurrentMoved: ``current`` is no longer ``started_from`` (another writer published meanwhile).
            MilvusWriterHeld: A live writer took the index since :meth:`begin`.
        """
        parts = text_parts(json.dumps(manifest.to_dict()))
        self._put({f"manifest/{version}/{number:05d}": part for number, part in enumerate(parts)})
        with self.publishing():
            self._check_no_writer()  # a writable server that started meanwhile: its writes would be left behind
            now = self._current_version()
            if started_from is not None and now != started_from:
                raise CurrentMoved(
                    f"{self.label}: another writer made version {now} current while this add built on version "
                    f"{started_from}; nothing of version {version} went live: run the add again"
                )
            record.update(state=LIVE, manifest_parts=len(parts), heartbeat=time.time())
            self._put({f"version/{version}": json.dumps(record)})
            self._put({CURRENT_KEY: json.dumps({"version": version, "at": time.time()})})  # the atomic step
            self._prune(keep, current=version)

    def prune(self, keep: int) -> list[str]:
        """Drop all but the newest ``keep`` live versions, never the current or a leased one; returns those dropped.

        Raises:
            MilvusWriterHeld: Another writer kept its turn to publish for ``PUBLISH_WAIT_S`` seconds.
        """
        with self.publishing():
            return self._prune(keep, self._current_version())

    def _prune(self, keep: int, current: str | None) -> list[str]:
        """:meth:`prune` in this writer's turn (so ``current`` cannot change meanwhile)."""
        records = self._records()
        live = [v for v, r in records.items() if r["state"] == LIVE]

        def drop(version: str) -> None:
            self._keep_turn()
            self._drop_version(version, records[version])

        return prune_old_versions(live, keep, current, self.held_versions, drop, self.label)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """This writer's turn to mark a version live, change ``current`` and prune: one writer at a time.

        Each writer puts its own ``publishing/<holder>`` record (a :class:`WriterRecord`), then reads them
        all at ``Strong``; it goes on only if no other live writer's record is there, else it removes its own
        and tries again a moment later. Of two writers, the one that reads last sees the other's record, so
        at most one goes on. A record whose process is gone is ignored and removed.

        Raises:
            MilvusWriterHeld: Another writer kept its turn for ``PUBLISH_WAIT_S`` seconds.
            IndexFolderError: No such index.
        """
        if not self.exists():
            raise IndexFolderError(f"{self.label}: index not found (no collection {self.meta!r})")
        mine = WriterRecord.mine("-", "publisher")
        key, deadline, said = PUBLISHING + mine.holder, time.monotonic() + PUBLISH_WAIT_S, False
        while True:
            self._put({key: mine.to_json()})
            others = self._other_turns(key)
            if not others:
                break
            self._delete([key])
            if not said:
                logger.info("waiting for another writer of %s to publish (%s)", self.label, others[0].holder)
                said = True
            if time.monotonic() > deadline:
                raise MilvusWriterHeld(
                    f"{self.label}: another writer ({others[0].holder}) has been publishing for over "
                    f"{PUBLISH_WAIT_S:.0f} s; try again once it is done"
                )
            time.sleep(random.uniform(0.05, 0.5))  # at random: two that saw each other do not meet again
            mine = replace(mine, at=time.time())
        self._turn = mine
        try:
            yield
        finally:
            self._turn = None
            try:
                self._delete([key])
            except EngineUnavailable as exc:  # other hosts ignore it WRITER_TTL_S after its last beat
                logger.warning("cannot end this writer's turn to publish %s: %s", self.label, exc)

    def _other_turns(self, key: str) -> list[WriterRecord]:
        """The live writers other than ``key`` that have a ``publishing/`` record; the stale ones are deleted."""
        live, stale = [], []
        for other, raw in self._scan(PUBLISHING).items():
            record = WriterRecord.parse(raw)
            if other != key and record is not None:
                if record.is_live():
                    live.append(record)
                else:
                    stale.append(other)
        if stale:
            self._delete(stale)
        return live

    def _keep_turn(self) -> None:
        """A new heartbeat on this writer's turn (a long prune; other hosts go by it)."""
        if self._turn is not None:
            self._turn = replace(self._turn, at=time.time())
            self._put({PUBLISHING + self._turn.holder: self._turn.to_json()})

    def held_versions(self) -> set[str]:
        """Versions a live server holds a lease on; stale lease records are deleted
        (:func:`index.versions.held_by_live_processes`)."""
        leases = self._scan("lease/").items()
        records = (LeaseRecord(key, *key.split("/", 2)[1:], json.loads(value)["at"]) for key, value in leases)
        return held_by_live_processes(records, self._delete)

    def versions(self) -> dict[str, str]:
        """Every version's state, by name."""
        return {version: record["state"] for version, record in self._records().items()}

    # --- what differs from other engines (index.stores) -----------------------------------
    def check_no_live_writer(self) -> None:
        """Refuse while a live writer (:mod:`index.milvus_live`) writes into the current version.

        Raises:
            MilvusWriterHeld: One line naming the index and the writer.
        """
        self._check_no_writer()

    def cache_dir(self) -> None:
        """None: an index in Milvus has no folder; builds share ``~/.cache/mrl/encode-cache``."""
        return None

    def open_live(self, opener: Callable[..., Any], *, device: Device, keep_versions: int, role: str) -> Any:
        """The current version, claimed for writes by ``opener`` (:func:`index.milvus_live.open_milvus_live`).

        ``keep_versions`` is unused: writes go into the version, and no compaction makes another.
        """
        loaded = self.open(self.current(), device=device)
        try:
            return opener(self, loaded, role)
        except BaseException:
            loaded.close()
            raise

    def info_lines(self, manifest: IndexManifest) -> list[str]:
        """Who writes into the index now, if anyone (its writes are in the version, nothing waits to be merged)."""
        writer = self.writer()
        if writer is None:
            return []
        host, pid, _ = writer.holder.split("~", 2)
        return [f"writes    a {writer.role} on {host} (pid {pid}) writes into version {writer.version}"]


class MilvusVersionWriter:
    """Writes one version's collections (documents, then one per dim); :meth:`publish` makes it live.

    The :class:`~index.build.VersionWriter` of an index kept in Milvus.
    """

    def __init__(
        self,
        store: MilvusIndexStore,
        version: str,
        record: dict[str, Any],
        keep_versions: int,
        started_from: str | None = None,
    ) -> None:
        self.store = store
        self.version = version
        self.record = record
        self.keep_versions = keep_versions
        self.started_from = started_from  # an add's starting version: publish refuses if it is no longer current
        # A server seals (flushes, indexes, loads) each collection in seconds whatever its size: side by side.
        self._sealer = ThreadPoolExecutor(SEALING_THREADS, thread_name_prefix="mrl-milvus-seal")
        self._sealing: dict[str, Future] = {}
        self._metadata: list[dict[str, Any]] | None = None  # each row's, from write_corpus, for every dim

    def _seal_later(self, collection: str, seal: Callable[[], None]) -> None:
        self._sealing[collection] = self._sealer.submit(seal)

    def _sealed(self, collection: str) -> None:
        future = self._sealing.pop(collection, None)
        if future is not None:
            future.result()

    def _claim(self, collection: str) -> None:
        """Name ``collection`` in the record before creating it, so that a killed build's leftovers are known."""
        self.record["collections"].append(collection)
        self.record["heartbeat"] = time.time()
        self.store._put({f"version/{self.version}": json.dumps(self.record)})

    def write_corpus(self, documents: Sequence[Document], vectors: np.ndarray, probes: np.ndarray) -> None:
        """The documents and their full vectors, into ``NAME_<tag>_docs`` (the probes are not kept)."""
        collection = self.store.docs_collection(self.version)
        self._claim(collection)
        self._metadata = [document.metadata for document in documents]
        client, uri = self.store._client, self.store.backend.uri
        with engine_errors(uri, f"creating {collection!r}"):
            client.create_collection(
                collection, schema=docs_schema(int(vectors.shape[1])), consistency_level=CONSISTENCY
            )
        rows, count, seen = [], 0, set()
        for row, (document, vector) in enumerate(zip(documents, np.asarray(vectors, dtype=np.float32), strict=True)):
            parts = passage_parts(document)
            if len(parts) > MAX_PARTS:
                raise IndexFolderError(f"document {document.id!r} is longer than {MAX_PARTS * PART_CHARS} characters")
            rows.extend(part_rows(row, document, parts, vector, first=document.doc_id not in seen))
            seen.add(document.doc_id)
            if len(rows) >= INSERT_ROWS:
                count += self._insert(collection, rows)
                rows = []
        count += self._insert(collection, rows)
        self.record["doc_rows"] = count

        def seal() -> None:
            with engine_errors(uri, f"indexing {collection!r}"):
                client.flush(collection)
                self.store._index_and_load(collection, "FLAT", METRIC)

        self._seal_later(collection, seal)

    def _insert(self, collection: str, rows: list[dict]) -> int:
        if rows:
            with engine_errors(self.store.backend.uri, f"inserting into {collection!r}"):
                self.store._client.insert(collection, rows)
        return len(rows)

    def build(self, dim: int, vectors: np.ndarray, plan: IndexPlan) -> MilvusIndex:
        """Dim ``dim``'s collection of ``vectors`` (truncated and normalised), indexed as ``plan`` says, with the
        metadata of the documents :meth:`write_corpus` wrote."""
        collection = self.store.dim_collection(self.version, dim)
        self._claim(collection)
        index = self.store.backend.build(vectors, plan, collection=collection, seal=False, metadata=self._metadata)
        self._seal_later(collection, lambda: self.store.backend.seal(collection))
        return index

    def keep(self, index: VectorIndex, dim: int) -> tuple[str, int]:
        """The collection stays in Milvus, sealed: its name, and its estimated size."""
        self._sealed(index.collection)
        return index.collection, layout_bytes(index.plan, index.ntotal, dim)

    def files(self) -> tuple[dict[str, int], dict[str, str]]:
        return {}, {}

    def publish(self, manifest: IndexManifest) -> str:
        for collection in list(self._sealing):
            self._sealed(collection)
        self._sealer.shutdown()
        self.store.publish(self.version, self.record, manifest, self.keep_versions, self.started_from)
        return self.store.where(self.version)

    def abort(self) -> None:
        """Remove what this build wrote (a build that failed; a killed one is removed by the next build)."""
        self._sealer.shutdown(cancel_futures=True)
        try:
            self.store._drop_version(self.version, self.record)
        except EngineUnavailable as exc:
            logger.warning("could not remove the failed build %s of %s: %s", self.version, self.store.label, exc)


def layout_bytes(plan: IndexPlan, count: int, dim: int) -> int:
    """Estimated memory of one dim's index in Milvus (Milvus reports rows, not bytes)."""
    layout = milvus_layout(plan)
    if layout.index_type == "IVF_PQ":
        return count * (layout.build_params["m"] + 8)
    if layout.index_type == "HNSW":
        return count * (4 * dim + 8 * layout.build_params["M"])
    return count * 4 * dim


# --- what a served version holds -------------------------------------------------------------


def _written(record: dict[str, Any]) -> bool:
    """Whether live writes have changed the version (its first one records the next free row)."""
    return "next_row" in record


class VersionWatch:
    """A served version's record as it changes under live writes, re-read at most every ``RECORD_TTL_S``
    seconds (at ``Session``: no wait): the metadata fields written documents brought, and the next free row,
    reach every replica without a reload."""

    def __init__(self, store: MilvusIndexStore, version: str, record: dict[str, Any]) -> None:
        self.store, self.version, self._record = store, version, record
        self._read_at = time.monotonic()

    def record(self) -> dict[str, Any]:
        if time.monotonic() - self._read_at >= RECORD_TTL_S:
            self._read_at = time.monotonic()
            try:
                self._record = self.store._record(self.version, SEARCH_CONSISTENCY) or self._record
            except EngineUnavailable as exc:  # searches say so themselves; keep what was read last
                logger.warning("cannot re-read the record of %s: %s", self.version, exc)
        return self._record

    def metadata_fields(self) -> dict[str, str] | None:
        """The version's fields with those of written documents (None: no write brought any)."""
        return self.record().get("metadata_fields")

    def next_row(self) -> int:
        """Above every row id written so far (0 before the first write)."""
        return int(self.record().get("next_row", 0))


class MilvusLease:
    """A server's claim on a version: a ``lease/<V>/<host>~<pid>~<tag>`` record, refreshed while it serves."""

    def __init__(self, store: MilvusIndexStore, version: str) -> None:
        self.store = store
        self.version = version
        self.key: str | None = f"lease/{version}/{lease_holder()}"
        self.refresh()

    def refresh(self) -> None:
        if self.key is None:
            return
        try:
            self.store._put({self.key: json.dumps({"at": time.time()})})
        except EngineUnavailable as exc:
            logger.warning("cannot refresh the lease on %s of %s: %s", self.version, self.store.label, exc)

    def release(self) -> None:
        if self.key is None:
            return
        key, self.key = self.key, None
        try:
            self.store._delete([key])
        except EngineUnavailable as exc:  # it goes stale and is removed by the next prune
            logger.warning("cannot release the lease on %s of %s: %s", self.version, self.store.label, exc)
