"""PDF documents to page texts (pypdf), for RAG ingestion.

Runs in a worker thread (see `RagService.prepare`) and is bounded: a byte and a page limit are
checked before any page is read, and between pages a deadline and the caller's `stop` event
(set when the client goes away), so an abandoned extraction ends within one page.

Each page becomes a section whose heading path is the PDF's outline (bookmarks) in force
on it, then `p. N`; a sentence that runs over a page break stays whole on the page where it
starts. Refusals (`UnsupportedDocument`) say why: encrypted, corrupt, over a limit, or no
text layer at all (a scan, which needs OCR first).
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from pypdf import PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError
from pypdf.generic import Destination

from proxy.infra.chunking import UnsupportedDocument

# pypdf reports every oddity of a damaged file as a warning; the outcome is what matters.
logging.getLogger("pypdf").setLevel(logging.ERROR)

_OUTLINE_DEPTH: Final = 6
# A page ending mid-sentence whose next page starts in lower case: the sentence runs on.
_RUNS_ON: Final = re.compile(r"[\w,\-\u2013]\s*$")
_FIRST_SENTENCE: Final = re.compile(r"^[^\n]{0,600}?[.!?](?=\s|$)")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BULLET: Final = re.compile(r"^\s*(?:[•●▪◦\-*\u2013]|\d{1,3}[.)])\s")
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class PdfLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pages: int = 1000
    timeout_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class PdfPage:
    number: int  # from 1
    path: tuple[str, ...]  # outline titles in force on the page, outermost first
    text: str

    @property
    def heading(self) -> tuple[str, ...]:
        return (*self.path, f"p. {self.number}")


@dataclass(frozen=True, slots=True)
class PdfDocument:
    pages: list[PdfPage]  # pages with text only
    page_count: int
    metadata: dict[str, Any]

    def text(self) -> str:
        """The whole document as stored and hashed: each page under its heading path."""
        return "\n\n".join(f"{' > '.join(page.heading)}\n{page.text}" for page in self.pages)


def extract_pdf(data: bytes, name: str, limits: PdfLimits, stop: threading.Event | None = None) -> PdfDocument:
    if len(data) > limits.max_bytes:
        raise UnsupportedDocument(
            f"{name} is {_size(len(data))}; PDFs are limited to {_size(limits.max_bytes)} (`[rag] pdf_max_bytes`)."
        )
    deadline = time.monotonic() + limits.timeout_seconds
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        _decrypt(reader, name)
        count = len(reader.pages)
    except UnsupportedDocument:
        raise
    except Exception as exc:  # a damaged file makes pypdf raise almost anything
        raise UnsupportedDocument(f"{name} could not be read as a PDF (corrupt or not a PDF): {_reason(exc)}") from None
    if count == 0:
        raise UnsupportedDocument(f"{name} has no pages (a corrupt or empty PDF).")
    if count > limits.max_pages:
        raise UnsupportedDocument(
            f"{name} has {count} pages; PDFs are limited to {limits.max_pages} (`[rag] pdf_max_pages`): split it."
        )
    starts = _outline_starts(reader)
    texts: list[str] = []
    paths: list[tuple[str, ...]] = []
    current: tuple[str, ...] = ()
    for index in range(count):
        if stop is not None and stop.is_set():
            raise UnsupportedDocument(f"Reading {name} was abandoned.")
        if time.monotonic() > deadline:
            raise UnsupportedDocument(
                f"{name} took more than {limits.timeout_seconds:g} s to read (`[rag] pdf_timeout_seconds`)."
            )
        entries = starts.get(index, [])
        paths.append(entries[0] if entries else current)
        if entries:
            current = entries[-1]
        try:
            texts.append(_clean(reader.pages[index].extract_text() or ""))
        except Exception as exc:  # as above: the page is damaged, whatever pypdf raises
            raise UnsupportedDocument(f"{name}: page {index + 1} could not be read (corrupt PDF): {_reason(exc)}") from None
    if not any(texts):
        raise UnsupportedDocument(
            f"{name} has no text layer (a scanned or image-only PDF): it needs OCR first (e.g. `ocrmypdf`)."
        )
    _join_sentences_across_pages(texts)
    pages = [PdfPage(i + 1, paths[i], text) for i, text in enumerate(texts) if text]
    return PdfDocument(pages, count, _metadata(reader))


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MB" if count >= 2**20 else f"{count:,} bytes"


def _decrypt(reader: PdfReader, name: str) -> None:
    if not reader.is_encrypted:
        return
    try:
        opened = reader.decrypt("")
    except DependencyError:
        raise UnsupportedDocument(f"{name} is encrypted with a cipher this gateway cannot open; decrypt it first.") from None
    if not opened:
        raise UnsupportedDocument(f"{name} is encrypted (password-protected): remove the password first.")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotDecryptedError):
        return "encrypted"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return text or type(exc).__name__


def _unicode(text: str) -> str:
    """`text` as UTF-8 can hold it: a font's broken ToUnicode map (math alphabets, emoji) makes
    pypdf give UTF-16 surrogates, which no encoder (the hash, the tokenizer, PostgreSQL) takes.
    A pair split in two is joined again; a lone one stands for no character and goes."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")


