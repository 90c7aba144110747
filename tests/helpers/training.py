"""What the training tests share: copies of the tiny model with other settings, and weights to compare.

The tiny model (the session fixture ``tiny_model``, :mod:`tests.helpers.models`) serves every test
of training *mechanics*; these helpers derive what some of them need from it: a copy without
dropout (two processes then match one exactly), a copy as deep as the real model (six layers, so
tests of layer freezing and unfreezing keep the real model's layer arithmetic), and the weights of
a model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.models import TINY_DIM

if TYPE_CHECKING:
    import torch

REAL_LAYERS = 6  # all-MiniLM-L6-v2's transformer layers


def without_dropout(model: Path, folder: Path) -> Path:
    """A copy of ``model`` at ``folder`` with dropout off: two runs then differ only by how they add up."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_tiny_model_with_layers(tiny_model: Path, folder: Path, layers: int = REAL_LAYERS, seed: int = 0) -> Path:
    """The tiny model's architecture and tokenizer with ``layers`` transformer layers, randomly initialised."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    source = folder.parent / f".{folder.name}-transformer"
    BertModel(config).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(source)
    transformer = Transformer(str(source), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(TINY_DIM, "mean"), Normalize()], device="cpu")
    model.save(str(folder))
    return folder


def encoder_weights(model: str | Path) -> dict[str, torch.Tensor]:
    """The transformer's weights of a model folder, by parameter name (copies: safe to keep while training)."""
    from core.models import load_model

    return {k: v.clone() for k, v in load_model(str(model))[0].auto_model.state_dict().items()}
