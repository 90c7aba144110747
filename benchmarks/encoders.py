"""Query encoder speed: torch vs ONNX Runtime vs ONNX int8, one text per call and in batches.

Each backend is loaded exactly as the service loads it (``service.encoders.load_encoder``
with an index's manifest, or the same steps with the model's own prompts when no index is
given), one backend at a time, with the same thread count for torch and ONNX Runtime. For
every (backend, batch size) a few unmeasured warm-up calls come first; then a fixed list of
query texts is encoded in calls of that batch size, each call timed. Speeds are compared
with torch at batch size 1 measured in the same run.

The embeddings of the largest batch size are kept to check quality: for every text, the
cosine between a backend's embedding and torch's (both by ``truncate_normalize``, at every
Matryoshka dim). ONNX in float32 should agree to rounding; int8 quantisation drifts.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import (
    ENCODERS,
    encoder_settings,
    format_ms,
    machine_info,
    markdown_row,
    read_query_texts,
    utc_now,
    write_report,
)
from core.cli_args import add_output_argument
from core.errors import ConfigError
from core.files import json_fields
from core.machine import usable_cpus
from core.matryoshka import truncate_normalize

if TYPE_CHECKING:
    from index.manifest import IndexManifest
    from service.encoders import LoadedEncoder
    from service.settings import ServiceSettings

# The service's encoders, and torch with bfloat16 weights (asked for by name: on a CPU it is slow).
BENCH_ENCODERS = (*ENCODERS, "torch-bf16")
logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
REFERENCE = ("torch", 1)  # speeds are compared with torch encoding one text per call


@dataclass
class EncodersConfig:
    """What ``mrl bench encoders`` can be told."""

    queries: Path
    model: str | None = None  # default: the index's model, else the project's default model
    index: Path | None = None  # its manifest gives the model, prompts and token limit
    encoders: list[str] = field(default_factory=lambda: list(ENCODERS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    texts: int = 256  # measured texts per cell (the file's queries, cycled when it has fewer)
    warmup: int = 3  # unmeasured calls per cell
    threads: int | None = None  # torch and ONNX Runtime threads; default: every CPU this process may use
    device: str = "auto"
    onnx_cache: Path | None = None  # default: the service's (~/.cache/mrl/onnx)
    out: Path | None = None


@dataclass
class CellResult:
    """One backend at one batch size."""

    encoder: str
    batch_size: int
    texts: int
    calls: int
    seconds: float  # all measured calls together
    queries_per_s: float
    ms_per_query: float
    p50_ms: float  # per call
    p95_ms: float
    mean_ms: float
    speedup_vs_torch_batch1: float | None = None  # queries/s ÷ torch's at batch size 1


def check_config(config: EncodersConfig) -> None:
    """Raises ConfigError for a count that is not positive, an unknown encoder or an unknown device."""
    for name, value in {"--texts": config.texts, "--threads": config.threads}.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {config.warmup}")
    if not config.batch_sizes or min(config.batch_sizes) < 1:
        raise ConfigError(f"--batch-sizes must list positive numbers, got {config.batch_sizes}")
    unknown = [name for name in config.encoders if name not in BENCH_ENCODERS]
    if unknown or not config.encoders:
        raise ConfigError(f"unknown encoders {unknown} (choose from {', '.join(BENCH_ENCODERS)})")
    if config.device not in DEVICES:
        raise ConfigError(f"unknown device {config.device!r} (choose from {', '.join(DEVICES)})")


def benchmark_texts(texts: list[str], count: int) -> list[str]:
    """``count`` texts: ``texts`` in order, cycled when there are fewer."""
    return [texts[number % len(texts)] for number in range(count)]


# --- loading --------------------------------------------------------------------------------


def service_settings(config: EncodersConfig, encoder: str, threads: int) -> ServiceSettings:
    """The service's settings for one backend of this benchmark."""
    from service.settings import load_settings

    return load_settings(
        index=config.index or Path("."),  # read only by the service; the manifest is passed in here
        model=config.model,
        device=config.device,
        **encoder_settings(encoder),
        onnx_cache=config.onnx_cache,
        encoder_threads=threads,
        batch_max_size=max(config.batch_sizes),  # one call of any measured batch size is one forward pass
    )


