"""Matryoshka fine-tuning: MatryoshkaLoss over a cached in-batch-negatives ranking loss.

The cached loss (GradCache) is the point: with in-batch negatives every other passage in
the batch is a negative, so the batch size *is* the number of negatives. Gradient
accumulation does not enlarge it; ``CachedMultipleNegativesRankingLoss`` does, in bounded
memory, by embedding mini-batches without graphs first and back-propagating per mini-batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.adapters import LoraAdapter, merge_lora
from core.data import DataError, Pair, Qrels, RetrievalDataset, load_beir, load_pairs
from core.errors import ConfigError, OutputExistsError
from core.files import publish_dir, staging_dir, write_json_atomic, write_text_atomic
from core.matryoshka import DimensionError, default_dims, validate_dims
from core.models import (
    DEFAULT_MODEL,
    DOCUMENT_PROMPT,
    QUERY_PROMPT,
    MatryoshkaCard,
    SentenceTransformerEncoder,
    embedding_dimension,
    load_model,
)
from training.adaptor import TOLERANCE, fold_spread, judge_folds
from training.config import TrainConfig
from training.distributed import (
    GROUP_TIMEOUT,
    Launch,
    barrier,
    check_launch_options,
    launch_from_env,
    per_device_batch,
    start,
)
from training.evaluate import EvalResult, evaluate
from training.memory import PeakMemory
from training.report import comparison_table, detail_table, plot_ndcg, views_section
from training.strategies import (
    ADAPTER_FOLDER,
    apply_strategy,
    check_strategy_options,
    learning_rate_mapping,
    lora_trainer,
    unfreezing_units,
)
from training.validation import (
    VALIDATION_SPLIT,
    ValidationSet,
    check_validation_options,
    split_folds,
    split_validation,
    validation_history,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from training.validation_evaluator import MatryoshkaValidationEvaluator

logger = logging.getLogger(__name__)

# Fewer held-out questions: a warning (on the bundled sample, 12 scored 1.0 at three dims of five after every
# epoch, and the run with them held out was lower on test at four dims of five than the run without)
MIN_VALIDATION_QUESTIONS = 50

REPORT_STEM = "training_report"
LOG_FOLDER = "runs"  # transformers' default TensorBoard folder under the trainer's output_dir
TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass
class TrainingData:
    """Training pairs plus, when an evaluation split is available, the dataset to score on."""

    pairs: list[Pair]
    source: str
    eval_dataset: RetrievalDataset | None
    corpus_passages: list[str] = field(default_factory=list)
    validation: ValidationSet | None = None
    folds: list[ValidationSet] | None = None  # --folds: each fold's questions, validated by a run on the others
    forgetting: RetrievalDataset | None = None
    training_qrels: Qrels | None = None  # when evaluated on the same folder: splits the clean and shared views


@dataclass
class TrainResult:
    output: Path
    dims: list[int]
    before: EvalResult | None
    after: EvalResult | None
    seconds: dict[str, float]
    report: dict[str, Any]
    published: bool = True  # False on the ranks other than 0 of a distributed launch


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the training pairs and the evaluation data, refusing to train on the evaluation split.

    Raises:
        DataError: For bad files or a training split equal to the evaluation split.
    """
    if not config.data.exists():
        raise DataError(config.data, "not found (expected a BEIR folder or a pairs .jsonl file)")
    validation = None
    if config.data.is_dir():
        splits = [config.train_split] + ([config.eval_split] if config.eval_split and not config.eval_data else [])
        if config.eval_split == config.train_split and not config.eval_data:
            raise DataError(config.data, f"training and evaluation split are both {config.train_split!r}")
        dataset = load_beir(config.data, sorted(set(splits)))
        pairs = dataset.pairs(config.train_split)
        if config.validation_fraction is not None:
            validation = split_validation(dataset, config.train_split, config.validation_fraction, config.seed)
            held_out = len(validation.dataset.split(VALIDATION_SPLIT))
            if held_out < MIN_VALIDATION_QUESTIONS:
                logger.warning(
                    "only %d validation questions: the checkpoint chosen on them follows their noise (one question "
                    "moves their mean NDCG@10 by up to %.2f), and they are not trained on; with few labelled "
                    "questions, train on all of them without --validation-fraction (docs: learning curves)",
                    held_out,
                    1 / held_out,
                )
            kept = RetrievalDataset(dataset.root, dataset.corpus, dataset.queries, {"kept": validation.training_qrels})
            pairs = kept.pairs("kept")
        folds = split_folds(dataset, config.train_split, config.folds, config.seed) if config.folds else None
        eval_dataset = dataset if config.eval_split and not config.eval_data else None
        training_qrels = dataset.split(config.train_split) if eval_dataset is not None else None
        passages = [doc.passage for doc in dataset.corpus.values()]
        source = f"{config.data} (split {config.train_split})"
    else:
        if config.validation_fraction is not None:
            raise DataError(config.data, "--validation-fraction needs a BEIR folder (a pairs file has no corpus)")
        if config.folds is not None:
            raise DataError(config.data, "--folds needs a BEIR folder (a pairs file has no corpus)")
        folds = None
        pairs, eval_dataset, passages, source = load_pairs(config.data), None, [], str(config.data)
        training_qrels = None
    if config.eval_data and config.eval_split:
        eval_dataset = load_beir(config.eval_data, [config.eval_split])
    if not pairs:
        raise DataError(config.data, f"split {config.train_split!r} has no relevant (query, passage) pairs")
    if config.max_train_pairs is not None and len(pairs) > config.max_train_pairs:
        pairs = sample_pairs(pairs, config.max_train_pairs, config.seed)
        source += f", {config.max_train_pairs} sampled pairs (seed {config.seed})"
    if config.hard_negatives and not passages:
        passages = sorted({p.positive for p in pairs} | {p.negative for p in pairs if p.negative})
    forgetting = load_beir(config.forgetting_data, [config.forgetting_split]) if config.forgetting_data else None
    return TrainingData(pairs, source, eval_dataset, passages, validation, folds, forgetting, training_qrels)


