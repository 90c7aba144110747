"""What every benchmark's command line shares: the report folder, list arguments, server limits.

Each benchmark module registers its own ``mrl bench`` parser with these; ``benchmarks.cli``
only collects them, so no benchmark imports the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("runs/bench")


def int_list_argument(text: str) -> list[int]:
    """argparse type for ``--concurrency 1,16``: comma-separated integers."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def name_list_argument(text: str) -> list[str]:
    """argparse type for ``--encoders torch,onnx``: comma-separated names (checked by the benchmark)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_server_limits(p: argparse.ArgumentParser, time_limit_s: float) -> None:
    """``--time-limit`` and ``--ready-timeout``: the bounds of every benchmark that starts servers."""
    p.add_argument("--time-limit", dest="time_limit_s", metavar="SECONDS", type=float, default=time_limit_s,
                   help=f"seconds; no request is sent after it ({time_limit_s:g})")  # fmt: skip
    p.add_argument("--ready-timeout", dest="ready_timeout_s", metavar="SECONDS", type=float, default=300.0,
                   help="seconds per server start (300)")  # fmt: skip
