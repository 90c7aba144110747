"""Matryoshka fine-tuning: MatryoshkaLoss over a cached in-batch-negatives ranking loss.

The cached loss (GradCache) is the point: with in-batch negatives every other passage in
the batch is a negative, so the batch size *is* the number of negatives. Gradient
accumulation does not enlarge it; ``CachedMultipleNegativesRankingLoss`` does, in bounded
memory, by embedding mini-batches without graphs first and back-propagating per mini-batch.
"""

from __future__ import annotations

import logging
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.data import DataError, Pair, RetrievalDataset, load_beir, load_pairs
from training.evaluate import EvalResult, evaluate
from training.files import publish_dir, staging_dir, write_json_atomic, write_text_atomic
from training.matryoshka import default_dims, validate_dims
from training.models import (
    DEFAULT_MODEL,
    DOCUMENT_PROMPT,
    QUERY_PROMPT,
    MatryoshkaCard,
    SentenceTransformerEncoder,
    embedding_dimension,
    load_model,
)
from training.report import comparison_table, detail_table, plot_ndcg
from training.strategies import (
    ADAPTER_FOLDER,
    LoraAdapter,
    apply_strategy,
    check_strategy_options,
    learning_rate_mapping,
    merge_lora,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

logger = logging.getLogger(__name__)

REPORT_STEM = "training_report"


@dataclass
class TrainConfig:
    """Everything ``mrl train`` can be told. Defaults are the measured SciFact recipe (see README)."""

    data: Path
    output: Path
    model: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    eval_data: Path | None = None
    dims: list[int] | None = None
    epochs: float = 5
    learning_rate: float = 1e-4
    batch_size: int = 64
    mini_batch_size: int = 32
    max_seq_length: int | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None
    warmup_ratio: float = 0.1
    seed: int = 42
    hard_negatives: bool = False
    hard_negative_epochs: float = 1
    hard_negative_learning_rate: float | None = None
    max_steps: int = -1
    max_train_pairs: int | None = None
    eval_batch_size: int = 64
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False
    progress: bool = True
    freeze_layers: int | None = None
    layer_lr_decay: float | None = None
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1

    def settings(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class TrainingData:
    """Training pairs plus, when an evaluation split is available, the dataset to score on."""

    pairs: list[Pair]
    source: str
    eval_dataset: RetrievalDataset | None
    corpus_passages: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    output: Path
    dims: list[int]
    before: EvalResult | None
    after: EvalResult | None
    seconds: dict[str, float]
    report: dict[str, Any]


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the training pairs and the evaluation data, refusing to train on the evaluation split.

    Raises:
        DataError: For bad files or a training split equal to the evaluation split.
    """
    if not config.data.exists():
        raise DataError(config.data, "not found (expected a BEIR folder or a pairs .jsonl file)")
    if config.data.is_dir():
        splits = [config.train_split] + ([config.eval_split] if config.eval_split and not config.eval_data else [])
        if config.eval_split == config.train_split and not config.eval_data:
            raise DataError(config.data, f"training and evaluation split are both {config.train_split!r}")
        dataset = load_beir(config.data, sorted(set(splits)))
        pairs = dataset.pairs(config.train_split)
        eval_dataset = dataset if config.eval_split and not config.eval_data else None
        passages = [doc.passage for doc in dataset.corpus.values()]
        source = f"{config.data} (split {config.train_split})"
    else:
        pairs, eval_dataset, passages, source = load_pairs(config.data), None, [], str(config.data)
    if config.eval_data and config.eval_split:
        eval_dataset = load_beir(config.eval_data, [config.eval_split])
    if not pairs:
        raise DataError(config.data, f"split {config.train_split!r} has no relevant (query, passage) pairs")
    if config.max_train_pairs is not None and len(pairs) > config.max_train_pairs:
        pairs = sample_pairs(pairs, config.max_train_pairs, config.seed)
        source += f", {config.max_train_pairs} sampled pairs (seed {config.seed})"
    if config.hard_negatives and not passages:
        passages = sorted({p.positive for p in pairs} | {p.negative for p in pairs if p.negative})
    return TrainingData(pairs, source, eval_dataset, passages)


def sample_pairs(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """``n`` pairs drawn without replacement by ``seed``, kept in file order (a cheaper run on a big split)."""
    if n < 1:
        raise ValueError(f"max_train_pairs must be at least 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def _precision_flags() -> dict[str, bool]:
    """bf16 where the GPU supports it, else fp16 on a GPU, else full precision on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def _prompts(config: TrainConfig) -> dict[str, str] | None:
    prompts = {
        "anchor": config.query_prompt or "",
        "positive": config.passage_prompt or "",
        "negative": config.passage_prompt or "",
    }
    return prompts if any(prompts.values()) else None


def _fit(
    model: SentenceTransformer,
    pairs: list[Pair],
    dims: list[int],
    config: TrainConfig,
    checkpoints: Path,
    epochs: float,
    learning_rate: float,
) -> None:
    """One training stage, resumed from its last checkpoint when ``config.resume`` is set."""
    from transformers.trainer_utils import get_last_checkpoint

    trainer = build_trainer(model, pairs, dims, config, checkpoints, epochs, learning_rate)
    last = get_last_checkpoint(str(checkpoints)) if config.resume and checkpoints.is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)


def build_trainer(
    model: SentenceTransformer,
    pairs: list[Pair],
    dims: list[int],
    config: TrainConfig,
    checkpoints: Path,
    epochs: float,
    learning_rate: float,
) -> SentenceTransformerTrainer:
    """MatryoshkaLoss(CachedMNRL) with the no-duplicates batch sampler and any layer-wise learning rates."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
    )

    columns: dict[str, list[str]] = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    if all(p.negative for p in pairs):
        columns["negative"] = [p.negative for p in pairs]  # type: ignore[misc]
    ranking = CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    loss = MatryoshkaLoss(model, ranking, matryoshka_dims=dims)
    steps_per_epoch = max(1, len(pairs) // config.batch_size)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        learning_rate_mapping=learning_rate_mapping(model, config, learning_rate),
        warmup_steps=config.warmup_ratio,
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=_prompts(config),
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=max(1, steps_per_epoch // 4),
        report_to="none",
        disable_tqdm=not config.progress,
        **_precision_flags(),
    )
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss)


def mine_negatives(model: SentenceTransformer, data: TrainingData, config: TrainConfig) -> list[Pair]:
    """One hard negative per pair, mined with the stage-one model (NV-Retriever's TopK-PercPos 95%).

    A candidate is kept only if it scores at least 5% below the positive, which filters most
    unjudged positives; every judged positive of the same query is excluded by the library.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = Dataset.from_dict({"anchor": [p.query for p in data.pairs], "positive": [p.positive for p in data.pairs]})
    mined = mine_hard_negatives(
        pairs,
        model,
        corpus=data.corpus_passages,
        range_max=50,
        relative_margin=0.05,
        num_negatives=1,
        sampling_strategy="top",
        query_prompt=config.query_prompt or None,
        corpus_prompt=config.passage_prompt or None,
        batch_size=config.eval_batch_size,
        output_format="triplet",
        verbose=config.progress,
    )
    return [Pair(row["anchor"], row["positive"], row["negative"]) for row in mined]


def _evaluate(
    model: SentenceTransformer, label: str, data: TrainingData, config: TrainConfig, dims: list[int]
) -> EvalResult | None:
    if data.eval_dataset is None or not config.eval_split:
        return None
    encoder = SentenceTransformerEncoder(model, label, config.eval_batch_size, config.progress)
    return evaluate(encoder, data.eval_dataset, config.eval_split, dims)


def _leaked_queries(data: TrainingData, config: TrainConfig) -> int | None:
    """How many evaluation queries also occur, verbatim, among the training queries (should be 0)."""
    if data.eval_dataset is None or not config.eval_split:
        return None
    training = {p.query for p in data.pairs}
    return sum(data.eval_dataset.queries[qid] in training for qid in data.eval_dataset.split(config.eval_split))


def _environment() -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "device": device,
        "threads": str(torch.get_num_threads()),
    }


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune, evaluate before and after, and publish the model folder atomically.

    Raises:
        DataError: Bad training or evaluation data (checked before any model is loaded).
        ModelError: The base model cannot be loaded.
        DimensionError: ``config.dims`` do not fit the model.
        FileExistsError: The output exists and ``overwrite`` is off (checked before training).
        ValueError: Impossible strategy options, or a strategy the model's architecture does not allow.
    """
    if config.output.exists() and not config.overwrite:
        raise FileExistsError(f"{config.output} already exists (pass --overwrite to replace it)")
    check_strategy_options(config)
    data = load_training_data(config)
    seconds: dict[str, float] = {}
    model = load_model(
        config.model,
        max_seq_length=config.max_seq_length,
        query_prompt=config.query_prompt,
        document_prompt=config.passage_prompt,
    )
    full_dim = embedding_dimension(model)
    dims = validate_dims(config.dims, full_dim) if config.dims else default_dims(full_dim)
    # Fresh LoRA layers add exactly zero, so the "before" scores are still the base model's.
    strategy, lora = apply_strategy(model, config, config.model or DEFAULT_MODEL)

    started = time.perf_counter()
    before = _evaluate(model, "base", data, config, dims)
    seconds["eval_before"] = time.perf_counter() - started

    checkpoints = config.output.parent / f".{config.output.name}.checkpoints"
    if not config.resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # stale checkpoints of another run must not be mixed in
    started = time.perf_counter()
    _fit(model, data.pairs, dims, config, checkpoints / "stage1", config.epochs, config.learning_rate)
    seconds["train_stage1"] = time.perf_counter() - started

    mining: dict[str, Any] = {}
    stage1 = None
    if config.hard_negatives:
        # Scored before stage two so the report shows what the hard negatives add.
        started = time.perf_counter()
        stage1 = _evaluate(model, "stage 1", data, config, dims)
        seconds["eval_stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        triplets = mine_negatives(model, data, config)
        seconds["mine_negatives"] = time.perf_counter() - started
        mining = {"pairs": len(data.pairs), "triplets": len(triplets), "candidates": len(data.corpus_passages)}
        started = time.perf_counter()
        rate = config.hard_negative_learning_rate or config.learning_rate / 2
        _fit(model, triplets, dims, config, checkpoints / "stage2", config.hard_negative_epochs, rate)
        seconds["train_stage2"] = time.perf_counter() - started

    adapter = merge_lora(model, lora) if lora is not None else None  # score and publish the merged model
    started = time.perf_counter()
    after = _evaluate(model, "tuned", data, config, dims)
    seconds["eval_after"] = time.perf_counter() - started

    report = {
        "base_model": config.model or DEFAULT_MODEL,
        "dims": dims,
        "data": {
            "training_source": data.source,
            "training_pairs": len(data.pairs),
            "training_queries": len({p.query for p in data.pairs}),
            "evaluation": None
            if before is None
            else {
                "dataset": before.dataset,
                "split": before.split,
                "queries": before.num_queries,
                "documents": before.num_documents,
            },
            "hard_negatives": mining or None,
            "evaluation_queries_seen_in_training": _leaked_queries(data, config),
        },
        "settings": config.settings(),
        "strategy": strategy,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "environment": _environment(),
        "before": before.to_dict() if before else None,
        "stage1": stage1.to_dict() if stage1 else None,
        "after": after.to_dict() if after else None,
    }
    compared = [r for r in (before, stage1, after) if r is not None]
    _publish(model, config, dims, report, compared, adapter)
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(config.output, dims, before, after, seconds, report)


def _publish(
    model: SentenceTransformer,
    config: TrainConfig,
    dims: list[int],
    report: dict[str, Any],
    compared: list[EvalResult],
    adapter: LoraAdapter | None = None,
) -> None:
    """Save model, card and reports (and the LoRA adapter) into a staging folder, then rename it to the output."""
    staging = staging_dir(config.output)
    try:
        model.save(str(staging))
        if adapter is not None:
            adapter.save(staging / ADAPTER_FOLDER)
        MatryoshkaCard(
            dims=dims,
            base_model=report["base_model"],
            query_prompt=model.prompts.get(QUERY_PROMPT, ""),
            document_prompt=model.prompts.get(DOCUMENT_PROMPT, ""),
            extra={"evaluation": report["after"], "strategy": report["strategy"]},
        ).write(staging)
        write_json_atomic(staging / f"{REPORT_STEM}.json", report)
        write_text_atomic(staging / f"{REPORT_STEM}.md", training_markdown(report, compared))
        if len(compared) > 1:
            plot_ndcg(compared, staging / f"{REPORT_STEM}_ndcg.png")
        publish_dir(staging, config.output, config.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def training_markdown(report: dict[str, Any], compared: list[EvalResult]) -> str:
    data, settings = report["data"], report["settings"]
    lines = [
        "# Matryoshka training report",
        "",
        f"- Base model: `{report['base_model']}`; Matryoshka dims: {', '.join(map(str, report['dims']))}",
        f"- Training data: {data['training_source']}: {data['training_pairs']} pairs, "
        f"{data['training_queries']} distinct queries"
        + (
            f"; evaluation queries also in training: {data['evaluation_queries_seen_in_training']}"
            if data["evaluation_queries_seen_in_training"] is not None
            else ""
        ),
        f"- Recipe: {settings['epochs']} epochs, lr {settings['learning_rate']}, batch {settings['batch_size']} "
        f"(cached MNRL, mini-batch {settings['mini_batch_size']}), warm-up {settings['warmup_ratio']}, "
        f"seed {settings['seed']}, hard negatives: {'yes' if settings['hard_negatives'] else 'no'}",
        _strategy_line(report["strategy"]),
        "- Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()),
        f"- Machine: {report['environment']['device']}, torch {report['environment']['torch']}, "
        f"sentence-transformers {report['environment']['sentence_transformers']}",
    ]
    if compared:
        evaluation = data["evaluation"]
        lines += [
            "",
            f"## NDCG@10 before and after, `{evaluation['dataset']}` split `{evaluation['split']}` "
            f"({evaluation['queries']} queries, {evaluation['documents']} documents)",
            "",
            comparison_table(compared),
            "",
            f"## {compared[-1].model} model, all metrics",
            "",
            detail_table(compared[-1]),
        ]
    return "\n".join(lines) + "\n"


def _strategy_line(strategy: dict[str, Any]) -> str:
    """One report line: what was trained and how many of the parameters that is."""
    described = {
        "full": "full fine-tuning",
        "freeze": f"embeddings and lowest {strategy.get('frozen_layers')} layers frozen",
        "lora": f"LoRA rank {strategy.get('lora_rank')}, alpha {strategy.get('lora_alpha')} "
        f"on {', '.join(strategy.get('lora_target_modules', []))}, merged (adapter in {ADAPTER_FOLDER}/)",
    }[strategy["name"]]
    if "layer_lr_decay" in strategy:
        described += f", layer-wise lr decay {strategy['layer_lr_decay']}"
    trainable, total = strategy["trainable_parameters"], strategy["total_parameters"]
    return f"- Strategy: {described}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)"
