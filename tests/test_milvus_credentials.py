"""Credentials inside a Milvus URI (``http://root:pw@host:19530``) reach pymilvus, and no message shows them.

:class:`~index.milvus.MilvusBackend` connects pymilvus to the URI without its userinfo, passes the
user and password as credentials (``MRL_MILVUS_*`` win), and names the URI everywhere as
:func:`~index.milvus.redact_uri` shows it. The failures are real: a Milvus URI on a closed port,
which pymilvus gives up on within the backend's timeout (about half a second here); the
credentials pymilvus would get are recorded by a stand-in ``MilvusClient``.
"""

from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from core.errors import ConfigError
from index.backends import EngineUnavailable
from index.locator import IndexLocator, parse_locator
from index.milvus import MilvusBackend, credentials_from_env, redact_uri
from index.milvus_store import MilvusIndexStore
from index.params import IndexPlan
from mrl.cli import main
from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers.milvus import free_port, require_module

SECRET = "pw"
TIMEOUT_S = 0.5  # pymilvus gives up on a closed port after about this long


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://root:pw@127.0.0.1:19530", "http://root:***@127.0.0.1:19530"),
        ("https://root:p%40w@milvus.example.com:443/db1", "https://root:***@milvus.example.com:443/db1"),
        ("https://root:p@w/#x@milvus.example.com", "https://root:***@milvus.example.com"),  # unescaped @ / #
        ("http://root:@127.0.0.1:19530", "http://root:***@127.0.0.1:19530"),
        ("http://apitoken@127.0.0.1:19530", "http://***@127.0.0.1:19530"),  # pymilvus reads a lone name as a token
        ("http://127.0.0.1:19530", "http://127.0.0.1:19530"),
        ("https://milvus.example.com/db1", "https://milvus.example.com/db1"),
        ("/var/lib/mrl/milvus.db", "/var/lib/mrl/milvus.db"),
        ("runs/user@host/milvus.db", "runs/user@host/milvus.db"),
    ],
)
def test_redact_uri_hides_the_userinfo_secret(uri: str, shown: str):
    assert redact_uri(uri) == shown


class RecordingClient:
    """Stands in for ``pymilvus.MilvusClient``: records what it was given, connects nowhere."""

    calls: list[dict] = []

    def __init__(self, **kwargs) -> None:
        RecordingClient.calls.append(kwargs)

    def close(self) -> None:
        pass


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    """What each ``MilvusClient(...)`` got, with no ``MRL_MILVUS_*`` variable set."""
    pymilvus = require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    monkeypatch.setattr(pymilvus, "MilvusClient", RecordingClient)
    monkeypatch.setattr(RecordingClient, "calls", [])
    for variable in ("MRL_MILVUS_TOKEN", "MRL_MILVUS_USER", "MRL_MILVUS_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    return RecordingClient.calls


def client_arguments(uri: str, **credentials: str) -> dict:
    backend = MilvusBackend(uri, **credentials)
    backend.client  # noqa: B018 - connects
    backend.close()
    return RecordingClient.calls[-1]


@pytest.mark.parametrize(
    ("uri", "address", "credentials"),
    [
        ("http://root:pw@127.0.0.1:19530", "http://127.0.0.1:19530", ("", "root", "pw")),
        ("https://root:p%40w@example.com/db1", "https://example.com/db1", ("", "root", "p@w")),
        ("http://apitoken@127.0.0.1:19530", "http://127.0.0.1:19530", ("apitoken", "", "")),
        ("http://127.0.0.1:19530", "http://127.0.0.1:19530", ("", "", "")),
    ],
)
def test_credentials_in_the_uri_reach_the_client_apart_from_it(recorded, uri: str, address: str, credentials: tuple):
    arguments = client_arguments(uri, **credentials_from_env())
    assert arguments["uri"] == address
    assert (arguments["token"], arguments["user"], arguments["password"]) == credentials


def test_milvus_lite_paths_reach_the_client_unchanged(recorded, tmp_path):
    arguments = client_arguments(str(tmp_path / "milvus.db"))
    assert arguments["uri"] == str(tmp_path / "milvus.db")
    assert (arguments["token"], arguments["user"], arguments["password"]) == ("", "", "")


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"MRL_MILVUS_USER": "alice", "MRL_MILVUS_PASSWORD": "env-secret"}, ("", "alice", "env-secret")),
        ({"MRL_MILVUS_TOKEN": "env-token"}, ("env-token", "root", "pw")),  # pymilvus uses the token alone
        ({"MRL_MILVUS_PASSWORD": "env-secret"}, ("", "root", "env-secret")),
    ],
)
def test_credential_variables_win_over_the_uri(recorded, monkeypatch, variables: dict, expected: tuple):
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    arguments = client_arguments("http://root:pw@127.0.0.1:19530", **credentials_from_env())
    assert arguments["uri"] == "http://127.0.0.1:19530"
    assert (arguments["token"], arguments["user"], arguments["password"]) == expected


def test_a_lone_user_in_the_uri_takes_the_password_variable(recorded, monkeypatch):
    monkeypatch.setenv("MRL_MILVUS_PASSWORD", "env-secret")
    arguments = client_arguments("http://root@127.0.0.1:19530", **credentials_from_env())
    assert arguments["uri"] == "http://127.0.0.1:19530"
    assert (arguments["token"], arguments["user"], arguments["password"]) == ("", "root", "env-secret")


