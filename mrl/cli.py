"""``mrl <command>``: builds the parser from each stage and turns known errors into one line.

Known failures (bad data, an unknown model, a wrong dimension, an existing output: every
``core.errors.MrlError``) end with exit code 2 and a single ``mrl: error: ...`` line; only a
bug shows a traceback (a ``ValueError`` raised anywhere else is a bug, and its traceback is
what explains it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mrl import __version__


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import add_bench_parser
    from index.cli import add_index_parser
    from service.cli import add_serve_parser
    from training.cli import add_adapt_parser, add_eval_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="mrl", description="Matryoshka retrieval: train, evaluate, index, serve.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands)
    add_eval_parser(commands)
    add_adapt_parser(commands)
    add_index_parser(commands)
    add_serve_parser(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Quiet the libraries' own chatter; our progress bars and log lines say what is happening.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "filelock", "faiss", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from core.errors import MrlError

    try:
        return args.handler(args)
    except MrlError as exc:
        if args.verbose:
            raise
        print(f"mrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mrl: interrupted", file=sys.stderr)
        return 130
