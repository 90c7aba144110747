"""``mrl index build|add|info|compact``: argument parsing and printing; the work is in build.py and loaded.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli_args import check_positive, config_fields, dims_argument
from core.errors import ConfigError
from core.readers import FieldMap
from index.locator import LOCATOR_FORMS, IndexLocator, deprecation_notice, parse_locator


def add_index_parser(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="build, extend and inspect indexes (FAISS folders, or Milvus)")
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="encode a corpus once, build one index per dimension",
        description="Encode a corpus once at full dimension; build one index per Matryoshka dimension; "
        "publish it as a new version of the index --index names: a folder (FAISS), milvus://HOST:PORT/NAME "
        "or milvus-lite://PATH/FILE.db/NAME (Milvus credentials from MRL_MILVUS_TOKEN, or MRL_MILVUS_USER "
        "and MRL_MILVUS_PASSWORD).",
    )
    build.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    add_field_arguments(build)
    add_locator_arguments(build, deprecated_output=True)
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="encode cache, kept: a rebuild of the same texts with the same model encodes nothing (default: "
        "INDEX/.encode-cache, or ~/.cache/mrl/encode-cache for Milvus, cleared after a successful build)",
    )
    build.add_argument("--model", default=None, help="model folder or hub name (default: all-MiniLM-L6-v2)")
    build.add_argument("--dims", type=dims_argument, default=None, help="default: the model's Matryoshka dims")
    build.add_argument(
        "--index-type",
        default=None,
        help="FAISS factory string for every dim, e.g. Flat, HNSW32,Flat, IVF1024,PQ32 "
        "(default: chosen from corpus size and memory budget)",
    )
    build.add_argument("--memory-budget-mb", type=int, default=4096, help="per-dimension budget (default: %(default)s)")
    build.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: %(default)s")
    build.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: %(default)s)")
    build.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that encode the corpus: one per GPU, or CPU processes sharing the cores (default: 1)",
    )
    build.add_argument("--max-seq-length", type=int, default=None, help="token limit (default: the model's)")
    build.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="split documents longer than this many tokens (title included) into passages, each returned with "
        "its place in the document (default: the model's window, 254 tokens for all-MiniLM-L6-v2; 0: never split, "
        "and documents longer than the window are counted and reported)",
    )
    build.add_argument(
        "--chunk-overlap", type=int, default=32, help="tokens each passage repeats of the one before (default: 32)"
    )
    build.add_argument("--keep-versions", type=int, default=3, help="finished versions to keep (default: %(default)s)")
    build.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="BEIR folder whose judged queries score every plan (dim, two-stage) on the new index, for "
        "quality targets (default: label-free agreement with the full dim, see --calibration)",
    )
    build.add_argument("--eval-split", default="test", help="qrels split of --eval-data (default: %(default)s)")
    build.add_argument(
        "--calibration",
        default="random",
        metavar="KIND",
        help="without labels, score every plan by its agreement with the full dim on pseudo-queries drawn from "
        "the corpus: random (a random sentence of a sampled passage), first (its first sentence), title (its "
        "title); none: skip (default: %(default)s; with --eval-data the agreement is recorded beside NDCG@10)",
    )
    build.add_argument(
        "--calibration-queries", type=int, default=200, help="pseudo-queries to draw (default: %(default)s)"
    )
    build.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    build.set_defaults(handler=run_build)

    add = actions.add_parser("add", help="append documents to an index without re-encoding the old ones")
    add.add_argument("--index", required=True, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    add.add_argument("--data", type=Path, required=True, help=f"the new documents: {DATA_HELP}")
    add_field_arguments(add)
    add.add_argument("--model", default=None, help="default: the model named in the manifest")
    add.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    add.add_argument("--batch-size", type=int, default=64)
    add.add_argument("--keep-versions", type=int, default=3)
    add.add_argument("--no-progress", dest="progress", action="store_false")
    add.set_defaults(handler=run_add)

    compact = actions.add_parser(
        "compact",
        help="merge an index's write-ahead log (upserts and deletes) into a new version",
        description="Replay the write-ahead log of a FAISS folder index and publish its live documents as a new "
        "version. Refused while a writable server owns the index (it compacts on its own). An index in Milvus "
        "takes its writes into its version: there is nothing to compact.",
    )
    compact.add_argument("--index", required=True, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    compact.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu", help="default: %(default)s")
    compact.add_argument("--keep-versions", type=int, default=3, help="finished versions to keep (default: 3)")
    compact.set_defaults(handler=run_compact)

    info = actions.add_parser("info", help="print an index's manifest as a table")
    info.add_argument("path", nargs="?", type=Path, default=None, help=argparse.SUPPRESS)  # deprecated: --index
    add_locator_arguments(info)
    info.add_argument("--check", action="store_true", help="also load every file and check it against the manifest")
    info.set_defaults(handler=run_info)


DATA_HELP = "a BEIR folder, a .jsonl/.csv/.parquet file, or a folder of .txt/.md/.html/.pdf files"


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """``--id-field``, ``--text-field``, ``--title-field``, ``--metadata-fields``: which fields of a .jsonl,
    .csv or .parquet record are what (a folder of files ignores them)."""
    fields = parser.add_argument_group(
        "record fields", "which JSON keys or columns of --data's records to read (ignored for a folder of files)"
    )
    fields.add_argument("--id-field", default="_id", help="the document id, unique (default: %(default)s)")
    fields.add_argument("--text-field", default="text", help="the text to encode and return (default: %(default)s)")
    fields.add_argument(
        "--title-field",
        default="title",
        help="the title, encoded with the text and returned (default: %(default)s, optional; a field named here "
        "must exist)",
    )
    fields.add_argument(
        "--metadata-fields",
        type=_names_argument,
        default=None,
        metavar="A,B,C",
        help="fields kept as each document's metadata, returned with hits (default: a JSON record's 'metadata' "
        "object; none for CSV and Parquet)",
    )


def _names_argument(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated field names, got {text!r}")
    return names


def field_map(args: argparse.Namespace) -> FieldMap:
    """The :class:`FieldMap` the record-field options name."""
    return FieldMap(args.id_field, args.text_field, args.title_field, args.metadata_fields)


def add_locator_arguments(parser: argparse.ArgumentParser, *, deprecated_output: bool = False) -> None:
    """``--index LOCATOR``, and the old spellings it replaces (kept for one release, with a notice)."""
    parser.add_argument("--index", default=None, metavar="LOCATOR", help=f"the index: {LOCATOR_FORMS}")
    if deprecated_output:
        parser.add_argument("--output", type=Path, default=None, help="deprecated: --index PATH")
    parser.add_argument("--backend", choices=["faiss", "milvus"], default=None, help="deprecated: say it in --index")
    parser.add_argument("--milvus-uri", default=None, help="deprecated: --index milvus://HOST:PORT/NAME")


def locator_from_args(args: argparse.Namespace) -> IndexLocator:
    """The index the options name: ``--index LOCATOR``, or an old spelling (with a one-line notice on stderr).

    Raises:
        ConfigError: No index named, or named twice.
    """
    output = getattr(args, "output", None) or getattr(args, "path", None)
    if args.backend == "milvus" or args.milvus_uri:
        if output is not None:
            raise ConfigError("name the index once: --index milvus://HOST:PORT/NAME")
        if not args.milvus_uri or not args.index:
            raise ConfigError(
                "--backend milvus needs --milvus-uri and --index NAME; better: --index milvus://HOST:PORT/NAME"
            )
        locator = IndexLocator.milvus(args.milvus_uri, args.index)
        _deprecated("--backend milvus --milvus-uri URI --index NAME", locator)
        return locator
    if output is not None:
        if args.index is not None:
            raise ConfigError("name the index once: --index LOCATOR")
        locator = IndexLocator.folder(output)
        _deprecated("--output PATH" if getattr(args, "output", None) else "a positional PATH", locator)
        return locator
    if args.index is None:
        raise ConfigError(f"--index is required: {LOCATOR_FORMS}")
    if args.backend == "faiss":
        _deprecated("--backend faiss", parse_locator(args.index))
    return parse_locator(args.index)


def _deprecated(spelling: str, locator: IndexLocator) -> None:
    """One line on stderr saying what to write instead (:func:`index.locator.deprecation_notice`)."""
    print(f"mrl: warning: {deprecation_notice(spelling, locator)}", file=sys.stderr)


def run_build(args: argparse.Namespace) -> int:
    from index.build import BuildConfig, build_index

    check_positive(
        args, ("memory_budget_mb", "batch_size", "keep_versions", "workers", "calibration_queries"), ("max_seq_length",)
    )
    locator = locator_from_args(args)
    skip = ("index", "output", "backend", "milvus_uri", "id_field", "text_field", "title_field", "metadata_fields")
    options = {k: v for k, v in config_fields(args).items() if k not in skip}
    # The locator itself, not its text: the text has no room for an old-style URI's credentials or path.
    where, manifest = build_index(BuildConfig(index=locator, fields=field_map(args), **options))
    print(info_table(manifest, where))
    return 0


def run_add(args: argparse.Namespace) -> int:
    from index.build import add_documents

    check_positive(args, ("batch_size", "keep_versions"))
    where, manifest = add_documents(
        parse_locator(args.index),
        args.data,
        args.model,
        batch_size=args.batch_size,
        device=args.device,
        keep_versions=args.keep_versions,
        progress=args.progress,
        fields=field_map(args),
    )
    print(f"added {manifest.history[-1]['added']} documents -> {where} ({manifest.num_vectors} in all)")
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from index.live import describe_compaction
    from index.stores import compact, open_store

    check_positive(args, ("keep_versions",))
    store = open_store(parse_locator(args.index))
    try:
        print(describe_compaction(*compact(store, device=args.device, keep_versions=args.keep_versions)))
    finally:
        store.close()
    return 0


def run_info(args: argparse.Namespace) -> int:
    from index.stores import open_store

    store = open_store(locator_from_args(args))
    try:
        version = store.current()
        manifest = store.manifest(version)
        if args.check:
            store.open(version, device="cpu", lease=False).close()
        print(info_table(manifest, store.where(version)))
        for line in store.info_lines(manifest):
            print(line)
        for other, state in sorted(store.versions().items()):
            if other != version:
                print(f"version {other}: {state}")
        if args.check:
            print("check: every part of the version loads and matches the manifest")
    finally:
        store.close()
    return 0


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.2f} MiB"


def _storage_line(manifest) -> str:
    if not manifest.files:  # kept in an engine
        return f"encoding  {manifest.encode_seconds:.1f} s; documents and vectors in {_engines(manifest)}"
    return (
        f"encoding  {manifest.encode_seconds:.1f} s; vectors.npy {_mib(manifest.files.get('vectors.npy', 0))}, "
        f"docs.sqlite {_mib(manifest.files.get('docs.sqlite', 0))}"
    )


def _chunking_line(manifest) -> str:
    if not manifest.chunking:
        return "one per document (built before passages were recorded)"
    from index.chunking import ChunkReport

    return ChunkReport.from_dict(manifest.chunking).describe()


def _engines(manifest) -> str:
    return ", ".join(sorted({entry.backend for entry in manifest.indexes.values()}))


def info_table(manifest, folder: Path | str) -> str:
    model = manifest.model
    ndcg = {}
    if manifest.evaluation:
        ndcg = {int(d): v.get("ndcg@10") for d, v in manifest.evaluation.get("by_dim", {}).items()}
    lines = [
        f"index     {folder}",
        f"version   {manifest.version} (built {manifest.built_at})",
        f"model     {model.name}  {model.fingerprint[:23]}…  full dim {model.full_dim}",
        f"prompts   query {model.query_prompt!r}, document {model.document_prompt!r}",
        f"vectors   {manifest.num_vectors}, {manifest.normalization}, {manifest.metric}",
        f"passages  {_chunking_line(manifest)}",
        _storage_line(manifest),
        "",
        "| dim | index | size | build s | search ms/query | recall@10 | NDCG@10 (training report) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dim in manifest.dims:
        entry = manifest.indexes[dim]
        recall = "exact" if entry.recall_at_10 is None else f"{entry.recall_at_10:.3f}"
        quality = f"{ndcg[dim]:.3f}" if ndcg.get(dim) is not None else "–"
        search = "–" if entry.search_ms is None else f"{entry.search_ms:.3f}"
        lines.append(
            f"| {dim} | {entry.factory} | {_mib(entry.bytes)} | {entry.build_seconds:.2f} | {search} | {recall} "
            f"| {quality} |"
        )
    if ndcg:
        from index.plans import report_source

        lines.append(f"NDCG@10 per dim: {report_source(manifest.evaluation)}")
    for event in manifest.history:
        if "compacted" in event:  # index.compaction: a live index's writes merged
            lines.append(f"compacted {event['compacted']} passages at {event['at']} (log seq {event['wal_seq']})")
        else:
            lines.append(f"added {event['added']} documents at {event['at']} from {event['source']}")
    return "\n".join(lines + plans_table(manifest))


def plans_table(manifest) -> list[str]:
    """The manifest's plans as Markdown rows, under where their quality comes from (none: no lines)."""
    from index.plans import Plan, quality_source

    plans = [Plan.from_dict(raw) for raw in manifest.plans]
    if not plans:
        return []
    _, source = quality_source(manifest, plans)
    lines = ["", f"plans, quality from {source}:", ""]
    lines += [
        "| plan | dim | re-score | candidates | NDCG@10 | agreement@10 | overlap@10 | min_quality figure | search ms "
        "| bytes/vector |"
    ]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for plan in plans:
        lines.append(
            f"| {plan.key} | {plan.dim} | {plan.rerank_dim or '–'} | "
            f"{f'{plan.candidates}× k' if plan.candidates else '–'} | {_value(plan.ndcg_at_10)} | "
            f"{_value(plan.agreement_at_10)} | {_value(plan.overlap_at_10)} | "
            f"{'–' if plan.ratio is None else f'{100 * plan.ratio:.1f}%'} | "
            f"{_value(plan.search_ms)} | {plan.bytes_per_vector:g} |"
        )
    return lines


def _value(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
