"""The shell and Python examples of the README, the client's README and the docs site, extracted from the
Markdown itself, and the links of the two READMEs (which the docs site's strict build does not see).

An example is a fenced ``bash`` block's ``curl`` command (continuation lines joined) or a fenced ``python``
block that talks to the demo server (it names ``127.0.0.1:8000``). ``tests/test_docs.py`` runs them all
against a real server, so a changed endpoint or client method fails the docs that show it. An ``mrl``
command of any shell or text block (:func:`mrl_commands`) is parsed there with the real command line.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_SERVER = re.compile(r"(?:http://)?(?:127\.0\.0\.1|localhost):8000")
FENCE = re.compile(r"^```(\w*)\s*$")
READMES = ("README.md", "client/README.md")  # outside docs/: no strict build checks their links
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "text"}  # text: a command shown with its output
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


@dataclass(frozen=True)
class Example:
    source: str  # file:line, for the failure message
    language: str  # "bash" (one curl command) or "python"
    code: str

    def against(self, base: str) -> str:
        """The example with the demo server's address replaced by ``base`` (``http://HOST:PORT``)."""
        return DEMO_SERVER.sub(base, self.code)


@dataclass(frozen=True)
class Command:
    """One ``mrl`` command of a shell or text block: its place and its text (continuation lines joined)."""

    source: str  # file:line of its first line
    text: str

    def argv(self) -> list[str] | None:
        """The arguments after ``mrl`` (``python -m mrl`` and launchers' ``-m mrl`` too), or None for another
        program. Environment assignments before it, a ``$`` prompt, ``...`` (more options) and whatever follows
        a pipe or redirection are left out."""
        words = shlex.split(self.text.removeprefix("$ "), comments=True)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words.pop(0)
        if words[:1] == ["mrl"]:
            words = words[1:]
        elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["mrl"]:
            words = words[words.index("-m") + 2 :]
        else:
            return None
        ends = [place for place, word in enumerate(words) if word in SHELL_OPERATORS]
        return [word for word in words[: ends[0] if ends else None] if word != "..."]


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "client/README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def examples(paths: list[Path] | None = None) -> list[Example]:
    found: list[Example] = []
    for path in paths or documents():
        for start, language, block in _blocks(path.read_text(encoding="utf-8")):
            where = f"{path.relative_to(ROOT)}:{start}"
            if language == "python" and DEMO_SERVER.search(block):
                found.append(Example(where, "python", block))
            elif language == "bash":
                found += [Example(where, "bash", command) for command in _curl_commands(block)]
    return found


def mrl_commands(paths: list[Path] | None = None) -> list[Command]:
    """Every ``mrl`` command in the shell and text blocks of ``paths`` (default: every document)."""
    found: list[Command] = []
    for path in paths or documents():
        for start, language, block in _blocks(path.read_text(encoding="utf-8")):
            if language not in SHELL_BLOCKS:
                continue
            for number, text in _command_lines(block):
                command = Command(f"{_where(path)}:{start + number}", text)
                if re.search(r"(^|\s)mrl\s", text) and _is_mrl(command):
                    found.append(command)
    return found


def _is_mrl(command: Command) -> bool:
    try:
        return command.argv() is not None
    except ValueError:  # unbalanced quotes: kept, so that the test reports it with its place
        return True


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _command_lines(block: str) -> list[tuple[int, str]]:
    """The block's lines with continuations (a trailing ``\\``) joined, each with its first line's offset."""
    lines, current, first = [], "", 0
    for offset, line in enumerate(block.splitlines()):
        if not current:
            first = offset
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append((first, current.strip()))
        current = ""
    return lines


def _blocks(text: str) -> list[tuple[int, str, str]]:
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and language is None:
            language, start, body = fence.group(1) or "text", number + 1, []
        elif line.startswith("```") and language is not None:
            blocks.append((start, language, "\n".join(body) + "\n"))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def _curl_commands(block: str) -> list[str]:
    commands = []
    for _, line in _command_lines(block):
        command = re.sub(r"\s+#.*$", "", line) if "#" in line else line
        # a plain command only: one inside a shell loop, or one that needs a variable, is not runnable alone
        if command.startswith("curl ") and DEMO_SERVER.search(command) and not set(command) & {"$", ";"}:
            commands.append(command)
    return commands


def readme_links() -> list[tuple[str, str]]:
    """Every relative link and image of the READMEs (``README.md``, ``client/README.md``) as ``(file, target)``;
    a link to a web page is left out."""
    found = []
    for name in READMES:
        page = _Links()
        page.feed(_html(ROOT / name))
        found += [(name, target) for target in page.targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]
    return found


def broken_link(source: str, target: str) -> str | None:
    """Why ``target``, a relative link of the file ``source`` (relative to the root), leads nowhere; None if it
    leads to a file (and to a heading there, for ``#anchor``)."""
    path, _, anchor = target.partition("#")
    file = (ROOT / source).parent / path if path else ROOT / source
    if not file.exists():
        return f"{source}: link {target!r}: no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{source}: link {target!r}: no heading with id {anchor!r} there"
    return None


def anchors(page: Path) -> set[str]:
    """The heading ids of a Markdown page, as the docs site's Markdown (toc, attr_list) writes them."""
    import markdown

    converter = markdown.Markdown(extensions=["toc", "attr_list", "tables", "pymdownx.superfences"])
    converter.convert(page.read_text(encoding="utf-8"))

    def ids(tokens: list[dict]) -> set[str]:
        return {token["id"] for token in tokens} | {i for token in tokens for i in ids(token["children"])}

    return ids(converter.toc_tokens)


def _html(page: Path) -> str:
    import markdown

    return markdown.markdown(
        page.read_text(encoding="utf-8"), extensions=["attr_list", "tables", "pymdownx.superfences"]
    )


class _Links(HTMLParser):
    """The ``href`` of every link and the ``src`` of every image of a rendered page (code is not rendered as links)."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"a": "href", "img": "src"}.get(tag)
        self.targets += [value for name, value in attrs if name == wanted and value]
