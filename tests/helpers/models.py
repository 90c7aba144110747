"""Models for the tests: the real default model loaded once per worker, and a tiny random BERT.

The tiny model is built here from a config (no download): two transformer layers of width 64
behind the real MiniLM tokenizer, mean pooling and normalisation, saved as a sentence-transformers
folder. Its embeddings mean nothing, and that is the point: tests of training *mechanics* (loss
schedule, resume, process groups, strategies, adaptor plumbing) run on it in a fraction of the
time, while a few tests still train and serve the real default model end to end.
"""

from __future__ import annotations

from pathlib import Path

TINY_DIM = 64
TINY_DIMS = [64, 32]


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer BERT (width 64) with MiniLM's tokenizer to ``folder``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TINY_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    source = folder.parent / f".{folder.name}-transformer"
    BertModel(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    transformer = Transformer(str(source), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(TINY_DIM, "mean"), Normalize()], device="cpu")
    model.save(str(folder))
    return folder
