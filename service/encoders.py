"""Query encoders behind one protocol: sentence-transformers on torch, or on ONNX Runtime.

Both encode at the model's full dimension, unnormalised; the engine derives every
dimension with ``core.matryoshka.truncate_normalize``. The model's fingerprint is
always taken from the torch weights, so an ONNX encoder is checked against the index
manifest exactly like a torch one.

The ONNX backend runs a whole query without torch or sentence-transformers when the model
is a text transformer followed by mean or CLS pooling (and optionally ``Normalize``), as
nearly every embedding model is: :class:`OnnxEncoder` tokenizes with the model's Rust
tokenizer (one copy per thread), runs the graph with numpy arrays and pools in numpy. Any
other module layout (a ``Dense`` head, say) keeps sentence-transformers around the network
and runs only the transformer on ONNX Runtime. The graph is exported once (for int8: fused
offline with ONNX Runtime's transformer optimizer, then quantised per channel) and cached by
model fingerprint: a changed model is re-exported, an unchanged one is loaded.

On CPU the float32 encoder packs the short texts of a call into one row instead of padding them to
the longest: a second graph takes the concatenated tokens with their positions and a segment number
per token, and each text attends only to its own tokens. The matrix products then run over the real
tokens only, in one call. The packed graph is checked against the padded one when it is loaded and
is used only if it gives the same vectors.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.matryoshka import truncate_normalize
from core.models import (
    ModelError,
    SentenceTransformerEncoder,
    embedding_dimension,
    load_model,
    model_dims,
    model_fingerprint,
)
from index.manifest import IndexManifest

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_int8_per_channel.onnx"
ONNX_PACKED_FILE = "model_packed.onnx"
# model types whose position ids start after the padding index (Hugging Face's
# ``create_position_ids_from_input_ids``); the others count from 0
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert"})
# texts of different lengths that a packed graph must encode as the padded graph does
PACKING_CHECK_TEXTS = (
    "a",
    "what causes high blood pressure",
    "An example passage of a few sentences. It has more tokens than the queries before it, so the "
    "padded graph pads the others to its length.",
    "ok",
)
PACKING_TOLERANCE = 1e-5  # largest 1 - cosine between packed and padded vectors of the check texts


class EncoderError(ModelError):
    """An encoder backend cannot be set up for this model."""


class QueryEncoder(Protocol):
    """What the service needs from an encoder: ``core.models.Encoder``, token counting, and its tokenizer's ids."""

    name: str
    dimension: int
    vocab_size: int  # token ids 0 .. vocab_size - 1 are the tokenizer's (added tokens included)

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> int: ...

    def decode_tokens(self, token_ids: list[list[int]]) -> list[str]: ...


@dataclass
class LoadedEncoder:
    """An encoder, the fingerprint of the weights it runs, which backend it is, and the model's own dims."""

    encoder: QueryEncoder
    fingerprint: str
    backend: str
    dims: list[int] | None = None  # its mrl.json's Matryoshka dims, else the defaults for its size; None: not read


