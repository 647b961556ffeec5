"""Chunking and text extraction: structure kept, sizes bounded in model tokens, overlap."""

from __future__ import annotations

import itertools

import pytest

from proxy.infra.chunking import (
    ChunkerSettings,
    UnsupportedDocument,
    chunk,
    decode_text,
    detect_format,
    html_to_text,
    to_text,
    token_counter,
)

FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "


def test_headings_start_sections_and_chunks_carry_their_heading_path() -> None:
    text = (
        "# Guide\n\nIntro.\n\n## Install\n\n### Linux\n\nUse apt.\n\n### macOS\n\nUse brew.\n\n"
        "Setext title\n============\n\nUnder setext.\n\nSub\n---\n\nUnder sub.\n"
    )
    chunks = chunk(text)
    assert [(c.heading, c.content) for c in chunks] == [
        ("Guide", "Intro."),
        ("Guide > Install > Linux", "Use apt."),
        ("Guide > Install > macOS", "Use brew."),
        ("Setext title", "Under setext."),
        ("Setext title > Sub", "Under sub."),
    ]
    assert chunks[1].text == "Guide > Install > Linux\nUse apt."


def test_a_heading_inside_a_code_fence_is_code_and_the_fence_stays_whole() -> None:
    text = "# Title\n\nBefore.\n\n```sh\n# not a heading\n\necho hi\n```\n\nAfter."
    chunks = chunk(text)
    assert len(chunks) == 1
    assert chunks[0].heading == "Title"
    assert "```sh\n# not a heading\n\necho hi\n```" in chunks[0].content


def test_plain_text_has_no_headings() -> None:
    chunks = chunk("# this is a comment in a text file\n\nBody.", "text")
    assert [c.heading for c in chunks] == [""]
    assert chunks[0].content.startswith("# this is a comment")


def test_chunks_stay_within_the_model_window_and_overlap() -> None:
    settings = ChunkerSettings(target=100, overlap=30, maximum=120)
    paragraphs = "\n\n".join(f"Paragraph {i}. " + FILLER * 3 for i in range(12))
    chunks = chunk(f"# Long section\n\n{paragraphs}", settings=settings)
    counter = token_counter()
    assert len(chunks) > 3
    for c in chunks:
        assert counter.count([c.text])[0] <= settings.maximum
        assert c.heading == "Long section"
    # Consecutive chunks share whole sentences (the overlap), and every paragraph survives.
    for previous, current in itertools.pairwise(chunks):
        first_sentence = current.content.split(". ")[0]
        assert first_sentence in previous.content
    joined = " ".join(c.content for c in chunks)
    for i in range(12):
        assert f"Paragraph {i}." in joined


def test_paragraphs_are_not_split_when_a_chunk_is_half_full() -> None:
    settings = ChunkerSettings(target=100, overlap=0, maximum=120)
    first = "First paragraph. " + FILLER * 4  # ~60 tokens
    second = "Second paragraph. " + FILLER * 4
    chunks = chunk(f"{first}\n\n{second}", settings=settings)
    assert [c.content.split(".")[0] for c in chunks] == ["First paragraph", "Second paragraph"]


def test_a_huge_sentence_and_cjk_text_are_cut_by_tokens() -> None:
    settings = ChunkerSettings(target=64, overlap=0, maximum=80)
    counter = token_counter()
    for text in ("word" + " word" * 1000, "東京都" * 300):
        chunks = chunk(text, settings=settings)
        assert len(chunks) > 3
        assert all(counter.count([c.text])[0] <= settings.maximum for c in chunks)
        assert "".join(c.content for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_a_word_longer_than_bert_reads_is_cut_too() -> None:
    """An inline base64 image or a minified line is one 'word' of thousands of characters:
    it must not become one chunk of any length (BERT would count it as a single [UNK])."""
    blob = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" * 2000
    text = "# Logo\n\nThe logo is below.\n\n" + blob
    chunks = chunk(text)
    assert len(chunks) > 100
    assert max(len(c.content) for c in chunks) < 2000
    assert max(token_counter().count([c.text for c in chunks])) <= ChunkerSettings().maximum
    assert "".join(c.content for c in chunks[1:]).replace(" ", "").endswith(blob[-500:])


def test_words_the_model_cannot_read_are_sized_by_their_length() -> None:
    """Thai, Amharic, emoji: each word (up to 64 characters) is one [UNK] to the model, and a
    chunk of 200 of them held over ten thousand characters, each passage injected from it tens
    of thousands of a chat model's tokens. Nothing is lost on the way."""
    settings = ChunkerSettings(overlap=0)
    thai = "ภาษาไทยเป็นภาษาที่มีระดับเสียงของคำแน่นอนหรือวรรณยุกต์เช่นเดียวกับภาษาจีนและออกเสียงแยกคำต่อคำ "
    for text in (thai * 400, "ሰላም እንዴት ነህ። " * 2000, "🎉" * 50000, "We ate 🍕🍕🍕 and more 🍕. " * 800):
        chunks = chunk(text, settings=settings)
        assert max(len(c.content) for c in chunks) <= 4 * settings.maximum + 64
        assert "".join(c.content for c in chunks).replace(" ", "") == text.replace(" ", "")
    # Text the model reads counts as it did: an English chunk is no smaller for it.
    counter = token_counter()
    assert counter.count([FILLER * 3]) == [counter.measure(FILLER * 3)[0]] == [42]


def test_html_becomes_markdown_like_text() -> None:
    html = (
        "<html><head><title>T</title><style>p { color: red }</style></head><body>"
        "<nav>Home | About</nav><h1>Title</h1><p>Hello <b>world</b> &amp; friends.</p>"
        "<ul><li>one</li><li>two</li></ul><pre>code\n  indented</pre><h2>Sub</h2><p>More<br>lines</p>"
        "<script>alert('x')</script></body></html>"
    )
    text = html_to_text(html)
    assert text == "# Title\n\nHello world & friends.\n\n- one\n- two\n\n```\ncode\n  indented\n```\n\n## Sub\n\nMore\nlines"
    chunks = chunk(to_text(html, "html"))
    assert [c.heading for c in chunks] == ["Title", "Title > Sub"]


def test_formats_are_detected() -> None:
    assert detect_format("a.md") == "markdown"
    assert detect_format("notes.TXT") == "text"
    assert detect_format("page.html") == "html"
    assert detect_format(None, "text/html; charset=utf-8") == "html"
    assert detect_format("upload", None, b"<!DOCTYPE html><html>") == "html"
    for name, media, data in (("x.pdf", None, None), ("x", "application/pdf", None), ("x.bin", None, b"%PDF-1.7\n")):
        assert detect_format(name, media, data) == "pdf"


def test_decoding_accepts_utf8_and_utf16_and_refuses_binary() -> None:
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text("\ufeffhéllo".encode()) == "héllo"
    assert decode_text("héllo".encode("utf-16")) == "héllo"
    with pytest.raises(UnsupportedDocument, match="binary"):
        decode_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(UnsupportedDocument, match="not UTF-8"):
        decode_text("héllo".encode("latin-1"))


def test_chunker_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        ChunkerSettings(target=300, maximum=300)
    with pytest.raises(ValueError):
        ChunkerSettings(target=100, overlap=60)
    assert ChunkerSettings().signature != ChunkerSettings(overlap=10).signature
