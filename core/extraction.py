"""Text and title of one document file: plain text, Markdown, HTML or PDF.

Parsing is left to kept libraries (``beautifulsoup4`` for HTML, ``pypdf`` for PDF); what is
ours is the layout of the text they give back: paragraphs separated by a blank line, so that
the chunker (:mod:`index.chunking`) finds the boundaries a reader sees. Every failure is one
:class:`DataError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.data import DataError

if TYPE_CHECKING:
    from bs4 import BeautifulSoup

# File suffix (lower case) -> the format recorded in each document's metadata.
FORMATS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".pdf": "pdf"}
FAILING = "fix or remove the file: the build reads every file of these types in the folder"

# HTML elements that start a paragraph (a blank line around them) or a line of their own.
PARAGRAPH_TAGS = [
    "p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "blockquote", "pre", "table",
    "ul", "ol", "dl", "figure", "form", "address", "fieldset", "details", "hr",
    "h1", "h2", "h3", "h4", "h5", "h6",
]  # fmt: skip
LINE_TAGS = ["li", "tr", "dt", "dd", "br", "caption", "figcaption", "summary", "option"]
CELL_TAGS = ["td", "th"]
HIDDEN_TAGS = ["script", "style", "noscript", "template", "head", "svg", "iframe", "object"]

# Marks left around elements while the tree is flattened, then made line breaks: a run of marks with a
# paragraph mark in it is one blank line, a run of line marks one line break.
PARAGRAPH_MARK, LINE_MARK = "\u2029", "\u2028"
MARKS = re.compile(r"[ \t]*[\u2028\u2029][\s\u2028\u2029]*")

MARKDOWN_TITLE = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
MARKDOWN_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@dataclass(frozen=True)
class Extracted:
    """What a file reads as: its text, and its title (empty when the file names none)."""

    text: str
    title: str = ""


def extract(path: Path, suffix: str) -> Extracted:
    """The text and title of ``path``, read as the format its (lower-case) ``suffix`` names.

    Raises:
        DataError: The file cannot be read or decoded, or has no text; the message says which and why.
    """
    fmt = FORMATS[suffix]
    extracted = {"txt": _plain, "md": _markdown, "html": _html, "pdf": _pdf}[fmt](path)
    if not extracted.text.strip():
        raise DataError(path, f"no text in this {fmt.upper()} file; {FAILING}")
    return extracted


def utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are one DataError naming the line (a leading BOM is dropped)."""
    raw = _bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1].hex()
        raise DataError(path, f"not valid UTF-8 (byte 0x{byte}); save the file as UTF-8", line) from None


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read the file ({exc.strerror or exc}); {FAILING}") from None


def _plain(path: Path) -> Extracted:
    return Extracted(utf8_text(path))


def _markdown(path: Path) -> Extracted:
    """The Markdown source as its text (the encoder reads it well); its title is the first ``# heading``
    outside a fenced code block (where ``#`` starts a shell comment)."""
    text = utf8_text(path)
    fence = ""
    for line in text.splitlines():
        opened = MARKDOWN_FENCE.match(line)
        if opened and (not fence or opened.group(1).startswith(fence)):
            fence = "" if fence else opened.group(1)[0] * 3
            continue
        heading = None if fence else MARKDOWN_TITLE.match(line)
        if heading:
            return Extracted(text, heading.group(1).strip())
    return Extracted(text)


def _html(path: Path) -> Extracted:
    """Visible text of an HTML page, a line per block element and a blank line between paragraphs; the title
    is ``<title>``, else the first ``<h1>``."""
    from bs4 import BeautifulSoup

    raw = _bytes(path)
    try:
        soup = BeautifulSoup(raw, "html.parser")  # bytes: the page's own <meta charset> decides the encoding
        title = _first_text(soup, "title") or _first_text(soup, "h1")
        return Extracted(_visible_text(soup), title)
    except Exception as exc:  # a parser's failure on a damaged page, whatever it is, is a fact about the file
        raise DataError(path, f"cannot read HTML ({_reason(exc)}); {FAILING}") from exc


def _first_text(soup: BeautifulSoup, tag: str) -> str:
    found = soup.find(tag)
    return " ".join(found.get_text(" ").split()) if found else ""


def _visible_text(soup: BeautifulSoup) -> str:
    from bs4 import NavigableString

    for hidden in soup.find_all(HIDDEN_TAGS):
        hidden.decompose()
    for string in soup.find_all(string=True):
        if not string.find_parent("pre"):  # the source's line breaks are layout, not text (except in <pre>)
            string.replace_with(re.sub(r"\s+", " ", str(string)))
    for mark, tags in ((PARAGRAPH_MARK, PARAGRAPH_TAGS), (LINE_MARK, LINE_TAGS), (" ", CELL_TAGS)):
        for element in soup.find_all(tags):
            element.insert_before(NavigableString(mark))
            element.insert_after(NavigableString(mark))
    text = MARKS.sub(lambda run: "\n\n" if PARAGRAPH_MARK in run.group() else "\n", soup.get_text())
    lines = [" ".join(line.split()) for line in text.split("\n")]  # <pre> keeps its lines, not its indentation
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf(path: Path) -> Extracted:
    """Text of every page, pages separated by a blank line; the title is the PDF's own (its metadata), else
    the first line of text."""
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about odd files are not ours to print
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DataError(path, f"cannot read PDF (it is encrypted with a password); {FAILING}")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except DataError:
        raise
    except Exception as exc:  # pypdf raises many kinds on damaged files; each is a fact about the file
        raise DataError(path, f"cannot read PDF ({_reason(exc)}); {FAILING}") from exc
    text = "\n\n".join(page for page in pages if page)
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return Extracted(text, " ".join(str(title).split()) or first_line)


def _reason(exc: Exception) -> str:
    """An exception as a few words on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
