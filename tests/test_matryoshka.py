from __future__ import annotations

import numpy as np
import pytest

from core.matryoshka import DimensionError, default_dims, parse_dims, truncate_normalize, validate_dims


def test_truncate_then_normalise_gives_unit_rows_of_the_prefix():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 384)).astype(np.float32)
    out = truncate_normalize(vectors, 64)
    assert out.shape == (50, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # Same direction as the plain prefix: truncation first, normalisation second.
    prefix = vectors[:, :64]
    np.testing.assert_allclose(out, prefix / np.linalg.norm(prefix, axis=1, keepdims=True), rtol=1e-5)


def test_normalising_before_truncating_would_not_give_unit_vectors():
    vectors = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    wrong = (vectors / np.linalg.norm(vectors))[:, :2]
    assert not np.isclose(np.linalg.norm(wrong), 1.0)
    np.testing.assert_allclose(truncate_normalize(vectors, 2), [[0.6, 0.8]], rtol=1e-6)


def test_truncate_keeps_zero_rows_finite_and_does_not_touch_input():
    vectors = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    original = vectors.copy()
    out = truncate_normalize(vectors, 2)
    np.testing.assert_array_equal(out[0], [0.0, 0.0])
    np.testing.assert_allclose(out[1], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_array_equal(vectors, original)


def test_truncate_single_vector_and_full_dimension():
    vector = np.array([1.0, 2.0, 2.0], dtype=np.float64)
    out = truncate_normalize(vector, 3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)


@pytest.mark.parametrize("dim", [0, -1, 385])
def test_truncate_rejects_impossible_dimension(dim):
    with pytest.raises(DimensionError, match="between 1 and the embedding dimension 384"):
        truncate_normalize(np.ones((2, 384), dtype=np.float32), dim)


@pytest.mark.parametrize(
    ("full", "expected"),
    [
        (384, [384, 256, 128, 64, 32]),
        (1024, [1024, 512, 256, 128, 64, 32]),
        (768, [768, 512, 256, 128, 64, 32]),
        (256, [256, 128, 64, 32]),
        (16, [16]),
    ],
)
def test_default_dims(full, expected):
    assert default_dims(full) == expected


def test_validate_dims_sorts_and_adds_full_dimension():
    assert validate_dims([64, 256], 384) == [384, 256, 64]


@pytest.mark.parametrize(("dims", "message"), [([], "at least one"), ([64, 512], r"\[512\]"), ([64, 64], "duplicates")])
def test_validate_dims_errors(dims, message):
    with pytest.raises(DimensionError, match=message):
        validate_dims(dims, 384)


def test_parse_dims():
    assert parse_dims("384, 64,") == [384, 64]
    with pytest.raises(DimensionError, match="comma-separated integers"):
        parse_dims("384,sixty-four")
