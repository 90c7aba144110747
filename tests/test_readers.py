"""Reading the documents people have (core.readers): tables through a field map, folders of files, and
``mrl index build`` on them. Tiny files written here; no model (builds use the keyword encoder)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.data import DataError, load_corpus
from core.errors import ConfigError
from core.readers import FieldMap, read_corpus
from index.layout import resolve_version
from index.store import DocumentStore
from tests.conftest import write_tiny_beir
from tests.helpers.servers import assert_one_line_error, mrl_in_process
from tests.helpers.service import DIMS, MODEL_NAME, keyword_model

MODIFIED = 1_700_000_000  # 2023-11-14T22:13:20Z
CONTENT = FieldMap(id="id", text="content")


def pdf_bytes(lines: list[str], title: str | None = None) -> bytes:
    """A one-page PDF, written by pypdf, whose text is ``lines`` in Helvetica (a font every reader knows)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(width=612, height=792)
    font = {"/Type": "/Font", "/Subtype": "/Type1", "/BaseFont": "/Helvetica"}
    helvetica = DictionaryObject({NameObject(key): NameObject(value) for key, value in font.items()})
    fonts = DictionaryObject({NameObject("/F1"): helvetica})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
    content = DecodedStreamObject()
    content.set_data(("BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET").encode())
    page.replace_contents(content)
    if title:
        writer.add_metadata({"/Title": title})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


HTML = """<html><head><title>Rash care</title><style>p { color: red }</style></head>
<body><script>var secret = "cough";</script><h1>Rash</h1>
<p>Keep the skin
   cool.</p><div><p>Avoid <b>scratching</b>.</p><ul><li>cream</li><li>rest</li></ul></div></body></html>"""


