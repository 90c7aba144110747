"""The shell and Python examples of the README and the docs site, extracted from the Markdown itself.

An example is a fenced ``bash`` block's ``curl`` command (continuation lines joined) or a fenced ``python``
block that talks to the demo server (it names ``127.0.0.1:8000``). ``tests/test_docs.py`` runs them all
against a real server, so a changed endpoint or client method fails the docs that show it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_SERVER = re.compile(r"(?:http://)?(?:127\.0\.0\.1|localhost):8000")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    source: str  # file:line, for the failure message
    language: str  # "bash" (one curl command) or "python"
    code: str

    def against(self, base: str) -> str:
        """The example with the demo server's address replaced by ``base`` (``http://HOST:PORT``)."""
        return DEMO_SERVER.sub(base, self.code)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


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
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        command = re.sub(r"\s+#.*$", "", current.strip()) if "#" in current else current.strip()
        # a plain command only: one inside a shell loop, or one that needs a variable, is not runnable alone
        if command.startswith("curl ") and DEMO_SERVER.search(command) and not set(command) & {"$", ";"}:
            commands.append(command)
        current = ""
    return commands