class ServingEncoder(SentenceTransformerEncoder):
    """A sentence-transformers encoder for serving: no progress bars, and token counts for ``usage``.

    The counts come from the tokenization that encoding does anyway: the model's ``preprocess`` is
    wrapped to note how many tokens each text became (its prompt's tokens included), and after each encode call
    :attr:`last_token_counts` holds one count per text, in order, or ``None`` where they cannot
    be matched to the texts (then :meth:`count_tokens` tokenizes them a second time). Use it from
    one thread (the service's encoder thread), right after the call.
    """

    def __init__(self, model: SentenceTransformer, name: str, batch_size: int) -> None:
        super().__init__(model, name, batch_size=batch_size, progress=False)
        self.last_token_counts: list[int] | None = None
        self._seen: dict[str, int] | None = None
        preprocess = model.preprocess  # what sentence-transformers' encode tokenizes each batch with

        def counting_preprocess(inputs, *args, **kwargs):
            features = preprocess(inputs, *args, **kwargs)
            mask = features.get("attention_mask") if isinstance(features, Mapping) else None  # a BatchEncoding
            if self._seen is not None and mask is not None and isinstance(inputs, list) and len(inputs) == len(mask):
                counts = (int(n) for n in mask.sum(dim=1).tolist())
                self._seen.update((text, n) for text, n in zip(inputs, counts, strict=True) if isinstance(text, str))
            return features

        model.preprocess = counting_preprocess

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._counted(super().encode_queries, texts, "query")

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._counted(super().encode_documents, texts, "document")

    def _counted(self, encode, texts: list[str], prompt_name: str) -> np.ndarray:
        self._seen, self.last_token_counts = {}, None
        try:
            vectors = encode(texts)
            prompt = self.model.prompts.get(prompt_name, "")  # older versions tokenize the prompted text
            counts = [self._seen.get(text, self._seen.get(prompt + text)) for text in texts]
            self.last_token_counts = None if None in counts else counts
            return vectors
        finally:
            self._seen = None

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model sees for ``texts`` (special tokens included, after truncation), by a second pass."""
        tokenizer = self.model.tokenizer
        encoded = tokenizer(texts, truncation=True, max_length=self.model.max_seq_length, add_special_tokens=True)
        return sum(len(ids) for ids in encoded["input_ids"])

    @property
    def max_seq_length(self) -> int | None:
        return self.model.max_seq_length

    @property
    def prompts(self) -> dict[str, str]:
        """The model's prompts by name, as :class:`OnnxEncoder` has them."""
        return self.model.prompts

    @property
    def vocab_size(self) -> int:
        return len(self.model.tokenizer)

    def decode_tokens(self, token_ids: list[list[int]]) -> list[str]:
        """The texts of token id arrays, special tokens left out: encoding them tokenizes them back to the same ids."""
        return self.model.tokenizer.batch_decode(token_ids, skip_special_tokens=True)


def load_encoder(settings: ServiceSettings, manifest: IndexManifest | None) -> LoadedEncoder:
    """The encoder ``settings`` ask for, with the prompts and token limit the index was built with.

    Without an index (``manifest`` None: embeddings only) the model keeps its own prompts and token limit.

    Raises:
        ModelError: If the model cannot be loaded. EncoderError: If the ONNX backend cannot run it.
    """
    built = manifest.model if manifest is not None else None
    name = (settings.model or built.name) if built is not None else str(settings.model)  # settings have one
    model = load_model(
        name,
        max_seq_length=built.max_seq_length if built is not None else None,
        query_prompt=built.query_prompt if built is not None else None,
        document_prompt=built.document_prompt if built is not None else None,
        device=_torch_device(settings.device),
    )
    if settings.encoder_threads:
        import torch

        torch.set_num_threads(settings.encoder_threads)
    fingerprint = model_fingerprint(model)
    encoder = serving_encoder(model, name, fingerprint, settings)
    return LoadedEncoder(encoder, fingerprint, settings.encoder, dims=model_dims(model, name))


def serving_encoder(model: SentenceTransformer, name: str, fingerprint: str, settings: ServiceSettings) -> QueryEncoder:
    """The encoder ``settings`` ask for over a loaded ``model``: torch, or ONNX Runtime (exported once per model).

    Raises:
        EncoderError: If the ONNX backend cannot run the model.
    """
    if settings.encoder != "onnx":
        return ServingEncoder(model, name, batch_size=settings.batch_max_size)
    return onnx_encoder(
        model,
        name,
        settings.onnx_cache_dir() / fingerprint.removeprefix("sha256:")[:16],
        quantize=settings.onnx_quantize,
        device=settings.device,
        threads=settings.encoder_threads,
        batch_size=settings.batch_max_size,
        pack_tokens=settings.onnx_pack_tokens,
    )


def _torch_device(device: str) -> str | None:
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        return "cuda"
    return None  # sentence-transformers picks CUDA when there is one


# --- ONNX Runtime -------------------------------------------------------------------------


def _onnx_network(session: Any, config: Any) -> Any:
    """A ``torch.nn.Module`` standing in for the Hugging Face model inside sentence-transformers' ``Transformer``."""
    import torch

    inputs = [i.name for i in session.get_inputs()]

    class OnnxNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config

        def forward(self, **features: Any) -> dict[str, torch.Tensor]:
            feed = {name: features[name].detach().cpu().numpy().astype(np.int64) for name in inputs}
            (hidden,) = session.run(["last_hidden_state"], feed)
            return {"last_hidden_state": torch.from_numpy(hidden)}

    return OnnxNetwork()


