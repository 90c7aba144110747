"""Training strategies side by side: full fine-tuning, frozen lower layers, LoRA (and gradual unfreezing).

Every strategy trains on the same pairs of one BEIR folder with the same recipe (epochs,
batch, seed), each in its own ``mrl train`` process so that its peak memory is its own. The
base model and every tuned model then encode the in-domain test split and, when given, an
out-of-domain test split, once each at full dimension (cached like ``mrl bench quality``);
NDCG@10, MRR@10 and Recall@100 are computed at every Matryoshka dim from those vectors.

Per strategy the report has: quality per dim in domain, the change per dim out of domain
(what the tuning cost elsewhere: forgetting), trainable parameters, training time, the
resident-memory peak of training, and the size of what must be shipped (the adapter for
LoRA, the weights otherwise). A model already in ``--models-dir`` trained with the same
settings is reused, so a second run only re-scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import machine_info, markdown_row, save_figure, utc_now, write_report
from core.cli_args import add_output_argument
from core.data import DataError, RetrievalDataset, load_beir
from core.errors import ConfigError
from core.files import json_fields

logger = logging.getLogger(__name__)

STRATEGIES = ("full", "freeze", "lora", "gradual")
METRICS = ("ndcg@10", "mrr@10", "recall@100")
REPORT_STEM = "strategies"
TRACEBACK_LINES = 20  # of a crashed `mrl train`, kept in the error
# Learning rates per strategy: LoRA's few, zero-initialised weights need a higher rate than full tuning.
DEFAULT_LEARNING_RATES = {"full": 1e-4, "freeze": 1e-4, "lora": 5e-4, "gradual": 1e-4}
# Settings of a model's training report that must match for the model to be reused.
REUSE_KEYS = ("model", "train_split", "epochs", "learning_rate", "batch_size", "max_train_pairs", "seed",
              "freeze_layers", "lora", "lora_rank", "lora_alpha", "gradual_unfreeze")  # fmt: skip


@dataclass
class StrategiesBenchConfig:
    """What ``mrl bench strategies`` can be told."""

    data: Path | None = None  # in-domain BEIR folder: trained on its train split, scored on its test split
    ood: Path | None = None  # out-of-domain BEIR folder, scored on its test split (the forgetting check)
    strategies: list[str] = field(default_factory=lambda: ["full", "freeze", "lora"])
    models_dir: Path = Path("runs/models/strategies")
    base_model: str | None = None
    train_split: str = "train"
    split: str = "test"
    epochs: float = 2
    batch_size: int = 64
    max_train_pairs: int | None = None
    seed: int = 42
    learning_rates: dict[str, float] = field(default_factory=dict)  # default: DEFAULT_LEARNING_RATES
    freeze_layers: int = 3
    lora_rank: int = 16
    lora_alpha: float = 32
    max_queries: int | None = None  # per scored split, sampled by seed
    max_docs: int | None = None  # per scored corpus: every judged document of the kept queries, then sampled ones
    retrain: bool = False
    cache: Path | None = None  # default: OUT/cache
    progress: bool = True
    out: Path | None = None


def check_config(config: StrategiesBenchConfig) -> None:
    """Raises ConfigError or DataError for settings that cannot run, before anything is trained."""
    if config.data is None:
        raise ConfigError("--data is required (the in-domain BEIR folder)")
    for folder in (config.data, config.ood):
        if folder is not None and not (folder / "corpus.jsonl").is_file():
            raise DataError(folder, "not a BEIR folder (no corpus.jsonl)")
    unknown = [name for name in config.strategies if name not in STRATEGIES]
    if unknown or not config.strategies:
        raise ConfigError(f"--strategies takes some of {', '.join(STRATEGIES)}, got {','.join(config.strategies)}")
    for name, rate in config.learning_rates.items():
        if name not in STRATEGIES or rate <= 0:
            raise ConfigError(f"--lr takes STRATEGY=RATE with a strategy of {', '.join(STRATEGIES)} and a rate > 0")
    for name, value in {"--max-queries": config.max_queries, "--max-docs": config.max_docs,
                        "--max-train-pairs": config.max_train_pairs, "--epochs": config.epochs}.items():  # fmt: skip
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def learning_rate(config: StrategiesBenchConfig, strategy: str) -> float:
    return config.learning_rates.get(strategy, DEFAULT_LEARNING_RATES[strategy])


def train_arguments(config: StrategiesBenchConfig, strategy: str, output: Path) -> list[str]:
    """The ``mrl train`` command line of one strategy: the shared recipe plus the strategy's own flags."""
    assert config.data is not None
    args = ["train", "--data", str(config.data), "--output", str(output), "--eval-split", "none"]
    args += ["--train-split", config.train_split, "--epochs", str(config.epochs)]
    args += ["--batch-size", str(config.batch_size), "--seed", str(config.seed)]
    args += ["--lr", str(learning_rate(config, strategy))]
    if config.base_model:
        args += ["--model", config.base_model]
    if config.max_train_pairs:
        args += ["--max-train-pairs", str(config.max_train_pairs)]
    if strategy == "freeze":
        args += ["--freeze-layers", str(config.freeze_layers)]
    elif strategy == "lora":
        args += ["--lora", "--lora-rank", str(config.lora_rank), "--lora-alpha", str(config.lora_alpha)]
    elif strategy == "gradual":
        args += ["--gradual-unfreeze"]
    if not config.progress:
        args.append("--no-progress")
    return args


