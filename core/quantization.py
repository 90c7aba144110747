"""Quantised embeddings: int8 with per-coordinate ranges calibrated on a corpus, and packed sign bits.

Both are taken after the Matryoshka step (truncate to the dim, re-normalise), so one calibration
serves each dim: the ranges of a dim are its corpus vectors' minimum and maximum per coordinate, as
sentence-transformers' ``quantize_embeddings`` computes them from calibration embeddings. The
quantising itself is that library's.

- ``int8``: each coordinate mapped linearly from its corpus range onto -128 … 127 (values outside it
  are clipped), so that coordinates with a narrow range keep their resolution;
- ``ubinary``: one bit per coordinate, 1 when it is above 0, packed eight to a byte (``ceil(dim / 8)``
  values 0 … 255, the first coordinate in the highest bit, the last byte's unused bits 0); compare
  with the Hamming distance.
"""

from __future__ import annotations

import warnings

import numpy as np

from core.matryoshka import truncate_normalize

QUANTISED = ("int8", "ubinary")
CALIBRATION_ROWS = 20_000  # corpus vectors sampled for the int8 ranges of a dim


def int8_ranges(
    vectors: np.ndarray, dim: int, rows: int = CALIBRATION_ROWS, seed: int = 0, count: int | None = None
) -> np.ndarray:
    """``(2, dim)``: the minimum and maximum of each coordinate of ``vectors`` at ``dim`` (truncated, re-normalised),
    over up to ``rows`` of them drawn with ``seed`` (``count``: how many rows there are, for a reader without len)."""
    count = len(vectors) if count is None else count
    picked = np.sort(np.random.default_rng(seed).choice(count, size=min(rows, count), replace=False))
    sample = truncate_normalize(np.asarray(vectors[picked], dtype=np.float32), dim)
    return np.vstack([sample.min(axis=0), sample.max(axis=0)])


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (already at their dim) as ``int8`` (``ranges`` required) or ``ubinary`` (packed uint8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.util.quantization import quantize_embeddings

    if precision == "int8":
        if ranges is None:
            raise ValueError("int8 needs the calibration ranges of the dim")
        low, high = ranges
        clipped = np.clip(vectors, low, high)  # outside the corpus's range: its edge
        return quantize_embeddings(clipped.astype(np.float32), precision="int8", ranges=ranges)
    if precision == "ubinary":
        return quantize_embeddings(np.asarray(vectors, dtype=np.float32), precision="ubinary")
    raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(QUANTISED)}")