# model types whose graphs ONNX Runtime's transformer optimizer fuses as BERT (attention, LayerNorm, GELU)
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"})
ONNX_OPTIMIZED_FILE = "model_opt.onnx"
ONNX_OPTIMIZED_INT8_FILE = "model_opt_int8_per_channel.onnx"


def onnx_encoder(
    model: SentenceTransformer,
    name: str,
    folder: Path,
    *,
    quantize: bool,
    device: str,
    threads: int | None,
    batch_size: int,
    pack_tokens: int = 0,
) -> QueryEncoder:
    """An ONNX Runtime encoder for ``model``, its graph exported (and optimised) once into ``folder``.

    Transformer + mean/CLS pooling (+ Normalize) gives the torch-free :class:`OnnxEncoder`; any other
    layout keeps sentence-transformers around an ONNX network. With ``pack_tokens`` (float32 on CPU),
    the encoder packs texts into rows of up to that many tokens when the packed graph checks out.

    Raises:
        EncoderError: For a model whose first module is not a text transformer, or a failed export.
    """
    module = model[0]
    config = _text_transformer_config(module)
    path = _onnx_graph(model, folder, config, quantize)
    session = _session(path, device, threads)
    logger.info("ONNX Runtime encoder: %s (%s)", path, ", ".join(session.get_providers()))
    pooling = _plain_pooling(model)
    tokenizer = getattr(model.tokenizer, "backend_tokenizer", None)
    if pooling is not None and tokenizer is not None:
        encoder = OnnxEncoder(
            session,
            tokenizer.to_str(),
            name=name,
            dimension=embedding_dimension(model),
            prompts=dict(model.prompts),
            max_seq_length=model.max_seq_length,
            pooling=pooling,
            pad_id=model.tokenizer.pad_token_id or 0,
            batch_size=batch_size,
        )
        on_cpu = session.get_providers()[0] == "CPUExecutionProvider"
        if pack_tokens and on_cpu and not quantize:
            _pack(encoder, model, folder, config, threads, pack_tokens)
        return encoder
    logger.info("ONNX Runtime runs the transformer only: sentence-transformers does the rest of this module layout")
    module.model = _onnx_network(session, config)
    model.to("cpu")
    return ServingEncoder(model, name, batch_size=batch_size)


def _onnx_graph(model: SentenceTransformer, folder: Path, config: Any, quantize: bool) -> Path:
    """The graph to run, made once: exported; for int8 also optimised (for a known architecture) and quantised.

    ONNX Runtime's session fusions already optimise the float32 graph: the offline optimizer's graph
    measured 4.25 against 4.32 ms per query and 2.53 against 1.99 ms per query in batches of 32 (MiniLM,
    2 cores). Quantised after the offline fusions (int8 attention), one query took 3.07 ms, against 3.40.
    """
    exported = folder / ONNX_FILE
    if not exported.is_file():
        export_onnx(model, exported)
    if not quantize:
        return exported
    optimizable = getattr(config, "model_type", None) in BERT_LIKE
    path = folder / (ONNX_OPTIMIZED_INT8_FILE if optimizable else ONNX_INT8_FILE)
    if path.is_file():
        return path
    optimized = folder / ONNX_OPTIMIZED_FILE
    if optimizable and not optimized.is_file():
        optimize_onnx(exported, optimized, config)
    _quantize(optimized if optimizable else exported, path)
    return path


