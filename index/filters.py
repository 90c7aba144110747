"""Metadata filters: one grammar, the one Pinecone and Chroma users know, answered alike by FAISS and by Milvus.

Grammar. A filter is an object of conditions, all of which must hold::

    {"topic": "Gout"}                                  # implicit $eq
    {"year": {"$gte": 2000, "$lt": 2010}}              # several operators on one field: all must hold
    {"topic": {"$in": ["Gout", "Flu"]}, "year": 2001}  # several keys: $and of them
    {"$or": [{"topic": "Gout"}, {"year": {"$lt": 1990}}]}

Operators: ``$eq $ne $in $nin`` on strings, numbers and booleans; ``$gt $gte $lt $lte`` on numbers
only; ``$and`` / ``$or`` take a non-empty list of filters. ``$in`` / ``$nin`` take a non-empty
list (at most ``MAX_IN_VALUES``) of values of the field's type. Filters nest at most ``MAX_DEPTH``
levels. Fields are the top-level keys of the documents' ``metadata``; each has one type across the
corpus (:func:`metadata_fields`, recorded in the manifest), and a value of another type is refused:
``2000`` never matches ``"2000"``. A field holding lists, objects or values of several types cannot
be filtered on. Every problem is a :class:`FilterError` naming where in the filter it is.

Semantics (the same on every engine, tested on FAISS, Milvus Lite and a Milvus 2.3.5 server):

* A comparison on a field a row does not have is false; a ``null`` value counts as not having it.
* ``$ne`` and ``$nin`` are the negations of ``$eq`` and ``$in``: a row without the field matches them.
* Numbers compare as 64-bit floats (integers are exact up to 2**53); ``true`` is not the number 1.
* Strings compare exactly (case, accents and spaces count); there are no ranges over strings.

FAISS evaluates a filter over a :class:`MetadataTable` (one column per field, built once per loaded
version) into a row mask, vectorised, and searches only the allowed rows (:class:`SearchFilter`).
Milvus evaluates :meth:`Filter.milvus_expr` on a JSON field of every dim collection. Milvus Lite
treats a comparison on a missing key as unknown, and ``not unknown`` as unknown (so ``not (x == v)``
would drop rows without ``x``), where the 2.3 server takes it as false; Lite also finds no ``null``
key where the server finds one, and has no ``in`` over JSON. The expression is therefore written so
that no ``not`` ever applies to an unknown: ``$ne`` is ``not ((exists m["x"]) and (m["x"] == v))``,
``$in`` a tree of ``==`` joined by ``or``. Operands are joined as balanced trees, because the server
refuses an expression nested more than about 49 levels deep (``MAX_EXPRESSION_DEPTH``).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import MrlError

STRING, NUMBER, BOOL, MIXED, LIST, OBJECT = "string", "number", "bool", "mixed", "list", "object"
FILTERABLE = (STRING, NUMBER, BOOL)
OPERATORS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte")
RANGES: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "$gt": (">", operator.gt),
    "$gte": (">=", operator.ge),
    "$lt": ("<", operator.lt),
    "$lte": ("<=", operator.le),
}
LOGICAL = ("$and", "$or")
MAX_IN_VALUES = 1000
MAX_DEPTH = 8  # nested $and / $or levels
MAX_CONDITIONS = 1000  # comparisons in one filter
# Levels of and/or/not a Milvus 2.3 server takes in one expression (49 fail there); kept with a margin.
MAX_EXPRESSION_DEPTH = 40
EXACT_INTEGERS = 2**53  # beyond this, integers are compared as the floats they round to
KIND_NAMES = {STRING: "strings", NUMBER: "numbers", BOOL: "booleans (true or false)"}
WHY_NOT = {MIXED: "values of several types", LIST: "lists", OBJECT: "objects"}
SHOWN_FIELDS = 50
JSON_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FilterError(MrlError, ValueError):
    """A filter that cannot be applied: the message names where in it (``filter.year.$gt``) and what is allowed."""


# --- metadata values ---------------------------------------------------------------------------------


def scalar(value: Any) -> str | int | float | bool | None:
    """``value`` as filters see it: strings, booleans and finite numbers as they are (integers beyond
    2**53 as floats), anything else (``null``, NaN, lists, objects) None."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= EXACT_INTEGERS else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def value_kind(value: Any) -> str | None:
    """The kind of one metadata value: ``string``, ``number``, ``bool``, ``list``, ``object``; None for ``null``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int | float):
        return NUMBER
    if isinstance(value, str):
        return STRING
    return LIST if isinstance(value, list | tuple) else OBJECT


def filterable_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The top-level entries of ``metadata`` a filter can test (see :func:`scalar`): what an engine keeps per row."""
    kept = {key: scalar(value) for key, value in metadata.items()} if isinstance(metadata, dict) else {}
    return {key: value for key, value in kept.items() if value is not None}


