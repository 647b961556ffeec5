"""Documents to retrieval chunks: text extraction (Markdown, plain text, HTML) and chunking.

Chunks are sized in the embedding model's own tokens (WordPiece, the vendored vocabulary), so
none is silently truncated by the model (it reads at most 254 tokens plus [CLS]/[SEP]).
Chunking follows the document's structure:

- Markdown headings (ATX `#` and setext underlines, outside code fences) start a new section;
  a chunk never spans two sections, and it carries its heading path ("Install > Linux"),
  which is embedded and full-text indexed with it.
- Within a section, paragraphs (blank-line separated; a fenced code block is one) are packed
  whole while they fit; a chunk ends at a paragraph boundary once it is at least half full.
- A paragraph too big for the rest of a chunk is split between sentences (and lines), and a
  sentence too big for any chunk between tokens.
- Consecutive chunks of a section overlap by up to `overlap` tokens of whole sentences.

HTML is turned into Markdown-ish text first (headings become `#` lines, `<pre>` becomes a
code fence, scripts, styles and navigation are dropped). PDF is read page by page
(`proxy.infra.pdf`); each page is a section (`chunk_sections`) headed by its outline path and
page number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from html.parser import HTMLParser
from importlib import resources
from pathlib import PurePath
from typing import Final, Literal

from tokenizers import Regex, pre_tokenizers
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

Format = Literal["markdown", "text", "html", "pdf"]
FORMATS: Final[tuple[Format, ...]] = ("markdown", "text", "html", "pdf")

MEDIA_TYPES: Final[dict[Format, str]] = {
    "markdown": "text/markdown",
    "text": "text/plain",
    "html": "text/html",
    "pdf": "application/pdf",
}
_EXTENSIONS: Final[dict[str, Format]] = {
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown", ".mkd": "markdown",
    ".txt": "text", ".text": "text", ".rst": "text", ".log": "text", ".adoc": "text",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".pdf": "pdf",
}
# Extensions `ingest` picks up when it walks a directory.
INGESTIBLE_EXTENSIONS: Final = frozenset(_EXTENSIONS)

# The model reads 256 tokens including [CLS] and [SEP].
MODEL_TOKENS: Final = 254
# A word the model cannot read (Thai, Amharic, emoji, …) is one [UNK] of up to 64 characters:
# sized as one token, a chunk of them held ten thousand characters, and so did every passage
# injected from it (tens of thousands of a chat model's tokens). Such a run counts a token
# per this many characters, about what a chat model's tokenizer makes of these scripts.
UNKNOWN_CHARS: Final = 4
_HEADING_TOKENS_MAX: Final = 48


class UnsupportedDocument(Exception):
    """The document cannot be ingested (binary, undecodable, a PDF that cannot be read); the
    message says why."""


@dataclass(frozen=True, slots=True)
class ChunkerSettings:
    """Chunk sizes in model tokens: aim for `target`, never exceed `maximum` (heading
    included), overlap consecutive chunks by up to `overlap` tokens."""

    target: int = 200
    overlap: int = 40
    maximum: int = 250

    def __post_init__(self) -> None:
        if not 32 <= self.target <= self.maximum <= MODEL_TOKENS:
            raise ValueError(f"chunk sizes need 32 <= target <= maximum <= {MODEL_TOKENS}")
        if not 0 <= self.overlap <= self.target // 2:
            raise ValueError("chunk overlap must be between 0 and half the target size")

    @property
    def signature(self) -> str:
        """Identifies the chunking; a document chunked differently is re-ingested."""
        return f"structure-v1/{self.target}/{self.overlap}/{self.maximum}"


@dataclass(frozen=True, slots=True)
class Chunk:
    heading: str
    content: str
    tokens: int

    @property
    def text(self) -> str:
        """What gets embedded: the heading path, then the content."""
        return f"{self.heading}\n{self.content}" if self.heading else self.content


# -- formats and text extraction -------------------------------------------------------------


def detect_format(name: str | None, content_type: str | None = None, data: bytes | None = None) -> Format:
    """The document's format from its file name, media type or first bytes."""
    media = (content_type or "").split(";")[0].strip().lower()
    suffix = PurePath(name).suffix.lower() if name else ""
    head = (data or b"")[:1024].lstrip().lower()
    if media in ("application/pdf", "application/x-pdf") or head.startswith(b"%pdf-"):
        return "pdf"
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    if media in ("text/markdown", "text/x-markdown"):
        return "markdown"
    if media in ("text/html", "application/xhtml+xml"):
        return "html"
    if head.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "markdown" if media in ("", "application/octet-stream") and suffix == "" else "text"


