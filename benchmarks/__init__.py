"""Benchmarks of the running system: HTTP latency of the real server, and two-stage search quality.

``benchmarks`` may import ``core`` and every stage (``training``, ``index``, ``service``); only the
``mrl bench`` command imports it. What both benchmarks share lives here: the description of
the machine a result was measured on, and Markdown table rows.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from core.machine import usable_cpus

# Query encoder backends a benchmark can run: the service's two, ONNX with int8 quantisation, and ONNX
# with padded batches instead of packed rows (the service's float32 ONNX on CPU packs by default).
ENCODERS = ("torch", "onnx", "onnx-int8", "onnx-padded")


def encoder_settings(encoder: str) -> dict[str, Any]:
    """The service settings that select the benchmark's ``encoder`` (one of :data:`ENCODERS`)."""
    settings: dict[str, Any] = {"encoder": "onnx" if encoder.startswith("onnx") else "torch"}
    if encoder == "onnx-int8":
        settings["onnx_quantize"] = True
    if encoder == "onnx-padded":
        settings["onnx_pack_tokens"] = 0
    return settings


# Versions recorded on top of index.build.library_versions() (read from package metadata, not imported).
SERVING_PACKAGES = ("transformers", "fastapi", "uvicorn", "aiohttp", "onnxruntime", "onnxruntime-gpu", "onnx")


def read_query_texts(path: Path) -> list[str]:
    """Query texts from a BEIR folder's ``queries.jsonl`` (or from such a file itself), in file order.

    Raises:
        DataError: Missing or malformed file.
    """
    from core.data import load_queries

    file = path / "queries.jsonl" if path.is_dir() else path
    return list(load_queries(file).values())


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: CPUs, load, platform, GPU and library versions.

    The load average is recorded because latency on a shared machine says little without it.
    """
    from index.build import library_versions

    versions = library_versions()
    for package in SERVING_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": _gpu_name(),
        "libraries": versions,
    }


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_ms(value: float | None) -> str:
    """Milliseconds for a table: three significant decimals below 10 ms, one above; ``–`` for none."""
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def write_report(
    report: dict[str, Any], folder: Path, stem: str, markdown: Callable[[dict[str, Any]], str]
) -> list[Path]:
    """``<stem>.json`` and ``<stem>.md`` (rendered by ``markdown``) in ``folder``, each written atomically."""
    from core.files import write_json_atomic, write_text_atomic

    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json_atomic(json_path, report)
    write_text_atomic(md_path, markdown(report))
    return [json_path, md_path]


def save_figure(figure: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a temporary file beside ``path``, then a rename); close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.tmp.png")
    try:
        figure.savefig(partial, dpi=110, bbox_inches="tight")
        partial.replace(path)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return path