def metadata_fields(metadatas: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Each top-level metadata key's type across ``metadatas``: ``string``, ``number`` (int or float; a
    boolean is not a number), ``bool``, or, not filterable, ``list``, ``object`` or ``mixed`` (several).

    ``null`` values are left out; a key that is only ever ``null`` is not a field.
    """
    kinds: dict[str, str] = {}
    for metadata in metadatas:
        for key, value in (metadata if isinstance(metadata, dict) else {}).items():
            kind = value_kind(value)
            if kind is not None:
                kinds[key] = kind if kinds.get(key, kind) == kind else MIXED
    return dict(sorted(kinds.items()))


# --- the table FAISS filters with --------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataColumn:
    """One field over every row: whether each row has it, and its values (floats, booleans, or string codes)."""

    kind: str
    present: np.ndarray  # bool, one per row
    values: np.ndarray  # float64 (numbers), bool, or int32 codes into `vocabulary` (-1: absent)
    vocabulary: dict[str, int] = field(default_factory=dict)

    def equal(self, value: Any) -> np.ndarray:
        if self.kind == STRING:
            code = self.vocabulary.get(value)
            return np.zeros(len(self.values), dtype=bool) if code is None else self.values == code
        return self.present & (self.values == value)

    def isin(self, values: tuple) -> np.ndarray:
        if self.kind == STRING:
            values = tuple(self.vocabulary[v] for v in values if v in self.vocabulary)
        if not values:
            return np.zeros(len(self.values), dtype=bool)
        return self.present & np.isin(self.values, np.asarray(values))


class MetadataTable:
    """Every row's filterable metadata as columns (numpy arrays), so that a filter over a million rows is a
    few vectorised comparisons; built once per loaded version, in row order."""

    def __init__(self, rows: int, columns: dict[str, MetadataColumn], fields: dict[str, str]) -> None:
        self.rows = rows
        self.columns = columns
        self.fields = fields  # every field's kind (metadata_fields), the unfilterable ones too

    def __len__(self) -> int:
        return self.rows

    @classmethod
    def build(cls, metadatas: Iterable[dict[str, Any]], fields: dict[str, str] | None = None) -> MetadataTable:
        """The table of ``metadatas`` (row ``i`` is the ``i``-th), for ``fields`` (default: their own
        :func:`metadata_fields`). A value of another kind than its field's counts as absent."""
        metadatas = list(metadatas)
        fields = metadata_fields(metadatas) if fields is None else dict(fields)
        metadatas = [filterable_metadata(metadata) for metadata in metadatas]
        kinds = {name: kind for name, kind in fields.items() if kind in FILTERABLE}
        collected: dict[str, tuple[list[int], list[Any]]] = {name: ([], []) for name in kinds}
        for row, metadata in enumerate(metadatas):
            for key, value in metadata.items():
                if key in kinds and value_kind(value) == kinds[key]:
                    collected[key][0].append(row)
                    collected[key][1].append(value)
        columns = {name: _column(kinds[name], len(metadatas), *collected[name]) for name in kinds}
        return cls(len(metadatas), columns, fields)

    def column(self, name: str, kind: str) -> MetadataColumn:
        """Field ``name`` as a column of ``kind``; a field this table lacks (or holds as another kind) is absent."""
        found = self.columns.get(name)
        if found is not None and found.kind == kind:
            return found
        absent = np.zeros(self.rows, dtype=bool)
        values = {STRING: np.full(self.rows, -1, dtype=np.int32), NUMBER: np.full(self.rows, np.nan)}
        return MetadataColumn(kind, absent, values.get(kind, absent))


def _column(kind: str, rows: int, where: list[int], values: list[Any]) -> MetadataColumn:
    present = np.zeros(rows, dtype=bool)
    present[where] = True
    vocabulary: dict[str, int] = {}
    if kind == NUMBER:
        column = np.full(rows, np.nan)
        column[where] = np.asarray(values, dtype=np.float64)
    elif kind == BOOL:
        column = np.zeros(rows, dtype=bool)
        column[where] = values
    else:
        column = np.full(rows, -1, dtype=np.int32)
        column[where] = [vocabulary.setdefault(value, len(vocabulary)) for value in values]
    return MetadataColumn(kind, present, column, vocabulary)


# --- parsed filters ----------------------------------------------------------------------------------