def decode_text(data: bytes, name: str = "document") -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192]:
        raise UnsupportedDocument(f"{name} looks binary; only text, Markdown and HTML can be ingested.")
    raise UnsupportedDocument(f"{name} is not UTF-8 text.")


def to_text(content: str, fmt: Format) -> str:
    """The document as Markdown-ish text ready for `chunk`."""
    text = html_to_text(content) if fmt == "html" else content
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.strip()


class _HtmlText(HTMLParser):
    _SKIP: Final = frozenset({"script", "style", "noscript", "template", "svg", "head", "nav", "iframe", "object"})
    _BLOCK: Final = frozenset({
        "p", "div", "section", "article", "header", "footer", "main", "aside", "blockquote",
        "ul", "ol", "table", "thead", "tbody", "tfoot", "dl", "figure", "figcaption", "form",
        "fieldset", "address", "details", "summary", "hr", "caption",
    })
    _VOID: Final = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0
        self._heading: int | None = None

    def _newlines(self, count: int) -> None:
        """End the current line and leave `count - 1` blank lines (none at the very start)."""
        if not self.out:
            return
        tail = "".join(self.out[-4:]).rstrip(" ")
        have = len(tail) - len(tail.rstrip("\n"))
        if have < count:
            self.out.append("\n" * (count - have))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            if tag not in self._VOID:
                self._skip_depth += 1
            return
        if self._skip_depth:
            return
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._newlines(2)
            self._heading = int(tag[1])
            self.out.append("#" * self._heading + " ")
        elif tag == "pre":
            self._newlines(2)
            self.out.append("```\n")
            self._pre_depth += 1
        elif tag == "li":
            self._newlines(1)
            self.out.append("- ")
        elif tag in ("tr", "dt", "dd"):
            self._newlines(1)
        elif tag in ("td", "th"):
            self.out.append(" | ")
        elif tag == "br":
            self.out.append("\n")
        elif tag in self._BLOCK:
            self._newlines(2)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip_depth and tag in ("br", "hr"):
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
            return
        if self._skip_depth:
            return
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self._heading is not None:
            self._heading = None
            self._newlines(2)
        elif tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
            self._newlines(1)
            self.out.append("```")
            self._newlines(2)
        elif tag in self._BLOCK or tag == "li":
            self._newlines(2 if tag in self._BLOCK else 1)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._pre_depth:
            self.out.append(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._heading is not None:
            text = text.replace("\n", " ")
        last = self.out[-1] if self.out else "\n"
        if last.endswith((" ", "\n")):
            text = text.lstrip()
        if text:
            self.out.append(text)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# -- tokens ----------------------------------------------------------------------------------


class TokenCounter:
    """Counts and splits text in the embedding model's WordPiece tokens (no [CLS]/[SEP])."""

    def __init__(self) -> None:
        vocab_text = resources.files("proxy.infra").joinpath("data", "vocab.txt").read_text("utf-8")
        vocab = {token: index for index, token in enumerate(vocab_text.splitlines())}
        self._tokenizer = BertWordPieceTokenizer(vocab, lowercase=True)
        # BERT reads a word of more than 100 characters as one [UNK]: a base64 image or a
        # minified line would count as a single token and make a chunk of any length. Here
        # words are first cut into runs of at most 64 characters (offsets kept), so such a
        # word counts, and splits, by its pieces (WordPiece is quadratic in a word's length).
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Split(Regex(".{1,64}"), behavior="isolated")]
        )
        self._unknown = vocab["[UNK]"]

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens, a run the model reads as [UNK] counted by its length (`UNKNOWN_CHARS`)."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [sum(self._weights(e.ids, e.offsets)) if self._unknown in e.ids else len(e.ids) for e in encodings]

    def _weights(self, ids: list[int], offsets: list[tuple[int, int]]) -> list[int]:
        unknown = self._unknown
        return [-(-(end - start) // UNKNOWN_CHARS) if token == unknown else 1
                for token, (start, end) in zip(ids, offsets, strict=True)]

    def measure(self, text: str) -> tuple[int, list[str]]:
        """`text`'s tokens, and the runs of it the model cannot read (each an [UNK]: Thai,
        Amharic, emoji, … words), which its vector says nothing about."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        unknown = self._unknown
        return len(encoding.ids), [
            text[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True) if token == unknown
        ]

    def split(self, text: str, size: int) -> list[str]:
        """`text` cut into consecutive pieces of at most `size` tokens as `count` counts them
        (at token starts)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        offsets = encoding.offsets
        weights = self._weights(encoding.ids, offsets)
        if sum(weights) <= size:
            return [text]
        step = size
        while True:
            pieces = self._cut(text, offsets, weights, step)
            # A piece cut inside a long word is pre-split afresh and may count a few more.
            excess = max(self.count(pieces)) - size
            if excess <= 0 or step <= 1:
                return pieces
            step = max(1, step - excess)

    @staticmethod
    def _cut(text: str, offsets: list[tuple[int, int]], weights: list[int], size: int) -> list[str]:
        pieces = []
        start = 0
        held = 0
        for (first, _), weight in zip(offsets, weights, strict=True):
            if held and held + weight > size:
                pieces.append(text[start:first])
                start = first
                held = 0
            held += weight
        pieces.append(text[start:])
        return [piece for piece in pieces if piece.strip()]


@cache
def token_counter() -> TokenCounter:
    """The process's counter (loading the vocabulary takes ~50 ms)."""
    return TokenCounter()


# -- structure -------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A piece ends after sentence punctuation followed by a space, or at a line break.
_PIECE_END = re.compile("(?<=[.!?;:\u3002\uff01\uff1f])[\"')\\]]*[ \t]+(?=\\S)|\n")


@dataclass(slots=True)
class _Section:
    path: list[str]
    blocks: list[str]


def _sections(text: str, markdown: bool) -> list[_Section]:
    sections = [_Section([], [])]
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    fence: str | None = None

    def end_block() -> None:
        if block and any(line.strip() for line in block):
            sections[-1].blocks.append("\n".join(block).strip("\n"))
        block.clear()

    def heading(level: int, title: str) -> None:
        end_block()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.strip()))
        sections.append(_Section([t for _, t in stack if t], []))

    for line in text.split("\n"):
        if fence is not None:
            block.append(line)
            if line.strip().startswith(fence):
                fence = None
                end_block()
            continue
        if markdown and (match := _FENCE.match(line)):
            end_block()
            fence = match.group(1)[0] * 3
            block.append(line)
            continue
        if markdown and (match := _ATX.match(line)):
            heading(len(match.group(1)), match.group(2) or "")
            continue
        if (
            markdown
            and (match := _SETEXT.match(line))
            and len(block) == 1
            and block[0].strip()
            and not block[0].lstrip().startswith(("-", "*", "+", ">", "|"))
        ):
            title = block.pop()
            heading(1 if match.group(1)[0] == "=" else 2, title)
            continue
        if not line.strip():
            end_block()
            continue
        block.append(line)
    end_block()
    return [s for s in sections if s.blocks]


