"""The ONNX encoder's packed rows: several texts in one row of tokens, each attending only to itself.

On tiny random transformers of three kinds (BERT, RoBERTa with its positions counted after the
padding id, DistilBERT): packed vectors and token counts equal the padded graph's; a packed graph that
disagrees with the padded one is not used; a network that takes no position ids keeps padded batches.
The real model packs in ``test_service_real``.
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def tiny_encoder(folder: Path, pack_tokens: int, **model_options) -> OnnxEncoder:
    from sentence_transformers import SentenceTransformer

    if not (folder / "model").is_dir():
        save_tiny_model(folder / "model", **model_options)
    model = SentenceTransformer(str(folder / "model"), device="cpu")
    encoder = onnx_encoder(
        model, "tiny", folder / "onnx", quantize=False, device="cpu", threads=1, batch_size=4, pack_tokens=pack_tokens
    )
    assert isinstance(encoder, OnnxEncoder)
    return encoder


def test_packs_are_cut_at_the_token_budget_and_a_longer_text_has_its_own():
    lengths = [70, 30, 20, 20, 10, 5]
    assert _packs([0, 1, 2, 3, 4, 5], lengths, 64) == [[0], [1, 2], [3, 4, 5]]
    assert _packs([0, 1, 2, 3, 4, 5], lengths, 1000) == [[0, 1, 2, 3, 4, 5]]
    assert _packs([1, 2], lengths, 1) == [[1], [2]]


@pytest.mark.parametrize(("architecture", "pooling"), [("bert", "mean"), ("bert", "cls"), ("roberta", "mean")], ids=str)
def test_packed_rows_give_the_padded_vectors_and_token_counts(tmp_path: Path, architecture: str, pooling: str):
    options = {"architecture": architecture, "pooling": pooling}
    padded = tiny_encoder(tmp_path, 0, **options)
    assert not padded.packing
    expected = padded.encode_queries(TEXTS)
    expected_counts = padded.last_token_counts
    for budget in (16, 64, 4096):  # many rows, some, one
        packed = tiny_encoder(tmp_path, budget, **options)
        assert packed.packing and packed.pack_tokens == budget
        vectors = packed.encode_queries(TEXTS)
        np.testing.assert_allclose(vectors, expected, atol=2e-5)
        assert packed.last_token_counts == expected_counts
        assert packed.encode_queries([]).shape == (0, padded.dimension)
    assert (tmp_path / "onnx" / encoders.ONNX_PACKED_FILE).is_file()


def test_a_packed_graph_that_disagrees_with_the_padded_one_is_not_used(tmp_path: Path, monkeypatch, caplog):
    # positions counted as RoBERTa counts them are wrong for BERT: the load-time check must catch it
    monkeypatch.setattr(encoders, "PADDING_OFFSET_POSITIONS", frozenset({"bert"}))
    expected = tiny_encoder(tmp_path, 0).encode_queries(TEXTS)
    with caplog.at_level(logging.WARNING, logger="service.encoders"):
        encoder = tiny_encoder(tmp_path, 256)
    assert not encoder.packing and encoder.pack_tokens == 0
    assert "without packing: its vectors differ from the padded graph's" in caplog.text
    np.testing.assert_allclose(encoder.encode_queries(TEXTS), expected, atol=1e-6)


def test_a_network_without_position_ids_keeps_padded_batches(tmp_path: Path, caplog):
    from sentence_transformers import SentenceTransformer

    save_tiny_model(tmp_path / "model")
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
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


def test_int8_keeps_padded_batches(tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    save_tiny_model(tmp_path / "model")
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    encoder = onnx_encoder(
        model, "tiny", tmp_path / "onnx", quantize=True, device="cpu", threads=1, batch_size=4, pack_tokens=256
    )
    assert isinstance(encoder, OnnxEncoder) and not encoder.packing