def open_encoder(settings: ServiceSettings, manifest: IndexManifest | None) -> LoadedEncoder:
    """The service's encoder: ``load_encoder`` with the index's manifest, else the same steps without one.

    Without a manifest the model keeps its own prompts (from its ``mrl.json``) and token limit.

    Raises:
        ModelError: The model cannot be loaded. EncoderError: ONNX Runtime cannot run it.
    """
    from core.models import DEFAULT_MODEL, load_model, model_dims, model_fingerprint
    from service.encoders import LoadedEncoder, load_encoder, serving_encoder

    if manifest is not None:
        return load_encoder(settings, manifest)
    model = load_model(settings.model, device={"cpu": "cpu", "gpu": "cuda"}.get(settings.device))
    if settings.encoder_threads:
        import torch

        torch.set_num_threads(settings.encoder_threads)
    fingerprint = model_fingerprint(model)
    name = settings.model or DEFAULT_MODEL
    encoder = serving_encoder(model, name, fingerprint, settings)
    return LoadedEncoder(encoder, fingerprint, settings.encoder, dims=model_dims(model, name))


def to_bfloat16(loaded: LoadedEncoder) -> None:
    """Run a torch encoder's weights in bfloat16 (tensor cores on a GPU; slow, but correct, on most CPUs).

    The embeddings come back as float32, so the drift against float32 torch is measured like ONNX int8's.
    """
    import torch

    loaded.encoder.model.to(torch.bfloat16)


def _manifest(config: EncodersConfig) -> IndexManifest | None:
    if config.index is None:
        return None
    from index.stores import current_manifest

    return current_manifest(config.index)


# --- measuring ------------------------------------------------------------------------------


def measure_cell(
    encoder: Any, name: str, texts: list[str], batch_size: int, warmup: int
) -> tuple[CellResult, np.ndarray]:
    """Encode ``texts`` in calls of ``batch_size`` after ``warmup`` unmeasured calls; time every call.

    Returns:
        The result and the embeddings of ``texts``, in order.
    """
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    for number in range(warmup):
        encoder.encode_queries(batches[number % len(batches)])
    seconds = np.empty(len(batches))
    embeddings = []
    for number, batch in enumerate(batches):
        started = time.perf_counter()
        embeddings.append(encoder.encode_queries(batch))
        seconds[number] = time.perf_counter() - started
    total = float(seconds.sum())
    p50, p95 = np.percentile(seconds, [50, 95])
    result = CellResult(
        encoder=name,
        batch_size=batch_size,
        texts=len(texts),
        calls=len(batches),
        seconds=round(total, 4),
        queries_per_s=round(len(texts) / total, 2),
        ms_per_query=_ms(total / len(texts)),
        p50_ms=_ms(p50),
        p95_ms=_ms(p95),
        mean_ms=_ms(seconds.mean()),
    )
    return result, np.concatenate(embeddings)


def _ms(seconds: float) -> float:
    return round(1000 * float(seconds), 4)


def cosine_drift(reference: np.ndarray, vectors: np.ndarray, dims: list[int]) -> dict[str, dict[str, float]]:
    """Per dim: the largest and the mean ``|1 − cos|`` between each text's two embeddings."""
    drift = {}
    for dim in dims:
        cosines = np.sum(truncate_normalize(reference, dim) * truncate_normalize(vectors, dim), axis=1)
        difference = np.abs(1.0 - cosines.astype(np.float64))
        drift[str(dim)] = {"max": _significant(difference.max()), "mean": _significant(difference.mean())}
    return drift


def _significant(value: float) -> float:
    return float(f"{float(value):.3g}")


def add_speedups(results: list[CellResult]) -> None:
    """Each cell's queries/s ÷ torch's at batch size 1, when that cell was measured."""
    reference = next((r for r in results if (r.encoder, r.batch_size) == REFERENCE), None)
    for result in results:
        if reference is not None:
            result.speedup_vs_torch_batch1 = round(result.queries_per_s / reference.queries_per_s, 2)


