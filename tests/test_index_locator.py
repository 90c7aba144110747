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
    assert "use --index milvus://db:19530/medical" in old.deprecated_spelling
    with_password = ServiceSettings(index="medical", backend="milvus", milvus_uri="http://root:pw@db:19530")
    notice = with_password.deprecated_spelling  # what it suggests works when copied: no ***, no password
    assert "use --index milvus://db:19530/medical with the credentials in MRL_MILVUS_USER" in notice
    assert "***" not in notice and "pw" not in notice
    parse_locator("milvus://db:19530/medical")


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
        "mrl: warning: --backend/MRL_BACKEND and --milvus-uri/MRL_MILVUS_URI is deprecated and goes in the next "
        f"release; use --index milvus://{down.removeprefix('http://')}/x"
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
        info = capsys.readouterr()
        assert info.err == "" and "check: " in info.out and "vectors   10," in info.out
        printed = info.out
        with serve(locator) as client:
            hits = client.get("/search", params={"q": "fever", "dim": 8, "k": 1}).json()["results"][0]["hits"]
            assert hits[0]["id"] == "d0"
            shown = client.get("/dims").json()
            assert current_manifest(locator).version == shown["index_version"]  # what benches read
            # as mrl index info shows it, but a folder by its name: the server's paths stay private
            assert shown["index"] == (locator if "://" in locator else "idx")
    assert f"index     milvus-lite://{milvus_lite_uri}/by_locator (version " in printed


def test_a_writable_server_and_the_commands_it_excludes_take_one_locator_for_a_folder_and_milvus_lite(
    tmp_path: Path, milvus_lite_uri, monkeypatch, capsys
):
    """Through the store, never by engine name: ``mrl serve --writable`` opens either for writes, a build and
    ``mrl index info`` see its writer, and ``mrl index compact`` folds a folder's log (Milvus has none)."""
    import service.engine as engine_module
    from service.writes import DocumentWriter
    from tests.helpers.service import ServiceKeywordEncoder, serve, stand_in_model, write_data

    def load(live, settings, metrics):  # the build's document encoder: the keyword encoder
        return DocumentWriter(live, settings, metrics, stand_in_model(), ServiceKeywordEncoder())

    monkeypatch.setattr(engine_module.DocumentWriter, "load", staticmethod(load))
    data = str(write_data(tmp_path / "data"))
    expected = {"folder": "merged 1 passages", "milvus": "nothing to compact: milvus-lite://"}
    for kind, locator in (("folder", str(tmp_path / "idx")), ("milvus", f"milvus-lite://{milvus_lite_uri}/live")):
        assert index_cli("index", "build", "--data", data, "--index", locator) == 0
        capsys.readouterr()
        with serve(locator, writable=True, compact_max_unmerged=1000) as client:
            written = client.post("/documents", json={"documents": [{"id": "w1", "text": "allergy stress"}]})
            assert written.status_code == 200, written.text
            hits = client.get("/search", params={"q": "allergy stress", "dim": 8, "k": 1}).json()["results"][0]
            public = locator if kind == "milvus" else "idx"  # a folder by its name: the server's paths stay private
            assert hits["hits"][0]["doc_id"] == "w1" and client.get("/dims").json()["index"] == public
            assert index_cli("index", "build", "--data", data, "--index", locator) == 2
            refused = capsys.readouterr().err.strip().splitlines()
            assert len(refused) == 1 and "write through its API, or stop it first" in refused[0], refused
            assert index_cli("index", "info", "--index", locator) == 0
            writes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("writes ")]
            assert len(writes) == 1 and ("1 logged writes" if kind == "folder" else "a writable server on") in writes[0]
        assert index_cli("index", "compact", "--index", locator, "--device", "cpu") == 0
        assert expected[kind] in capsys.readouterr().out


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


def test_the_old_milvus_flags_keep_the_uri_credentials_and_path_and_the_notice_says_what_works(monkeypatch, capsys):
    """``--milvus-uri http://root:pw@host:19530`` reaches the build as written (its text in a locator was refused),
    and the notice suggests a locator that parses, with the credentials in the environment."""
    import index.build as build_module
    from mrl.cli import main

    for name in [name for name in __import__("os").environ if name.startswith("MRL_")]:
        monkeypatch.delenv(name)
    configs = []

    def stand_in(config):  # the build itself, once the options are read
        configs.append(config)
        raise ConfigError("stopped before the build")

    monkeypatch.setattr(build_module, "build_index", stand_in)
    old = ["index", "build", "--data", "data", "--backend", "milvus", "--index", "idx", "--milvus-uri"]
    assert main([*old, "http://root:s3cret@db.example:19530"]) == 2
    assert configs[-1].locator() == IndexLocator("milvus", uri="http://root:s3cret@db.example:19530", name="idx")
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert err.splitlines()[0] == (
        "mrl: warning: --backend milvus --milvus-uri URI --index NAME is deprecated and goes in the next release; "
        "use --index milvus://db.example:19530/idx with the credentials in MRL_MILVUS_USER and MRL_MILVUS_PASSWORD "
        "(or MRL_MILVUS_TOKEN)"
    )
    assert parse_locator("milvus://db.example:19530/idx") == IndexLocator.milvus("http://db.example:19530", "idx")

    assert main([*old, "https://db.example:443/db1"]) == 2  # a path: no locator can say it yet
    assert configs[-1].locator() == IndexLocator("milvus", uri="https://db.example:443/db1", name="idx")
    assert "no --index locator can name this URI yet" in capsys.readouterr().err.splitlines()[0]


def test_bench_two_stage_takes_a_milvus_lite_locator(tmp_path: Path, milvus_lite_uri, monkeypatch):
    """``mrl bench`` reads an index in Milvus Lite through the same ``--index`` (two-stage: the cheapest bench that
    searches it)."""
    import json

    import benchmarks.search_quality as two_stage
    from mrl.cli import main
    from tests.helpers.service import ServiceKeywordEncoder, keyword_loader, write_data

    data, locator = str(write_data(tmp_path / "data")), f"milvus-lite://{milvus_lite_uri}/benched"
    assert index_cli("index", "build", "--data", data, "--index", locator, "--cache-dir", str(tmp_path / "cache")) == 0
    monkeypatch.setattr(two_stage, "load_encoder", keyword_loader(ServiceKeywordEncoder()))
    out = tmp_path / "bench"
    argv = ["bench", "two-stage", "--index", locator, "--data", data, "--device", "cpu", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "two_stage.json").read_text())
    assert report["index"]["version"] == current_manifest(locator).version
    assert report["dataset"]["num_queries"] == 8 and report["dataset"]["judged_documents_missing_from_index"] == 0
    single, staged = report["single_stage"], report["two_stage"]
    assert list(single) == ["8", "4", "2"] and list(staged) == ["4", "2"]
    assert single["8"]["ndcg@10"] == pytest.approx(1.0)  # each query's keyword document first
    for dim in staged:  # a shortlist of k × 10 holds all 9 documents: re-scored at 8, the full dim's ranking
        assert staged[dim]["ndcg@10"] == pytest.approx(single["8"]["ndcg@10"])
