"""The served model: micro-batched encoding for searches and for ``/v1/embeddings``, with an index or without.

An :class:`Embedder` owns the query encoder and the micro-batcher that every text goes through.
The :class:`~service.engine.Searcher` builds one over the index's model and tells it the index's
dims (again after each reload); ``mrl serve --model MODEL`` without an index opens one alone
(:meth:`Embedder.open`), which serves the model's own Matryoshka dims: those its ``mrl.json``
records, else its full dim and the powers of two below it down to 32.

Token ids (``input: [[101, 2023, ...]]``, as vLLM takes them) are ids of the served model's own
tokenizer: they are decoded to text (special tokens left out) and encoded as texts are, so that the
model's own tokenization of a text gives that text's vector, prompt and special tokens included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.matryoshka import default_dims, truncate_normalize
from index.manifest import IndexManifest
from service.batching import MicroBatcher, TextKind
from service.cache import QueryCache
from service.encoders import LoadedEncoder, load_encoder
from service.errors import InvalidRequest, NotReady, UnknownDimension
from service.limits import RequestLimits
from service.metrics import NO_INDEX, ServiceMetrics
from service.results import EmbeddingResult, ServedModel
from service.settings import ServiceSettings

EncoderLoader = Callable[[ServiceSettings, "IndexManifest | None"], LoadedEncoder]
WARM_UP_QUERY = "warm-up query"
CHARS_PER_TOKEN = 4  # about, for English with WordPiece or SentencePiece; texts are cut at the model's limit
DEFAULT_MAX_TOKENS = 512


class ConfigurationError(ConfigError):
    """The settings do not fit the index or the model (e.g. a default dimension it does not serve)."""


class Embedder:
    """Encodes texts through one micro-batcher: queries for searches, texts or token ids for embeddings.

    Args:
        settings: The service settings (batching, limits, the query cache).
        loaded_encoder: The encoder, its fingerprint and backend.
        metrics: The app's metrics.
        served: The model's name and the dims embeddings are served at (the Searcher updates them on reload).
        max_seq_length: The model's token limit, for the batcher's estimate of a text's cost.
        query_prompt: The query prompt the encoder was loaded with (part of the query cache's key).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        loaded_encoder: LoadedEncoder,
        metrics: ServiceMetrics,
        served: ServedModel,
        *,
        max_seq_length: int | None = None,
        query_prompt: str = "",
    ) -> None:
        self.encoder = loaded_encoder
        self.metrics = metrics
        self.served = served
        self.limits = RequestLimits(settings.max_k, settings.max_query_chars, settings.max_batch_queries)
        longest = max_seq_length or DEFAULT_MAX_TOKENS
        self.batcher = MicroBatcher(
            self._encode_batch,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            on_batch=metrics.observe_batch,
            max_tokens=settings.batch_max_tokens,
            cost=lambda text: min(len(text) // CHARS_PER_TOKEN + 2, longest),  # before tokenizing: an estimate
        )
        self._query_prompt = query_prompt
        # The int8 ranges of a dim, from the served index's corpus (the Searcher sets it; None: embeddings only).
        self.calibration: Callable[[int], np.ndarray] | None = None
        size = settings.query_cache_size
        self._query_cache = QueryCache(size, metrics.query_cache) if size else None
        metrics.queued_texts.set_function(lambda: self.batcher.pending)

    @classmethod
    async def open(
        cls, settings: ServiceSettings, metrics: ServiceMetrics, load: EncoderLoader = load_encoder
    ) -> Embedder:
        """The model of ``settings.model`` alone, started, for embeddings only (no index).

        Raises:
            ModelError: The model cannot be loaded. ConfigurationError: An embeddings default dim it does not serve.
        """
        loaded = await asyncio.to_thread(_load_model, settings, load)
        dims = sorted(loaded.dims or default_dims(loaded.encoder.dimension), reverse=True)
        served = ServedModel(
            model=public_name(loaded.encoder.name),
            dims=dims,
            default_dim=served_default(settings.embeddings_default_dim, dims, "embeddings default dim", "model"),
            created=datetime.now(timezone.utc).isoformat(),
        )
        longest = getattr(loaded.encoder, "max_seq_length", None)  # the encoders of service.encoders have it
        embedder = cls(settings, loaded, metrics, served, max_seq_length=longest)
        await embedder.start()
        metrics.set_serving(served.model, loaded.fingerprint, NO_INDEX, NO_INDEX)
        return embedder

    async def start(self) -> None:
        await self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()

    def check_ready(self) -> None:
        """Raises NotReady once the encoder's worker has stopped."""
        if not self.batcher.alive:
            raise NotReady("the encoder stopped; the server log says why; restart the service")

    @property
    def model_name(self) -> str:
        return self.served.model

    # --- encoding -----------------------------------------------------------------------
    async def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Full-dimension query vectors, through the query cache when there is one."""
        if self._query_cache is None:
            return await self.batcher.encode(texts, "query")
        encode = lambda missing: self.batcher.encode(missing, "query")  # noqa: E731
        return await self._query_cache.encode(texts, self.encoder.fingerprint, self._query_prompt, encode)

    async def embed(
        self, texts: Sequence[str], dimensions: int | None = None, kind: TextKind = "document"
    ) -> EmbeddingResult:
        """Unit-length embeddings of ``texts`` at ``dimensions`` (default: the served default dim), truncated then
        re-normalised.

        Raises:
            InvalidRequest: Bad texts. UnknownDimension: ``dimensions`` is not one of the served dims.
        """
        self.limits.check_texts(texts, what="input")
        return await self._embed(list(texts), self._dim(dimensions), kind)

    async def embed_tokens(
        self,
        token_ids: Sequence[int] | Sequence[Sequence[int]],
        dimensions: int | None = None,
        kind: TextKind = "document",
    ) -> EmbeddingResult:
        """Embeddings of texts given as token ids of the served model's tokenizer: one array of ids, or several.

        Raises:
            InvalidRequest: No ids, too many arrays or ids, or an id outside the vocabulary.
            UnknownDimension: ``dimensions`` is not one of the served dims.
        """
        nested = not token_ids or not isinstance(token_ids[0], int)
        arrays = [list(ids) for ids in token_ids] if nested else [list(token_ids)]  # type: ignore[arg-type]
        encoder = self.encoder.encoder
        self.limits.check_token_ids(arrays, encoder.vocab_size, nested=nested)
        dim = self._dim(dimensions)
        # On the encoder's thread, as token counting: a tokenizer is not to be used from two threads at once.
        texts = await self.batcher.run_on_encoder_thread(encoder.decode_tokens, arrays)
        return await self._embed(texts, dim, kind)

    def int8_ranges(self, dim: int) -> np.ndarray:
        """The int8 calibration of ``dim``: each coordinate's range over the served corpus (computed once a dim).

        Raises:
            InvalidRequest: No index is served, so there is no corpus to calibrate on.
        """
        if self.calibration is None:
            raise InvalidRequest(
                "encoding_format int8 maps each coordinate from its range over the served index's corpus, and this "
                "server serves embeddings only (no index): use float, base64 or ubinary, or serve an index"
            )
        return self.calibration(dim)

    def _dim(self, dimensions: int | None) -> int:
        served = self.served
        dim = served.default_dim if dimensions is None else dimensions
        if dim not in served.dims:
            raise UnknownDimension(dim, served.dims, what="dimensions")
        return dim

    async def _embed(self, texts: list[str], dim: int, kind: TextKind) -> EmbeddingResult:
        started = time.perf_counter()
        vectors, tokens = await self.batcher.encode_counted(texts, kind)
        self.metrics.encode_seconds.labels(dim=str(dim)).observe(time.perf_counter() - started)
        if tokens is None:  # an encoder that does not count as it tokenizes: a second pass
            # On the encoder's thread: a fast tokenizer used from two threads at once can pad one call with the
            # other's settings ("Unable to create tensor ... activate truncation and/or padding").
            tokens = await self.batcher.run_on_encoder_thread(self.encoder.encoder.count_tokens, texts)
        return EmbeddingResult(truncate_normalize(vectors, dim), dim, self.model_name, tokens)

    def _encode_batch(self, texts: list[str], kind: TextKind) -> np.ndarray | tuple[np.ndarray, list[int]]:
        """Vectors of ``texts``, with their token counts when the encoder noted them while tokenizing."""
        encoder = self.encoder.encoder
        vectors = encoder.encode_queries(texts) if kind == "query" else encoder.encode_documents(texts)
        counts = getattr(encoder, "last_token_counts", None)
        return (vectors, counts) if counts is not None and len(counts) == len(texts) else vectors


def _load_model(settings: ServiceSettings, load: EncoderLoader) -> LoadedEncoder:
    loaded = load(settings, None)
    loaded.encoder.encode_queries([WARM_UP_QUERY])  # the first call is slow; pay it before serving
    return loaded


def public_name(name: str) -> str:
    """The model's hub name, or a local model folder's own name (clients never see server paths)."""
    return Path(name).name if Path(name).is_absolute() else name


def served_default(configured: int | None, dims: Sequence[int], what: str, served_by: str = "index") -> int:
    """The default dim: ``configured`` if it is one of ``dims``, else the largest.

    Raises:
        ConfigurationError: ``configured`` is not one of ``dims``.
    """
    if configured is None:
        return max(dims)
    if configured not in dims:
        raise ConfigurationError(f"{what} {configured} is not served by this {served_by} (it has {list(dims)})")
    return configured
