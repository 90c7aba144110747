"""The one settings class of the service: every field is a ``MRL_*`` environment variable or a flag.

Built where the app is built (``create_app(settings)``, ``mrl serve``), never at import, so
tests construct as many differently configured apps as they like.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError
from index.locator import IndexLocator, deprecation_notice, parse_locator
from service.protocol import HttpProtocol

EncoderBackend = Literal["torch", "onnx"]
DeviceSetting = Literal["auto", "cpu", "gpu"]
IndexBackendSetting = Literal["faiss", "milvus"]
NOTHING_TO_SERVE = (
    "nothing to serve: give --index LOCATOR to serve search and embeddings, or --model MODEL to serve embeddings "
    "only (MRL_INDEX, MRL_MODEL)"
)


class ServiceSettings(BaseSettings):
    """What ``mrl serve`` can be told; ``MRL_INDEX=runs/demo-index`` etc., or keyword arguments."""

    # hide_input_in_errors: a ValidationError would otherwise repeat the values given, secrets included
    # (a password inside milvus_uri, api_key).
    model_config = SettingsConfigDict(env_prefix="MRL_", extra="ignore", frozen=True, hide_input_in_errors=True)

    index: str | None = Field(
        None,
        description="the index: a folder (an index root, serving its `current` version, or one version folder), "
        "milvus://HOST:PORT/NAME (a Milvus server or cluster) or milvus-lite://PATH/FILE.db/NAME; by default none: "
        "then `model` is served for /v1/embeddings only, without search",
    )
    backend: IndexBackendSetting | None = Field(
        None, description="deprecated: name the engine in `index` (milvus://HOST:PORT/NAME) instead"
    )
    milvus_uri: str | None = Field(
        None, description="deprecated: name the Milvus deployment in `index` (milvus://HOST:PORT/NAME) instead"
    )
    # Credentials: from the environment only (flags show in `ps`), so no flag is made for them.
    milvus_token: SecretStr | None = Field(
        None, description="backend milvus: API token, or user:password", json_schema_extra={"cli": False}
    )
    milvus_user: str = Field(
        "", description="backend milvus: user name (with milvus_password)", json_schema_extra={"cli": False}
    )
    milvus_password: SecretStr | None = Field(
        None, description="backend milvus: password", json_schema_extra={"cli": False}
    )
    milvus_timeout_s: float = Field(
        5.0, gt=0, description="backend milvus: seconds each call to Milvus may take before the request gets 503"
    )
    model: str | None = Field(
        None,
        description="model folder or hub name (default: the model named in the manifest); without `index`, the "
        "model served for embeddings only",
    )
    default_dim: int | None = Field(
        None, gt=0, description="dimension used when a request names none (default: the largest)"
    )
    embeddings_default_dim: int | None = Field(
        None,
        gt=0,
        description="dimensions of an embeddings request that names none, for clients that cannot pass one "
        "(default: the full dim)",
    )
    max_k: int = Field(100, gt=0, description="largest number of hits a request may ask for")
    max_query_chars: int = Field(2000, gt=0, description="longest query or embedding input, in characters")
    max_batch_queries: int = Field(64, gt=0, description="most queries (or embedding inputs) in one request")
    rerank_candidates: int = Field(10, gt=0, description="two-stage search shortlists k times this many candidates")
    snippet_chars: int = Field(300, ge=0, description="hit texts are cut to this many characters; 0 keeps them whole")

    encoder: EncoderBackend = Field(
        "torch", description="query encoder: sentence-transformers on torch, or ONNX Runtime"
    )
    onnx_quantize: bool = Field(
        False, description="ONNX backend: int8 dynamic quantisation (faster on CPU, ~0.97 cosine)"
    )
    onnx_pack_tokens: int = Field(
        256,
        ge=0,
        description="ONNX backend on CPU, float32: the texts of an encoder call are packed into rows of up to this "
        "many tokens, each attending only to itself, instead of padded to the longest (checked against padding "
        "when loaded); 0: padded batches",
    )
    onnx_cache: Path | None = Field(
        None, description="where exported ONNX models are kept (default: ~/.cache/mrl/onnx)"
    )
    encoder_threads: int | None = Field(None, gt=0, description="CPU threads for the encoder (default: the library's)")
    device: DeviceSetting = Field(
        "auto", description="where the encoder and FAISS run; auto picks the GPU if there is one"
    )

    batch_max_size: int = Field(32, gt=0, description="most texts encoded in one micro-batch")
    batch_max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="how long a micro-batch waits for more texts; 0: none, batches form while the encoder is busy",
    )
    batch_max_tokens: int = Field(
        2048,
        gt=0,
        description="estimated tokens per encoder call (about 0.25 s on 2 CPU cores for MiniLM); a query waits for "
        "at most one such call",
    )
    query_cache_size: int = Field(
        0,
        ge=0,
        description="query embeddings kept (least recently used out, ~1.5 KB each at 384 dims); 0: no cache",
    )
    shadow_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="share of searches answered by a reduced plan (a dim below full, or two-stage) whose hits are "
        "compared, off the request path, with a full-dim search of the same query: live agreement per plan in "
        "/plans and /metrics; 0 turns it off",
    )
    shadow_cpu_budget: float = Field(
        0.1, gt=0, le=1, description="most of one CPU core the live comparisons may take; samples beyond are dropped"
    )
    max_in_flight: int = Field(256, gt=0, description="concurrent requests accepted; beyond it requests get 429")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes on one port, each with its own encoder; they share the memory-mapped index "
        "and add up their metrics (not with --writable)",
    )

    api_key: SecretStr | None = Field(
        None,
        description="if set, every endpoint but healthz/readyz/metrics needs it, as X-API-Key or Authorization: "
        "Bearer (prefer MRL_API_KEY to the flag: flags show in `ps`)",
    )
    public_docs: bool = Field(False, description="with an API key: still serve /docs and /openapi.json without it")
    writable: bool = Field(
        False,
        description="take document writes over HTTP (POST /documents, DELETE /documents/{id}, POST "
        "/documents/delete); one writable server per folder index",
    )
    write_key: SecretStr | None = Field(
        None,
        description="the key writes need (X-API-Key or Authorization: Bearer) when keys are used; it also searches",
        json_schema_extra={"cli": False},
    )
    max_write_documents: int = Field(64, gt=0, description="most documents in one write request")
    max_document_chars: int = Field(200_000, gt=0, description="longest document text a write may carry, in characters")
    compact_max_unmerged: int = Field(
        20_000, gt=0, description="compact a written folder index once this many passages are not yet in a version"
    )
    compact_max_age_s: float = Field(
        900.0, gt=0, description="or once its oldest unmerged write is this many seconds old"
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024, gt=0, description="largest request body; larger ones get 413 before they are read"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not received within this many seconds gets 408"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a whole request head within this many seconds is closed"
    )
    http: HttpProtocol = Field(
        "auto",
        description="HTTP parser: httptools (in C; auto picks it where it is installed) or h11 (pure Python); "
        "both keep the JSON errors, head deadline and limits",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this many seconds")
    max_header_bytes: int = Field(
        64 * 1024, ge=4096, description="largest request line plus headers; larger ones get 400"
    )
    log_queries: bool = Field(
        False, description="access log with query strings (they hold the search text: patient data in medical corpora)"
    )
    shutdown_timeout_s: float = Field(
        20.0,
        gt=0,
        description="after SIGTERM, requests still running this many seconds later are answered 503 and the server "
        "exits; keep it under the orchestrator's grace period (Kubernetes: 30 s)",
    )
    load_in_background: bool = Field(
        False, description="start answering at once (readyz 503 until loaded) instead of loading before listening"
    )

    host: str = Field("127.0.0.1", description="address uvicorn binds")
    port: int = Field(8000, ge=0, le=65535, description="port uvicorn binds")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line (with the request id) for collectors"
    )

    @field_validator("api_key", "milvus_token", "milvus_password", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("index", mode="before")
    @classmethod
    def _a_path_is_a_folder_locator(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _index_is_a_locator(self) -> ServiceSettings:
        if self.index is None:
            if self.model is None:
                raise ValueError(NOTHING_TO_SERVE)
            if self.backend is not None or self.milvus_uri is not None:
                raise ValueError("backend and milvus_uri name an index; give index milvus://HOST:PORT/NAME instead")
            return self
        if self.backend == "milvus" and not self.milvus_uri:
            raise ValueError("backend milvus needs milvus_uri; better: index milvus://HOST:PORT/NAME")
        if self.backend == "faiss" and self.milvus_uri:
            raise ValueError("milvus_uri is set but backend is faiss; better: index milvus://HOST:PORT/NAME")
        try:
            self.locator()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.writable and self.api_key is not None and self.write_key is None:
            raise ValueError("writable with an api_key needs a write_key (MRL_WRITE_KEY): writes take their own key")
        return self

    @property
    def serves_search(self) -> bool:
        """False when the service serves its model's embeddings only (``model`` without ``index``)."""
        return self.index is not None

    def locator(self) -> IndexLocator:
        """Where the served index is: ``index`` as a locator, or the deprecated ``backend`` + ``milvus_uri`` + name.

        Raises:
            ConfigError: Without an index (embeddings only).
        """
        if self.index is None:
            raise ConfigError("no index is served (embeddings only)")
        if self.backend == "milvus" or self.milvus_uri:
            return IndexLocator.milvus(self.milvus_uri or "", self.index)
        return parse_locator(self.index)

    @property
    def deprecated_spelling(self) -> str | None:
        """A one-line notice when the index is named the old way (``backend``/``milvus_uri``), else None."""
        if self.backend is None and self.milvus_uri is None:
            return None
        return deprecation_notice("--backend/MRL_BACKEND and --milvus-uri/MRL_MILVUS_URI", self.locator())

    def milvus_credentials(self) -> dict[str, str]:
        """``token``, ``user``, ``password`` for a Milvus index, from ``MRL_MILVUS_*``."""
        secrets = (self.milvus_token, self.milvus_password)
        token, password = (value.get_secret_value() if value else "" for value in secrets)
        return {"token": token, "user": self.milvus_user, "password": password}

    def onnx_cache_dir(self) -> Path:
        return self.onnx_cache or Path("~/.cache/mrl/onnx").expanduser()


def setting_flag_types(annotation: Any) -> tuple[type, list[str] | None]:
    """How a setting's type reads from a command line: ``(parse function, choices)``.

    ``X | None`` reads as ``X``, a ``Literal`` as its choices, a ``SecretStr`` as a string.
    """
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is Literal:
        return str, [str(value) for value in get_args(annotation)]
    if annotation is SecretStr:
        return str, None
    return annotation, None


def load_settings(**overrides: object) -> ServiceSettings:
    """Settings from the ``MRL_*`` environment, overridden by ``overrides``.

    Raises:
        ConfigError: For invalid or missing settings, all of them in one line.
    """
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"invalid settings ({problems}); use the flags or MRL_* variables") from None


def _problem(error: Any) -> str:
    """One validation error as ``field: message``; an error of the settings as a whole is its message alone."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message
