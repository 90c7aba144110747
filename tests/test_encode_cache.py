"""The encode cache of ``mrl index build``: keyed by content, and it resumes a killed build.

The real builder runs with the keyword encoder standing in for the model (as in the
service fixtures), so every cached or fresh vector can be checked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import index.build as build_module
from core.data import Document
from index.build import BuildConfig, build_index, encode_cache_key
from index.loaded import open_index
from tests.conftest import KEYWORDS, KeywordEncoder
from tests.helpers.service import stand_in_model

FINGERPRINT = "sha256:" + "cd" * 32


class CountingEncoder(KeywordEncoder):
    """The keyword encoder; records every document batch and can crash on a chosen call."""

    def __init__(self, crash_on_call: int | None = None) -> None:
        super().__init__(KEYWORDS)
        self.batches: list[list[str]] = []
        self.query_batches: list[list[str]] = []
        self.crash_on_call = crash_on_call

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        if self.crash_on_call is not None and len(self.batches) + 1 == self.crash_on_call:
            raise KeyboardInterrupt  # as if the build were killed while encoding
        self.batches.append(list(texts))
        return self._encode(texts)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        self.query_batches.append(list(texts))
        return self._encode(texts)


@pytest.fixture
def keyword_build(monkeypatch):
    """``build(data, root, encoder)``: the real ``build_index`` with only its model seams faked."""
    model = stand_in_model()
    monkeypatch.setattr(build_module, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(build_module, "model_fingerprint", lambda m: FINGERPRINT)
    monkeypatch.setattr(build_module, "library_versions", lambda: {"mrl": "test"})

    def build(data: Path, root: Path, encoder: KeywordEncoder, cache_dir: Path | None = None):
        monkeypatch.setattr(build_module, "SentenceTransformerEncoder", lambda *a, **k: encoder)
        config = BuildConfig(
            data=data, output=root, model="keywords", dims=[4, 2], device="cpu", progress=False, cache_dir=cache_dir
        )
        return build_index(config)

    return build


def crash_after_encoding(monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build_dim_indexes", crash)


def test_corpus_edited_in_place_is_re_encoded(keyword_build, tiny_beir: Path, tmp_path: Path, monkeypatch):
    root = tmp_path / "index"
    with monkeypatch.context() as patch:
        crash_after_encoding(patch)
        with pytest.raises(KeyboardInterrupt):
            keyword_build(tiny_beir, root, CountingEncoder())
    assert list((root / ".encode-cache").rglob("chunk_*.npy"))  # the killed build left its vectors

    corpus = tiny_beir / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    docs[0]["text"] = "advice about rash and pain at home"  # was about fever; still four documents
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))

    encoder = CountingEncoder()
    keyword_build(tiny_beir, root, encoder)
    assert len(encoder.batches) == 1 and encoder.batches[0][0] == "advice about rash and pain at home"
    loaded = open_index(root, device="cpu")
    np.testing.assert_array_equal(np.asarray(loaded.vectors[0]), [0, 0, 1, 1])  # rash + pain, not fever
    np.testing.assert_array_equal(np.asarray(loaded.vectors[1:]), np.eye(4, dtype=np.float32)[1:])
    loaded.close()


def test_killed_build_resumes_from_finished_chunks(keyword_build, tiny_beir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(build_module, "ENCODE_CHUNK", 2)
    root = tmp_path / "index"
    killed = CountingEncoder(crash_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        keyword_build(tiny_beir, root, killed)
    assert killed.batches == [["advice about fever at home", "advice about cough at home"]]

    resumed = CountingEncoder()
    keyword_build(tiny_beir, root, resumed)
    assert resumed.batches == [["advice about rash at home", "advice about pain at home"]]  # only the rest
    loaded = open_index(root, device="cpu")
    np.testing.assert_array_equal(np.asarray(loaded.vectors), np.eye(4, dtype=np.float32))
    loaded.close()
    assert not (root / ".encode-cache").exists()  # a finished build clears its cache


def test_cache_key_follows_every_part_of_the_content():
    model = SimpleNamespace(prompts={"document": "passage: "}, max_seq_length=128)
    docs = [Document("a", "bc", "t"), Document("d", "e")]
    key = encode_cache_key(docs, FINGERPRINT, model)
    assert key == encode_cache_key(list(docs), FINGERPRINT, model)
    changed = [
        [Document("a", "bc", "t"), Document("d", "E")],  # text
        [Document("a", "bc", ""), Document("d", "e")],  # title
        [Document("ab", "c", "t"), Document("d", "e")],  # id/text boundary
        [Document("d", "e"), Document("a", "bc", "t")],  # order
        docs[:1],
    ]
    assert all(encode_cache_key(other, FINGERPRINT, model) != key for other in changed)
    assert encode_cache_key(docs, "sha256:other", model) != key
    assert encode_cache_key(docs, FINGERPRINT, SimpleNamespace(prompts={}, max_seq_length=128)) != key
    assert encode_cache_key(docs, FINGERPRINT, SimpleNamespace(prompts=model.prompts, max_seq_length=64)) != key


def test_a_named_cache_dir_is_kept_and_a_rebuild_encodes_nothing(keyword_build, tiny_beir: Path, tmp_path: Path):
    """``--cache-dir`` works for folder builds: two roots (or a rebuild after a settings change) encode once."""
    cache = tmp_path / "cache"
    first = CountingEncoder()
    keyword_build(tiny_beir, tmp_path / "one", first, cache)
    assert len(first.batches) == 1 and list(cache.rglob("chunk_*.npy"))
    again = CountingEncoder()
    keyword_build(tiny_beir, tmp_path / "two", again, cache)
    assert first.query_batches and again.batches == again.query_batches == []  # documents and probes: cached
    assert not (tmp_path / "two" / ".encode-cache").exists()
    one, two = open_index(tmp_path / "one", device="cpu"), open_index(tmp_path / "two", device="cpu")
    np.testing.assert_array_equal(np.asarray(one.vectors), np.asarray(two.vectors))
    np.testing.assert_array_equal(one.probes(), two.probes())
    one.close()
    two.close()