def optimize_onnx(source: Path, target: Path, config: Any) -> None:
    """ONNX Runtime's offline transformer fusions (attention, skip-LayerNorm, bias-GELU) for a BERT-like graph.

    Raises:
        EncoderError: If the optimizer fails.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    fd, tmp = tempfile.mkstemp(prefix=".optimize-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(
                str(source),
                model_type="bert",
                num_heads=int(config.num_attention_heads),
                hidden_size=int(config.hidden_size),
            )
        optimized.save_model_to_file(tmp)
        os.replace(tmp, target)
    except Exception as exc:
        raise EncoderError(f"cannot optimise the ONNX graph: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    fused = optimized.get_fused_operator_statistics()
    logger.info("optimised %s: %s", target, ", ".join(f"{op} {n}" for op, n in sorted(fused.items()) if n))


def _pack(
    encoder: OnnxEncoder, model: SentenceTransformer, folder: Path, config: Any, threads: int | None, tokens: int
) -> None:
    """Give ``encoder`` the packed graph (exported once into ``folder``) if it encodes as the padded one.

    Packing is a speed-up only: a model whose network cannot be exported packed, or whose packed
    vectors differ from the padded ones, keeps padded batches, and the log says why.
    """
    path = folder / ONNX_PACKED_FILE
    try:
        if not path.is_file():
            export_packed_onnx(model, path)
        session = _session(path, "cpu", threads)
    except EncoderError as exc:
        logger.info("ONNX Runtime encoder without packing: %s", exc)
        return
    offset = int(config.pad_token_id) + 1 if getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS else 0
    texts = list(PACKING_CHECK_TEXTS)
    padded = encoder.encode_documents(texts)
    encoder.use_packing(session, tokens=tokens, position_offset=offset)
    try:
        packed = encoder.encode_documents(texts)
    except Exception as exc:  # an exported graph ONNX Runtime cannot run: padded batches still work
        packed, reason = None, str(exc).strip().splitlines()[0]
    if packed is not None:
        full = padded.shape[1]
        cosine = (truncate_normalize(padded, full) * truncate_normalize(packed, full)).sum(axis=1)
        gap = float(1 - cosine.min())
        if gap <= PACKING_TOLERANCE:
            encoder.drop_padded()  # its own copy of the weights, no longer used
            logger.info("ONNX Runtime encoder packs texts into rows of up to %d tokens", tokens)
            return
        reason = f"its vectors differ from the padded graph's (1 - cosine {gap:.1e})"
    encoder.use_packing(None)
    logger.warning("ONNX Runtime encoder without packing: %s", reason)


def _plain_pooling(model: SentenceTransformer) -> str | None:
    """``mean`` or ``cls`` for a Transformer → Pooling (→ Normalize) model that pools prompts too; else None."""
    kinds = [type(module).__name__ for module in model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    config = model[1].get_config_dict()
    mode = config.get("pooling_mode")
    mode = mode[0] if isinstance(mode, (list, tuple)) and len(mode) == 1 else mode
    if mode not in ("mean", "cls") or not config.get("include_prompt", True):
        return None
    return mode


class OnnxEncoder:
    """Queries and documents through ONNX Runtime with numpy only: Rust tokenizer → graph → pooling.

    It gives sentence-transformers' vectors (prompt prepended to the text, truncation to the token limit,
    mean or CLS pooling) without torch in the call path. Each thread gets its own tokenizer. After each
    encode call :attr:`last_token_counts` holds the token count of every text (prompt and special tokens
    included), as :class:`ServingEncoder` does; use it from the thread that encoded.
    """

    def __init__(
        self,
        session: Any,
        tokenizer_json: str,
        *,
        name: str,
        dimension: int,
        prompts: dict[str, str],
        max_seq_length: int | None,
        pooling: str,
        pad_id: int,
        batch_size: int,
    ) -> None:
        self.name = name
        self.dimension = dimension
        self.prompts = prompts
        self.max_seq_length = max_seq_length
        self.pooling = pooling
        self.batch_size = max(1, batch_size)
        self.last_token_counts: list[int] | None = None
        self._session = session
        self._inputs = {i.name for i in session.get_inputs()}
        self._tokenizer_json = tokenizer_json
        self._pad_id = pad_id
        self._local = threading.local()
        self._packed: Any = None
        self._packed_inputs: set[str] = set()
        self.pack_tokens = 0
        self._position_offset = 0

    def use_packing(self, session: Any, *, tokens: int = 0, position_offset: int = 0) -> None:
        """Encode through ``session``, a packed graph (see :func:`export_packed_onnx`), in rows of up to
        ``tokens`` tokens (a longer text gets a row of its own); None: padded batches again."""
        self._packed = session
        self._packed_inputs = {i.name for i in session.get_inputs()} if session is not None else set()
        self.pack_tokens = tokens if session is not None else 0
        self._position_offset = position_offset

    @property
    def packing(self) -> bool:
        return self._packed is not None

    def drop_padded(self) -> None:
        """Release the padded graph's session (and its copy of the weights) once the packed graph serves."""
        if self._packed is not None:
            self._session = None

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.prompts.get("query", ""))

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.prompts.get("document", ""))

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model sees for ``texts`` (special tokens included, after truncation), without a prompt."""
        return sum(len(encoding.ids) for encoding in self._tokenizer().encode_batch(list(texts)))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer().get_vocab_size(with_added_tokens=True)

    def decode_tokens(self, token_ids: list[list[int]]) -> list[str]:
        """The texts of token id arrays, special tokens left out (as :class:`ServingEncoder` decodes them)."""
        return self._tokenizer().decode_batch(token_ids, skip_special_tokens=True)

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(self._tokenizer_json)
            tokenizer.no_padding()
            if self.max_seq_length:
                tokenizer.enable_truncation(self.max_seq_length)
            else:
                tokenizer.no_truncation()
            self._local.tokenizer = tokenizer
        return tokenizer

    def _encode(self, texts: list[str], prompt: str) -> np.ndarray:
        self.last_token_counts = None
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return vectors
        encodings = self._tokenizer().encode_batch([prompt + text for text in texts])
        lengths = [len(encoding.ids) for encoding in encodings]
        order = sorted(range(len(texts)), key=lengths.__getitem__, reverse=True)  # little padding per batch
        if self._packed is not None:
            for rows in _packs(order, lengths, self.pack_tokens):
                vectors[rows] = self._run_packed([encodings[row] for row in rows])
        else:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                vectors[rows] = self._run_padded([encodings[row] for row in rows])
        self.last_token_counts = lengths
        return vectors

    def _run_padded(self, encodings: list[Any]) -> np.ndarray:
        """Pooled vectors of ``encodings`` (longest first) padded to the first one's length, in one call."""
        width = len(encodings[0].ids)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            length = len(encoding.ids)
            ids[i, :length] = encoding.ids
            types[i, :length] = encoding.type_ids
            mask[i, :length] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (hidden,) = self._session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in self._inputs})
        return self._pool(hidden, mask)

    def _run_packed(self, encodings: list[Any]) -> np.ndarray:
        """Pooled vectors of ``encodings`` packed into one row, each text attending only to itself."""
        lengths = np.array([len(encoding.ids) for encoding in encodings])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        positions = np.arange(int(lengths.sum())) - np.repeat(starts, lengths) + self._position_offset
        feed = {
            "input_ids": np.concatenate([encoding.ids for encoding in encodings]),
            "token_type_ids": np.concatenate([encoding.type_ids for encoding in encodings]),
            "position_ids": positions,
            "segment_ids": np.repeat(np.arange(len(encodings)), lengths),
        }
        feed = {k: v.astype(np.int64)[None] for k, v in feed.items() if k in self._packed_inputs}
        (hidden,) = self._packed.run(["last_hidden_state"], feed)
        if self.pooling == "cls":
            return hidden[0, starts]
        return np.add.reduceat(hidden[0], starts, axis=0) / lengths[:, None].astype(np.float32)

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _packs(order: list[int], lengths: list[int], tokens: int) -> list[list[int]]:
    """``order`` cut into runs of at most ``tokens`` tokens; a longer text makes a run of its own."""
    packs: list[list[int]] = []
    total = 0
    for row in order:
        if packs and total + lengths[row] <= tokens:
            packs[-1].append(row)
            total += lengths[row]
        else:
            packs.append([row])
            total = lengths[row]
    return packs


