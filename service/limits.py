"""What one request may ask for, checked before any work; the OpenAPI schema states the same limits."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import InvalidRequest

# A text must hold one character that is not whitespace; the schema's `pattern` is the same regex. The class is
# spelled out because Python's \s (str.isspace: also U+001C-U+001F, U+0085) and JSON Schema's ECMA-262 \s (also
# U+FEFF) differ; this is their union, read the same way by both engines.
NON_BLANK_PATTERN = r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_NON_BLANK = re.compile(NON_BLANK_PATTERN)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; every check names the allowed range in its message."""

    max_k: int = 100
    max_query_chars: int = 2000
    max_batch_queries: int = 64

    def check_texts(self, texts: Sequence[str], what: str = "query") -> None:
        """Raises InvalidRequest for no texts, too many, or an empty, over-long or unencodable one."""
        if not texts:
            raise InvalidRequest(f"at least one {what} is required")
        if len(texts) > self.max_batch_queries:
            raise InvalidRequest(f"at most {self.max_batch_queries} {what} texts per request, got {len(texts)}")
        for number, text in enumerate(texts):
            where = f"{what}" if len(texts) == 1 else f"{what} {number}"
            if not _NON_BLANK.search(text):
                raise InvalidRequest(f"{where} is empty; a non-blank text of 1-{self.max_query_chars} characters")
            if len(text) > self.max_query_chars:
                raise InvalidRequest(
                    f"{where} is {len(text)} characters long; at most {self.max_query_chars} are allowed"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{where} holds an unpaired surrogate; send valid Unicode") from None

    def check_token_ids(self, arrays: Sequence[Sequence[int]], vocab_size: int, *, nested: bool = True) -> None:
        """Raises InvalidRequest for no arrays, too many, or an empty or over-long one, or an id not in the vocabulary.

        A token array may hold as many ids as a text may hold characters (``max_query_chars``); as with a
        text, the model reads its first ``max_seq_length`` tokens. ``nested`` False: one array was sent
        (``input: [ids]``), and the messages point into it as ``input[j]``, else as ``input[i][j]``.
        """
        if not arrays:
            raise InvalidRequest("at least one input is required")
        if len(arrays) > self.max_batch_queries:
            raise InvalidRequest(f"at most {self.max_batch_queries} input token arrays per request, got {len(arrays)}")
        vocabulary = f"the model's vocabulary (0..{vocab_size - 1})"
        for number, ids in enumerate(arrays):
            where = f"input[{number}]" if nested else "input"
            if not ids:
                limit = self.max_query_chars
                raise InvalidRequest(f"{where} is an empty token array; give 1-{limit} ids of {vocabulary}")
            if len(ids) > self.max_query_chars:
                raise InvalidRequest(f"{where} holds {len(ids)} token ids; at most {self.max_query_chars} are allowed")
            for position, token in enumerate(ids):
                if not 0 <= token < vocab_size:
                    raise InvalidRequest(f"{where}[{position}]: token id {token} is outside {vocabulary}")

    def check_k(self, k: int) -> None:
        """Raises InvalidRequest unless ``1 <= k <= max_k``."""
        if not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be between 1 and {self.max_k}, got {k}")
