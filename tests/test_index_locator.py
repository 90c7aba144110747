"""The index locator: one string for a folder, a Milvus server or a Milvus Lite file, parsed in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from index.locator import IndexLocator, parse_locator
from index.stores import current_manifest


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/idx", IndexLocator("faiss", path=Path("runs/idx"))),
        ("/abs/idx/versions/v1", IndexLocator("faiss", path=Path("/abs/idx/versions/v1"))),
        ("milvus://localhost:19530/medical", IndexLocator("milvus", uri="http://localhost:19530", name="medical")),
        ("milvus+https://db.example:443/m_1", IndexLocator("milvus", uri="https://db.example:443", name="m_1")),
        ("milvus-lite://runs/milvus.db/medical", IndexLocator("milvus", uri="runs/milvus.db", name="medical")),
        ("milvus-lite:///tmp/x/milvus.db/idx/", IndexLocator("milvus", uri="/tmp/x/milvus.db", name="idx")),
    ],
)
def test_each_form_names_its_engine_and_place(text: str, expected: IndexLocator):
    assert parse_locator(text) == expected


@pytest.mark.parametrize(
    "text", ["runs/idx", "milvus://localhost:19530/medical", "milvus+https://h:443/m", "milvus-lite://a/b.db/x"]
)
def test_a_locator_prints_as_it_was_written(text: str):
    assert str(parse_locator(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "--index is empty"),
        ("milvus://localhost:19530", "names no index"),
        ("milvus://localhost:19530/1bad", "must be letters, digits and _"),
        ("milvus://root:pw@localhost:19530/idx", "credentials go in MRL_MILVUS_TOKEN"),
        ("milvus-lite://runs/milvus/idx", "keeps an index in a .db file"),
        ("milvus://h:1/a/b", "expected milvus://HOST:PORT/NAME"),
        ("milvuss://h:1/a", "unknown index locator scheme"),
    ],
)
def test_a_bad_locator_says_what_is_allowed(text: str, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        parse_locator(text)


def test_the_password_of_a_refused_locator_is_not_repeated():
    with pytest.raises(ConfigError) as caught:
        parse_locator("milvus://root:s3cret@localhost:19530/idx")
    assert "s3cret" not in str(caught.value)


def test_the_old_spelling_becomes_a_locator():
    assert IndexLocator.milvus("http://h:19530", "idx") == parse_locator("milvus://h:19530/idx")
    assert IndexLocator.milvus("runs/m.db", "idx") == parse_locator("milvus-lite://runs/m.db/idx")
    with pytest.raises(ConfigError, match="needs a URI"):
        IndexLocator.milvus("", "idx")


# --- the service names its index with one locator --------------------------------------------


def test_the_service_takes_a_locator_and_the_old_spelling_with_a_notice(tmp_path: Path):
    from index.folder_store import FolderStore
    from index.milvus_store import MilvusIndexStore
    from index.stores import open_store
    from service.settings import ServiceSettings

    folder = ServiceSettings(index=tmp_path / "idx")
    assert folder.locator() == IndexLocator.folder(tmp_path / "idx") and folder.deprecated_spelling is None
    assert isinstance(open_store(folder.locator()), FolderStore)
    lite = ServiceSettings(index=f"milvus-lite://{tmp_path}/m.db/medical")
    assert lite.locator() == IndexLocator("milvus", uri=f"{tmp_path}/m.db", name="medical")
    store = open_store(lite.locator(), timeout=1.0)  # nothing is connected before it is used
    assert isinstance(store, MilvusIndexStore) and store.name == "medical" and store.backend.timeout == 1.0
    old = ServiceSettings(index="medical", backend="milvus", milvus_uri="http://db:19530")
    assert old.locator() == parse_locator("milvus://db:19530/medical")
    assert "name the index as one locator: --index milvus://db:19530/medical" in old.deprecated_spelling


def test_a_bad_locator_in_the_settings_is_one_line():
    from service.settings import load_settings

    with pytest.raises(ConfigError, match=r"invalid settings \(.*expected milvus://HOST:PORT/NAME.*\)"):
        load_settings(index="milvus://db:19530/a/b")


def test_serve_with_the_old_spelling_says_so_in_one_line(capsys, monkeypatch):
    from core.servers import free_port
    from mrl.cli import main

    for name in [name for name in __import__("os").environ if name.startswith("MRL_")]:
        monkeypatch.delenv(name)
    down = f"http://127.0.0.1:{free_port()}"
    argv = ["serve", "--backend", "milvus", "--milvus-uri", down, "--index", "x", "--milvus-timeout-s", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("mrl: warning:")] == [
        "mrl: warning: --backend/MRL_BACKEND and --milvus-uri/MRL_MILVUS_URI are deprecated and go in the next "
        f"release; name the index as one locator: --index milvus://{down.removeprefix('http://')}/x"
    ]
    assert [line for line in err if line.startswith("mrl: error:")][0].startswith("mrl: error: cannot serve: Milvus at")


def test_an_old_style_uri_with_a_password_prints_without_it():
    assert str(IndexLocator.milvus("http://root:s3cret@db:19530", "idx")) == "milvus://root:***@db:19530/idx"


# --- mrl index build / info / add and mrl serve: the same --index for every engine ---------------


def index_cli(*argv: str) -> int:
    from mrl.cli import main
    from tests.helpers.service import DIMS, MODEL_NAME, keyword_model

    options = ["--model", MODEL_NAME, "--dims", ",".join(map(str, DIMS)), "--device", "cpu", "--no-progress"]
    with keyword_model():
        return main([*argv, *(options if argv[:2] == ("index", "build") else [])])


def test_build_info_and_serve_take_one_locator_for_a_folder_and_milvus_lite(tmp_path: Path, milvus_lite_uri, capsys):
    from tests.helpers.service import serve, write_data

    data = str(write_data(tmp_path / "data"))
    for locator in (str(tmp_path / "idx"), f"milvus-lite://{milvus_lite_uri}/by_locator"):
        cache = str(tmp_path / "cache")
        assert index_cli("index", "build", "--data", data, "--index", locator, "--cache-dir", cache) == 0
        built = capsys.readouterr()
        assert "mrl: warning" not in built.err and "vectors   9," in built.out
        extra = tmp_path / "extra.jsonl"
        extra.write_text('{"_id": "x1", "text": "fever and cough"}\n')
        assert index_cli("index", "add", "--index", locator, "--data", str(extra), "--model", "keywords") == 0
        assert "added 1 documents -> " in capsys.readouterr().out
        assert index_cli("index", "info", "--index", locator, "--check") == 0
        shown = capsys.readouterr()
        assert shown.err == "" and "check: " in shown.out and "vectors   10," in shown.out
        with serve(locator) as client:
            hits = client.get("/search", params={"q": "fever", "dim": 8, "k": 1}).json()["results"][0]["hits"]
            assert hits[0]["id"] == "d0"
            assert current_manifest(locator).version == client.get("/dims").json()["index_version"]  # what benches read
    assert f"index     milvus-lite://{milvus_lite_uri}/by_locator (version " in shown.out


def test_every_command_that_takes_an_index_takes_a_locator_as_written():
    """``--index`` is never a Path (which would fold ``milvus://`` into ``milvus:/``): one locator everywhere."""
    from tests.helpers.code import cli_commands

    taking = []
    for path, parser in cli_commands():
        for action in parser._actions:
            if "--index" in action.option_strings:
                taking.append(" ".join(path))
                assert action.type in (None, str), f"mrl {' '.join(path)} --index is parsed as {action.type}"
    assert {"index build", "index info", "index add", "serve", "bench latency", "bench two-stage"} <= set(taking)


def test_the_old_spellings_still_work_and_say_the_new_one(tmp_path: Path, milvus_lite_uri, capsys):
    from tests.helpers.service import write_data

    data, folder = str(write_data(tmp_path / "data")), str(tmp_path / "idx")
    assert index_cli("index", "build", "--data", data, "--output", folder) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"mrl: warning: --output PATH is deprecated and goes in the next release; use --index {folder}"
    ]
    assert index_cli("index", "info", folder) == 0
    assert "use --index " + folder in capsys.readouterr().err
    old = ["--backend", "milvus", "--milvus-uri", milvus_lite_uri, "--index", "old_way", "--cache-dir", folder + "-c"]
    assert index_cli("index", "build", "--data", data, *old) == 0
    assert capsys.readouterr().err.splitlines() == [
        "mrl: warning: --backend milvus --milvus-uri URI --index NAME is deprecated and goes in the next release; "
        f"use --index milvus-lite://{milvus_lite_uri}/old_way"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "info"], "--index is required: a folder (FAISS), milvus://HOST:PORT/NAME"),
        (["index", "info", "x", "--index", "y"], "name the index once"),
        (["index", "info", "--index", "milvus://h:1/a/b"], "expected milvus://HOST:PORT/NAME"),
    ],
)
def test_a_missing_or_doubled_locator_is_one_line(argv: list[str], message: str, capsys):
    assert index_cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mrl: error: ") and message in err[0]