def _clean(text: str) -> str:
    """Visual lines joined into paragraphs (hyphenation undone; list items and blank lines kept)."""
    text = _CONTROL.sub(" ", _unicode(text).replace("\r\n", "\n").replace("\r", "\n"))
    out: list[str] = []
    for line in (raw.strip() for raw in text.split("\n")):
        if not line:
            if out and out[-1] != "":
                out.append("")
        elif not out or out[-1] == "" or _BULLET.match(line):
            out.append(line)
        elif out[-1].endswith("-") and line[:1].islower():
            out[-1] = out[-1][:-1] + line
        else:
            out[-1] = f"{out[-1]} {line}"
    return "\n".join(line if line else "" for line in out).replace("\n\n\n", "\n\n").strip()


def _join_sentences_across_pages(texts: list[str]) -> None:
    """The start of a sentence's tail moves up to the page where the sentence starts."""
    for index in range(len(texts) - 1):
        following = texts[index + 1]
        if not texts[index] or not _RUNS_ON.search(texts[index]) or not following[:1].islower():
            continue
        match = _FIRST_SENTENCE.match(following)
        if match is None:
            continue
        texts[index] = f"{texts[index]} {match.group(0)}"
        texts[index + 1] = following[match.end():].lstrip()


def _outline_starts(reader: PdfReader) -> dict[int, list[tuple[str, ...]]]:
    """Page index -> the outline paths of the entries that start on it, in outline order."""
    starts: dict[int, list[tuple[str, ...]]] = {}
    try:
        outline = reader.outline
    except Exception:  # a damaged outline only loses the section titles
        return starts

    def walk(items: list[Any], path: tuple[str, ...]) -> None:
        last: tuple[str, ...] = path
        for item in items:
            if isinstance(item, list):
                if len(path) < _OUTLINE_DEPTH:
                    walk(item, last)
                continue
            if not isinstance(item, Destination):
                continue
            title = " ".join(_unicode(str(item.title or "")).split())[:120]
            try:
                page = reader.get_destination_page_number(item)
            except Exception:  # a dangling bookmark is skipped
                page = -1
            last = (*path, title) if title else path
            if page is not None and page >= 0 and title:
                starts.setdefault(page, []).append(last)

    walk(list(outline), ())
    return starts


def _metadata(reader: PdfReader) -> dict[str, Any]:
    out: dict[str, Any] = {"pages": len(reader.pages)}
    try:
        info = reader.metadata
    except Exception:  # damaged document info: no title or author
        return out
    if info is None:
        return out
    try:
        fields = (("title", info.title), ("author", info.author))
    except Exception:  # as above
        return out
    for key, value in fields:
        if isinstance(value, str) and (clean := " ".join(_CONTROL.sub(" ", _unicode(value)).split())[:500]):
            out[key] = clean
    return out


__all__ = ["PdfDocument", "PdfLimits", "PdfPage", "extract_pdf"]
