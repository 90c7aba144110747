"""``mrl bench``: collects the parser each benchmark module registers for itself."""

from __future__ import annotations

import argparse

from benchmarks.agreement import add_agreement_parser
from benchmarks.backends import add_backends_parser
from benchmarks.curves import add_curves_parser
from benchmarks.encoders import add_encoders_parser
from benchmarks.fairness import add_fairness_parser
from benchmarks.formats import add_formats_parser
from benchmarks.latency import add_latency_parser
from benchmarks.passages import add_passages_parser
from benchmarks.peers import add_peers_parser
from benchmarks.quality import add_quality_parser
from benchmarks.recipes import add_recipes_parser
from benchmarks.scaling import add_scaling_parser
from benchmarks.search_quality import add_two_stage_parser
from benchmarks.strategies import add_strategies_parser
from benchmarks.writes import add_writes_parser


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks: quality per dim, HTTP latency, encoders, search scaling, peers, training strategies"
    )
    actions = bench.add_subparsers(dest="action", required=True, metavar="BENCHMARK")
    add_quality_parser(actions)
    add_recipes_parser(actions)
    add_latency_parser(actions)
    add_fairness_parser(actions)
    add_two_stage_parser(actions)
    add_encoders_parser(actions)
    add_scaling_parser(actions)
    add_peers_parser(actions)
    add_strategies_parser(actions)
    add_backends_parser(actions)
    add_passages_parser(actions)
    add_writes_parser(actions)
    add_agreement_parser(actions)
    add_curves_parser(actions)
    add_formats_parser(actions)
