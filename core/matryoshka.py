"""The one place where a Matryoshka embedding becomes a smaller embedding.

Every stage (training evaluation, index building, the query path, benchmarks) calls
:func:`truncate_normalize`, so the order of operations can never drift: first keep the
leading ``dim`` coordinates, then L2-normalise what is left. Slicing without
re-normalising gives vectors that are not unit length, and inner-product search over
them is no longer cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.errors import MrlError

MIN_DEFAULT_DIM = 32


class DimensionError(MrlError, ValueError):
    """A requested Matryoshka dimension is not valid for the model or index."""


def truncate_normalize(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Keep the first ``dim`` coordinates of each row and L2-normalise the result.

    Args:
        vectors: ``(n, d)`` or ``(d,)`` array of full-dimension embeddings.
        dim: Number of leading coordinates to keep, ``1 <= dim <= d``.

    Returns:
        A new float32 array of shape ``(n, dim)`` (or ``(dim,)``) whose rows have unit
        L2 norm; all-zero rows stay zero instead of becoming NaN.

    Raises:
        DimensionError: If ``dim`` is not between 1 and the vectors' dimension.
    """
    full = vectors.shape[-1]
    if not 1 <= dim <= full:
        raise DimensionError(f"dimension {dim} is not between 1 and the embedding dimension {full}")
    truncated = np.array(vectors[..., :dim], dtype=np.float32, copy=True)
    norms = np.linalg.norm(truncated, axis=-1, keepdims=True)
    np.divide(truncated, norms, out=truncated, where=norms > 0)
    return truncated


def default_dims(full_dim: int, smallest: int = MIN_DEFAULT_DIM) -> list[int]:
    """Matryoshka dimensions for a model: its full dimension, then halving powers of two.

    384 gives ``[384, 256, 128, 64, 32]``; 1024 gives ``[1024, 512, 256, 128, 64, 32]``.
    """
    dims = [full_dim]
    power = 1 << (full_dim - 1).bit_length() >> 1  # largest power of two below full_dim
    while power >= smallest:
        dims.append(power)
        power //= 2
    return dims


def validate_dims(dims: Sequence[int], full_dim: int) -> list[int]:
    """Check user-given dimensions against the model and return them sorted, largest first.

    The full dimension is added when missing: Matryoshka training must keep the full
    embedding good, and evaluation needs it as the reference.

    Raises:
        DimensionError: For an empty list, duplicates, or a value outside ``1..full_dim``.
    """
    if not dims:
        raise DimensionError("at least one dimension is required")
    bad = [d for d in dims if not 1 <= d <= full_dim]
    if bad:
        raise DimensionError(f"dimensions {bad} are not between 1 and the model's embedding dimension {full_dim}")
    if len(set(dims)) != len(dims):
        raise DimensionError(f"dimensions {list(dims)} contain duplicates")
    return sorted(set(dims) | {full_dim}, reverse=True)


def parse_dims(text: str) -> list[int]:
    """Parse a comma-separated list like ``"384,256,64"``; raise DimensionError if it is not one."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DimensionError(f"dimensions must be comma-separated integers, got {text!r}") from None
