"""The OpenAPI schema with the limits this server really enforces.

FastAPI derives the schema from the route signatures and request models, which know
neither the settings (``max_k``, ``max_query_chars``, ``max_batch_queries``) nor the dims of
the served index, nor the served model's vocabulary (the token ids ``/v1/embeddings`` takes).
:func:`service_openapi` adds them, so that every request the schema calls valid is one the
service accepts, with the exceptions the schema cannot state: ``rerank_dim`` must be larger
than ``dim``; a request gives dims or a target, not both; and a quality target needs an index
with measured quality. The schema is rebuilt when a reload changes the served version. A server
without an index (embeddings only) leaves the search, index and admin paths out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from index.backends import EngineUnavailable
from index.manifest import IndexFolderError
from service.limits import NON_BLANK_PATTERN
from service.routes import DELETE_IDS_PER_DOCUMENT, INDEX_PATHS, WRITE_PATHS
from service.sources import index_source

if TYPE_CHECKING:
    from service.deps import ServiceState


def service_openapi(app: FastAPI, state: ServiceState) -> dict[str, Any]:
    """The app's schema for its settings, served dims and vocabulary (cached per served index version)."""
    dims, version = _served_dims(state)
    vocab_size = state.embedder.encoder.encoder.vocab_size if state.embedder is not None else None
    key = (version, tuple(dims or ()), vocab_size, tuple(sorted(_served_fields(state).items())))
    cached = getattr(app.state, "openapi_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    settings = state.settings
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    if not settings.serves_search:  # embeddings only: those paths answer 404 no_index
        schema["paths"] = {path: item for path, item in schema["paths"].items() if path not in INDEX_PATHS}
    if not (settings.serves_search and settings.writable):  # writes answer 403 (or 404) here
        schema["paths"] = {path: item for path, item in schema["paths"].items() if path not in WRITE_PATHS}
    describe_limits(schema, settings.max_query_chars, settings.max_k, settings.max_batch_queries, dims, vocab_size)
    describe_write_limits(schema, settings.max_write_documents, settings.max_document_chars, settings.max_body_bytes)
    describe_filters(schema, _served_fields(state))
    app.state.openapi_cache = (key, schema)
    return schema


def describe_limits(
    schema: dict[str, Any],
    max_chars: int,
    max_k: int,
    max_texts: int,
    dims: list[int] | None,
    vocab_size: int | None = None,
) -> None:
    """Write the request limits into ``schema`` in place: text lengths, k, batch sizes, dims and token ids."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": NON_BLANK_PATTERN}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": max_texts}
    token_id: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size is not None:
        token_id["maximum"] = vocab_size - 1
    token_ids = {"type": "array", "items": token_id, "minItems": 1, "maxItems": max_chars}  # ids: as many as chars
    token_arrays = {"type": "array", "items": token_ids, "minItems": 1, "maxItems": max_texts}
    k = {"type": "integer", "minimum": 1, "maximum": max_k}
    dim = _dim_schema(dims, exclude_smallest=False)
    rerank_dim = _dim_schema(dims, exclude_smallest=True)  # re-scoring at the smallest dim cannot beat it
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                replacement = {"q": text, "k": k, "dim": dim, "rerank_dim": rerank_dim}.get(parameter["name"])
                if replacement is not None:
                    parameter["schema"] = _keep_docs(parameter["schema"], replacement)
    models = schema.get("components", {}).get("schemas", {})
    _set_properties(
        models.get("SearchRequest"),
        {"query": text, "queries": texts, "k": k, "dim": _nullable(dim), "rerank_dim": _nullable(rerank_dim)},
    )
    embedding_input = {"anyOf": [text, texts, token_ids, token_arrays]}
    _set_properties(models.get("EmbeddingRequest"), {"input": embedding_input, "dimensions": _nullable(dim)})


def describe_write_limits(
    schema: dict[str, Any], max_documents: int, max_document_chars: int, max_body_bytes: int
) -> None:
    """Write the limits of ``/documents`` into ``schema`` in place: documents per write, characters per text, ids
    per delete (``DELETE_IDS_PER_DOCUMENT`` times the documents), and every 413's body limit in bytes.

    A request beyond them gets a 422 (413 for the body) in the documented error body.
    """
    models = schema.get("components", {}).get("schemas", {})
    text = {"type": "string", "minLength": 1, "maxLength": max_document_chars, "pattern": NON_BLANK_PATTERN}
    _set_properties(models.get("DocumentIn"), {"text": text})
    documents = {"type": "array", "items": {"$ref": "#/components/schemas/DocumentIn"}, "minItems": 1}
    _set_properties(models.get("UpsertRequest"), {"documents": {**documents, "maxItems": max_documents}})
    ids = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    _set_properties(
        models.get("DeleteRequest"), {"ids": _nullable({**ids, "maxItems": max_documents * DELETE_IDS_PER_DOCUMENT})}
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            too_large = operation.get("responses", {}).get("413")
            if too_large is not None:
                too_large["description"] = f"the request body is over the server's limit of {max_body_bytes} bytes"


# The schema describes filters nested 2 deep, $and / $or of 4 filters and $in lists of 16 values: a subset of what
# the service takes (8 levels, 1,000 values), so that every filter the schema calls valid is one the service
# accepts, and generated clients and fuzzers stay small.
FILTER_LEVELS = 2
FILTER_ITEMS = 4
FILTER_VALUES = 16
VALUE_TYPES = {"string": {"type": "string"}, "number": {"type": "number"}, "bool": {"type": "boolean"}}


def describe_filters(schema: dict[str, Any], fields: dict[str, str]) -> None:
    """The ``filter`` of ``POST /search`` and ``POST /documents/delete`` for the served metadata fields: each
    field with the operators its type takes, ``$and`` / ``$or`` unrolled to the nesting the service allows."""
    models = schema.get("components", {}).get("schemas", {})
    if not models:
        return
    for level in range(FILTER_LEVELS + 1):
        properties: dict[str, Any] = {
            name: _condition_schema(kind) for name, kind in sorted(fields.items()) if kind in VALUE_TYPES
        }
        if level < FILTER_LEVELS:
            inner = {"$ref": f"#/components/schemas/MetadataFilter{level + 1}"}
            listed = {"type": "array", "items": inner, "minItems": 1, "maxItems": FILTER_ITEMS}
            properties.update({"$and": listed, "$or": listed})
        models[f"MetadataFilter{level}" if level else "MetadataFilter"] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
            "minProperties": 1 if level else 0,  # a filter inside $and / $or names something ({} at the top: none)
            "description": ""
            if level
            else "a metadata filter over the fields the served documents have (GET /dims); the service also takes "
            "deeper nesting (8 levels) and longer $in lists (1,000 values) than this schema states",
        }
    for name in ("SearchRequest", "DeleteRequest"):
        _set_properties(models.get(name), {"filter": _nullable({"$ref": "#/components/schemas/MetadataFilter"})})


def _condition_schema(kind: str) -> dict[str, Any]:
    value = VALUE_TYPES[kind]
    values = {"type": "array", "items": value, "minItems": 1, "maxItems": FILTER_VALUES}
    operators = {"$eq": value, "$ne": value, "$in": values, "$nin": values}
    if kind == "number":
        operators.update({op: value for op in ("$gt", "$gte", "$lt", "$lte")})
    condition = {"type": "object", "properties": operators, "additionalProperties": False, "minProperties": 1}
    return {"anyOf": [value, condition]}


def _served_fields(state: ServiceState) -> dict[str, str]:
    if state.searcher is None:
        return {}
    return dict(state.searcher.metadata_fields)


def _served_dims(state: ServiceState) -> tuple[list[int] | None, str | None]:
    if state.searcher is not None:
        return state.searcher.dims, state.searcher.index_version
    if state.embedder is not None:  # embeddings only
        return state.embedder.served.dims, None
    if not state.settings.serves_search:  # the model is still loading
        return None, None
    try:  # still loading: the manifest says what will be served
        source = index_source(state.settings)
        manifest = source.manifest(source.current())
    except (IndexFolderError, EngineUnavailable):
        return None, None
    return list(manifest.dims), manifest.version


def _dim_schema(dims: list[int] | None, *, exclude_smallest: bool) -> dict[str, Any]:
    if not dims:
        return {"type": "integer"}
    allowed = sorted(dims, reverse=True)
    return {"type": "integer", "enum": allowed[:-1] if exclude_smallest and len(allowed) > 1 else allowed}


def _nullable(value: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [value, {"type": "null"}]}


def _keep_docs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the title, description, default and examples of ``old``."""
    kept = {key: old[key] for key in ("title", "description", "default", "examples") if key in old}
    if kept.get("default", 0) is None and "anyOf" not in new:
        del kept["default"]  # an optional field that may not be sent as null
    allowed = (new.get("anyOf", [new])[0]).get("enum")
    if allowed is not None and "examples" in kept:  # e.g. dim 256 on an index without it
        kept["examples"] = [value for value in kept["examples"] if value in allowed] or allowed[:1]
    return {**new, **kept}


def _set_properties(model: dict[str, Any] | None, properties: dict[str, dict[str, Any]]) -> None:
    if model is None:
        return
    for name, replacement in properties.items():
        if name in model.get("properties", {}):
            model["properties"][name] = _keep_docs(model["properties"][name], replacement)