def _pieces(block: str) -> list[str]:
    """A paragraph cut after sentences and at line breaks; concatenated they give it back."""
    if block.lstrip().startswith(("```", "~~~")):
        return [line + "\n" for line in block.split("\n")[:-1]] + [block.split("\n")[-1]]
    pieces: list[str] = []
    start = 0
    for match in _PIECE_END.finditer(block):
        pieces.append(block[start : match.end()])
        start = match.end()
    pieces.append(block[start:])
    return [p for p in pieces if p]


def chunk(text: str, fmt: Format = "markdown", settings: ChunkerSettings | None = None,
          counter: TokenCounter | None = None) -> list[Chunk]:
    """Split extracted text (see `to_text`) into chunks; see the module docstring."""
    settings = settings or ChunkerSettings()
    counter = counter or token_counter()
    chunks: list[Chunk] = []
    for section in _sections(text, markdown=fmt != "text"):
        heading = _heading_text(section.path, counter)
        chunks.extend(_pack(section, heading, settings, counter))
    return chunks


def chunk_sections(
    sections: Sequence[tuple[Sequence[str], str]], settings: ChunkerSettings | None = None,
    counter: TokenCounter | None = None,
) -> list[Chunk]:
    """Chunks of plain-text sections given with their heading paths (a PDF's pages): each is
    chunked as plain text under its own heading, never spanning two."""
    settings = settings or ChunkerSettings()
    counter = counter or token_counter()
    chunks: list[Chunk] = []
    for path, text in sections:
        heading = _heading_text(list(path), counter)
        for section in _sections(text, markdown=False):
            chunks.extend(_pack(section, heading, settings, counter))
    return chunks


