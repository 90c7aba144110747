"""The docs pages (:mod:`service.docs`) work with no network: local assets only, rendered by a real browser.

The fast tests read the pages through a TestClient: every script, stylesheet and icon they name is
served by the app itself. The browser test starts uvicorn on loopback and lets headless Chromium
(Debian's ``chromium`` package) render ``/docs`` and ``/redoc`` with every other host unresolvable,
as on an air-gapped cluster; FastAPI's default CDN pages stay blank there. Skipped where Chromium is
missing, except in CI, which installs it.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.docs import add_docs
from tests.helpers.deploy import require_tool

DEBIAN_CHROMIUM = "Debian's `chromium` package (apt-get install --no-install-recommends chromium; .ci/run does)"
# (method, path) of the routes the test app documents; each must show up in the rendered pages.
OPERATIONS = (("get", "/items/{item_id}"), ("post", "/search"))
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
ASSET_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def docs_app(*, offline: bool = True) -> FastAPI:
    """A small app with the routes of OPERATIONS; ``offline=False`` keeps FastAPI's CDN-based pages."""
    app = FastAPI(title="docs-test") if not offline else FastAPI(title="docs-test", docs_url=None, redoc_url=None)

    @app.get("/items/{item_id}")
    def read_item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.post("/search")
    def search(query: str) -> dict[str, str]:
        return {"query": query}

    if offline:
        add_docs(app)
    return app


# --- through a TestClient ---------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_names_only_local_assets_and_each_one_is_served(page: str):
    client = TestClient(docs_app())
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "://" not in response.text, "the page names an absolute URL, i.e. another host"

    references = ASSET_REFERENCE.findall(response.text)
    assert any(ref.endswith(".js") for ref in references), references
    for ref in references:
        assert ref.startswith("/docs/assets/"), ref
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.headers["content-type"].startswith(ASSET_TYPES[Path(ref).suffix]), ref
        assert len(asset.content) > 1000, ref


def test_add_docs_registers_its_paths_under_the_docs_path_and_not_in_the_schema():
    app = docs_app()
    client = TestClient(app)
    paths = {route.path for route in app.routes}
    assert {"/docs", "/docs/oauth2-redirect", "/docs/assets", "/redoc"} <= paths

    redirect = client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "swaggerUIRedirectOauth2" in redirect.text
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in client.get("/docs").text
    assert set(client.get("/openapi.json").json()["paths"]) == {path for _, path in OPERATIONS}
    assert client.get("/docs/assets/../docs.py").status_code == 404


def test_docs_urls_follow_a_proxy_root_path():
    client = TestClient(docs_app(), root_path="/api")
    html = client.get("/docs").text
    assert 'src="/api/docs/assets/swagger-ui-bundle.js"' in html
    assert "url: '/api/openapi.json'" in html


def test_add_docs_without_swagger_serves_redoc_assets_below_redoc():
    app = FastAPI(docs_url=None, redoc_url=None)
    add_docs(app, docs_url=None)
    client = TestClient(app)
    assert client.get("/docs").status_code == 404
    assert 'src="/redoc/assets/redoc.standalone.js"' in client.get("/redoc").text
    assert client.get("/redoc/assets/redoc.standalone.js").status_code == 200


def test_add_docs_needs_an_openapi_schema():
    with pytest.raises(ValueError, match="OpenAPI schema"):
        add_docs(FastAPI(openapi_url=None, docs_url=None, redoc_url=None))


# --- in a real browser, without network -------------------------------------------------------


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    """Base URL of uvicorn serving :func:`docs_app` on a free loopback port, in a thread."""
    server = uvicorn.Server(uvicorn.Config(docs_app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium builds for ``url`` with every host but 127.0.0.1 unresolvable."""
    chromium = require_tool("chromium", DEBIAN_CHROMIUM)
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium refuses to start sandboxed
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished.stdout


@pytest.mark.browser
def test_swagger_ui_renders_every_operation_without_network(docs_server: str, tmp_path: Path):
    dom = rendered_dom(f"{docs_server}/docs", tmp_path / "profile")
    for method, path in OPERATIONS:
        assert f'class="opblock opblock-{method}' in dom, f"no {method} operation block: Swagger UI did not render"
        assert f'data-path="{path}"' in dom, path


@pytest.mark.browser
def test_redoc_renders_every_operation_without_network(docs_server: str, tmp_path: Path):
    dom = rendered_dom(f"{docs_server}/redoc", tmp_path / "profile")
    for method, path in OPERATIONS:
        assert f'http-verb {method}"' in dom, f"no {method} operation: ReDoc did not render"
        assert f">{path}<" in dom, path
