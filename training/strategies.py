"""What fine-tuning may change: everything, everything above N frozen layers, or LoRA adapters only.

Freezing and layer-wise learning-rate decay protect the general knowledge kept in the lower
layers; LoRA trains small low-rank updates next to frozen weights and is merged back into a
plain model afterwards, so the index builder and the service load the result unchanged.
Only BERT-like encoders (``embeddings`` plus ``encoder.layer``) are supported for freezing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.adapters import inject_lora
from core.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer
    from torch import nn

    from training.config import TrainConfig

# The linear layers of a BERT block: attention projections and both feed-forward layers. The pattern
# (which peft matches against the whole module name) leaves out the pooler, which mean pooling never uses.
LORA_TARGET_MODULES = ["query", "key", "value", "dense"]
LORA_TARGET_PATTERN = rf".*\.layer\.\d+\..*\b({'|'.join(LORA_TARGET_MODULES)})"
ADAPTER_FOLDER = "adapter"


def strategy_name(config: TrainConfig) -> str:
    if config.lora:
        return "lora"
    if config.gradual_unfreeze:
        return "gradual"
    return "freeze" if config.freeze_layers is not None else "full"


def check_strategy_options(config: TrainConfig) -> None:
    """Reject impossible strategy settings before any data or model is loaded.

    Raises:
        ConfigError: With the offending option named, in one line.
    """
    if config.freeze_layers is not None and config.freeze_layers < 0:
        raise ConfigError(f"--freeze-layers must be 0 or more, got {config.freeze_layers}")
    if config.layer_lr_decay is not None and not 0 < config.layer_lr_decay <= 1:
        raise ConfigError(f"--layer-lr-decay must be in (0, 1], got {config.layer_lr_decay}")
    if not config.lora:
        return
    if config.freeze_layers is not None or config.layer_lr_decay is not None or config.gradual_unfreeze:
        raise ConfigError(
            "--lora cannot be combined with --freeze-layers, --layer-lr-decay or --gradual-unfreeze "
            "(it freezes all base weights)"
        )
    if config.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, got {config.lora_rank}")
    if config.lora_alpha <= 0:
        raise ConfigError(f"--lora-alpha must be positive, got {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")


def encoder_parts(model: SentenceTransformer) -> tuple[nn.Module, nn.ModuleList]:
    """The token embeddings and the transformer layers (lowest first) of a BERT-like model.

    Raises:
        ConfigError: For an architecture without ``embeddings`` and ``encoder.layer``.
    """
    auto_model = getattr(model[0], "auto_model", None)
    embeddings = getattr(auto_model, "embeddings", None)
    layers = getattr(getattr(auto_model, "encoder", None), "layer", None)
    if embeddings is None or layers is None:
        name = type(auto_model).__name__
        raise ConfigError(f"layer freezing and decay need a BERT-like model (embeddings + encoder.layer), not {name}")
    return embeddings, layers


def freeze_lower_layers(model: SentenceTransformer, num_frozen: int) -> None:
    """Freeze the token embeddings and the lowest ``num_frozen`` layers; at least one layer must stay trainable.

    Raises:
        ConfigError: If ``num_frozen`` is negative or leaves no layer to train.
    """
    embeddings, layers = encoder_parts(model)
    if not 0 <= num_frozen < len(layers):
        raise ConfigError(
            f"--freeze-layers {num_frozen}: the model has {len(layers)} transformer layers; "
            f"freeze between 0 and {len(layers) - 1}"
        )
    for module in [embeddings, *layers[:num_frozen]]:
        module.requires_grad_(False)


def layer_learning_rates(
    num_layers: int, learning_rate: float, decay: float, frozen: int | None = None
) -> dict[str, float]:
    """Learning rate per parameter-name pattern: top layer ``learning_rate``, each lower one ``decay`` times that.

    The embeddings sit one step below the lowest layer. Frozen parts (the embeddings and the
    lowest ``frozen`` layers when ``frozen`` is set) get no entry. The patterns are regular
    expressions over parameter names, the form SentenceTransformerTrainingArguments'
    ``learning_rate_mapping`` takes; parameters they do not match keep ``learning_rate``.
    """
    rates = {}
    if frozen is None:
        rates[r"\.embeddings\."] = learning_rate * decay**num_layers
    for layer in range(frozen or 0, num_layers):
        rates[rf"\.encoder\.layer\.{layer}\."] = learning_rate * decay ** (num_layers - 1 - layer)
    return rates


def unfreezing_units(model: SentenceTransformer, config: TrainConfig) -> list[nn.Module]:
    """What gradual unfreezing releases, top layer first: the layers above ``--freeze-layers``, then (with no
    frozen floor) the embeddings."""
    embeddings, layers = encoder_parts(model)
    floor = config.freeze_layers or 0
    return [*reversed(layers[floor:]), *([embeddings] if config.freeze_layers is None else [])]


def learning_rate_mapping(model: SentenceTransformer, config: TrainConfig, learning_rate: float) -> dict[str, float]:
    """``layer_learning_rates`` for this model and config; empty without ``--layer-lr-decay``."""
    if config.layer_lr_decay is None:
        return {}
    _, layers = encoder_parts(model)
    return layer_learning_rates(len(layers), learning_rate, config.layer_lr_decay, config.freeze_layers)


def add_lora(model: SentenceTransformer, config: TrainConfig, base_model: str) -> LoraConfig:
    """Inject LoRA layers into the transformer in place; only their weights stay trainable."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGET_PATTERN,
        base_model_name_or_path=base_model,
    )
    try:
        inject_lora(model, lora)
    except ValueError as exc:  # peft: no linear layer matches the BERT-like target pattern
        name = type(model[0].auto_model).__name__
        raise ConfigError(f"--lora needs a BERT-like model (encoder.layer.N linear layers), not {name}") from exc
    return lora


