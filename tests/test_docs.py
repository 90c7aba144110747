"""The user's docs: the site builds strictly, the README stays a README, and every example runs.

The examples are extracted from README.md and docs/ (``tests.helpers.docs``), never copied here, and run
against a real ``mrl serve`` of the bundled sample with the real default model: a renamed endpoint, a
changed client method or an option that no longer exists fails the page that shows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers.docs import ROOT, examples
from tests.helpers.sample import copy_index
from tests.helpers.servers import serve_process

MKDOCS = [sys.executable, "-m", "mkdocs", "build", "--strict"]  # not --quiet: it hides the warnings --strict counts
QUIET = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MKDOCS, "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        env=QUIET,
        timeout=300,
    )


def test_the_docs_site_builds_strictly_with_references_written_from_the_code(tmp_path: Path):
    built = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr
    api = (tmp_path / "site/reference/http-api/index.html").read_text(encoding="utf-8")
    for path in create_app(ServiceSettings(index="unused")).openapi()["paths"]:
        assert path in api, path
    settings = (tmp_path / "site/reference/settings/index.html").read_text(encoding="utf-8")
    for name in ServiceSettings.model_fields:
        assert f"MRL_{name.upper()}" in settings, name
    client = (tmp_path / "site/reference/python-client/index.html").read_text(encoding="utf-8")
    assert "MrlClient" in client and "latency_budget_ms" in client and "MrlRetriever" in client


def test_a_broken_link_in_the_docs_fails_the_build(tmp_path: Path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "client", copy / "client", ignore=shutil.ignore_patterns("*.egg-info"))
    page = copy / "docs/getting-started.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the tuning guide](tuning.md).\n", encoding="utf-8")
    built = build_site(copy / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "tuning.md" in built.stdout + built.stderr


def test_the_readme_is_a_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 16_000
    sections = [line[3:] for line in readme.splitlines() if line.startswith("## ")]
    # install, searching from Python, own data and which dim to pick come first
    assert sections[:4] == ["Quick start", "Search: curl, Python, OpenAI clients", "Your own documents",
                            "Which dimension to pick"]  # fmt: skip
    assert "../shared" not in readme and "minutes of tests" not in readme


def test_there_are_examples_to_run():
    found = examples()
    sources = {example.source.split(":")[0] for example in found}
    assert {"README.md", "docs/getting-started.md", "docs/client.md", "docs/service.md"} <= sources
    assert sum(example.language == "python" for example in found) >= 5
    assert sum(example.language == "bash" for example in found) >= 10


@pytest.fixture(scope="module")
def demo_server(sample_index: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo: the bundled sample, served writable (the writing examples write into a copy of it)."""
    folder = tmp_path_factory.mktemp("docs-server")
    root = copy_index(sample_index, folder / "index")
    with serve_process(folder / "server.log", index=root, device="cpu", writable=True) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("example", examples(), ids=lambda example: f"{example.source}-{example.language}")
def test_every_example_of_the_docs_runs_against_a_real_server(example, demo_server, tmp_path: Path):
    code = example.against(demo_server.base)
    if example.language == "python":
        script = tmp_path / "example.py"
        script.write_text(code, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:  # one curl command; --fail-with-body turns an error answer into a failure
        argv = ["bash", "-c", code.replace("curl ", "curl --fail-with-body -sS ", 1)]
    ran = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, f"{example.source}:\n{code}\n{ran.stdout}\n{ran.stderr}"
