"""``TrainConfig``: everything ``mrl train`` can be told, in a module of its own.

The training modules that read it (``train``, ``strategies``, ``validation``) import it from
here, so none of them needs another for its type, and the import graph has no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import json_fields


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
    train_only_dims: list[int] | None = None
    dim_weights: list[float] | None = None
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
    gradual_unfreeze: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    validation_fraction: float | None = None
    folds: int | None = None  # choose the number of epochs by k-fold cross-validation over the training questions
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "ndcg@10"
    early_stopping_dim: int | None = None
    report_to: str = "none"
    forgetting_data: Path | None = None
    forgetting_split: str = "test"

    def settings(self) -> dict[str, Any]:
        return json_fields(self)
