"""argparse helpers every command line uses: the ``--dims`` type, option checks, config fields."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import ConfigError
from core.matryoshka import DimensionError, parse_dims


def dims_argument(text: str) -> list[int]:
    """argparse type for ``--dims``: the parse error becomes argparse's own usage message."""
    try:
        return parse_dims(text)
    except DimensionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def weights_argument(text: str) -> list[float]:
    """argparse type for a comma-separated list of numbers such as ``--dim-weights 1,1,2,4``."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def config_fields(args: argparse.Namespace) -> dict:
    """The parsed options of a subcommand, without argparse's routing entries, for a config dataclass."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "action", "handler", "verbose")}


def check_positive(args: argparse.Namespace, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse a non-positive numeric option (``optional`` ones only when given), naming it.

    Raises:
        ConfigError: For the first option that is zero or negative.
    """
    for name in (*required, *(n for n in optional if getattr(args, n) is not None)):
        value = getattr(args, name)
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def add_output_argument(
    parser: argparse.ArgumentParser, help_text: str, *, dest: str = "out", default: Path | None = None
) -> None:
    """``--output`` (alias ``--out``): where a command writes, one spelling for every command.

    Without ``default`` the option is required.
    """
    shown = f" (default: {default})" if default is not None else ""
    parser.add_argument(
        "--output",
        "--out",
        dest=dest,
        type=Path,
        metavar="FOLDER",
        required=default is None,
        default=default,
        help=help_text + shown,
    )
