"""MkDocs hooks: the reference pages written from the code at every build, never by hand.

``reference/http-api.md`` comes from the service's own OpenAPI schema (the app is built, not started:
no model or index is loaded), and ``reference/settings.md`` from the fields of ``ServiceSettings``, so
neither can drift from what the server does. ``mkdocs.yml`` names this file under ``hooks``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("get", "post", "put", "patch", "delete")


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference/http-api.md", content=http_api_page()))
    files.append(File.generated(config, "reference/settings.md", content=settings_page()))
    return files


def http_api_page() -> str:
    from service.app import create_app
    from service.settings import ServiceSettings

    schema = create_app(ServiceSettings(index="runs/demo-index")).openapi()
    lines = [
        "# HTTP API reference",
        "",
        "Written from the service's OpenAPI schema at every build of these pages. A running server serves the",
        "same schema at `/openapi.json`, with its own limits and dims filled in, and browsable at `/docs`.",
        'Every error has one body shape, `{"error": {"type": …, "message": …}}`: see',
        "[errors](../service.md#errors) for the table of statuses and types.",
        "",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in schema["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                by_tag.setdefault((operation.get("tags") or ["other"])[0], []).append((method, path, operation))
    for tag, operations in by_tag.items():
        lines += [f"## {tag}", ""]
        for method, path, operation in operations:
            lines += _operation(method, path, operation, schema)
    return "\n".join(lines) + "\n"


def _operation(method: str, path: str, operation: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    lines += [f"operationId `{operation.get('operationId', '')}`. {operation.get('summary', '')}", ""]
    if operation.get("description"):
        lines += [operation["description"].strip(), ""]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | type | default | description |", "| --- | --- | --- | --- | --- |"]
        for parameter in parameters:
            field = parameter.get("schema", {})
            lines.append(
                f"| `{parameter['name']}` | {parameter['in']} | {_type(field, schema)} | {_default(field)} | "
                f"{_cell(parameter.get('description') or field.get('description', ''))} |"
            )
        lines.append("")
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        model = _resolve(body, schema)
        lines += [f"Request body (JSON, `{model.get('title', 'object')}`):", ""]
        lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        required = set(model.get("required", []))
        for name, field in model.get("properties", {}).items():
            shown = f"`{name}`" + (" (required)" if name in required else "")
            lines.append(
                f"| {shown} | {_type(field, schema)} | {_default(field)} | {_cell(field.get('description', ''))} |"
            )
        lines.append("")
    responses = operation.get("responses", {})
    ok = [f"{status} ({_cell(answer.get('description', ''))})" for status, answer in responses.items() if status < "4"]
    errors = [status for status in responses if status >= "4"]
    if ok or errors:
        said = "Answers " + ", ".join(ok) + (f"; errors {', '.join(errors)}" if errors else "")
        lines += [f"{said} ([error types](../service.md#errors)).", ""]
    return lines


def _resolve(field: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = field.get("$ref")
    if not ref:
        return field
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def _type(field: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in field:
        return field["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in field:
        return " or ".join(_type(option, schema) for option in field["anyOf"])
    if "enum" in field:
        return " \\| ".join(f"`{value}`" for value in field["enum"])
    kind = field.get("type", "any")
    if kind == "array":
        return f"list of {_type(field.get('items', {}), schema)}"
    said = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    shown = ", ".join(f"{sign} {field[key]}" for key, sign in said.items() if key in field)
    return f"{kind} ({shown})" if shown else kind


def _default(field: dict[str, Any]) -> str:
    return f"`{json.dumps(field['default'])}`" if "default" in field else ""


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def settings_page() -> str:
    from service.cli import add_setting_flags
    from service.settings import ServiceSettings

    flags = set(add_setting_flags(argparse.ArgumentParser()))
    lines = [
        "# Service settings",
        "",
        "Written from `service.settings.ServiceSettings` at every build of these pages. Each setting is an",
        "environment variable `MRL_<NAME>` and, unless marked *environment only*, a flag of `mrl serve`",
        "(`--max-k` for `max_k`); a flag wins over the environment. `mrl serve --help` lists the same.",
        "",
        "| setting | variable | flag | default | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in ServiceSettings.model_fields.items():
        flag = f"`--{name.replace('_', '-')}`" if name in flags else "environment only"
        default = "(required)" if field.is_required() else f"`{_shown_default(field.get_default())}`"
        lines.append(f"| `{name}` | `MRL_{name.upper()}` | {flag} | {default} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _shown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, Path):
        return str(value)
    return value if isinstance(value, str) and value else json.dumps(value)
