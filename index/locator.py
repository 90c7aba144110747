"""Where an index lives, in one string: the locator every command's ``--index`` (and ``MRL_INDEX``) takes.

    runs/scifact-index                      a folder of FAISS versions (an index root), or one version folder
    milvus://HOST:PORT/NAME                 the index NAME in a Milvus server or cluster (``milvus+https://`` for TLS)
    milvus-lite://PATH/TO/FILE.db/NAME      the index NAME in a Milvus Lite file (the last path segment is the name)

:func:`index.stores.open_store` chooses the engine from a parsed locator; credentials never come from a
locator (``MRL_MILVUS_TOKEN``, or ``MRL_MILVUS_USER`` and ``MRL_MILVUS_PASSWORD``). A message that repeats
a locator or URI shows a password in it as ``***`` (:func:`shown`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.errors import ConfigError

Engine = str  # a name in index.stores.STORES
FOLDER_ENGINE = "faiss"  # a locator with none of the registered schemes (LOCATORS) is a folder
INDEX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A URI's userinfo: everything between `scheme://` and the last `@` (a password may hold an unescaped `/` or `#`).
URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>.*)@(?P<rest>[^@]*)", re.DOTALL)
REDACTED = "***"
# Engine name -> (the locator schemes it takes, "module:object" that reads and writes its locators: a
# LocatorForms); a locator with none of these schemes is a folder. The schemes are listed here and the code
# imported on use, so that parsing a folder's locator imports no engine. Its store is in index.stores.STORES.
LOCATORS = {
    "milvus": (("milvus://", "milvus+https://", "milvus-lite://"), "index.milvus_store:MILVUS_LOCATORS"),
}
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
        if self.engine == FOLDER_ENGINE:
            return str(self.path)
        return _forms(self.engine).format(self)

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
        return cls("milvus", uri=uri, name=index_name(name, f"{uri}/{name}"))


class LocatorForms(Protocol):
    """How an engine's locators are read and written (registered in :data:`LOCATORS`)."""

    def parse(self, scheme: str, text: str) -> IndexLocator:
        """The locator ``text`` (which starts with ``scheme``, one of the engine's) names.

        Raises:
            ConfigError: One line saying what is wrong, any password in ``text`` shown as ``***``.
        """

    def format(self, locator: IndexLocator) -> str:
        """``locator`` as written (a password from an old-style URI as ``***``)."""

    def shown(self, text: str) -> str:
        """``text``, one of the engine's locators, as a message may repeat it."""


def parse_locator(text: str | Path) -> IndexLocator:
    """The locator ``text`` names; a string with none of the registered schemes is a folder.

    Raises:
        ConfigError: A locator of an engine that is not well formed, or with credentials in it; an unknown scheme
            of a registered engine (e.g. ``milvus2://``).
    """
    text = str(text)
    if not text.strip():
        raise ConfigError(f"--index is empty; give {LOCATOR_FORMS}")
    found = _scheme(text)
    if found is None:
        stems = {re.split(r"[+-]", scheme.removesuffix("://"))[0] for scheme in _schemes()}
        if "://" in text and text.split("://", 1)[0].startswith(tuple(stems)):
            raise ConfigError(f"unknown index locator scheme in {shown(text)!r}; give {LOCATOR_FORMS}")
        return IndexLocator.folder(text)
    scheme, engine = found
    return _forms(engine).parse(scheme, text)


def shown(text: str) -> str:
    """A locator or URI as a message may repeat it: a password before an ``@`` shows as ``***``
    (:func:`redact_uri`), unless the engine of its scheme says otherwise (a Milvus Lite ``.db`` path, where an
    ``@`` is part of a folder's name, shows as given)."""
    found = _scheme(text)
    return redact_uri(text) if found is None else _forms(found[1]).shown(text)


def redact_uri(uri: str) -> str:
    """``uri`` as messages may show it: ``http://root:***@host:19530`` for ``http://root:pw@host:19530``.

    A lone name before the ``@`` is redacted whole: pymilvus reads it as an API token. Other URIs
    and Milvus Lite ``.db`` paths come back unchanged.
    """
    match = URI_USERINFO.fullmatch(uri)
    if match is None:
        return uri
    user, colon, _ = match["userinfo"].partition(":")
    hidden = f"{user}:{REDACTED}" if colon else REDACTED
    return f"{match['scheme']}{hidden}@{match['rest']}"


def _schemes() -> dict[str, str]:
    """Every registered locator scheme, and its engine."""
    return {scheme: engine for engine, (schemes, _) in LOCATORS.items() for scheme in schemes}


def _scheme(text: str) -> tuple[str, str] | None:
    """``(scheme, engine)`` of the longest registered scheme ``text`` starts with, else None."""
    schemes = _schemes()
    scheme = next((s for s in sorted(schemes, key=len, reverse=True) if text.startswith(s)), None)
    return None if scheme is None else (scheme, schemes[scheme])


def _forms(engine: str) -> LocatorForms:
    """The locator forms of ``engine``, their module imported now (a folder's locator imports no engine)."""
    if engine not in LOCATORS:
        raise ConfigError(f"no locator forms for engine {engine!r}; known: {', '.join(sorted(LOCATORS))}")
    module, _, attribute = LOCATORS[engine][1].partition(":")
    return getattr(importlib.import_module(module), attribute)


def index_name(name: str, text: str) -> str:
    """``name`` if an engine may take it as an index's name (letters, digits, ``_``)."""
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