def _heading_text(path: list[str], counter: TokenCounter) -> str:
    # Deep or long heading paths keep their innermost levels.
    while path:
        heading = " > ".join(path)
        if counter.count([heading])[0] <= _HEADING_TOKENS_MAX:
            return heading
        if len(path) == 1:
            return counter.split(heading, _HEADING_TOKENS_MAX)[0].strip()
        path = path[1:]
    return ""


@dataclass(slots=True)
class _Piece:
    text: str
    tokens: int
    paragraph: int
    first: bool  # the first piece of its paragraph


def _pack(section: _Section, heading: str, settings: ChunkerSettings, counter: TokenCounter) -> list[Chunk]:
    heading_tokens = counter.count([heading])[0] if heading else 0
    budget = max(16, settings.target - heading_tokens)
    ceiling = max(16, settings.maximum - heading_tokens)
    raw = [(i, piece) for i, block in enumerate(section.blocks) for piece in _pieces(block)]
    counts = counter.count([piece for _, piece in raw])
    pieces: list[_Piece] = []
    previous = -1
    for (paragraph, text), tokens in zip(raw, counts, strict=True):
        parts = counter.split(text, ceiling) if tokens > ceiling else [text]
        for part in parts:
            part_tokens = tokens if len(parts) == 1 else counter.count([part])[0]
            pieces.append(_Piece(part, part_tokens, paragraph, paragraph != previous))
            previous = paragraph
    paragraph_tokens: dict[int, int] = {}
    for piece in pieces:
        paragraph_tokens[piece.paragraph] = paragraph_tokens.get(piece.paragraph, 0) + piece.tokens

    out: list[Chunk] = []
    current: list[_Piece] = []
    size = 0
    for piece in pieces:
        if current:
            whole = paragraph_tokens[piece.paragraph] if piece.first else 0
            full = size + piece.tokens > budget
            # At a paragraph start, break rather than split the paragraph when the chunk is
            # already half full and the paragraph would not fit whole.
            early = piece.first and size >= budget // 2 and size + whole > budget
            if full or early:
                out.append(_emit(current, heading, size + heading_tokens))
                current = _overlap(current, settings.overlap, ceiling - piece.tokens)
                size = sum(p.tokens for p in current)
        current.append(piece)
        size += piece.tokens
    if current:
        out.append(_emit(current, heading, size + heading_tokens))
    return out


def _overlap(previous: list[_Piece], overlap: int, room: int) -> list[_Piece]:
    """The trailing whole pieces of the previous chunk that fit in `overlap` tokens."""
    carried: list[_Piece] = []
    size = 0
    for piece in reversed(previous[1:]):  # never the whole previous chunk
        if size + piece.tokens > min(overlap, room):
            break
        carried.insert(0, piece)
        size += piece.tokens
    return carried


def _emit(pieces: list[_Piece], heading: str, tokens: int) -> Chunk:
    parts: list[str] = []
    for index, piece in enumerate(pieces):
        if index and piece.paragraph != pieces[index - 1].paragraph:
            parts.append("\n\n")
        parts.append(piece.text)
    return Chunk(heading=heading, content="".join(parts).strip(), tokens=tokens)


__all__ = [
    "FORMATS",
    "INGESTIBLE_EXTENSIONS",
    "MEDIA_TYPES",
    "UNKNOWN_CHARS",
    "Chunk",
    "ChunkerSettings",
    "Format",
    "TokenCounter",
    "UnsupportedDocument",
    "chunk",
    "chunk_sections",
    "decode_text",
    "detect_format",
    "html_to_text",
    "to_text",
    "token_counter",
]
