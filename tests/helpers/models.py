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


def save_tiny_model(folder: Path, seed: int = 0, architecture: str = "bert", pooling: str = "mean") -> Path:
    """Write a randomly initialised 2-layer transformer (width 64) with MiniLM's tokenizer to ``folder``.

    ``architecture``: ``bert`` (the default), ``roberta`` (position ids counted after the padding id, as
    XLM-RoBERTa models such as multilingual-e5 count them) or ``distilbert``.
    """
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer

    from core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    if architecture == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=TINY_DIM, n_layers=2, n_heads=4, hidden_dim=128
        )
    else:
        kind = {"bert": "Bert", "roberta": "Roberta"}[architecture]
        config = getattr(transformers, f"{kind}Config")(
            vocab_size=tokenizer.vocab_size,
            hidden_size=TINY_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512 + (tokenizer.pad_token_id + 1 if architecture == "roberta" else 0),
            pad_token_id=tokenizer.pad_token_id,
        )
    network = {"bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel"}[architecture]
    torch.manual_seed(seed)
    source = folder.parent / f".{folder.name}-transformer"
    getattr(transformers, network)(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    transformer = Transformer(str(source), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(TINY_DIM, pooling), Normalize()], device="cpu")
    model.save(str(folder))
    return folder
