"""Query encoders behind one protocol: sentence-transformers on torch, or on ONNX Runtime.

Both encode at the model's full dimension, unnormalised; the engine derives every
dimension with ``core.matryoshka.truncate_normalize``. The model's fingerprint is
always taken from the torch weights, so an ONNX encoder is checked against the index
manifest exactly like a torch one.

The ONNX backend keeps sentence-transformers for everything around the network
(prompts, tokenisation, length sorting, pooling) and runs only the transformer itself
on ONNX Runtime. Its export is cached by model fingerprint: a changed model is
re-exported, an unchanged one is loaded.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.models import ModelError, SentenceTransformerEncoder, load_model, model_fingerprint
from index.manifest import IndexManifest

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_int8.onnx"


class EncoderError(ModelError):
    """An encoder backend cannot be set up for this model."""


class QueryEncoder(Protocol):
    """What the service needs from an encoder: ``core.models.Encoder`` plus token counting."""

    name: str
    dimension: int

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> int: ...


@dataclass
class LoadedEncoder:
    """An encoder, the fingerprint of the weights it runs, and which backend it is."""

    encoder: QueryEncoder
    fingerprint: str
    backend: str


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


def load_encoder(settings: ServiceSettings, manifest: IndexManifest) -> LoadedEncoder:
    """The encoder ``settings`` ask for, with the prompts and token limit the index was built with.

    Raises:
        ModelError: If the model cannot be loaded. EncoderError: If the ONNX backend cannot run it.
    """
    name = settings.model or manifest.model.name
    model = load_model(
        name,
        max_seq_length=manifest.model.max_seq_length,
        query_prompt=manifest.model.query_prompt,
        document_prompt=manifest.model.document_prompt,
        device=_torch_device(settings.device),
    )
    if settings.encoder_threads:
        import torch

        torch.set_num_threads(settings.encoder_threads)
    fingerprint = model_fingerprint(model)
    if settings.encoder == "onnx":
        folder = settings.onnx_cache_dir() / fingerprint.removeprefix("sha256:")[:16]
        attach_onnx_runtime(model, folder, settings.onnx_quantize, settings.device, settings.encoder_threads)
    encoder = ServingEncoder(model, name, batch_size=settings.batch_max_size)
    return LoadedEncoder(encoder, fingerprint, settings.encoder)


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


def attach_onnx_runtime(
    model: SentenceTransformer, folder: Path, quantize: bool, device: str, threads: int | None
) -> None:
    """Replace ``model``'s transformer network by an ONNX Runtime session (exported once into ``folder``).

    Raises:
        EncoderError: For a model whose first module is not a text transformer, or a failed export.
    """
    module = model[0]
    config = _text_transformer_config(module)
    path = folder / (ONNX_INT8_FILE if quantize else ONNX_FILE)
    if not path.is_file():
        export_onnx(model, folder / ONNX_FILE)
        if quantize:
            _quantize(folder / ONNX_FILE, path)
    session = _session(path, device, threads)
    module.model = _onnx_network(session, config)
    model.to("cpu")
    logger.info("ONNX Runtime encoder: %s (%s)", path, ", ".join(session.get_providers()))


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

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter about the TorchScript exporter
            torch.onnx.export(
                _Positional(),
                tuple(example[n].to("cpu") for n in names),
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
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(prefix=".quantize-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        quantize_dynamic(str(source), tmp, weight_type=QuantType.QInt8)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _session(path: Path, device: str, threads: int | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EncoderError("the ONNX backend needs onnxruntime (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    available = ort.get_available_providers()
    wants_gpu = device in ("gpu", "auto") and "CUDAExecutionProvider" in available
    if device == "gpu" and not wants_gpu:
        raise EncoderError("device 'gpu' requested but ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if wants_gpu else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)