def sample_pairs(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """``n`` pairs drawn without replacement by ``seed``, kept in file order (a cheaper run on a big split)."""
    if n < 1:
        raise ConfigError(f"--max-train-pairs must be at least 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    evaluator: MatryoshkaValidationEvaluator | None = None,
    launch: Launch | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, float]]]:
    """One training stage, resumed from its last checkpoint when ``config.resume`` is set.

    Returns:
        With an evaluator, the validation record of the stage (history, best step), else None; and the
        logged training loss per step (averaged over all processes by the trainer).
    """
    trainer = build_trainer(model, pairs, dims, config, checkpoints, epochs, learning_rate, evaluator, launch)
    last = last_complete_checkpoint(checkpoints, (launch or Launch()).world_size) if config.resume else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    losses = [
        {"step": entry["step"], "loss": round(entry["loss"], 5)} for entry in state.log_history if "loss" in entry
    ]
    if evaluator is None:
        return None, losses
    return {
        "history": validation_history(state.log_history, dims, config.early_stopping_metric),
        "best_step": state.best_global_step,
        "best_metric": None if state.best_metric is None else round(state.best_metric, 4),
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "steps_run": state.global_step,
        "max_steps": state.max_steps,
        "stopped_early": state.global_step < state.max_steps,
    }, losses


def last_complete_checkpoint(folder: Path, world_size: int = 1) -> str | None:
    """The newest checkpoint an interrupted run wrote whole, skipping any the interruption cut short.

    The trainer writes a checkpoint's files in turn: the model, then (rank 0) the optimizer and scheduler,
    every rank its own RNG state, and rank 0 the trainer state last. Nothing waits for the other ranks'
    RNG files, so a kill can leave rank 0's trainer state whole beside another rank's RNG file half
    written, and resuming from it fails on that rank. A checkpoint counts only when its trainer state
    parses and every rank's RNG file loads.
    """
    if not folder.is_dir():
        return None
    numbered = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            numbered.append((int(match.group(1)), path))
    rng_files = [f"rng_state_{rank}.pth" for rank in range(world_size)] if world_size > 1 else ["rng_state.pth"]
    for _, path in sorted(numbered, reverse=True):
        gap = _checkpoint_gap(path, rng_files)
        if gap is None:
            return str(path)
        logger.warning("skipping %s: %s (cut short by the interruption)", path.name, gap)
    return None