# --- the whole run --------------------------------------------------------------------------


def run_encoders(config: EncodersConfig) -> dict[str, Any]:
    """Measure every backend at every batch size, one backend loaded at a time.

    Returns:
        The report: settings, machine, model, threads, one entry per (encoder, batch size), and
        per backend its load time and embedding drift from torch. Written as ``encoders.json``
        and ``encoders.md`` into ``config.out`` when it is set.

    Raises:
        ConfigError: Invalid settings. DataError: Missing or bad queries file. IndexFolderError: Bad
        --index. ModelError, EncoderError: The model cannot be loaded or exported.
    """
    check_config(config)
    texts = benchmark_texts(read_query_texts(config.queries), config.texts)
    manifest = _manifest(config)
    threads = config.threads or usable_cpus()
    started_at, started = utc_now(), time.perf_counter()
    results: list[CellResult] = []
    backends: dict[str, dict[str, Any]] = {}
    embeddings: dict[str, np.ndarray] = {}
    model: dict[str, Any] = {}
    for name in config.encoders:
        loading = time.perf_counter()
        loaded = open_encoder(service_settings(config, name, threads), manifest)
        if name == "torch-bf16":
            to_bfloat16(loaded)
        backends[name] = {"load_s": round(time.perf_counter() - loading, 2), **_runtime(loaded)}
        model = model or _model_dict(loaded, manifest)
        for batch_size in sorted(set(config.batch_sizes)):
            result, embeddings[name] = measure_cell(loaded.encoder, name, texts, batch_size, config.warmup)
            logger.info(
                "%s, batch %d: %.1f queries/s, p50 %s ms per call",
                name,
                batch_size,
                result.queries_per_s,
                format_ms(result.p50_ms),
            )
            results.append(result)
        del loaded
        gc.collect()
    add_speedups(results)
    if "torch" in embeddings:
        for name, vectors in embeddings.items():
            if name != "torch":
                backends[name]["cosine_drift_vs_torch"] = cosine_drift(embeddings["torch"], vectors, model["dims"])
    report = {
        "benchmark": "encoders",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 2),
        "settings": _settings_dict(config, threads, len(set(texts))),
        "machine": machine_info(),
        "model": model,
        "encoders": backends,
        "results": [asdict(result) for result in results],
    }
    if config.out is not None:
        write_encoders_report(report, config.out)
    return report


def _runtime(loaded: LoadedEncoder) -> dict[str, Any]:
    """Where a loaded backend runs and with how many threads."""
    import torch

    runtime: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if loaded.backend == "torch":
        runtime["device"] = str(loaded.encoder.model.device)
    return runtime


def _model_dict(loaded: LoadedEncoder, manifest: IndexManifest | None) -> dict[str, Any]:
    """The measured model, read from whichever backend was loaded first (ONNX runs without the torch model)."""
    encoder = loaded.encoder
    dims = list(manifest.dims) if manifest is not None else list(loaded.dims or [])
    return {
        "name": encoder.name,
        "fingerprint": loaded.fingerprint,
        "full_dim": encoder.dimension,
        "dims": sorted(dims, reverse=True),
        "query_prompt": encoder.prompts.get("query", ""),
        "max_seq_length": encoder.max_seq_length,
    }


def _settings_dict(config: EncodersConfig, threads: int, distinct: int) -> dict[str, Any]:
    settings = json_fields(config)
    return {**settings, "threads": threads, "distinct_texts": distinct, "batch_sizes": sorted(set(config.batch_sizes))}


# --- the report -----------------------------------------------------------------------------


