"""``mrl serve``: argument parsing only; flags override ``MRL_*`` environment variables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Flags whose value goes straight into ServiceSettings under the same name (None = not given).
SETTING_FLAGS = (
    "index",
    "model",
    "host",
    "port",
    "default_dim",
    "encoder",
    "onnx_quantize",
    "onnx_cache",
    "encoder_threads",
    "device",
    "api_key",
    "max_k",
    "max_query_chars",
    "max_batch_queries",
    "max_in_flight",
    "batch_max_size",
    "batch_max_wait_ms",
    "snippet_chars",
    "load_in_background",
    "log_level",
)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an index over HTTP (search, embeddings, metrics)",
        description="Serve GET/POST /search, POST /v1/embeddings, /dims, /healthz, /readyz, /metrics. "
        "Every flag can also be set as an MRL_* environment variable (e.g. MRL_INDEX, MRL_API_KEY); flags win.",
    )
    p.add_argument(
        "--index", type=Path, default=None, help="index root (serves `current`) or version folder [MRL_INDEX]"
    )
    p.add_argument("--model", default=None, help="model folder or hub name (default: the one in the manifest)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: 8000)")
    p.add_argument("--default-dim", type=int, default=None, help="dim of requests that name none (default: largest)")
    p.add_argument("--encoder", choices=["torch", "onnx"], default=None, help="query encoder backend (default: torch)")
    p.add_argument("--onnx-quantize", action="store_true", default=None, help="ONNX: int8 dynamic quantisation")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: ~/.cache/mrl/onnx)")
    p.add_argument("--encoder-threads", type=int, default=None, help="CPU threads for the encoder")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default=None, help="encoder and FAISS (default: auto)")
    p.add_argument("--api-key", default=None, help="require X-API-Key (prefer MRL_API_KEY: flags show in `ps`)")
    p.add_argument("--max-k", type=int, default=None, help="largest k a request may ask for (default: 100)")
    p.add_argument("--max-query-chars", type=int, default=None, help="longest query in characters (default: 2000)")
    p.add_argument("--max-batch-queries", type=int, default=None, help="most queries per request (default: 64)")
    p.add_argument("--max-in-flight", type=int, default=None, help="requests in flight before 429 (default: 256)")
    p.add_argument("--batch-max-size", type=int, default=None, help="texts per encoder micro-batch (default: 32)")
    p.add_argument("--batch-max-wait-ms", type=float, default=None, help="micro-batch wait in ms (default: 2)")
    p.add_argument("--snippet-chars", type=int, default=None, help="cut hit texts to this length; 0: whole")
    p.add_argument(
        "--load-in-background", action="store_true", default=None, help="listen at once; readyz 503 until loaded"
    )
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None)
    p.set_defaults(handler=run_serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServiceSettings from the environment, overridden by the flags that were given.

    Raises:
        ValueError: For invalid or missing settings, in one line.
    """
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}" for error in exc.errors()
        )
        raise ValueError(f"invalid settings ({problems}); use the flags or MRL_* variables") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from index.layout import resolve_version
    from index.manifest import IndexManifest
    from service.app import create_app

    settings = settings_from_args(args)
    IndexManifest.read(resolve_version(settings.index))  # a wrong path fails here, in one line
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0