def _text_transformer_config(module: Any) -> Any:
    modality = getattr(module, "modality_config", {}).get("text", {})
    if type(module).__name__ != "Transformer" or modality.get("method_output_name") != "last_hidden_state":
        raise EncoderError(
            f"the ONNX backend runs text transformer models only, not a {type(module).__name__} first module"
        )
    return module.model.config


def export_onnx(model: SentenceTransformer, path: Path) -> None:
    """Export the transformer network of ``model`` to ``path`` (written atomically).

    Raises:
        EncoderError: If torch cannot export the network.
    """
    import torch

    network = model[0].model.to("cpu").eval()
    example = model.preprocess(["an example query for tracing the network"])
    forward_params = set(inspect.signature(network.forward).parameters)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in example and n in forward_params]

    class _Positional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.network(**dict(zip(names, tensors, strict=True)), return_dict=True).last_hidden_state

    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    _export(_Positional(), tuple(example[n].to("cpu") for n in names), names, axes, path)


def export_packed_onnx(model: SentenceTransformer, path: Path) -> None:
    """Export ``model``'s transformer as a packed graph to ``path``: several texts in one row of tokens.

    Inputs, each of shape (1, tokens): ``input_ids``, ``position_ids`` (each text counting from its own
    start), ``segment_ids`` (which text a token belongs to) and ``token_type_ids`` if the network takes
    them. Inside the graph a token attends to the tokens of its own segment only (an additive mask of
    shape (1, 1, tokens, tokens)), so each text's hidden states are those it has alone.

    Raises:
        EncoderError: If the network takes no ``position_ids`` or torch cannot export it.
    """
    import torch

    network = model[0].model.to("cpu").eval()
    forward_params = set(inspect.signature(network.forward).parameters)
    if "position_ids" not in forward_params:
        raise EncoderError(f"{type(network).__name__} takes no position ids, so its texts cannot be packed")
    types = "token_type_ids" in forward_params
    names = ["input_ids", "position_ids", "segment_ids", *(["token_type_ids"] if types else [])]

    class _Packed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            inputs = dict(zip(names, tensors, strict=True))
            segments = inputs.pop("segment_ids")
            same = segments[:, :, None] == segments[:, None, :]
            inputs["attention_mask"] = torch.where(same[:, None], 0.0, torch.finfo(torch.float32).min)
            return self.network(**inputs, return_dict=True).last_hidden_state

    example = {
        "input_ids": torch.tensor([[1, 2, 3, 1, 4, 5, 3]]),  # ids every vocabulary has
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
        "segment_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1]]),
        "token_type_ids": torch.zeros((1, 7), dtype=torch.long),
    }
    axes = {name: {1: "tokens"} for name in [*names, "last_hidden_state"]}
    _export(_Packed(), tuple(example[n] for n in names), names, axes, path)