def write_folder(root: Path) -> Path:
    """One file of each kind, a nested one, an image, and a hidden folder; every file modified at MODIFIED."""
    files = {
        "notes.txt": "fever: rest and drink water\n",
        "guide.md": "Intro line\n\n# Cough guide\n\nHoney helps a cough.\n",
        "web/rash.html": HTML,
        "papers/pain.pdf": pdf_bytes(["Pain relief", "ice and rest for pain"], title="On pain"),
        "photo.png": b"\x89PNG\r\n\x1a\n",
        ".git/notes.txt": "not a document",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        os.utime(path, (MODIFIED, MODIFIED))
    return root


# --- tables through a field map ---------------------------------------------------------------------


def test_a_beir_folder_reads_as_load_corpus_does(tmp_path: Path):
    folder = write_tiny_beir(tmp_path / "beir")
    assert read_corpus(folder) == list(load_corpus(folder / "corpus.jsonl").values())


def test_jsonl_fields_are_named_by_the_field_map(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    records = [{"id": 7, "content": "fever advice", "source": "leaflet", "year": 2021}, {"id": "b", "content": "rash"}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    documents = read_corpus(path, FieldMap(id="id", text="content", metadata=("source", "year")))
    assert [(d.id, d.text, d.title, d.metadata) for d in documents] == [
        ("7", "fever advice", "", {"source": "leaflet", "year": 2021}),
        ("b", "rash", "", {}),
    ]
    with pytest.raises(DataError, match=r"docs.jsonl:1: field '_id' is missing or empty"):
        read_corpus(path)


def test_csv_rows_are_read_through_the_field_map(tmp_path: Path):
    path = tmp_path / "docs.csv"
    path.write_text('id,content,heading,lang\n1,"fever, and rest",Fever,en\n2,rash care,,de\n')
    documents = read_corpus(path, FieldMap(id="id", text="content", title="heading", metadata=("lang",)))
    assert [(d.id, d.text, d.title, d.metadata) for d in documents] == [
        ("1", "fever, and rest", "Fever", {"lang": "en"}),
        ("2", "rash care", "", {"lang": "de"}),
    ]


def test_missing_csv_columns_are_one_error_naming_the_file_and_its_columns(tmp_path: Path):
    path = tmp_path / "docs.csv"
    path.write_text("id,body\n1,fever\n")
    with pytest.raises(DataError) as caught:
        read_corpus(path, FieldMap(id="id", text="content", title="heading"))
    assert str(caught.value) == (
        f"{path}: no column 'content' (text), 'heading' (title); the file's columns are 'id', 'body'"
    )


def test_empty_text_in_a_csv_row_names_its_line(tmp_path: Path):
    path = tmp_path / "docs.csv"
    path.write_text("id,content\n1,fever\n2,   \n")
    with pytest.raises(DataError, match=r"docs.csv:3: field 'content' \(text\) is missing, empty or not text"):
        read_corpus(path, CONTENT)


def test_parquet_rows_are_read_with_the_same_rules(tmp_path: Path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": [1, 2], "content": ["fever", "cough"], "score": [0.5, None], "unused": ["x", "y"]})
    pq.write_table(table, path)
    documents = read_corpus(path, FieldMap(id="id", text="content", metadata=("score",)))
    assert [(d.id, d.text, d.metadata) for d in documents] == [
        ("1", "fever", {"score": 0.5}),
        ("2", "cough", {"score": None}),
    ]
    with pytest.raises(DataError, match=r"no column 'body' \(text\); the file's columns are 'id', 'content'"):
        read_corpus(path, FieldMap(id="id", text="body"))
    pq.write_table(pa.table({"id": ["a", "a"], "content": ["fever", "cough"]}), path)
    with pytest.raises(DataError, match=r"docs.parquet: row 2: duplicate id 'a'"):
        read_corpus(path, CONTENT)


def test_a_file_of_another_kind_is_refused_naming_what_is_read(tmp_path: Path):
    path = tmp_path / "docs.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"cannot read a \.xlsx file as a corpus \(expected a BEIR folder, a \.jsonl"):
        read_corpus(path)


def test_an_empty_field_name_is_refused():
    with pytest.raises(ConfigError, match="field names must not be empty"):
        FieldMap(text=" ")


# --- a folder of files ------------------------------------------------------------------------------


def test_a_folder_reads_every_document_file_in_path_order(tmp_path: Path, caplog):
    root = write_folder(tmp_path / "docs")
    with caplog.at_level("INFO"):
        documents = read_corpus(root)
    assert [(d.id, d.title) for d in documents] == [
        ("guide.md", "Cough guide"),
        ("notes.txt", "notes"),
        ("papers/pain.pdf", "On pain"),
        ("web/rash.html", "Rash care"),
    ]
    by_id = {d.id: d for d in documents}
    assert by_id["papers/pain.pdf"].metadata == {
        "path": "papers/pain.pdf",
        "modified": "2023-11-14T22:13:20+00:00",
        "format": "pdf",
    }
    assert [d.metadata["format"] for d in documents] == ["md", "txt", "pdf", "html"]
    assert by_id["notes.txt"].text == "fever: rest and drink water\n"
    assert by_id["papers/pain.pdf"].text == "Pain relief\nice and rest for pain"
    assert by_id["web/rash.html"].text == "Rash\n\nKeep the skin cool.\n\nAvoid scratching.\n\ncream\nrest"
    assert "skipped 1 files of other types (.png: 1)" in caplog.text


def test_titles_fall_back_to_the_first_h1_the_first_line_and_the_file_name(tmp_path: Path):
    (tmp_path / "page.htm").write_text("<body><h1>Fever <i>facts</i></h1><p>rest</p></body>")
    (tmp_path / "scan.pdf").write_bytes(pdf_bytes(["", "First line", "second"]))
    (tmp_path / "code.md").write_text("```bash\n# a shell comment, not a heading\n```\nbody\n")
    titles = {d.id: d.title for d in read_corpus(tmp_path)}
    assert titles == {"page.htm": "Fever facts", "scan.pdf": "First line", "code.md": "code"}


def test_a_damaged_pdf_fails_with_one_error_naming_it(tmp_path: Path):
    (tmp_path / "broken.pdf").write_bytes(pdf_bytes(["fever"])[:200])
    with pytest.raises(DataError) as caught:
        read_corpus(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'broken.pdf'}: cannot read PDF (") and "\n" not in message
    assert message.endswith("fix or remove the file: the build reads every file of these types in the folder")


def test_a_text_file_that_is_not_utf8_is_an_error_naming_it(tmp_path: Path):
    (tmp_path / "latin.txt").write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        read_corpus(tmp_path)


def test_a_page_without_text_is_an_error_naming_it(tmp_path: Path):
    (tmp_path / "empty.html").write_text("<html><head><title>Nothing</title></head><body><script>x()</script></html>")
    with pytest.raises(DataError, match=r"empty.html: no text in this HTML file; fix or remove the file"):
        read_corpus(tmp_path)


def test_a_folder_without_documents_says_which_files_are_read(tmp_path: Path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"no documents: no corpus.jsonl, and no \.txt, \.md, .* \.pdf files"):
        read_corpus(tmp_path)


# --- mrl index build on them ------------------------------------------------------------------------


def build(data: Path, root: Path, capsys, caplog, monkeypatch, *flags: str):
    argv = ["index", "build", "--data", str(data), "--index", str(root), "--model", MODEL_NAME]
    argv += ["--dims", ",".join(map(str, DIMS)), "--device", "cpu", "--no-progress", *flags]
    with keyword_model():
        return mrl_in_process(argv, capsys, caplog, monkeypatch)


def indexed(root: Path) -> dict[str, tuple[str, dict]]:
    """Each indexed document's id -> (title, metadata), from the current version's docs.sqlite."""
    store = DocumentStore(resolve_version(root) / "docs.sqlite")
    try:
        return {d.id: (d.title, d.metadata) for d in store.get(range(len(store)))}
    finally:
        store.close()


def test_index_build_reads_a_folder_of_files(tmp_path: Path, capsys, caplog, monkeypatch):
    root = write_folder(tmp_path / "docs")
    assert build(root, tmp_path / "idx", capsys, caplog, monkeypatch).code == 0
    documents = indexed(tmp_path / "idx")
    assert sorted(documents) == ["guide.md", "notes.txt", "papers/pain.pdf", "web/rash.html"]
    assert documents["web/rash.html"] == (
        "Rash care",
        {"path": "web/rash.html", "modified": "2023-11-14T22:13:20+00:00", "format": "html"},
    )


def test_index_build_and_add_read_records_through_the_field_flags(tmp_path: Path, capsys, caplog, monkeypatch):
    data = tmp_path / "docs.csv"
    data.write_text("key,body,name,lang\nk1,fever and rest,Fever,en\nk2,cough syrup,Cough,fr\n")
    flags = ["--id-field", "key", "--text-field", "body", "--title-field", "name", "--metadata-fields", "lang"]
    assert build(data, tmp_path / "idx", capsys, caplog, monkeypatch, *flags).code == 0
    assert indexed(tmp_path / "idx") == {"k1": ("Fever", {"lang": "en"}), "k2": ("Cough", {"lang": "fr"})}
    more = tmp_path / "more.jsonl"
    more.write_text('{"key": 3, "body": "rash cream", "lang": "de"}\n')
    argv = ["index", "add", "--index", str(tmp_path / "idx"), "--data", str(more), "--no-progress", *flags]
    with keyword_model():
        assert mrl_in_process(argv, capsys, caplog, monkeypatch).code == 0
    assert indexed(tmp_path / "idx")["3"] == ("", {"lang": "de"})


def test_an_unreadable_file_fails_the_build_with_one_line(tmp_path: Path, capsys, caplog, monkeypatch):
    root = write_folder(tmp_path / "docs")
    (root / "papers" / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<<")
    result = build(root, tmp_path / "idx", capsys, caplog, monkeypatch)
    assert_one_line_error(result, f"{root / 'papers' / 'broken.pdf'}: cannot read PDF (")
    assert not (tmp_path / "idx" / "current").exists()