class Filter:
    """A parsed filter: evaluated over a :class:`MetadataTable` (:meth:`mask`) or written for Milvus
    (:meth:`milvus_expr`), with the same answer."""

    depth: int  # levels of and / or / not in its Milvus expression
    conditions: int  # comparisons in it

    def mask(self, table: MetadataTable) -> np.ndarray:
        """Which rows of ``table`` it allows: a bool array of ``len(table)``."""
        raise NotImplementedError

    def milvus_expr(self, json_field: str) -> str:
        """The same filter as a Milvus boolean expression over the JSON field ``json_field`` holding each row's
        metadata (every value escaped: a filter value never becomes expression syntax)."""
        if not JSON_FIELD_NAME.fullmatch(json_field):
            raise ValueError(f"{json_field!r} is not a Milvus field name")
        return self._expression(json_field)

    def _expression(self, json_field: str) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Comparison(Filter):
    """One operator on one field: ``value`` is a scalar, or a tuple of them for ``$in`` / ``$nin``."""

    field: str
    operator: str
    value: Any
    kind: str

    @property
    def negated(self) -> bool:
        return self.operator in ("$ne", "$nin")

    @property
    def depth(self) -> int:
        spread = _levels(len(self.value)) if self.operator in ("$in", "$nin") else 0
        return spread + (2 if self.negated else 0)

    conditions = 1

    def mask(self, table: MetadataTable) -> np.ndarray:
        column = table.column(self.field, self.kind)
        if self.operator in ("$eq", "$ne"):
            matches = column.equal(self.value)
        elif self.operator in ("$in", "$nin"):
            matches = column.isin(self.value)
        else:
            matches = column.present & RANGES[self.operator][1](column.values, self.value)
        return ~matches if self.negated else matches

    def _expression(self, json_field: str) -> str:
        reference = f"{json_field}[{milvus_string(self.field)}]"
        if self.operator in ("$in", "$nin"):
            positive = _balanced([f"{reference} == {milvus_literal(v)}" for v in self.value], "or")
        elif self.operator in ("$eq", "$ne"):
            positive = f"{reference} == {milvus_literal(self.value)}"
        else:
            positive = f"{reference} {RANGES[self.operator][0]} {milvus_literal(self.value)}"
        # `exists` first: Lite's `not` of a comparison on a missing key is unknown, not true (module docstring).
        return f"not ((exists {reference}) and ({positive}))" if self.negated else positive


@dataclass(frozen=True)
class Combination(Filter):
    """``$and`` (``every``) or ``$or`` (not ``every``) of two or more filters."""

    parts: tuple[Filter, ...]
    every: bool

    @property
    def depth(self) -> int:
        return _levels(len(self.parts)) + max(part.depth for part in self.parts)

    @property
    def conditions(self) -> int:
        return sum(part.conditions for part in self.parts)

    def mask(self, table: MetadataTable) -> np.ndarray:
        result = self.parts[0].mask(table)
        for part in self.parts[1:]:  # one array at a time: a stack of every part's mask could be large
            result = (result & part.mask(table)) if self.every else (result | part.mask(table))
        return result

    def _expression(self, json_field: str) -> str:
        return _balanced([part._expression(json_field) for part in self.parts], "and" if self.every else "or")


def combine(parts: list[Filter], every: bool) -> Filter:
    """``parts`` joined by $and (``every``) or $or; one part is itself, and nested joins of the same kind merge."""
    flat: list[Filter] = []
    for part in parts:
        same = isinstance(part, Combination) and part.every == every
        flat.extend(part.parts if same else [part])
    return flat[0] if len(flat) == 1 else Combination(tuple(flat), every)


def _levels(count: int) -> int:
    return math.ceil(math.log2(count)) if count > 1 else 0


def _balanced(parts: list[str], word: str) -> str:
    """``parts`` joined by ``word`` as a balanced tree (a chain would nest as deep as it is long)."""
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return f"({_balanced(parts[:middle], word)}) {word} ({_balanced(parts[middle:], word)})"


