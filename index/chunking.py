"""Splitting long documents into passages that the model reads whole, in the model's own tokens.

An encoder reads at most its window (``max_seq_length`` less its special tokens); the rest of a longer
document is cut off silently, so a question answered on its fifth page can never find it. A document
that does not fit is therefore split into passages of at most ``size`` tokens (the title and the
document prompt, which go in front of every passage, included), each overlapping the one before by
``overlap`` tokens. A passage ends at the last paragraph break in the second half of its window,
else at the last line break, else after the last sentence, else where the window ends. Token offsets
from the fast tokenizer give each passage its exact character span: ``document.text[start:end]`` is
the passage's text. A document that fits stays one passage with its own id.

With chunking off (``size=0``) nothing is split, and the documents longer than the window are counted
(the build reports them and ``mrl index info`` shows them), never cut without a word.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.data import Document
from core.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP = 32
MIN_TEXT_TOKENS = 16  # the least text a passage holds, however long the title
TOKENIZE_BATCH = 256
SENTENCE_ENDS = ".!?"
PASSAGE_SEPARATOR = "#"  # a passage's id: "<document id>#<number>"


@dataclass(frozen=True)
class ChunkSettings:
    """How documents are split: ``size`` tokens per passage (None: the model's window; 0: never split)."""

    size: int | None = None
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ConfigError(f"--chunk-size must be 0 (off) or a number of tokens, got {self.size}")
        if self.overlap < 0 or (self.size and self.overlap >= self.size // 2):
            raise ConfigError(f"--chunk-overlap must be at least 0 and below half of --chunk-size, got {self.overlap}")

    @property
    def enabled(self) -> bool:
        return self.size != 0


@dataclass
class ChunkReport:
    """What chunking did to a corpus; the manifest keeps it (``chunking``)."""

    size: int  # tokens per passage, title and prompt included (0: off)
    overlap: int
    window: int  # the model's window in tokens, special tokens excluded
    documents: int
    passages: int
    split_documents: int  # documents cut into several passages
    over_window: int  # documents longer than the window, not split (chunking off): their ends are never read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkReport:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    def describe(self) -> str:
        if not self.size:
            if not self.over_window:
                return f"{self.documents} documents, none longer than the model's window ({self.window} tokens)"
            return (
                f"chunking off: {self.over_window} of {self.documents} documents are longer than the model's window "
                f"({self.window} tokens) and are cut there; index with --chunk-size to split them"
            )
        if not self.split_documents:
            return f"{self.documents} documents, each one passage (none longer than {self.size} tokens)"
        return (
            f"{self.documents} documents → {self.passages} passages of at most {self.size} tokens "
            f"({self.overlap} overlapping); {self.split_documents} documents split"
        )


def model_window(model: Any) -> int:
    """Tokens of text the model reads: its ``max_seq_length`` less the special tokens it adds."""
    tokenizer = model.tokenizer
    return int(model.max_seq_length) - int(tokenizer.num_special_tokens_to_add(pair=False))


def chunk_documents(
    documents: Sequence[Document], tokenizer: Any, window: int, settings: ChunkSettings, prompt: str = ""
) -> tuple[list[Document], ChunkReport]:
    """The passages of ``documents``, in order (a document's passages together), and what was done.

    Args:
        documents: Whole documents (none of them a passage already).
        tokenizer: The model's fast tokenizer (offsets are needed).
        window: :func:`model_window` of the model.
        settings: Passage size and overlap.
        prompt: The model's document prompt, which every passage is encoded behind.
    """
    size = window if not settings.size else min(settings.size, window)  # off: what the window holds
    if settings.enabled and settings.overlap >= size // 2:
        raise ConfigError(
            f"--chunk-overlap must be below half of the passage size ({size} tokens), got {settings.overlap}"
        )
    reserved = _token_count(tokenizer, prompt) if prompt else 0
    passages: list[Document] = []
    split = over = 0
    for start in range(0, len(documents), TOKENIZE_BATCH):
        batch = documents[start : start + TOKENIZE_BATCH]
        offsets = _offsets(tokenizer, [document.text for document in batch])
        titles = _offsets(tokenizer, [document.title for document in batch])
        for document, spans, title in zip(batch, offsets, titles, strict=True):
            budget = max(MIN_TEXT_TOKENS, size - reserved - len(title))
            if len(spans) <= budget:
                passages.append(document)
            elif not settings.enabled:
                passages.append(document)
                over += 1
            else:
                cut = list(_split(document, spans, budget, settings.overlap))
                passages.extend(cut)
                split += 1
    report = ChunkReport(
        size=size if settings.enabled else 0,
        overlap=settings.overlap if settings.enabled else 0,
        window=window,
        documents=len(documents),
        passages=len(passages),
        split_documents=split,
        over_window=over,
    )
    logger.info("%s", report.describe())
    return passages, report


def _token_count(tokenizer: Any, text: str) -> int:
    return len(_offsets(tokenizer, [text])[0])


def _offsets(tokenizer: Any, texts: list[str]) -> list[list[tuple[int, int]]]:
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
    return [[(int(a), int(b)) for a, b in spans if b > a] for spans in encoded["offset_mapping"]]


def _split(document: Document, spans: list[tuple[int, int]], budget: int, overlap: int):
    text = document.text
    first, number = 0, 0
    while first < len(spans):
        last = min(first + budget, len(spans))  # the passage is tokens [first, last)
        if last < len(spans):
            last = _boundary(text, spans, first + budget // 2, last)
        start, end = spans[first][0], spans[last - 1][1]
        yield Document(
            f"{document.id}{PASSAGE_SEPARATOR}{number}",
            text[start:end],
            document.title,
            document.metadata,
            parent=document.id,
            start=start,
            end=end,
        )
        if last >= len(spans):
            return
        number += 1
        first = max(last - overlap, first + 1)


def _boundary(text: str, spans: list[tuple[int, int]], earliest: int, latest: int) -> int:
    """Where to end a passage: before token ``c`` in ``(earliest, latest]``, at the strongest break found last."""
    best: dict[int, int] = {}
    for cut in range(latest, earliest, -1):
        gap = text[spans[cut - 1][1] : spans[cut][0]]
        sentence = text[spans[cut - 1][1] - 1] in SENTENCE_ENDS
        strength = 3 if "\n\n" in gap else 2 if "\n" in gap else 1 if sentence else 0
        if strength and strength not in best:
            best[strength] = cut
            if strength == 3:
                break
    return best[max(best)] if best else latest
