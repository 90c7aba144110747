"""Where an index lives, in one string: the locator every command's ``--index`` (and ``MRL_INDEX``) takes.

    runs/scifact-index                      a folder of FAISS versions (an index root), or one version folder
    milvus://HOST:PORT/NAME                 the index NAME in a Milvus server or cluster (``milvus+https://`` for TLS)
    milvus-lite://PATH/TO/FILE.db/NAME      the index NAME in a Milvus Lite file (the last path segment is the name)

:func:`index.stores.open_store` chooses the engine from a parsed locator; credentials never come from a
locator (``MRL_MILVUS_TOKEN``, or ``MRL_MILVUS_USER`` and ``MRL_MILVUS_PASSWORD``). A message that repeats
a locator or URI shows a password in it as ``***`` (:func:`shown`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import ConfigError

Engine = Literal["faiss", "milvus"]
SCHEMES = {"milvus://": "http://", "milvus+https://": "https://", "milvus-lite://": ""}
INDEX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LITE_FILE = re.compile(r"\.db(/|$)")
LOCATOR_FORMS = (
    "a folder (FAISS), milvus://HOST:PORT/NAME (a Milvus server or cluster) or milvus-lite://PATH/FILE.db/NAME"
)


@dataclass(frozen=True)
class IndexLocator:
    """A parsed locator: the engine, and where in it (a folder; or a Milvus URI and an index name)."""

    engine: Engine
    path: Path | None = None  # faiss: the index root or version folder
    uri: str | None = None  # milvus: http(s)://host:port, or a Milvus Lite .db file
    name: str | None = None  # milvus: the index's name

    def __str__(self) -> str:
        """The locator as written; a password from an old-style URI (``http://user:pw@host``) shows as ``***``."""
        if self.engine == "faiss":
            return str(self.path)
        if self.uri is not None and self.uri.endswith(".db"):
            return f"milvus-lite://{self.uri}/{self.name}"
        from index.milvus import redact_uri

        uri = redact_uri(self.uri or "")
        scheme = "milvus+https://" if uri.startswith("https://") else "milvus://"
        return f"{scheme}{uri.split('://', 1)[-1]}/{self.name}"

    @classmethod
    def folder(cls, path: Path | str) -> IndexLocator:
        return cls("faiss", path=Path(path))

    @classmethod
    def milvus(cls, uri: str, name: str) -> IndexLocator:
        """The index ``name`` at the Milvus ``uri`` (``http(s)://host:port`` or a ``.db`` file), as the old flags said.

        Raises:
            ConfigError: An index name Milvus would not accept, or an empty URI.
        """
        if not uri:
            raise ConfigError("a Milvus index needs a URI: http://HOST:PORT, or a Milvus Lite .db file")
        return cls("milvus", uri=uri, name=_index_name(name, f"{uri}/{name}"))


def parse_locator(text: str | Path) -> IndexLocator:
    """The locator ``text`` names; a string without a ``milvus`` scheme is a folder.

    Raises:
        ConfigError: A Milvus locator without a host, a file or an index name, or with credentials in it.
    """
    text = str(text)
    if not text.strip():
        raise ConfigError(f"--index is empty; give {LOCATOR_FORMS}")
    scheme = next((s for s in sorted(SCHEMES, key=len, reverse=True) if text.startswith(s)), None)
    if scheme is None:
        if text.split("://", 1)[0].startswith("milvus") and "://" in text:
            raise ConfigError(f"unknown index locator scheme in {shown(text)!r}; give {LOCATOR_FORMS}")
        return IndexLocator.folder(text)
    rest = text[len(scheme) :]
    where, _, name = rest.rstrip("/").rpartition("/")
    if not where or not name:
        raise ConfigError(f"index locator {shown(text)!r} names no index; give {LOCATOR_FORMS}")
    if scheme == "milvus-lite://":
        if not where.endswith(".db"):
            raise ConfigError(
                f"index locator {shown(text)!r}: Milvus Lite keeps an index in a .db file (PATH/FILE.db/NAME)"
            )
        return IndexLocator("milvus", uri=where, name=_index_name(name, text))
    if "@" in where:
        raise ConfigError(
            f"index locator {scheme}…@…: credentials go in MRL_MILVUS_TOKEN, or MRL_MILVUS_USER and "
            "MRL_MILVUS_PASSWORD, never in the locator"
        )
    if "/" in where or not where:
        raise ConfigError(f"index locator {shown(text)!r}: expected {scheme}HOST:PORT/NAME")
    return IndexLocator("milvus", uri=SCHEMES[scheme] + where, name=_index_name(name, text))


def shown(text: str) -> str:
    """A locator or URI as a message may repeat it: a password before an ``@`` shows as ``***``
    (:func:`index.milvus.redact_uri`). A Milvus Lite locator that names a ``.db`` file is a path, where an
    ``@`` is part of a folder's name: it shows as given."""
    if text.startswith("milvus-lite://") and LITE_FILE.search(text):
        return text
    from index.milvus import redact_uri  # not at import: a folder index never loads the Milvus module

    return redact_uri(text)


def _index_name(name: str, text: str) -> str:
    if not INDEX_NAME.fullmatch(name):
        raise ConfigError(
            f"index locator {shown(text)!r}: the index name {name!r} must be letters, digits and _, "
            "not starting with a digit"
        )
    return name


def deprecation_notice(spelling: str, locator: IndexLocator) -> str:
    """What to write instead of a deprecated ``spelling``, as it works when copied: credentials never go in a
    locator, so those of an old-style URI move to the environment; a URI with a path has no locator yet."""
    shown = str(locator)  # a password in an old-style URI shows as ***
    without = re.sub(r"^([a-z+-]+://)[^/@]*@", r"\1", shown)
    try:
        parse_locator(without)
    except ConfigError:  # e.g. https://host:443/db1: a locator has no place for the URI's path
        return f"{spelling} is deprecated, but no --index locator can name this URI yet ({LOCATOR_FORMS}): keep it"
    notice = f"{spelling} is deprecated and goes in the next release; use --index {without}"
    if without != shown:
        notice += " with the credentials in MRL_MILVUS_USER and MRL_MILVUS_PASSWORD (or MRL_MILVUS_TOKEN)"
    return notice
