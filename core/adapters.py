"""LoRA adapters on a sentence-transformers model: inject, merge into the weights, apply a saved one.

Shared by training (which trains and publishes adapters) and model loading (which accepts an
adapter folder as a model). peft is imported only when an adapter is really used, so loading
a plain model, and the service, never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ModelError

if TYPE_CHECKING:
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer
    from torch import Tensor


@dataclass
class LoraAdapter:
    """A trained adapter taken out of the model before merging, ready to be saved."""

    config: LoraConfig
    state: dict[str, Tensor]

    def save(self, folder: Path) -> None:
        """Write the standard PEFT layout (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(folder))
        # PeftModel keys its weights under base_model.model.; keep that so PeftModel.from_pretrained reads it.
        tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in self.state.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))


def inject_lora(model: SentenceTransformer, lora: LoraConfig) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora, model[0].auto_model)


def merge_lora(model: SentenceTransformer, lora: LoraConfig) -> LoraAdapter:
    """Fold the LoRA updates into the base weights and remove the LoRA layers; return the adapter.

    transformers' own PEFT integration (``model.add_adapter``) would do this too, but it needs a
    newer peft than the one we can install, so the layers are injected and merged here.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    auto_model = model[0].auto_model
    adapter = LoraAdapter(lora, get_peft_model_state_dict(auto_model, save_embedding_layers=False))
    for name, module in list(auto_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(auto_model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(auto_model, "peft_config"):
        del auto_model.peft_config
    return adapter


def apply_adapter(model: SentenceTransformer, folder: Path) -> None:
    """Add a saved LoRA adapter (PEFT layout, as ``LoraAdapter.save`` writes it) to the base model and merge it.

    The same injection and merge as at the end of training, so the result equals the published
    merged model bit for bit (and an index built from one serves the other).
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = LoraConfig.from_pretrained(str(folder))
    inject_lora(model, lora)
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(model[0].auto_model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelError(f"{folder}: the adapter lacks {len(missing)} LoRA weights of the model, e.g. {missing[0]}")
    merge_lora(model, lora)
