"""``mrl train`` and ``mrl eval``: argument parsing only; the work is in train.py and evaluate.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.cli_args import add_output_argument, check_positive, config_fields, dims_argument, weights_argument
from core.errors import ConfigError


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    defaults = _train_defaults()
    p = commands.add_parser(
        "train",
        help="Matryoshka fine-tuning with before/after evaluation",
        description="Fine-tune a sentence-transformers model with MatryoshkaLoss over cached MNRL.",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a pairs .jsonl (query, positive[, negative])",
    )
    add_output_argument(p, "folder for the tuned model and its report", dest="output")
    p.add_argument(
        "--model", default=None, help="base model: hub name or local path (default: all-MiniLM-L6-v2, shipped on PyPI)"
    )
    p.add_argument("--train-split", default=defaults.train_split, help="qrels split to train on (default: %(default)s)")
    p.add_argument(
        "--eval-split",
        default=defaults.eval_split,
        help="qrels split to evaluate on before and after; 'none' to skip (default: %(default)s)",
    )
    p.add_argument(
        "--eval-data", type=Path, default=None, help="BEIR folder to evaluate on (default: --data when it is one)"
    )
    p.add_argument(
        "--dims",
        type=dims_argument,
        default=None,
        help="comma-separated Matryoshka dims (default: full, then powers of two down to 32)",
    )
    p.add_argument(
        "--train-only-dims",
        type=dims_argument,
        default=None,
        help="dims below the smallest served one that enter the loss only, as a regulariser (e.g. 16,8); "
        "they are not evaluated nor written to the model card",
    )
    p.add_argument(
        "--dim-weights",
        type=weights_argument,
        default=None,
        help="MatryoshkaLoss weight per loss dim, largest first, served dims then --train-only-dims "
        "(e.g. 1,1,1,2,4 for 384..32; default: all 1)",
    )
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="default: %(default)s")
    p.add_argument(
        "--lr", dest="learning_rate", type=float, default=defaults.learning_rate, help="default: %(default)s"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="in-batch negatives per step (default: %(default)s); memory is bounded by --mini-batch-size",
    )
    p.add_argument("--mini-batch-size", type=int, default=defaults.mini_batch_size, help="default: %(default)s")
    p.add_argument("--max-seq-length", type=int, default=None, help="token limit (default: the model's own)")
    p.add_argument("--query-prompt", default=None, help="prefix for queries, e.g. 'query: ' for e5 models")
    p.add_argument("--passage-prompt", default=None, help="prefix for passages, e.g. 'passage: ' for e5 models")
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    p.add_argument(
        "--hard-negatives",
        action="store_true",
        help="second stage: mine one hard negative per pair with the stage-one model and train on triplets",
    )
    p.add_argument(
        "--hard-negative-epochs", type=float, default=defaults.hard_negative_epochs, help="default: %(default)s"
    )
    p.add_argument(
        "--hard-negative-lr",
        dest="hard_negative_learning_rate",
        type=float,
        default=None,
        help="learning rate of the second stage (default: half of --lr)",
    )
    p.add_argument(
        "--max-steps", type=int, default=defaults.max_steps, help="stop each stage after N steps (smoke runs)"
    )
    p.add_argument(
        "--max-train-pairs",
        type=int,
        default=None,
        help="train on N pairs sampled by --seed (a cheaper run on a big split; default: all)",
    )
    strategy = p.add_argument_group("training strategy (default: full fine-tuning)")
    strategy.add_argument(
        "--freeze-layers",
        type=int,
        default=None,
        metavar="N",
        help="freeze the token embeddings and the lowest N transformer layers (BERT-like models)",
    )
    strategy.add_argument(
        "--layer-lr-decay",
        type=float,
        default=None,
        metavar="F",
        help="layer-wise learning-rate decay, 0 < F <= 1: the top layer gets --lr, each lower layer F times that",
    )
    strategy.add_argument(
        "--gradual-unfreeze",
        action="store_true",
        help="start with the top layer only and release one more layer at a time, top down, over the first half "
        "of training (with --freeze-layers N, the lowest N stay frozen)",
    )
    strategy.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters only; the output is the merged model, the adapter is saved in its adapter/ folder",
    )
    strategy.add_argument(
        "--lora-rank", type=int, default=defaults.lora_rank, help="rank of the LoRA updates (default: %(default)s)"
    )
    strategy.add_argument(
        "--lora-alpha",
        type=float,
        default=defaults.lora_alpha,
        help="LoRA scaling numerator (update scale alpha/rank) (default: %(default)s)",
    )
    strategy.add_argument(
        "--lora-dropout",
        type=float,
        default=defaults.lora_dropout,
        help="dropout on the LoRA input (default: %(default)s)",
    )
    validation = p.add_argument_group("validation and tracking (default: off)")
    validation.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        metavar="F",
        help="hold out a seeded share F (0 < F < 1) of the TRAINING queries, by query, for validation during "
        "training; the best checkpoint, not the last, is published (the evaluation split is never used)",
    )
    validation.add_argument(
        "--folds",
        type=int,
        default=None,
        metavar="K",
        help="choose the number of epochs (0 to --epochs; 0 publishes the input model) by K-fold "
        "cross-validation over the training questions, grouped by shared positives, under the never-worse rule, "
        "then train on all of them: K+1 runs, for a few hundred questions or fewer (instead of "
        "--validation-fraction)",
    )
    validation.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        metavar="N",
        help="validate (and checkpoint) every N steps (default: each epoch)",
    )
    validation.add_argument(
        "--early-stopping-patience",
        type=int,
        default=None,
        metavar="P",
        help="stop after P validations without improvement (default: train to the end, still publish the best)",
    )
    validation.add_argument(
        "--early-stopping-metric",
        default=defaults.early_stopping_metric,
        help="validation metric that picks the best checkpoint: ndcg@10, mrr@10, recall@1/10/100 "
        "(default: %(default)s)",
    )
    validation.add_argument(
        "--early-stopping-dim",
        type=int,
        default=None,
        metavar="D",
        help="the dim whose gain picks the best checkpoint (default: the mean gain over the dims); either way no "
        "checkpoint that loses more than 0.005 at any dim against the input model is kept",
    )
    validation.add_argument(
        "--report-to",
        default=defaults.report_to,
        help="log losses and validation metrics: none, tensorboard (to OUTPUT/runs/; pip install "
        "'mrl-retrieval[tracking]') or wandb when installed (default: %(default)s)",
    )
    p.add_argument(
        "--forgetting-data",
        type=Path,
        default=None,
        metavar="BEIR_DIR",
        help="out-of-domain BEIR folder scored at every dim before and after training, to measure forgetting",
    )
    p.add_argument(
        "--forgetting-split",
        default=defaults.forgetting_split,
        help="qrels split of --forgetting-data (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the per-epoch checkpoints after success")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(handler=run_train)


def _train_defaults():
    from training.train import TrainConfig

    return TrainConfig(data=Path("."), output=Path("."))


def run_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    check_positive(
        args,
        ("epochs", "learning_rate", "batch_size", "mini_batch_size", "hard_negative_epochs"),
        ("max_seq_length", "max_train_pairs", "hard_negative_learning_rate"),
    )
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    fields = config_fields(args)
    if str(fields["eval_split"]).lower() == "none":
        fields["eval_split"] = None
    started = time.perf_counter()
    result = train(TrainConfig(**fields))
    if not result.published:
        return 0  # another rank of a distributed launch: rank 0 prints and publishes
    minutes = (time.perf_counter() - started) / 60
    folds = result.report.get("cross_validation")
    if folds and folds["kept_input"]:
        print(f"mrl train: published the input model: no number of epochs kept every dim's validation NDCG@10 "
              f"within 0.005 of it across {folds['folds']} folds and gained")  # fmt: skip
    elif folds:
        print(f"mrl train: {folds['folds']}-fold cross-validation chose {folds['epochs']} of {folds['epochs_tried']} "
              f"epochs (mean gain {folds['gain_mean']:+.4f} ± {folds['gain_std']:.4f} over the folds)")  # fmt: skip
    if (result.report.get("validation") or {}).get("kept_input"):
        print("mrl train: published the input model: no checkpoint kept every dim's validation NDCG@10 within "
              "0.005 of it and gained")  # fmt: skip
    summary = f"trained {len(result.dims)} dims in {minutes:.1f} min -> {result.output}"
    if result.before and result.after:
        full, small = max(result.dims), min(result.dims)
        summary += (
            f" | NDCG@10 {full}d {result.before.metric(full):.3f} -> {result.after.metric(full):.3f},"
            f" {small}d {result.before.metric(small):.3f} -> {result.after.metric(small):.3f}"
        )
    print(summary)
    return 0


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="NDCG@10, MRR@10, Recall@k at every dimension",
        description="Encode once at full dimension, then truncate, re-normalise and score every dimension.",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        help="model path or hub name; repeat to compare (e.g. base then tuned)",
    )
    p.add_argument("--data", type=Path, required=True, help="BEIR folder")
    p.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    p.add_argument(
        "--training-split",
        default="train",
        help="the split models were tuned on: questions whose relevant documents are among its positives are also "
        "scored apart (the shared view) from the rest (the clean view); skipped when the folder has no such split; "
        "'none' to skip (default: %(default)s)",
    )
    p.add_argument(
        "--dims", type=dims_argument, default=None, help="comma-separated dims (default: the model's Matryoshka dims)"
    )
    add_output_argument(p, "report folder", default=Path("runs/eval"))
    p.add_argument("--query-prompt", default=None, help="override the model's saved query prompt")
    p.add_argument("--passage-prompt", default=None, help="override the model's saved passage prompt")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=None, help="token limit (default: the model's own)")
    p.add_argument(
        "--workers", type=int, default=1, help="processes that encode the corpus: one per GPU, or CPU processes"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from core.data import load_beir
    from core.matryoshka import validate_dims
    from core.models import SentenceTransformerEncoder, embedding_dimension, encoder_pool, load_model, model_dims
    from training.evaluate import evaluate
    from training.report import comparison_table, write_eval_report

    check_positive(args, ("batch_size", "workers"), ("max_seq_length",))
    training_split = args.training_split
    if training_split in ("none", args.split) or not (args.data / "qrels" / f"{training_split}.tsv").is_file():
        training_split = None
    dataset = load_beir(args.data, [args.split, *([training_split] if training_split else [])])
    training = dataset.split(training_split) if training_split else None
    names = args.models or [None]
    labels = _labels(names)
    results = []
    for name, label in zip(names, labels, strict=True):
        model = load_model(
            name,
            max_seq_length=args.max_seq_length,
            query_prompt=args.query_prompt,
            document_prompt=args.passage_prompt,
        )
        dims = validate_dims(args.dims, embedding_dimension(model)) if args.dims else model_dims(model, name)
        encoder = SentenceTransformerEncoder(model, label, args.batch_size, args.progress)
        with encoder_pool(encoder, args.workers) as pooled:
            results.append(evaluate(pooled, dataset, args.split, dims, training))
    paths = write_eval_report(results, args.out)
    print(comparison_table(results))
    if results[0].views:
        print(f"clean view ({results[0].views['clean']['num_queries']} questions whose relevant documents are no "
              f"{training_split} positive):")  # fmt: skip
        print(comparison_table([result.view("clean") for result in results]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _labels(names: list[str | None]) -> list[str]:
    """Short, distinct table labels for model names or paths."""
    short = [Path(n).name if n else "all-MiniLM-L6-v2" for n in names]
    return short if len(set(short)) == len(short) else [n or "all-MiniLM-L6-v2" for n in names]


def add_adapt_parser(commands: argparse._SubParsersAction) -> None:
    from training.adapt import METHODS, AdaptConfig
    from training.adaptor import INITS

    defaults = AdaptConfig(data=Path("."), output=Path("."))
    fit = defaults.fit
    p = commands.add_parser(
        "adapt",
        help="fit a Matryoshka adaptor (linear map on frozen embeddings) or a PCA rotation; publish the model",
        description="Encode the corpus and training queries once, fit a linear map so that truncated embeddings "
        "rank well at every dim, and publish the model with the map appended as a Dense module.",
    )
    p.add_argument("--data", type=Path, required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    add_output_argument(p, "folder for the adapted model and its report", dest="output")
    p.add_argument("--model", default=None, help="input model: a tuned folder, a local path or hub name")
    p.add_argument(
        "--method",
        choices=METHODS,
        default=defaults.method,
        help="adaptor: fitted map; pca: the corpus's principal axes, no training (default: %(default)s)",
    )
    p.add_argument("--train-split", default=defaults.train_split, help="default: %(default)s")
    p.add_argument(
        "--eval-split",
        default=defaults.eval_split,
        help="scored before and after; 'none' to skip (default: %(default)s)",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=defaults.validation_fraction,
        help="share of the training queries held out to pick the best step, carved as mrl train carves it "
        "(default: %(default)s)",
    )
    p.add_argument("--dims", type=dims_argument, default=None, help="default: the model's Matryoshka dims")
    p.add_argument("--dim-weights", type=weights_argument, default=None, help="loss weight per dim, largest first")
    p.add_argument("--init", choices=INITS, default=fit.init, help="starting map (default: %(default)s)")
    p.add_argument("--steps", type=int, default=fit.steps, help="most optimiser steps (default: %(default)s)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=fit.learning_rate, help="default: %(default)s")
    p.add_argument(
        "--negatives",
        type=int,
        default=fit.negatives,
        help="corpus documents sampled per step (default: %(default)s)",
    )
    p.add_argument(
        "--similarity-weight",
        type=float,
        default=fit.similarity_weight,
        help="weight of the unsupervised neighbour-similarity term (default: %(default)s)",
    )
    p.add_argument(
        "--reconstruction-weight",
        type=float,
        default=fit.reconstruction_weight,
        help="weight of the term that keeps mapped vectors near the input ones (default: %(default)s)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=fit.patience,
        help="validations without gain before stopping (default: %(default)s)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=fit.tolerance,
        help="the never-worse rule: a step is kept only if no dim's validation NDCG@10 falls more than this below "
        "the input model's; none qualifying keeps the input (default: %(default)s)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="choose the start and step by k-fold cross-validation over the training queries, then fit on all "
        "of them (default: 5 folds below 1,000 training queries, else --validation-fraction; 0: never)",
    )
    p.add_argument(
        "--orthogonal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the map a rotation: the full dim's cosines stay the input model's exactly, and only which "
        "directions the leading dims keep is learned; --no-orthogonal: a free map, which can also gain at the full "
        "dim (default: a rotation below 1,000 labelled questions, where a free map can cost the full dim)",
    )
    p.add_argument("--seed", type=int, default=fit.seed, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="encoding batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="processes that encode the corpus")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(handler=run_adapt)


def run_adapt(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from training.adapt import FIT_OPTIONS, KEPT_INPUT, AdaptConfig, adapt
    from training.adaptor import AdaptorConfig

    check_positive(args, ("steps", "learning_rate", "negatives", "patience", "batch_size", "workers"))
    fields = config_fields(args)
    if str(fields["eval_split"]).lower() == "none":
        fields["eval_split"] = None
    fit = AdaptorConfig(dims=[], weights=fields.pop("dim_weights"), **{name: fields.pop(name) for name in FIT_OPTIONS})
    never = fit.folds == 0  # never cross-validate: the held-out --validation-fraction chooses
    if fit.folds is not None and fit.folds < 0:
        raise ConfigError(f"--folds must be 0 (never) or at least 2, got {fit.folds}")
    report = adapt(AdaptConfig(**fields, fit=replace(fit, folds=None) if never else fit), cross_validate=not never)
    if report.get("rule", {}).get("kept_input"):
        print(f"mrl adapt: kept the input model: {KEPT_INPUT.format(tolerance=report['rule']['tolerance'])}")
    summary = f"{report['method']} fitted in {report['fit']['seconds']:.1f} s -> {args.output}"
    if "after" in report:
        before, after = report["before"]["by_dim"], report["after"]["by_dim"]
        summary += " | NDCG@10 " + ", ".join(
            f"{dim}d {before[dim]['ndcg@10']:.3f} -> {after[dim]['ndcg@10']:.3f}" for dim in after
        )
    print(summary)
    return 0