def load_lora_checkpoint(model: SentenceTransformer, checkpoint: Path) -> None:
    """Load a checkpoint written during LoRA training into the model, whose LoRA layers are still injected.

    The checkpoint holds the injected model's own state (base weights plus ``lora_A``/``lora_B``),
    which sentence-transformers' loader cannot read into a plain model; this reads it back as it was saved.

    Raises:
        RuntimeError: If the checkpoint's weights do not match the injected model (another rank or model).
    """
    from safetensors.torch import load_file

    model[0].auto_model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))


def lora_trainer(trainer_class: type) -> type:
    """``trainer_class`` reading its checkpoints (best model at the end, ``--resume``) with the LoRA layers kept."""

    class LoraCheckpointTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def _load_from_checkpoint(self, checkpoint_path: str, *args: Any, **kwargs: Any) -> None:
            load_lora_checkpoint(getattr(self.model, "_orig_mod", self.model), Path(checkpoint_path))

    return LoraCheckpointTrainer


def parameter_counts(model: SentenceTransformer) -> dict[str, int]:
    parameters = list(model.parameters())
    return {
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "total_parameters": sum(p.numel() for p in parameters),
    }


def apply_strategy(
    model: SentenceTransformer, config: TrainConfig, base_model: str
) -> tuple[dict[str, Any], LoraConfig | None]:
    """Freeze or add LoRA as configured; return the strategy's description and the LoRA config (or ``None``).

    Raises:
        ConfigError: For an unsupported architecture, too many frozen layers, or --lora on a model
            without BERT-like layers.
    """
    description: dict[str, Any] = {"name": strategy_name(config)}
    lora = None
    if config.lora:
        lora = add_lora(model, config, base_model)
        description |= {
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "lora_target_modules": LORA_TARGET_MODULES,
        }
    if config.freeze_layers is not None:
        freeze_lower_layers(model, config.freeze_layers)
        description["frozen_layers"] = config.freeze_layers
    if config.layer_lr_decay is not None:
        encoder_parts(model)  # fail now, not when the optimizer is built
        description["layer_lr_decay"] = config.layer_lr_decay
    if config.gradual_unfreeze:
        description["gradual_unfreeze_units"] = len(unfreezing_units(model, config))
    return description | parameter_counts(model), lora
