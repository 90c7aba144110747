"""The project's own modules, by dotted name, read from the source tree (for the architecture checks)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "training", "index", "service", "benchmarks", "mrl")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def cli_commands() -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the ``mrl`` command line with its path (``("bench", "latency")``), the top one first."""
    from mrl.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator:
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))

    return walk(build_parser(), ())