def write_encoders_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``encoders.json`` and ``encoders.md`` in ``folder``, each written atomically."""
    return write_report(report, folder, "encoders", encoders_markdown)


def speed_table(report: dict[str, Any]) -> str:
    header = ["encoder", "batch", "calls", "queries/s", "ms/query", "p50 ms/call", "p95 ms/call", "× torch batch 1"]
    lines = [markdown_row(header), markdown_row(["---", *["---:"] * (len(header) - 1)])]
    for row in report["results"]:
        speedup = row["speedup_vs_torch_batch1"]
        cells = [row["encoder"], str(row["batch_size"]), str(row["calls"]), f"{row['queries_per_s']:.1f}"]
        cells += [format_ms(row[name]) for name in ("ms_per_query", "p50_ms", "p95_ms")]
        cells.append(f"{speedup:.2f}×" if speedup is not None else "–")
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def drift_table(report: dict[str, Any]) -> str:
    """Largest ``|1 − cos|`` to torch per backend and dim (mean in brackets)."""
    dims = [str(dim) for dim in report["model"]["dims"]]
    lines = [markdown_row(["encoder", *(f"dim {d}" for d in dims)]), markdown_row(["---", *["---:"] * len(dims)])]
    for name, backend in report["encoders"].items():
        drift = backend.get("cosine_drift_vs_torch")
        if drift:
            lines.append(markdown_row([name, *(f"{drift[d]['max']:.2e} ({drift[d]['mean']:.1e})" for d in dims)]))
    return "\n".join(lines)


def encoders_markdown(report: dict[str, Any]) -> str:
    """Title, context, the speed table and (when torch was measured) the drift table."""
    settings, machine, model = report["settings"], report["machine"], report["model"]
    context = (
        f"Model `{model['name']}` (full dim {model['full_dim']}); {settings['texts']} query texts per cell "
        f"({settings['distinct_texts']} distinct, from `{settings['queries']}`) after {settings['warmup']} warm-up "
        f"calls. Torch and ONNX Runtime threads: {settings['threads']} of {machine['cpus_usable']} usable CPUs, "
        f"device {settings['device']}, GPU {machine['gpu'] or 'none'}, load average {machine['load_average_1m']} at "
        "the start. p50/p95 are per call (one call encodes `batch` texts)."
    )
    parts = ["# Query encoder speed", "", context, "", speed_table(report)]
    if any("cosine_drift_vs_torch" in backend for backend in report["encoders"].values()):
        parts += ["", "## Embedding drift vs torch", "", "Largest |1 − cos| over the texts (mean in brackets).", ""]
        parts.append(drift_table(report))
    return "\n".join(parts) + "\n"


# --- command line ---------------------------------------------------------------------------


def add_encoders_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``mrl bench encoders`` on the ``mrl bench`` sub-parsers."""
    from benchmarks.args import DEFAULT_OUT, int_list_argument, name_list_argument

    p = actions.add_parser(
        "encoders",
        help="query encoder speed: torch vs ONNX vs ONNX int8, one text per call and batched",
        description="Load each query encoder backend as the service does, encode a fixed number of query texts at "
        "every batch size after a warm-up, and report queries/s, per-call p50/p95 latency, the speed-up over torch "
        "at batch size 1, and how far ONNX and int8 embeddings drift from torch's.",
    )
    p.add_argument("--queries", type=Path, required=True, help="BEIR folder (its queries.jsonl) or a queries .jsonl")
    p.add_argument(
        "--model", default=None, help="model folder or hub name (default: the index's, else all-MiniLM-L6-v2)"
    )
    p.add_argument(
        "--index", default=None, metavar="LOCATOR", help="the index (a folder or Milvus): its model, prompts, dims"
    )
    p.add_argument(
        "--encoders",
        type=name_list_argument,
        default=list(ENCODERS),
        help=f"backends: {', '.join(BENCH_ENCODERS)} (default: {', '.join(ENCODERS)})",
    )
    p.add_argument("--batch-sizes", type=int_list_argument, default=[1, 32], help="texts per call (default: 1,32)")
    p.add_argument("--texts", type=int, default=256, help="measured texts per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per cell (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: usable CPUs)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: %(default)s")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX export folder (default: the service's)")
    add_output_argument(p, "report folder", default=DEFAULT_OUT)
    p.set_defaults(handler=run_encoders_command)


def run_encoders_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    report = run_encoders(EncodersConfig(**config_fields(args)))
    print(encoders_markdown(report), end="")
    print(f"wrote {args.out / 'encoders.json'}, {args.out / 'encoders.md'}")
    return 0
