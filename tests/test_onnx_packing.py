"""The ONNX encoder's packed rows: several texts in one row of tokens, each attending only to itself.

On tiny random transformers of three kinds (BERT, RoBERTa with its positions counted after the
padding id, DistilBERT): packed vectors and token counts equal the padded graph's; a packed graph that
disagrees with the padded one is not used; a network that takes no position ids keeps padded batches.
The real model packs in ``test_service_real``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import encoders
from service.encoders import OnnxEncoder, _packs, onnx_encoder
from tests.helpers.models import save_tiny_model

TEXTS = [
    "a",
    "what causes high blood pressure in adults",
    "word " * 60,  # 62 tokens: longer than the smallest budget below, so it gets a row of its own
    "ok",
    "How is type 2 diabetes treated, and what can a patient do about it day to day?",
    "",
]


KINDS = [("bert", "mean"), ("bert", "cls"), ("roberta", "mean"), ("distilbert", "mean")]


@pytest.fixture(scope="module")
def tiny_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The session's tiny BERT (mean pooling), and the other kinds built once for this module."""
    folder = tmp_path_factory.mktemp("packing-models")
    others = {
        kind: save_tiny_model(folder / "-".join(kind), architecture=kind[0], pooling=kind[1]) for kind in KINDS[1:]
    }
    return {KINDS[0]: tiny_model} | others


def load(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def tiny_encoder(model: Path, onnx: Path, pack_tokens: int, quantize: bool = False) -> OnnxEncoder:
    encoder = onnx_encoder(
        load(model), "tiny", onnx, quantize=quantize, device="cpu", threads=1, batch_size=4, pack_tokens=pack_tokens
    )
    assert isinstance(encoder, OnnxEncoder)
    return encoder


def test_packs_are_cut_at_the_token_budget_and_a_longer_text_has_its_own():
    lengths = [70, 30, 20, 20, 10, 5]
    assert _packs([0, 1, 2, 3, 4, 5], lengths, 64) == [[0], [1, 2], [3, 4, 5]]
    assert _packs([0, 1, 2, 3, 4, 5], lengths, 1000) == [[0, 1, 2, 3, 4, 5]]
    assert _packs([1, 2], lengths, 1) == [[1], [2]]


@pytest.mark.parametrize("kind", KINDS, ids="-".join)
def test_packed_rows_give_the_padded_vectors_and_token_counts(tiny_models, tmp_path: Path, kind: tuple[str, str]):
    padded = tiny_encoder(tiny_models[kind], tmp_path / "onnx", 0)
    assert not padded.packing
    expected = padded.encode_queries(TEXTS)
    expected_counts = padded.last_token_counts
    for budget in (16, 64, 4096):  # many rows, some, one
        packed = tiny_encoder(tiny_models[kind], tmp_path / "onnx", budget)
        assert packed.packing and packed.pack_tokens == budget
        vectors = packed.encode_queries(TEXTS)
        np.testing.assert_allclose(vectors, expected, atol=2e-5)
        assert packed.last_token_counts == expected_counts
        assert packed.encode_queries([]).shape == (0, padded.dimension)
    assert (tmp_path / "onnx" / encoders.ONNX_PACKED_FILE).is_file()


def test_a_packed_graph_that_disagrees_with_the_padded_one_is_not_used(
    tiny_model: Path, tmp_path: Path, monkeypatch, caplog
):
    # positions counted as RoBERTa counts them are wrong for BERT: the load-time check must catch it
    monkeypatch.setattr(encoders, "PADDING_OFFSET_POSITIONS", frozenset({"bert"}))
    expected = tiny_encoder(tiny_model, tmp_path / "onnx", 0).encode_queries(TEXTS)
    with caplog.at_level(logging.WARNING, logger="service.encoders"):
        encoder = tiny_encoder(tiny_model, tmp_path / "onnx", 256)
    assert not encoder.packing and encoder.pack_tokens == 0
    assert "without packing: its vectors differ from the padded graph's" in caplog.text
    np.testing.assert_allclose(encoder.encode_queries(TEXTS), expected, atol=1e-6)


def test_a_network_without_position_ids_keeps_padded_batches(tiny_model: Path, tmp_path: Path, caplog):
    model = load(tiny_model)
    network = model[0].model
    original = network.forward

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, return_dict=None):  # no position_ids
        return original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    network.forward = forward
    expected = model.encode(TEXTS, convert_to_numpy=True)
    with caplog.at_level(logging.INFO, logger="service.encoders"):
        encoder = onnx_encoder(
            model, "tiny", tmp_path / "onnx", quantize=False, device="cpu", threads=1, batch_size=4, pack_tokens=256
        )
    assert isinstance(encoder, OnnxEncoder) and not encoder.packing
    assert "without packing: BertModel takes no position ids, so its texts cannot be packed" in caplog.text
    assert not (tmp_path / "onnx" / encoders.ONNX_PACKED_FILE).exists()
    vectors = encoder.encode_queries(TEXTS)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_int8_keeps_padded_batches(tiny_model: Path, tmp_path: Path):
    assert not tiny_encoder(tiny_model, tmp_path / "onnx", 256, quantize=True).packing