def _export(module: Any, example: tuple[Any, ...], names: list[str], axes: dict, path: Path) -> None:
    """``torch.onnx.export`` of ``module`` into ``path``, written to a temporary file first.

    Raises:
        EncoderError: If torch cannot export the module.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter about the TorchScript exporter
            torch.onnx.export(
                module,
                example,
                tmp,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,  # the TorchScript exporter needs no extra packages
            )
        os.replace(tmp, path)
    except Exception as exc:
        raise EncoderError(f"cannot export the model to ONNX: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    logger.info("exported the model to %s", path)


def _quantize(source: Path, target: Path) -> None:
    """int8 dynamic quantisation of ``source``'s matrix products (fused attention included) into ``target``.

    Per output channel, and embeddings left in float32: per-tensor int8 with quantised embedding tables kept
    a mean cosine of 0.958 to float32 on SciFact's queries (MiniLM), per channel without the tables 0.993.

    Raises:
        EncoderError: If ONNX Runtime's quantizer fails.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(prefix=".quantize-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    # contrib operators of an optimised graph have no shape inference: their outputs are float tensors
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(source),
                tmp,
                op_types_to_quantize=["MatMul", "Attention"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options=options,
            )
        os.replace(tmp, target)
    except Exception as exc:
        raise EncoderError(f"cannot quantise the ONNX graph: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def _session(path: Path, device: str, threads: int | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EncoderError("the ONNX backend needs onnxruntime (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    # Idle worker threads sleep instead of spinning: the encoder shares the cores with the event loop
    # (and, in the benchmarks, with the client). At 16 requests in flight on 2 cores, POST /v1/embeddings
    # answered 319-338 req/s without spinning against 251-336 with it (five runs each), the same at one.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    available = ort.get_available_providers()
    wants_gpu = device in ("gpu", "auto") and "CUDAExecutionProvider" in available
    if device == "gpu" and not wants_gpu:
        raise EncoderError("device 'gpu' requested but ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if wants_gpu else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)