def _checkpoint_gap(path: Path, rng_files: list[str]) -> str | None:
    """What is missing or half written in one checkpoint folder, or None when it is whole."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or incomplete"
    for name in rng_files:
        try:
            with safe_globals():  # read as the trainer reads it on resume
                torch.load(path / name, weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated pickle raises any of several errors
            return f"{name} is missing or incomplete"
    return None


def _validation_arguments(config: TrainConfig, evaluator: MatryoshkaValidationEvaluator | None) -> dict[str, Any]:
    """Evaluate and save on the same schedule, and reload the best checkpoint at the end."""
    if evaluator is None:
        return {"save_strategy": "epoch"}
    schedule: dict[str, Any] = {"eval_strategy": "epoch", "save_strategy": "epoch"}
    if config.eval_steps:
        schedule = {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": config.eval_steps}
        schedule["save_steps"] = config.eval_steps
    return schedule | {
        "load_best_model_at_end": True,
        "metric_for_best_model": evaluator.primary_metric,
        "greater_is_better": True,
    }


def build_trainer(
    model: SentenceTransformer,
    pairs: list[Pair],
    dims: list[int],
    config: TrainConfig,
    checkpoints: Path,
    epochs: float,
    learning_rate: float,
    evaluator: MatryoshkaValidationEvaluator | None = None,
    launch: Launch | None = None,
) -> SentenceTransformerTrainer:
    """MatryoshkaLoss(CachedMNRL) with the no-duplicates batch sampler and any layer-wise learning rates."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
    )
    from transformers import EarlyStoppingCallback, TrainerCallback

    columns: dict[str, list[str]] = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    if all(p.negative for p in pairs):
        columns["negative"] = [p.negative for p in pairs]  # type: ignore[misc]
    launch = launch or Launch()
    # Several processes: each embeds its share of the batch and gathers the others' (with gradients), so
    # every anchor still sees the whole global batch as negatives, as in one process.
    ranking = CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=config.mini_batch_size, gather_across_devices=launch.distributed
    )
    loss_dims, weights = loss_schedule(dims, config)
    loss = MatryoshkaLoss(model, ranking, matryoshka_dims=loss_dims, matryoshka_weights=weights)
    steps_per_epoch = max(1, len(pairs) // config.batch_size)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=per_device_batch(config.batch_size, launch),
        ddp_timeout=int(GROUP_TIMEOUT.total_seconds()),
        # accelerate treats a multi-process launch as MULTI_CPU (gloo DDP) only when told the run is on CPU.
        use_cpu=launch.distributed and not _cuda_available(),
        learning_rate=learning_rate,
        learning_rate_mapping=learning_rate_mapping(model, config, learning_rate),
        warmup_steps=config.warmup_ratio,
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=_prompts(config),
        save_total_limit=1,
        # Losses logged at least as often as validation runs, so the two curves share their steps.
        logging_steps=min(max(1, steps_per_epoch // 4), config.eval_steps or steps_per_epoch),
        report_to=config.report_to,
        disable_tqdm=not config.progress,
        **_validation_arguments(config, evaluator),
        **_precision_flags(),
    )
    callbacks: list[TrainerCallback] = []
    if evaluator is not None and config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    if config.gradual_unfreeze:
        from training.unfreezing import GradualUnfreezing

        callbacks.append(GradualUnfreezing(unfreezing_units(model, config)))
    trainer_class = lora_trainer(SentenceTransformerTrainer) if config.lora else SentenceTransformerTrainer
    return trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(columns),
        loss=loss,
        evaluator=evaluator,
        callbacks=callbacks or None,
    )


def loss_schedule(dims: list[int], config: TrainConfig) -> tuple[list[int], list[float]]:
    """The dims MatryoshkaLoss sums over (served dims, then any train-only ones below them) and their weights.

    Raises:
        DimensionError: A train-only dim that is not below every served dim.
        ConfigError: A weight list whose length is not the number of loss dims, or a weight that is not positive.
    """
    extra = sorted(set(config.train_only_dims or []), reverse=True)
    if extra and (max(extra) >= min(dims) or min(extra) < 1):
        raise DimensionError(f"--train-only-dims {extra} must lie between 1 and the smallest served dim ({min(dims)})")
    loss_dims = dims + extra
    weights = config.dim_weights or [1.0] * len(loss_dims)
    if len(weights) != len(loss_dims):
        raise ConfigError(
            f"--dim-weights has {len(weights)} values for {len(loss_dims)} loss dims {loss_dims} (one per dim, "
            "largest first)"
        )
    if any(w <= 0 for w in weights):
        raise ConfigError(f"--dim-weights must all be positive, got {weights}")
    return loss_dims, [float(w) for w in weights]


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
    return evaluate(encoder, data.eval_dataset, config.eval_split, dims, data.training_qrels)


def check_tracking(report_to: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed, in one line.

    Raises:
        ConfigError: Naming the tracker and how to install it.
    """
    if report_to not in TRACKERS:
        raise ConfigError(f"--report-to {report_to!r} is not one of {', '.join(TRACKERS)}")
    package = TRACKERS[report_to]
    if package and importlib.util.find_spec(package) is None:
        hint = "pip install 'mrl-retrieval[tracking]'" if package == "tensorboard" else f"pip install {package}"
        raise ConfigError(f"--report-to {report_to}: the {package} package is not installed ({hint})")


def _validation_evaluator(
    validation: ValidationSet | None, config: TrainConfig, dims: list[int]
) -> MatryoshkaValidationEvaluator | None:
    """The evaluator that scores ``validation`` (the hold-out, or one fold) at every dim, or None without one."""
    from training.validation_evaluator import MatryoshkaValidationEvaluator

    if validation is None:
        return None
    dim = config.early_stopping_dim
    if dim is not None and dim not in dims:
        raise DimensionError(f"--early-stopping-dim {dim} is not one of the training dims {dims}")
    metric, batch = config.early_stopping_metric, config.eval_batch_size
    return MatryoshkaValidationEvaluator(validation, dims, metric, dim, batch, TOLERANCE)


def _validation_report(
    data: TrainingData,
    config: TrainConfig,
    dims: list[int],
    stages: dict[str, dict[str, Any] | None],
    baseline: dict[int, float] | None = None,
    kept_input: bool = False,
) -> dict[str, Any]:
    assert data.validation is not None
    return {
        "queries": len(data.validation.queries),
        "fraction": config.validation_fraction,
        "metric": config.early_stopping_metric,
        "dim": config.early_stopping_dim,  # None: the mean gain over the dims
        "tolerance": TOLERANCE,
        "input": {str(dim): round(value, 4) for dim, value in (baseline or {}).items()},
        "kept_input": kept_input,
        "patience": config.early_stopping_patience,
        "eval_steps": config.eval_steps,
        "stages": stages,
    }


def _evaluate_forgetting(
    model: SentenceTransformer, label: str, data: TrainingData, config: TrainConfig, dims: list[int]
) -> EvalResult | None:
    if data.forgetting is None:
        return None
    encoder = SentenceTransformerEncoder(model, label, config.eval_batch_size, config.progress)
    return evaluate(encoder, data.forgetting, config.forgetting_split, dims)


def forgetting_report(
    before: EvalResult, after: EvalResult, in_before: EvalResult | None, in_after: EvalResult | None
) -> dict[str, Any]:
    """NDCG@10 per dim on the out-of-domain data, before and after, next to the in-domain change."""
    per_dim = {}
    for dim in sorted(before.by_dim, reverse=True):
        row = {"before": before.metric(dim), "after": after.metric(dim)}
        row["change"] = row["after"] - row["before"]
        if in_before and in_after:
            row["in_domain_change"] = in_after.metric(dim) - in_before.metric(dim)
        per_dim[str(dim)] = {k: round(v, 4) for k, v in row.items()}
    return {
        "dataset": before.dataset,
        "split": before.split,
        "queries": before.num_queries,
        "documents": before.num_documents,
        "ndcg@10": per_dim,
        "before": before.to_dict(),
        "after": after.to_dict(),
    }


def forgetting_markdown(forgetting: dict[str, Any]) -> list[str]:
    rows = forgetting["ndcg@10"]
    in_domain = all("in_domain_change" in row for row in rows.values())
    lines = [
        "",
        f"## Forgetting: NDCG@10 on out-of-domain `{forgetting['dataset']}` split `{forgetting['split']}` "
        f"({forgetting['queries']} queries, {forgetting['documents']} documents)",
        "",
        "| dim | before | after | change |" + (" in-domain change |" if in_domain else ""),
        "|---|---|---|---|" + ("---|" if in_domain else ""),
    ]
    for dim, row in rows.items():
        line = f"| {dim} | {row['before']:.4f} | {row['after']:.4f} | {row['change']:+.4f} |"
        lines.append(line + (f" {row['in_domain_change']:+.4f} |" if in_domain else ""))
    return lines


def _leaked_queries(data: TrainingData, config: TrainConfig) -> int | None:
    """How many evaluation queries also occur, verbatim, among the training queries (should be 0)."""
    if data.eval_dataset is None or not config.eval_split:
        return None
    training = {p.query for p in data.pairs}
    return sum(data.eval_dataset.queries[qid] in training for qid in data.eval_dataset.split(config.eval_split))


def _wandb_run_url() -> str | None:
    """The Weights & Biases run's page, when this process logged to one (offline runs have none)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb else None
    return getattr(run, "url", None) if run else None


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


def _load_input(config: TrainConfig) -> SentenceTransformer:
    """The input model (``--model``), with the run's sequence length and prompts."""
    return load_model(config.model, max_seq_length=config.max_seq_length, query_prompt=config.query_prompt,
                      document_prompt=config.passage_prompt)  # fmt: skip


def cross_validate_epochs(data: TrainingData, config: TrainConfig, dims: list[int], launch: Launch) -> dict[str, Any]:
    """Choose the number of epochs by k-fold cross-validation over the training questions (``--folds``).

    Each fold's questions (grouped: no other fold has their positives as training positives,
    :func:`training.validation.split_folds`) validate a run trained from the input model on the other folds,
    once per epoch. The fold means per epoch and dim are judged by the never-worse rule against the input
    model's fold means, with the folds' spread counted (:func:`training.adaptor.holds_across_folds`); the
    epoch with the best mean gain wins, and 0 (publish the input model) when none qualifies. Every question
    validates once, so with 120 questions the choice rests on 120, where a 10% hold-out would rest on 12.
    """
    assert data.folds is not None
    started = time.perf_counter()
    metric, select_dim = config.early_stopping_metric, config.early_stopping_dim
    root = config.output.parent / f".{config.output.name}.folds"
    shutil.rmtree(root, ignore_errors=True)
    per_fold: list[dict[int, dict[int, float]]] = []  # fold -> epoch -> dim -> score
    inputs: list[dict[int, float]] = []
    try:
        for number, fold in enumerate(data.folds):
            held = set(fold.queries)
            pairs = [pair for pair in data.pairs if pair.query not in held]
            logger.info("fold %d of %d: training on %d pairs, validating on %d questions", number + 1,
                        len(data.folds), len(pairs), len(held))  # fmt: skip
            model = _load_input(config)
            apply_strategy(model, config, config.model or DEFAULT_MODEL)
            evaluator = _validation_evaluator(fold, config, dims)
            assert evaluator is not None
            inputs.append(evaluator.set_baseline(model))
            fold_config = replace(config, resume=False, report_to="none", progress=False)
            record, _ = _fit(model, pairs, dims, fold_config, root / f"fold-{number + 1}", config.epochs,
                             config.learning_rate, evaluator, launch)  # fmt: skip
            assert record is not None
            per_fold.append({round(e["epoch"]): {int(d): v for d, v in e[metric].items()} for e in record["history"]})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mean_input = {dim: float(np.mean([scores[dim] for scores in inputs])) for dim in dims}
    judged = judge_folds(per_fold, inputs, mean_input, dims, TOLERANCE, select_dim)  # the epochs every fold reached
    rows = [{"epoch": e["step"], metric: {str(d): round(v, 4) for d, v in e["mean"].items()},
             "gain": None if e["gain"] is None else round(e["gain"], 4), "holds": e["holds"]}
            for e in judged]  # fmt: skip
    # the largest gain among the epochs that hold, the fewest epochs on a tie
    best = max(((e["gain"], e["step"]) for e in judged if e["holds"]), key=lambda pair: pair[0], default=None)
    report: dict[str, Any] = {
        "folds": len(data.folds),
        "queries": sum(len(fold.queries) for fold in data.folds),
        "metric": metric,
        "dim": select_dim,
        "tolerance": TOLERANCE,
        "epochs_tried": int(config.epochs),
        "input": {str(d): round(v, 4) for d, v in mean_input.items()},
        "by_epoch": rows,
        "epochs": 0 if best is None else best[1],
        "kept_input": best is None,
    }
    if best is not None:
        report |= {"gain_mean": round(best[0], 4), **fold_spread(per_fold, inputs, best[1], dims)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune, evaluate before and after, and publish the model folder atomically.

    Raises:
        DataError: Bad training or evaluation data (checked before any model is loaded).
        ModelError: The base model cannot be loaded.
        DimensionError: ``config.dims`` (or ``early_stopping_dim``) do not fit the model.
        FileExistsError: The output exists and ``overwrite`` is off (checked before training).
        ConfigError: Impossible strategy, validation or tracking options (a missing tracker package included),
            a strategy the model's architecture does not allow, or a wrong distributed launch (mismatched
            ranks, a batch the processes cannot share evenly).

    Under ``torchrun``/``accelerate launch`` every rank trains; rank 0 alone evaluates and publishes
    (:mod:`training.distributed`), and the other ranks return ``published=False`` once it has.
    """
    launch = launch_from_env()
    per_device_batch(config.batch_size, launch)
    check_launch_options(launch, config.gradual_unfreeze)
    if config.folds is not None and launch.distributed:
        raise ConfigError("--folds runs in one process: launch mrl train without torchrun or accelerate")
    if config.output.exists() and not config.overwrite:
        raise OutputExistsError(f"{config.output} already exists (pass --overwrite to replace it)")
    check_strategy_options(config)
    check_validation_options(config)
    check_tracking(config.report_to)
    data = load_training_data(config)
    seconds: dict[str, float] = {}
    backend = start(launch)
    model = _load_input(config)
    full_dim = embedding_dimension(model)
    dims = validate_dims(config.dims, full_dim) if config.dims else default_dims(full_dim)
    loss_schedule(dims, config)  # refuse bad weights or train-only dims before any evaluation
    cross_validation = cross_validate_epochs(data, config, dims, launch) if data.folds else None
    if cross_validation and cross_validation["epochs"]:
        config = replace(config, epochs=cross_validation["epochs"])  # then trained on every question
    evaluator = _validation_evaluator(data.validation, config, dims)
    # Fresh LoRA layers add exactly zero, so the "before" scores are still the base model's.
    strategy, lora = apply_strategy(model, config, config.model or DEFAULT_MODEL)
    main = launch.is_main
    baseline = evaluator.set_baseline(model) if evaluator is not None else None  # what every checkpoint must keep

    started = time.perf_counter()
    before = _evaluate(model, "base", data, config, dims) if main else None
    if before is not None:
        seconds["eval_before"] = time.perf_counter() - started
    started = time.perf_counter()
    forgetting_before = _evaluate_forgetting(model, "base", data, config, dims) if main else None
    if forgetting_before:
        seconds["forgetting_before"] = time.perf_counter() - started

    checkpoints = config.output.parent / f".{config.output.name}.checkpoints"
    if not config.resume and main:
        shutil.rmtree(checkpoints, ignore_errors=True)  # stale checkpoints of another run must not be mixed in
    barrier(launch)  # no rank starts while rank 0 still clears them
    with PeakMemory() as memory:  # what the training stages cost in memory, for strategy comparisons
        started = time.perf_counter()
        stage1_rates = (config.epochs, config.learning_rate)
        if cross_validation and cross_validation["kept_input"]:  # no epoch count held every dim: nothing to train
            stage1_fit, stage1_losses = None, []
        else:
            stage1_fit, stage1_losses = _fit(
                model, data.pairs, dims, config, checkpoints / "stage1", *stage1_rates, evaluator, launch
            )
        validation = {"stage1": stage1_fit}
        losses = {"stage1": stage1_losses}
        seconds["train_stage1"] = time.perf_counter() - started

        mining: dict[str, Any] = {}
        stage1 = None
        if config.hard_negatives:
            # Scored before stage two so the report shows what the hard negatives add.
            started = time.perf_counter()
            stage1 = _evaluate(model, "stage 1", data, config, dims) if main else None
            seconds["eval_stage1"] = time.perf_counter() - started
            started = time.perf_counter()
            triplets = mine_negatives(model, data, config)
            seconds["mine_negatives"] = time.perf_counter() - started
            mining = {"pairs": len(data.pairs), "triplets": len(triplets), "candidates": len(data.corpus_passages)}
            started = time.perf_counter()
            rate = config.hard_negative_learning_rate or config.learning_rate / 2
            validation["stage2"], losses["stage2"] = _fit(
                model,
                triplets,
                dims,
                config,
                checkpoints / "stage2",
                config.hard_negative_epochs,
                rate,
                evaluator,
                launch,
            )
            seconds["train_stage2"] = time.perf_counter() - started

    if not main:
        barrier(launch)  # released once rank 0 has published (or the launcher stops the job if it fails)
        return TrainResult(config.output, dims, None, None, seconds, {}, published=False)
    last = [record for record in validation.values() if record]
    kept_input = bool(last) and (last[-1]["best_metric"] or 0.0) <= 0.0  # no checkpoint kept every dim and gained
    kept_input = kept_input or bool(cross_validation and cross_validation["kept_input"])
    if kept_input:  # the never-worse rule: publish the input model, unchanged
        logger.warning("no checkpoint kept every dim within %s of the input model and gained: publishing the input",
                       TOLERANCE)  # fmt: skip
        model = _load_input(config)
        lora = None
    adapter = merge_lora(model, lora) if lora is not None else None  # score and publish the merged model
    started = time.perf_counter()
    after = _evaluate(model, "tuned", data, config, dims)
    if after is not None:
        seconds["eval_after"] = time.perf_counter() - started
    started = time.perf_counter()
    forgetting_after = _evaluate_forgetting(model, "tuned", data, config, dims)
    if forgetting_after:
        seconds["forgetting_after"] = time.perf_counter() - started

    report = {
        "base_model": config.model or DEFAULT_MODEL,
        "dims": dims,
        "loss_dims": dict(zip(*loss_schedule(dims, config), strict=True)),
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
        "distributed": {
            "world_size": launch.world_size,
            "backend": backend,
            "global_batch": config.batch_size,
            "per_device_batch": per_device_batch(config.batch_size, launch),
            "gather_across_devices": launch.distributed,
        },
        "training_loss": losses,
        "strategy": strategy,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "training_memory": memory.to_dict(),
        "environment": _environment(),
        "before": before.to_dict() if before else None,
        "stage1": stage1.to_dict() if stage1 else None,
        "after": after.to_dict() if after else None,
        "validation": _validation_report(data, config, dims, validation, baseline, kept_input) if evaluator else None,
        "cross_validation": cross_validation,
        "forgetting": forgetting_report(forgetting_before, forgetting_after, before, after)
        if forgetting_before and forgetting_after
        else None,
        "tracking": None
        if config.report_to == "none"
        else {"report_to": config.report_to, "log_dir": str(config.output / LOG_FOLDER), "run_url": _wandb_run_url()},
    }
    compared = [r for r in (before, stage1, after) if r is not None]
    logs = {stage: checkpoints / stage / LOG_FOLDER for stage in validation}
    _publish(model, config, dims, report, compared, adapter, logs)
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    barrier(launch)
    return TrainResult(config.output, dims, before, after, seconds, report)


def _publish(
    model: SentenceTransformer,
    config: TrainConfig,
    dims: list[int],
    report: dict[str, Any],
    compared: list[EvalResult],
    adapter: LoraAdapter | None = None,
    logs: dict[str, Path] | None = None,
) -> None:
    """Save model, card and reports (and the LoRA adapter, the tracking logs) into a staging folder, then
    rename it to the output."""
    staging = staging_dir(config.output)
    try:
        model.save(str(staging))
        for stage, folder in (logs or {}).items():
            if folder.is_dir():
                shutil.copytree(folder, staging / LOG_FOLDER / stage)
        card = MatryoshkaCard(
            dims=dims,
            base_model=report["base_model"],
            query_prompt=model.prompts.get(QUERY_PROMPT, ""),
            document_prompt=model.prompts.get(DOCUMENT_PROMPT, ""),
            extra={"evaluation": report["after"], "strategy": report["strategy"]},
        )
        card.write(staging)
        if adapter is not None:
            adapter.save(staging / ADAPTER_FOLDER)
            card.write(staging / ADAPTER_FOLDER)  # the adapter alone loads with the same dims and prompts
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
        _distributed_line(report["distributed"]),
        "- Loss dims and weights: " + ", ".join(f"{d}: {w:g}" for d, w in report["loss_dims"].items()),
        _strategy_line(report["strategy"]),
        "- Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()),
        _memory_line(report["training_memory"]),
        f"- Machine: {report['environment']['device']}, torch {report['environment']['torch']}, "
        f"sentence-transformers {report['environment']['sentence_transformers']}",
    ]
    if report["tracking"]:
        tracking = report["tracking"]
        line = f"- Tracking: {tracking['report_to']} logs in `{tracking['log_dir']}`"
        lines.append(line + (f"; run: {tracking['run_url']}" if tracking.get("run_url") else ""))
    if report["validation"]:
        lines += validation_markdown(report["validation"])
    if report.get("cross_validation"):
        lines += cross_validation_markdown(report["cross_validation"])
    if report["forgetting"]:
        lines += forgetting_markdown(report["forgetting"])
    if compared:
        evaluation = data["evaluation"]
        lines += [
            "",
            f"## NDCG@10 before and after, `{evaluation['dataset']}` split `{evaluation['split']}` "
            f"({evaluation['queries']} queries, {evaluation['documents']} documents)",
            "",
            comparison_table(compared),
            *views_section(compared),
            "",
            f"## {compared[-1].model} model, all metrics",
            "",
            detail_table(compared[-1]),
        ]
    return "\n".join(lines) + "\n"


def validation_markdown(validation: dict[str, Any]) -> list[str]:
    """The validation section: size, selection rule and, per stage, the metric history and the best step."""
    metric, dim, patience = validation["metric"], validation["dim"], validation["patience"]
    stopping = f", early stopping after {patience} evaluations without gain" if patience else ""
    objective = f"the gain in {metric} at {dim} dims" if dim else f"the mean gain in {metric} over the dims"
    tolerance = validation.get("tolerance", 0.005)
    lines = [
        "",
        f"## Validation ({validation['queries']} training queries held out, {validation['fraction']:.0%})",
        "",
        f"Best checkpoint chosen by the never-worse rule: {objective}, among the checkpoints where no dim falls "
        f"more than {tolerance} below the input model{stopping}; the published model is the best checkpoint, not "
        "the last.",
    ]
    if validation.get("input"):
        lines += ["", "Input model: " + ", ".join(f"{d}d {v:.4f}" for d, v in validation["input"].items())]
    if validation.get("kept_input"):
        lines += ["", f"**The input model was published:** no checkpoint kept every dim within {tolerance} of it "
                  "and gained."]  # fmt: skip
    for stage, record in validation["stages"].items():
        if not record:
            continue
        dims = list(record["history"][0][metric]) if record["history"] else []
        lines += [
            "",
            f"### {stage}: best step {record['best_step']} (rule objective {record['best_metric']}), "
            f"{record['steps_run']} of {record['max_steps']} steps run"
            + (" (stopped early)" if record["stopped_early"] else ""),
            "",
            "| step | epoch | " + " | ".join(f"{d}d {metric}" for d in dims) + " |",
            "|" + "---|" * (len(dims) + 2),
        ]
        lines += [
            f"| {entry['step']} | {entry['epoch']} | " + " | ".join(f"{entry[metric][d]:.4f}" for d in dims) + " |"
            for entry in record["history"]
        ]
    return lines


def cross_validation_markdown(folds: dict[str, Any]) -> list[str]:
    """The ``--folds`` section: every epoch's fold means next to the input model's, and what was chosen."""
    metric, dims = folds["metric"], list(folds["input"])
    objective = f"the gain in {metric} at {folds['dim']} dims" if folds["dim"] else f"the mean gain in {metric}"
    lines = [
        "",
        f"## Cross-validation ({folds['folds']} grouped folds of {folds['queries']} training questions)",
        "",
        f"Each fold validated a run trained on the other folds, once per epoch. The number of epochs is chosen by "
        f"the never-worse rule on the fold means: {objective}, among the epochs where no dim's mean falls more "
        f"than {folds['tolerance']} below the input model's (less its standard error over the folds), then "
        "trained on every question.",
        "",
        "| epochs | " + " | ".join(f"{d}d {metric}" for d in dims) + " | mean gain | never worse |",
        "|---|" + "---:|" * len(dims) + "---:|---|",
        "| 0 (input model) | " + " | ".join(f"{folds['input'][d]:.4f}" for d in dims) + " | – | – |",
    ]
    for row in folds["by_epoch"]:
        gain = "–" if row["gain"] is None else f"{row['gain']:+.4f}"
        lines.append(f"| {row['epoch']} | " + " | ".join(f"{row[metric][d]:.4f}" for d in dims)
                     + f" | {gain} | {'yes' if row['holds'] else 'no'} |")  # fmt: skip
    if folds["kept_input"]:
        lines += ["", f"**The input model was published:** no number of epochs kept every dim within "
                  f"{folds['tolerance']} of it across the folds and gained."]  # fmt: skip
    else:
        worst = ", ".join(f"{d}d {v:+.4f}" for d, v in folds["worst_fold_change_by_dim"].items())
        lines += [
            "",
            f"**Chosen: {folds['epochs']} of {folds['epochs_tried']} epochs**, mean gain "
            f"{folds['gain_mean']:+.4f} ± {folds['gain_std']:.4f} over the folds (worst fold per dim: {worst}).",
        ]
    return lines


def _memory_line(memory: dict[str, Any]) -> str:
    line = f"- Training memory: resident peak {memory['rss_peak_mb']:,.0f} MB (+{memory['rss_growth_mb']:,.0f} MB)"
    if memory["cuda_peak_allocated_mb"] is not None:
        line += f", GPU allocated peak {memory['cuda_peak_allocated_mb']:,.0f} MB"
    return line


def _strategy_line(strategy: dict[str, Any]) -> str:
    """One report line: what was trained and how many of the parameters that is."""
    described = {
        "full": "full fine-tuning",
        "freeze": f"embeddings and lowest {strategy.get('frozen_layers')} layers frozen",
        "gradual": f"gradual unfreezing of {strategy.get('gradual_unfreeze_units')} units, top layer first, "
        "one at a time over the first half of each stage"
        + (f", embeddings and lowest {strategy['frozen_layers']} layers frozen" if "frozen_layers" in strategy else ""),
        "lora": f"LoRA rank {strategy.get('lora_rank')}, alpha {strategy.get('lora_alpha')} "
        f"on {', '.join(strategy.get('lora_target_modules', []))}, merged (adapter in {ADAPTER_FOLDER}/)",
    }[strategy["name"]]
    if "layer_lr_decay" in strategy:
        described += f", layer-wise lr decay {strategy['layer_lr_decay']}"
    trainable, total = strategy["trainable_parameters"], strategy["total_parameters"]
    return f"- Strategy: {described}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)"


def _distributed_line(distributed: dict[str, Any]) -> str:
    if distributed["world_size"] == 1:
        return "- Processes: 1"
    return (
        f"- Processes: {distributed['world_size']} ({distributed['backend']}), global batch "
        f"{distributed['global_batch']} = {distributed['per_device_batch']} per process, negatives gathered "
        "across processes"
    )