def expected_settings(config: StrategiesBenchConfig, strategy: str) -> dict[str, Any]:
    """The training-report settings a reusable model of ``strategy`` must have."""
    return {
        "model": config.base_model,
        "train_split": config.train_split,
        "epochs": config.epochs,
        "learning_rate": learning_rate(config, strategy),
        "batch_size": config.batch_size,
        "max_train_pairs": config.max_train_pairs,
        "seed": config.seed,
        "freeze_layers": config.freeze_layers if strategy == "freeze" else None,
        "lora": strategy == "lora",
        "lora_rank": config.lora_rank if strategy == "lora" else None,
        "lora_alpha": config.lora_alpha if strategy == "lora" else None,
        "gradual_unfreeze": strategy == "gradual",
    }


def read_training_report(folder: Path) -> dict[str, Any] | None:
    from training.train import REPORT_STEM as TRAINING_REPORT

    try:
        return json.loads((folder / f"{TRAINING_REPORT}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def settings_mismatch(report: dict[str, Any], config: StrategiesBenchConfig, strategy: str) -> list[str]:
    """Names of the settings in which an existing model's training differs from this run's recipe."""
    settings = report.get("settings", {})
    expected = expected_settings(config, strategy)
    if strategy != "lora":  # LoRA-only settings have defaults in every report; compare them for LoRA alone
        expected = {k: v for k, v in expected.items() if k not in ("lora_rank", "lora_alpha")}
    # A switch missing from an older report was off.
    differs = [k for k, v in expected.items() if settings.get(k, False if isinstance(v, bool) else None) != v]
    data = settings.get("data")
    assert config.data is not None
    if data is None or Path(data).resolve() != config.data.resolve():
        differs.append("data")
    return differs


def trained_model(config: StrategiesBenchConfig, strategy: str) -> tuple[Path, bool]:
    """The model folder of ``strategy``: reused when trained with the same settings, else trained now.

    Returns:
        The folder and whether it was trained by this run.

    Raises:
        ConfigError: An existing folder was trained differently (and ``--retrain`` is off), or ``mrl train``
            refused its settings or data (its one-line error is relayed).
        RuntimeError: ``mrl train`` crashed (the end of its traceback is in the message).
    """
    assert config.data is not None
    output = config.models_dir / f"{config.data.name}-{strategy}"
    report = read_training_report(output) if output.is_dir() else None
    if report is not None and not config.retrain:
        differs = settings_mismatch(report, config, strategy)
        if not differs:
            logger.info("%s: reusing %s", strategy, output)
            return output, False
        raise ConfigError(f"{output} was trained with other {', '.join(differs)}; pass --retrain to replace it")
    if output.exists() and not config.retrain:
        raise ConfigError(f"{output} exists but holds no training report; pass --retrain to replace it")
    command = [sys.executable, "-m", "mrl", *train_arguments(config, strategy, output)]
    if output.exists():
        command.append("--overwrite")
    logger.info("%s: training (%s)", strategy, " ".join(command[2:]))
    finished = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    if finished.returncode == 2:  # a known error: mrl printed it as its last line
        last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"training the {strategy} strategy failed: {last}")
    if finished.returncode != 0:  # a crash: keep the end of the traceback, which is what explains it
        tail = "\n".join(finished.stderr.strip().splitlines()[-TRACEBACK_LINES:]) or "no output"
        raise RuntimeError(f"training the {strategy} strategy crashed (exit {finished.returncode}):\n{tail}")
    return output, True


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def artifact(folder: Path, strategy: str) -> dict[str, Any]:
    """What has to be shipped: the adapter for LoRA (next to a base model users already have), else the weights."""
    from training.strategies import ADAPTER_FOLDER

    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if strategy == "lora":
        return {"kind": "adapter", "bytes": folder_bytes(folder / ADAPTER_FOLDER), "merged_weights_bytes": weights}
    return {"kind": "weights", "bytes": weights, "merged_weights_bytes": weights}


def strategy_facts(folder: Path, strategy: str) -> dict[str, Any]:
    """Parameters, time and memory from the model's training report; artifact sizes from its folder."""
    report = read_training_report(folder) or {}
    described = report.get("strategy", {})
    seconds = report.get("seconds", {})
    memory = report.get("training_memory") or {}
    return {
        "trainable_parameters": described.get("trainable_parameters"),
        "total_parameters": described.get("total_parameters"),
        "train_seconds": round(sum(v for k, v in seconds.items() if k.startswith("train_")), 1),
        "rss_peak_mb": memory.get("rss_peak_mb"),
        "rss_growth_mb": memory.get("rss_growth_mb"),
        "cuda_peak_allocated_mb": memory.get("cuda_peak_allocated_mb"),
        "training_pairs": report.get("data", {}).get("training_pairs"),
        "artifact": artifact(folder, strategy),
    }


# Scoring


def scored_subset(
    dataset: RetrievalDataset, split: str, max_queries: int | None, max_docs: int | None, seed: int
) -> RetrievalDataset:
    """The split with at most ``max_queries`` judged queries and ``max_docs`` documents, drawn by ``seed``.

    Every document judged for a kept query stays, so a kept query can still find its answers;
    the rest of the corpus budget is filled with documents drawn at random (distractors).
    Smaller corpora give higher absolute scores; comparisons within one report stay fair.
    """
    qrels = dataset.split(split)
    query_ids = list(qrels)
    rng = random.Random(seed)
    if max_queries is not None and len(query_ids) > max_queries:
        query_ids = sorted(rng.sample(query_ids, max_queries), key=list(qrels).index)
    kept_qrels = {qid: qrels[qid] for qid in query_ids}
    corpus = dataset.corpus
    if max_docs is not None and len(corpus) > max_docs:
        judged = {doc for docs in kept_qrels.values() for doc in docs if doc in corpus}
        others = [doc for doc in corpus if doc not in judged]
        drawn = set(rng.sample(others, max(0, max_docs - len(judged))))
        corpus = {doc: value for doc, value in corpus.items() if doc in judged or doc in drawn}
    queries = {qid: dataset.queries[qid] for qid in query_ids}
    return RetrievalDataset(dataset.root, corpus, queries, {split: kept_qrels})


def score_model(
    name_or_path: str | None, datasets: dict[str, RetrievalDataset], config: StrategiesBenchConfig
) -> tuple[dict[str, dict[int, dict[str, float]]], list[int]]:
    """Metrics per dim on each dataset for one model, from cached full-dimension vectors."""
    from benchmarks.quality import cache_folder, encode_dataset, load_scored_model
    from core.matryoshka import validate_dims
    from core.models import default_dims, read_model_card
    from training.evaluate import SplitEmbeddings, score_dims

    model, fingerprint = load_scored_model(name_or_path)
    full = model.get_embedding_dimension()
    card = read_model_card(Path(name_or_path)) if name_or_path and Path(name_or_path).is_dir() else None
    dims = validate_dims(list(card.dims) if card else default_dims(full), full)
    cache = cache_folder(config.cache, config.out)
    scores = {}
    for role, dataset in datasets.items():
        qrels = dataset.split(config.split)
        encoded = encode_dataset(model, fingerprint, dataset, list(qrels), cache, config.progress)
        vectors = SplitEmbeddings(encoded.doc_ids, encoded.docs, encoded.query_ids, encoded.queries, 0.0)
        by_dim = score_dims(vectors, qrels, dims)
        scores[role] = {dim: {m: round(values[m], 4) for m in METRICS} for dim, values in by_dim.items()}
        logger.info("%s on %s: NDCG@10 %s", name_or_path or "base", dataset.name,
                    ", ".join(f"{d}d {v['ndcg@10']:.3f}" for d, v in scores[role].items()))  # fmt: skip
    return scores, dims


def describe(dataset: RetrievalDataset, split: str, full: RetrievalDataset) -> dict[str, Any]:
    return {
        "name": dataset.name,
        "path": str(dataset.root),
        "split": split,
        "num_queries": len(dataset.split(split)),
        "num_documents": len(dataset.corpus),
        "subsampled": len(dataset.corpus) < len(full.corpus) or len(dataset.split(split)) < len(full.split(split)),
    }


def run_strategies(config: StrategiesBenchConfig) -> dict[str, Any]:
    """Train (or reuse) every strategy, score all of them and the base model; write the report into ``config.out``.

    Raises:
        ConfigError: Invalid settings, a model trained differently, or a training that was refused.
        RuntimeError: A training crashed.
        DataError: A missing or malformed dataset. ModelError: A model cannot load.
    """
    from core.models import DEFAULT_MODEL, resolve_model

    check_config(config)
    assert config.data is not None
    started_at, started = utc_now(), time.perf_counter()
    roles = {"in_domain": config.data} | ({"out_of_domain": config.ood} if config.ood else {})
    datasets, described = {}, {}
    for role, folder in roles.items():
        whole = load_beir(folder, [config.split])
        datasets[role] = scored_subset(whole, config.split, config.max_queries, config.max_docs, config.seed)
        described[role] = describe(datasets[role], config.split, whole)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
    folders = {name: trained_model(config, name) for name in config.strategies}

    base_name = resolve_model(config.base_model)
    base_scores, dims = score_model(str(base_name) if base_name else None, datasets, config)
    rows = [{"strategy": "base", "model": config.base_model or DEFAULT_MODEL, "scores": base_scores}]
    for name, (folder, trained_now) in folders.items():
        scores, _ = score_model(str(folder), datasets, config)
        row = {"strategy": name, "model": str(folder), "trained_now": trained_now, "scores": scores}
        rows.append(row | strategy_facts(folder, name))
    report = {
        "benchmark": "strategies",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 2),
        "settings": json_fields(config) | {"learning_rates": {s: learning_rate(config, s) for s in config.strategies}},
        "machine": machine_info(),
        "datasets": described,
        "dims": dims,
        "strategies": [jsonable(row) for row in rows],
    }
    if config.out is not None:
        write_report(report, config.out, REPORT_STEM, strategies_markdown)
        plot_strategies(report, config.out / f"{REPORT_STEM}.png")
    return report


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Dims as string keys, the way they come back from JSON, so a report reads the same before and after."""
    scores = {role: {str(dim): v for dim, v in by_dim.items()} for role, by_dim in row["scores"].items()}
    return row | {"scores": scores}


# Reading a report


def _ndcg(row: dict[str, Any], role: str, dim: int) -> float:
    return row["scores"][role][str(dim)]["ndcg@10"]


def _params(row: dict[str, Any]) -> str:
    trainable, total = row.get("trainable_parameters"), row.get("total_parameters")
    if trainable is None or not total:
        return "–"
    return f"{trainable / 1e6:.2f} M ({100 * trainable / total:.1f}%)"


def summary_table(report: dict[str, Any]) -> list[str]:
    """One row per strategy: cost columns, in-domain NDCG@10 per dim, out-of-domain change at the full and least dim."""
    dims = report["dims"]
    full, least = max(dims), min(dims)
    base = report["strategies"][0]
    ood = "out_of_domain" in report["datasets"]
    header = ["strategy", "trainable params", "train s", "peak RSS MB (+growth)", "artifact MB"]
    header += [f"in-domain {d}d" for d in dims]
    if ood:
        header += [f"OOD {full}d (change)", f"OOD {least}d (change)"]
    lines = [markdown_row(header), markdown_row(["---"] + ["---:"] * (len(header) - 1))]
    for row in report["strategies"]:
        tuned = row["strategy"] != "base"
        memory = f"{row['rss_peak_mb']:,.0f} (+{row['rss_growth_mb']:,.0f})" if row.get("rss_peak_mb") else "–"
        cells = [
            row["strategy"] if tuned else "base (untuned)",
            _params(row) if tuned else "0",
            f"{row['train_seconds']:.0f}" if tuned else "–",
            memory if tuned else "–",
            f"{row['artifact']['bytes'] / 1e6:.1f} ({row['artifact']['kind']})" if tuned else "–",
        ]
        cells += [f"{_ndcg(row, 'in_domain', d):.3f}" for d in dims]
        if ood:
            for d in (full, least):
                value = _ndcg(row, "out_of_domain", d)
                change = value - _ndcg(base, "out_of_domain", d)
                cells.append(f"{value:.3f} ({change:+.3f})" if tuned else f"{value:.3f}")
        lines.append(markdown_row(cells))
    return lines


def per_dim_table(report: dict[str, Any], role: str) -> list[str]:
    """NDCG@10 per dim (rows) and strategy (columns), each tuned cell with its change over the base model."""
    rows = report["strategies"]
    lines = [markdown_row(["dim"] + [r["strategy"] for r in rows]), markdown_row(["---:"] * (len(rows) + 1))]
    for dim in report["dims"]:
        base = _ndcg(rows[0], role, dim)
        cells = [str(dim), f"{base:.3f}"]
        cells += [f"{_ndcg(r, role, dim):.3f} ({_ndcg(r, role, dim) - base:+.3f})" for r in rows[1:]]
        lines.append(markdown_row(cells))
    return lines


def _dataset_line(info: dict[str, Any]) -> str:
    sample = " (sample: every judged document of the kept queries plus random others)" if info["subsampled"] else ""
    return f"`{info['name']}` split `{info['split']}`: {info['num_queries']:,} queries, " \
           f"{info['num_documents']:,} documents{sample}"  # fmt: skip


def strategies_markdown(report: dict[str, Any]) -> str:
    settings, datasets = report["settings"], report["datasets"]
    rates = ", ".join(f"{name} {rate:g}" for name, rate in settings["learning_rates"].items())
    first = next((r for r in report["strategies"] if r.get("training_pairs")), {})
    lines = [
        "# Training strategies side by side",
        "",
        f"- Trained on `{Path(settings['data']).name}` split `{settings['train_split']}`"
        + (f" ({first['training_pairs']} pairs)" if first else "")
        + f": {settings['epochs']:g} epochs, batch {settings['batch_size']}, seed {settings['seed']}; "
        f"learning rates {rates}; frozen layers {settings['freeze_layers']}; LoRA rank {settings['lora_rank']}, "
        f"alpha {settings['lora_alpha']:g}.",
        f"- In domain: {_dataset_line(datasets['in_domain'])}.",
    ]
    if "out_of_domain" in datasets:
        lines.append(f"- Out of domain (forgetting check): {_dataset_line(datasets['out_of_domain'])}.")
    lines += [
        f"- Machine: {report['machine']['cpus_usable']} CPUs, GPU: {report['machine']['gpu'] or 'none'}. "
        "Train s and peak memory are those of each strategy's own `mrl train` process (training stages only).",
        "- Artifact: what must be shipped; for LoRA the adapter, used with the base model (the merged model served "
        "by the index and service is the size of the full weights).",
        "",
        "## Summary (NDCG@10)",
        "",
        *summary_table(report),
        "",
        "## In domain, NDCG@10 per dim (change over the base model)",
        "",
        *per_dim_table(report, "in_domain"),
    ]
    if "out_of_domain" in datasets:
        lines += ["", "## Out of domain, NDCG@10 per dim (change over the base model)", ""]
        lines += per_dim_table(report, "out_of_domain")
    return "\n".join(lines) + "\n"


def plot_strategies(report: dict[str, Any], path: Path) -> Path:
    """NDCG@10 against dim per strategy: in domain on the left, out of domain on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in ("in_domain", "out_of_domain") if r in report["datasets"]]
    figure, axes = plt.subplots(1, len(roles), figsize=(6 * len(roles), 4.2), squeeze=False)
    dims = sorted(report["dims"])
    for axis, role in zip(axes[0], roles, strict=True):
        for row in report["strategies"]:
            style = {"linestyle": "--", "color": "grey"} if row["strategy"] == "base" else {"marker": "o"}
            axis.plot(dims, [_ndcg(row, role, d) for d in dims], label=row["strategy"], **style)
        info = report["datasets"][role]
        axis.set_title(f"{role.replace('_', '-')}: {info['name']} ({info['num_queries']} queries)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(dims, [str(d) for d in dims])
        axis.set_xlabel("embedding dim")
        axis.set_ylabel("NDCG@10")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Training strategies, trained on {Path(report['settings']['data']).name}")
    return save_figure(figure, path)


# Command line


def learning_rate_argument(text: str) -> tuple[str, float]:
    """argparse type for ``--lr lora=5e-4``."""
    name, sep, rate = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STRATEGY=RATE (e.g. lora=5e-4), got {text!r}") from None


def add_strategies_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``mrl bench strategies`` on the ``mrl bench`` sub-parsers."""
    from benchmarks.args import DEFAULT_OUT, name_list_argument

    defaults = StrategiesBenchConfig()
    rates = ",".join(f"{k}={v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
    p = actions.add_parser(
        "strategies",
        help="full fine-tuning vs frozen lower layers vs LoRA: NDCG@10 per dim, forgetting, parameters, time, memory",
        description="Train every strategy on the same pairs with the same recipe (each in its own `mrl train` "
        "process; a model already in --models-dir trained the same way is reused), score the base model and every "
        "tuned model at every dim in domain and on an out-of-domain dataset, and write strategies.json, "
        "strategies.md and strategies.png.",
    )
    p.add_argument("--data", type=Path, required=True, help="in-domain BEIR folder (train split, then test split)")
    p.add_argument("--ood", type=Path, default=None, help="out-of-domain BEIR folder for the forgetting check")
    p.add_argument("--strategies", type=name_list_argument, default=defaults.strategies,
                   help=f"some of {','.join(STRATEGIES)} (default: {','.join(defaults.strategies)})")  # fmt: skip
    p.add_argument("--models-dir", type=Path, default=defaults.models_dir,
                   help="tuned models, as DATASET-STRATEGY folders (default: %(default)s)")  # fmt: skip
    p.add_argument("--base-model", default=None, help="base model: hub name or local path (default: all-MiniLM-L6-v2)")
    p.add_argument("--train-split", default=defaults.train_split, help="default: %(default)s")
    p.add_argument("--split", default=defaults.split, help="qrels split scored on both datasets (default: test)")
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--max-train-pairs", type=int, default=None, help="train on N sampled pairs (default: all)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="training and sampling seed (default: 42)")
    p.add_argument("--lr", dest="learning_rates", type=learning_rate_argument, action="append", default=[],
                   metavar="STRATEGY=RATE", help=f"repeatable (default: {rates})")  # fmt: skip
    p.add_argument("--freeze-layers", type=int, default=defaults.freeze_layers,
                   help="layers frozen by the freeze strategy (default: %(default)s)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="default: %(default)s")
    p.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="default: %(default)g")
    p.add_argument("--max-queries", type=int, default=None, help="score N sampled queries per dataset (default: all)")
    p.add_argument("--max-docs", type=int, default=None, help="score against N documents per dataset: the judged "
                   "ones of the kept queries plus sampled others (default: the whole corpus)")  # fmt: skip
    p.add_argument("--retrain", action="store_true", help="train every strategy again, replacing its folder")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_output_argument(p, "report folder", default=DEFAULT_OUT / "strategies")
    p.set_defaults(handler=run_strategies_command)


def run_strategies_command(args: argparse.Namespace) -> int:
    from core.cli_args import config_fields

    fields = config_fields(args) | {"learning_rates": dict(args.learning_rates)}
    report = run_strategies(StrategiesBenchConfig(**fields))
    print(strategies_markdown(report), end="")
    print(f"wrote {REPORT_STEM}.json, {REPORT_STEM}.md, {REPORT_STEM}.png to {args.out}")
    return 0
