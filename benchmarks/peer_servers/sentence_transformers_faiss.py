"""The plain baseline: sentence-transformers + an exact FAISS index behind a minimal FastAPI app.

What a user writes in thirty lines without this project: encode the corpus once with
``normalize_embeddings=True``, put it in ``faiss.IndexFlatIP``, answer ``GET /search?q=...&k=...``
by encoding the query and searching. No micro-batching, no Matryoshka dims, no metrics; FastAPI
runs the synchronous route in its thread pool. It imports nothing from this project on purpose.

    python -m benchmarks.peer_servers.sentence_transformers_faiss --corpus corpus.jsonl --model MODEL_DIR --port 8001

The corpus is JSON lines with ``id`` and ``text`` (the passage to encode). The corpus is encoded
before the server listens; ``GET /info`` then reports how long loading the model and building the
index took, so answering at all means ready.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Annotated, Any

import faiss
import uvicorn
from fastapi import FastAPI, Query
from sentence_transformers import SentenceTransformer

LOOPBACK = "127.0.0.1"
MAX_K = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sentence-transformers + FAISS IndexFlatIP search server")
    parser.add_argument("--corpus", type=Path, required=True, help="JSON lines with id and text")
    parser.add_argument("--model", required=True, help="sentence-transformers model folder")
    parser.add_argument("--query-prompt", default="", help="text put before each query (default: none)")
    parser.add_argument("--document-prompt", default="", help="text put before each passage (default: none)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="token limit (default: the model's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: sentence-transformers' choice)")
    parser.add_argument("--batch-size", type=int, default=64, help="corpus encoding batch size")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    return parser.parse_args(argv)


def create_app(args: argparse.Namespace) -> FastAPI:
    """Load the model, encode the corpus, build the index; return the FastAPI app that searches it."""
    started = time.perf_counter()
    model = SentenceTransformer(args.model, device=args.device)
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    loaded = time.perf_counter()
    with args.corpus.open(encoding="utf-8") as lines:
        docs = [json.loads(line) for line in lines if line.strip()]
    vectors = model.encode(
        [doc["text"] for doc in docs],
        prompt=args.document_prompt,
        normalize_embeddings=True,
        batch_size=args.batch_size,
        convert_to_numpy=True,
    )
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors.astype("float32"))
    info = {
        "model": args.model,
        "num_vectors": index.ntotal,
        "dim": index.d,
        "load_s": round(loaded - started, 3),
        "build_s": round(time.perf_counter() - loaded, 3),
    }

    app = FastAPI(title="sentence-transformers + FAISS")

    @app.get("/search")
    def search(q: str, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> dict[str, Any]:
        query = model.encode([q], prompt=args.query_prompt, normalize_embeddings=True, convert_to_numpy=True)
        scores, rows = index.search(query.astype("float32"), k)
        hits = [
            {"id": docs[row]["id"], "score": float(score), "text": docs[row]["text"]}
            for score, row in zip(scores[0], rows[0], strict=True)
            if row >= 0
        ]
        return {"hits": hits}

    @app.get("/info")
    def describe() -> dict[str, Any]:
        return info

    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    uvicorn.run(create_app(args), host=LOOPBACK, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
