"""The user's docs: the site builds strictly, the README stays a README, and every example runs.

The examples are extracted from README.md, client/README.md and docs/ (``tests.helpers.docs``), never
copied here, and run against a real ``mrl serve`` of the bundled sample with the real default model: a
renamed endpoint, a changed client method or an option that no longer exists fails the page that shows
it. Every ``mrl`` command line of those pages is parsed by the real command line (not run: most need
data sets, models or hours), and the READMEs' links, which the site's strict build never sees, are
resolved here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers.code import cli_commands
from tests.helpers.docs import ROOT, Command, broken_link, examples, mrl_commands, readme_links
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
    assert {"README.md", "client/README.md", "docs/getting-started.md", "docs/client.md", "docs/service.md"} <= sources
    assert sum(example.language == "python" for example in found) >= 5
    assert sum(example.language == "bash" for example in found) >= 10


class CommandLineError(Exception):
    pass


def parse_failures(commands: list[Command]) -> list[str]:
    """Each command that the real ``mrl`` command line refuses (an unknown command or flag, a bad value, a
    missing required option), with its file and line and argparse's message."""
    paths = list(cli_commands())
    for _, parser in paths:

        def refuse(message: str, parser: argparse.ArgumentParser = parser) -> None:
            raise CommandLineError(f"{parser.prog}: {message}")

        parser.error = refuse  # type: ignore[method-assign]  # raise instead of printing and exiting
    top = paths[0][1]
    failures = []
    for command in commands:
        try:
            top.parse_args(command.argv())
        except (CommandLineError, SystemExit, ValueError) as exc:  # SystemExit: --help or --version
            failures.append(f"{command.source}: {command.text}\n    {exc}")
    return failures


def test_every_mrl_command_of_the_docs_parses_with_the_real_command_line():
    commands = mrl_commands()
    sources = {command.source.split(":")[0] for command in commands}
    assert {"README.md", "docs/getting-started.md", "docs/indexes.md", "docs/training.md"} <= sources
    assert len(commands) >= 40
    failures = parse_failures(commands)
    assert not failures, "mrl commands in the docs that the command line refuses:\n" + "\n".join(failures)


def test_a_renamed_flag_in_a_docs_command_fails_with_its_file_and_line(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "Build it:\n\n```bash\nmrl index build --data my_docs/ \\\n    --indx runs/x   # a typo\n"
        "MRL_API_KEY=k mrl serve --index runs/x\n```\n",
        encoding="utf-8",
    )
    commands = mrl_commands([page])
    assert [command.argv() for command in commands] == [
        ["index", "build", "--data", "my_docs/", "--indx", "runs/x"], ["serve", "--index", "runs/x"]
    ]  # fmt: skip
    [failure] = parse_failures(commands)
    assert failure.startswith(f"{page}:4: mrl index build") and "unrecognized arguments: --indx runs/x" in failure


def test_the_readmes_links_and_anchors_lead_somewhere():
    links = readme_links()
    assert len([source for source, _ in links if source == "README.md"]) >= 10
    assert any("#" in target for _, target in links)  # at least one anchor is checked
    broken = [why for source, target in links if (why := broken_link(source, target))]
    assert not broken, "\n".join(broken)
    assert "no such file" in broken_link("README.md", "docs/tuning.md")
    assert "no heading with id 'plans'" in broken_link("README.md", "docs/indexes.md#plans")
    assert broken_link("README.md", "#which-dimension-to-pick") is None  # an anchor of the README itself


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
