"""Fixtures for the service tests: a keyword fake encoder behind the real index builder and app.

The index is built by ``index.build.build_index`` itself, with only its model seams
(``load_model``, the encoder, the fingerprint) pointed at :class:`ServiceKeywordEncoder`,
so every score in the service tests can be worked out by hand.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

import index.build as build_module
from index.build import BuildConfig, build_index
from index.layout import resolve_version
from index.manifest import IndexManifest
from service.app import create_app
from service.encoders import LoadedEncoder
from service.settings import ServiceSettings
from tests.conftest import KeywordEncoder, write_beir

VOCABULARY = ["fever", "cough", "rash", "pain", "sleep", "diet", "stress", "allergy"]
DIMS = [8, 4, 2]
FINGERPRINT = "sha256:" + "ab" * 32
MODEL_NAME = "keywords"
ERROR_KEYS = {"type", "message"}


class ServiceKeywordEncoder(KeywordEncoder):
    """The keyword encoder plus what the service needs (token counts, token ids: one per keyword), a way to hold
    one call, and a crash word."""

    def __init__(self) -> None:
        super().__init__(VOCABULARY, name=MODEL_NAME)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = False
        self.calls: list[int] = []

    def hold_next_call(self) -> None:
        """The next encode call signals ``entered`` and waits for ``release``."""
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=30)
        if any("explode" in text for text in texts):
            raise RuntimeError("secret internal detail")
        self.calls.append(len(texts))
        return super()._encode(texts)

    encode_queries = _encode
    encode_documents = _encode

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(text.split()) for text in texts)

    @property
    def vocab_size(self) -> int:
        """Token id ``i`` is the keyword ``VOCABULARY[i]``."""
        return len(self.vocabulary)

    def decode_tokens(self, token_ids: list[list[int]]) -> list[str]:
        return [" ".join(self.vocabulary[token] for token in ids) for ids in token_ids]


def corpus(extra: int = 0) -> list[dict]:
    """One document per keyword, one about three keywords, then ``extra`` more about allergy and rash."""
    docs = [
        {"_id": f"d{i}", "title": f"Leaflet {i}", "text": f"advice about {word} at home", "metadata": {"topic": word}}
        for i, word in enumerate(VOCABULARY)
    ]
    docs.append({"_id": "d8", "title": "Leaflet 8", "text": "fever with cough and rash", "metadata": {}})
    docs += [{"_id": f"n{i}", "title": "New", "text": "allergy rash season"} for i in range(extra)]
    return docs


def write_data(folder: Path, extra: int = 0) -> Path:
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(VOCABULARY)]
    qrels = {"test": [(f"q{i}", f"d{i}", 1) for i in range(len(VOCABULARY))]}
    return write_beir(folder, corpus(extra), queries, qrels)


@functools.cache
def minilm_tokenizer():
    """The default model's fast tokenizer alone (a fraction of a second to load, no weights)."""
    from transformers import AutoTokenizer

    from core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


def stand_in_model(max_seq_length: int = 256) -> SimpleNamespace:
    """What the index builder reads of a model besides its encoder: prompts, window and tokenizer (which
    splits long documents into passages), for builds whose encoder is the keyword encoder."""
    return SimpleNamespace(prompts={}, max_seq_length=max_seq_length, tokenizer=minilm_tokenizer())


@contextmanager
def keyword_model(encoder: KeywordEncoder | None = None) -> Iterator[KeywordEncoder]:
    """While open, ``mrl index build`` and ``add`` (in this process) load the keyword encoder as their model."""
    encoder = encoder or KeywordEncoder(VOCABULARY, name=MODEL_NAME)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "load_model", lambda *a, **k: stand_in_model())
        patch.setattr(build_module, "SentenceTransformerEncoder", lambda *a, **k: encoder)
        patch.setattr(build_module, "model_fingerprint", lambda model: FINGERPRINT)
        patch.setattr(build_module, "library_versions", lambda: {"mrl": "test"})
        yield encoder


def build_keyword_index(data: Path, root: Path, calibration: str = "none") -> Path:
    """``build_index`` for real, with the keyword encoder standing in for the model; returns the version folder.

    Its plans are not calibrated unless ``calibration`` names a pseudo-query kind (``index.calibration``): the
    tests of hand-made plans and training reports want none.
    """
    with keyword_model():
        folder, _ = build_index(
            BuildConfig(
                data=data, output=root, model=MODEL_NAME, dims=DIMS, device="cpu", progress=False,
                calibration=calibration,
            )  # fmt: skip
        )
    return folder


def add_evaluation(root: Path, ndcg: dict[int, float]) -> None:
    """Record a measured NDCG@10 per dim in the current manifest (the manifest is not in its own file list)."""
    folder = resolve_version(root)
    manifest = IndexManifest.read(folder)
    manifest.evaluation = {"by_dim": {str(dim): {"ndcg@10": value} for dim, value in ndcg.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest.to_dict()))


def add_plans(root: Path, plans: list) -> None:
    """Replace the current manifest's plans (``index.plans.Plan`` objects) with ``plans``."""
    folder = resolve_version(root)
    manifest = IndexManifest.read(folder)
    manifest.plans = [plan.to_dict() for plan in plans]
    manifest.calibration_queries = None  # else a server whose encoder is not the build's would score them again
    (folder / "manifest.json").write_text(json.dumps(manifest.to_dict()))


def keyword_loader(encoder: ServiceKeywordEncoder, fingerprint: str = FINGERPRINT):
    def load(settings: ServiceSettings, manifest: IndexManifest) -> LoadedEncoder:
        return LoadedEncoder(encoder, fingerprint, "fake")

    return load


@contextmanager
def serve(root: Path, encoder: ServiceKeywordEncoder | None = None, loader=None, **settings) -> Iterator[TestClient]:
    """A TestClient over the real app and lifespan, serving ``root`` with the keyword encoder."""
    encoder = encoder or ServiceKeywordEncoder()
    app = create_app(
        ServiceSettings(index=root, device="cpu", **settings), encoder_loader=loader or keyword_loader(encoder)
    )
    with TestClient(app) as client:
        yield client


def assert_error(response, status: int, error_type: str, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["type"] == error_type
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]
    return body["error"]["message"]