def milvus_string(text: str) -> str:
    """``text`` as a Milvus string literal: in double quotes, with backslashes, quotes, newlines, tabs and
    carriage returns escaped; every other character as it is (Milvus reads no ``\\u`` escapes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def milvus_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return milvus_string(value)
    return repr(float(value)) if isinstance(value, float) else str(int(value))


# --- parsing -----------------------------------------------------------------------------------------


def parse_filter(raw: Any, fields: dict[str, str]) -> Filter | None:
    """``raw`` (a request's filter object) checked against the index's ``fields`` (:func:`metadata_fields`).

    Returns:
        The filter, or None for no filter (``None`` or ``{}``).

    Raises:
        FilterError: Naming where in the filter the problem is, and what is allowed there.
    """
    if raw is None or raw == {}:
        return None
    parsed = _parse_object(raw, "filter", fields, 0)
    if parsed.conditions > MAX_CONDITIONS:
        raise FilterError(f"filter: {parsed.conditions} conditions, at most {MAX_CONDITIONS}")
    if parsed.depth > MAX_EXPRESSION_DEPTH:
        raise FilterError(
            f"filter: nested too deeply once its lists are paired up ({parsed.depth} levels, at most "
            f"{MAX_EXPRESSION_DEPTH}): use fewer nested $and / $or, or shorter lists"
        )
    return parsed


def _parse_object(raw: Any, path: str, fields: dict[str, str], level: int) -> Filter:
    """One filter object, ``level`` $and / $or lists deep."""
    if level > MAX_DEPTH:
        raise FilterError(f"{path}: nested deeper than {MAX_DEPTH} levels of $and / $or")
    if not isinstance(raw, dict) or not raw:
        raise FilterError(f'{path}: expects an object of conditions such as {{"topic": "Gout"}}, got {_shown(raw)}')
    parts = []
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key in LOGICAL:
            if not isinstance(value, list) or not value:
                raise FilterError(f"{where}: expects a non-empty list of filters")
            items = [_parse_object(item, f"{where}[{i}]", fields, level + 1) for i, item in enumerate(value)]
            parts.append(combine(items, every=key == "$and"))
        elif isinstance(key, str) and key.startswith("$"):
            raise FilterError(f"{where}: unknown operator here; use $and, $or or a field name")
        else:
            parts.append(_parse_field(key, value, where, fields))
    return combine(parts, every=True)


def _parse_field(name: str, value: Any, path: str, fields: dict[str, str]) -> Filter:
    if name not in fields:
        raise FilterError(f"{path}: unknown field {name!r}; fields: {_listed(fields)}")
    kind = fields[name]
    if kind not in FILTERABLE:
        raise FilterError(
            f"{path}: field {name!r} holds {WHY_NOT.get(kind, kind)}, which cannot be filtered on; "
            "only fields of strings, numbers or booleans can"
        )
    if not isinstance(value, dict):
        return Comparison(name, "$eq", _scalar(value, path, name, kind), kind)
    if not value:
        raise FilterError(f"{path}: expects a value or an object of operators ({', '.join(OPERATORS)})")
    parts = []
    for op, operand in value.items():
        where = f"{path}.{op}"
        if op not in OPERATORS:
            raise FilterError(f"{where}: unknown operator; operators: {', '.join(OPERATORS)}")
        if op in RANGES and kind != NUMBER:
            raise FilterError(
                f"{where}: ranges ($gt, $gte, $lt, $lte) apply to numbers, and {name} holds {KIND_NAMES[kind]}"
            )
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or not operand or len(operand) > MAX_IN_VALUES:
                raise FilterError(f"{where}: expects a non-empty list of at most {MAX_IN_VALUES} {KIND_NAMES[kind]}")
            items = tuple(dict.fromkeys(_scalar(v, f"{where}[{i}]", name, kind) for i, v in enumerate(operand)))
            parts.append(Comparison(name, op, items, kind))
        else:
            parts.append(Comparison(name, op, _scalar(operand, where, name, kind), kind))
    return combine(parts, every=True)


def _scalar(value: Any, path: str, name: str, kind: str) -> Any:
    """``value`` if it is of ``kind`` (numbers finite; integers beyond 2**53 as floats), else a FilterError."""
    if value_kind(value) != kind or scalar(value) is None:
        wanted = {NUMBER: "a number", STRING: "a string", BOOL: "true or false"}[kind]
        raise FilterError(f"{path}: expects {wanted} ({name} holds {KIND_NAMES[kind]}), got {_shown(value)}")
    return scalar(value)


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listed(fields: dict[str, str]) -> str:
    if not fields:
        return "none (the documents of this index have no metadata)"
    names = sorted(fields)
    more = f" and {len(names) - SHOWN_FIELDS} more" if len(names) > SHOWN_FIELDS else ""
    return ", ".join(names[:SHOWN_FIELDS]) + more


# --- what a search is given --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchFilter:
    """What ``VectorIndex.search(..., where=)`` is given: the filter, and for engines that select rows by id
    (FAISS) the allowed rows, sorted (an engine that evaluates the filter itself, Milvus, needs none)."""

    filter: Filter
    rows: np.ndarray | None = None

    @classmethod
    def over(cls, parsed: Filter, table: MetadataTable | None) -> SearchFilter:
        """``parsed``, with the rows of ``table`` it allows when there is a table."""
        rows = None if table is None else np.flatnonzero(parsed.mask(table)).astype(np.int64)
        return cls(parsed, rows)

    def allowed(self, ntotal: int) -> np.ndarray:
        """The allowed rows below ``ntotal``.

        Raises:
            ValueError: If it was made without rows (an engine that selects by id needs them).
        """
        if self.rows is None:
            raise ValueError(
                "this index selects rows by id: make the SearchFilter with SearchFilter.over(filter, table)"
            )
        rows = np.asarray(self.rows, dtype=np.int64)
        return rows[(rows >= 0) & (rows < ntotal)]