@pytest.fixture
def closed_uri() -> str:
    """A Milvus URI with a password, on a port nothing listens on."""
    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    return f"http://root:{SECRET}@127.0.0.1:{free_port()}"


def assert_redacted(message: str, uri: str) -> None:
    assert SECRET not in message
    assert uri.rsplit("@", 1)[1] in message  # names the host and port


def test_every_failure_on_an_unreachable_server_names_it_without_the_password(closed_uri: str):
    backend = MilvusBackend(closed_uri, timeout=TIMEOUT_S)
    store = MilvusIndexStore(backend, "x")
    assert SECRET not in f"{backend!r} {backend.uri} {store!r} {store.label} {store.where('v')}"
    attempts = {
        "list": backend.all_collections,
        "open": lambda: backend.open_collection("x", IndexPlan("Flat")),
        "count": lambda: backend.count("x"),
        "drop": lambda: backend.drop("x"),
        "current": store.current,
        "versions": store.versions,
    }
    started = time.monotonic()
    for what, attempt in attempts.items():
        with pytest.raises(EngineUnavailable) as failure:
            attempt()
        message = str(failure.value)
        assert len(message.splitlines()) == 1, what
        assert_redacted(message, closed_uri)
    assert time.monotonic() - started < 15


def test_index_info_on_an_unreachable_server_shows_no_password(closed_uri: str, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    code = main(["index", "info", "--backend", "milvus", "--milvus-uri", closed_uri, "--index", "x"])
    out, err = capsys.readouterr()
    assert code == 2
    warning, error = err.splitlines()  # the old spelling's deprecation notice, then the error
    assert warning.startswith("mrl: warning: ") and error.startswith("mrl: error: ")
    assert_redacted(error, closed_uri)
    assert SECRET not in err and SECRET not in out and SECRET not in caplog.text


def test_the_service_reports_an_unreachable_server_without_the_password(closed_uri: str, caplog):
    settings = ServiceSettings(
        index="x", backend="milvus", milvus_uri=closed_uri, milvus_timeout_s=TIMEOUT_S, load_in_background=True
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 15
        while "loading failed" not in (ready := client.get("/readyz")).text and time.monotonic() < deadline:
            time.sleep(0.1)
        dims = client.get("/dims")
    assert ready.status_code == 503 and "loading failed" in ready.text
    assert_redacted(ready.text, closed_uri)
    assert dims.status_code == 503 and SECRET not in dims.text
    assert SECRET not in caplog.text


def test_invalid_settings_do_not_repeat_the_uri():
    with pytest.raises(ValueError) as failure:  # pydantic's ValidationError
        ServiceSettings(index="x", backend="faiss", milvus_uri=f"http://root:{SECRET}@127.0.0.1:19530")
    assert "backend is faiss" in str(failure.value)
    assert SECRET not in str(failure.value)


REFUSED = {
    "no index name": ["--index", f"milvus://root:{SECRET}@127.0.0.1:19530"],
    "unknown scheme": ["--index", f"milvus2://root:{SECRET}@127.0.0.1/x"],
    "old flags, bad name": ["--backend", "milvus", "--milvus-uri", f"http://root:{SECRET}@127.0.0.1", "--index", "x-"],
}


@pytest.mark.parametrize("given", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_locator_is_one_line_without_the_password(given: list[str], capsys):
    assert main(["index", "info", *given]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("mrl: error: ")]
    assert len(errors) == 1 and "root:***@127.0.0.1" in errors[0], err
    assert SECRET not in err and SECRET not in out


@pytest.mark.parametrize(
    "refused",
    [
        lambda: parse_locator(f"milvus://root:{SECRET}@127.0.0.1:19530"),
        lambda: parse_locator(f"milvus2://root:{SECRET}@127.0.0.1/x"),
        lambda: parse_locator(f"milvus-lite://root:{SECRET}@127.0.0.1:19530/x"),
        lambda: IndexLocator.milvus(f"http://root:{SECRET}@127.0.0.1:19530", "bad-name"),
    ],
    ids=["no index name", "unknown scheme", "a server written as Lite", "old URI, bad name"],
)
def test_locator_errors_show_the_password_as_stars(refused):
    with pytest.raises(ConfigError) as failure:
        refused()
    assert SECRET not in str(failure.value) and "root:***@127.0.0.1" in str(failure.value)


def test_a_lite_path_with_an_at_sign_is_shown_as_given():
    with pytest.raises(ConfigError, match=r"'milvus-lite://runs/me@host/milvus.db/bad-name'"):
        parse_locator("milvus-lite://runs/me@host/milvus.db/bad-name")


def test_mrl_index_naming_no_index_does_not_repeat_the_password():
    """``MRL_INDEX`` (what ``mrl serve`` reads) is parsed by the same locator."""
    with pytest.raises(ValueError) as failure:  # pydantic's ValidationError
        ServiceSettings(index=f"milvus://root:{SECRET}@127.0.0.1:19530")
    assert "names no index" in str(failure.value)
    assert SECRET not in str(failure.value)
