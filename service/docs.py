"""The interactive API docs (Swagger UI and ReDoc) served from installed files, with no CDN.

FastAPI's default ``/docs`` and ``/redoc`` pages load their script, stylesheet, favicon and
fonts from public hosts, so they are blank on the air-gapped networks this service runs on.
:func:`add_docs` follows FastAPI's recipe for self-hosting the docs assets, with the files
that the ``fastapi-offline`` package ships (Swagger UI 5 and ReDoc 2, copied from their
npm releases), so the pages name no host but the service's own.

Every path it registers sits under the docs path (assets under ``{docs_url}/assets``), so a
guard can treat ``/docs*`` as one group; ReDoc's page loads its script from there too.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

# (package, folder inside it) holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png.
DOCS_ASSETS_PACKAGE = ("fastapi_offline", "static")
ASSETS_SUFFIX = "/assets"
OAUTH2_REDIRECT_SUFFIX = "/oauth2-redirect"
# Swagger UI's default sends the spec to validator.swagger.io; nothing may leave the network.
OFFLINE_SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}


def add_docs(
    app: FastAPI,
    *,
    docs_url: str | None = "/docs",
    redoc_url: str | None = "/redoc",
    openapi_url: str | None = None,
) -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from locally installed assets.

    Create the app with ``FastAPI(docs_url=None, redoc_url=None)`` so that FastAPI's CDN pages
    are not registered as well. With the defaults this adds ``/docs``, ``/docs/oauth2-redirect``,
    ``/docs/assets/{file}`` (a static mount) and ``/redoc``. The app's ``title``,
    ``swagger_ui_parameters`` and ``swagger_ui_init_oauth`` apply as they do to FastAPI's own pages,
    and a ``root_path`` (a proxy's prefix) is honoured.

    Args:
        app: The application to add the pages to.
        docs_url: Path of the Swagger UI page; ``None`` for none. Its assets and OAuth2 redirect live below it.
        redoc_url: Path of the ReDoc page; ``None`` for none. Without a Swagger page, assets go below this one.
        openapi_url: The schema the pages show; defaults to the app's own ``openapi_url``.

    Raises:
        ValueError: The app serves no OpenAPI schema and none was given, or a path does not start with ``/``.
    """
    schema_url = openapi_url if openapi_url is not None else app.openapi_url
    if not schema_url:
        raise ValueError("the docs need an OpenAPI schema: the app has openapi_url=None and none was given")
    pages = [url for url in (docs_url, redoc_url) if url is not None]
    if not pages:
        return
    for url in (*pages, schema_url):
        if not url.startswith("/"):
            raise ValueError(f"docs paths must start with '/': {url!r}")

    assets_url = pages[0].rstrip("/") + ASSETS_SUFFIX
    app.mount(assets_url, StaticFiles(packages=[DOCS_ASSETS_PACKAGE]), name="docs-assets")
    if docs_url is not None:
        _add_swagger_ui(app, docs_url, schema_url, assets_url)
    if redoc_url is not None:
        _add_redoc(app, redoc_url, schema_url, assets_url)


def _add_swagger_ui(app: FastAPI, docs_url: str, schema_url: str, assets_url: str) -> None:
    redirect_url = docs_url.rstrip("/") + OAUTH2_REDIRECT_SUFFIX
    parameters = {**OFFLINE_SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})}

    async def swagger_ui_html(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + schema_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{assets_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets_url}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets_url}/favicon.png",
            oauth2_redirect_url=root + redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=parameters,
        )

    async def swagger_ui_oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(docs_url, swagger_ui_html, include_in_schema=False)
    app.add_route(redirect_url, swagger_ui_oauth2_redirect, include_in_schema=False)


def _add_redoc(app: FastAPI, redoc_url: str, schema_url: str, assets_url: str) -> None:
    async def redoc_html(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_redoc_html(
            openapi_url=root + schema_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets_url}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets_url}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(redoc_url, redoc_html, include_in_schema=False)


def _root_path(request: Request) -> str:
    """The prefix a proxy serves the app under ('' when none), as FastAPI's own docs pages use it."""
    return request.scope.get("root_path", "").rstrip("/")
