"""Small PDFs written by hand for the RAG tests: real text operators (Helvetica), so pypdf
extracts what a text-layer PDF would give; optional outline (bookmarks) and document info."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(
    pages: Sequence[Sequence[str]],
    *,
    outline: Sequence[tuple[str, int]] = (),
    title: str | None = None,
    author: str | None = None,
    busywork: int = 0,
    to_unicode: Mapping[str, str] | None = None,
) -> bytes:
    """A PDF whose page i shows the lines `pages[i]` (an empty page draws only a rectangle,
    like a scan without a text layer, and `busywork` text objects that show nothing: work for
    an extractor that finds no text); `outline`: (title, page index) bookmarks; `to_unicode`:
    the font's ToUnicode map, a character drawn -> the UTF-16BE code units (hex) it stands for."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in below
    pages_id = add(b"")
    cmap = b""
    if to_unicode:
        pairs = b"\n".join(b"<%02X> <%s>" % (ord(char), units.encode()) for char, units in to_unicode.items())
        body = (b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /Test def\n"
                b"1 begincodespacerange <00> <FF> endcodespacerange\n%d beginbfchar\n%s\nendbfchar\n"
                b"endcmap CMapName currentdict /CMap defineresource pop end end" % (len(to_unicode), pairs))
        cmap = b" /ToUnicode %d 0 R" % add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(body), body))
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica%s >>" % cmap)
    page_ids: list[int] = []
    for lines in pages:
        if lines:
            ops = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({_escape(line)}) Tj T*" for line in lines) + " ET"
        else:
            ops = "0.5 g 72 72 400 600 re f" + " BT /F1 11 Tf () Tj ET" * busywork
        stream = ops.encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        page_ids.append(add(
            b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 %d 0 R >> >> "
            b"/Contents %d 0 R >>" % (pages_id, font, content)
        ))
    objects[pages_id - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % p for p in page_ids), len(page_ids))
    extra = b""
    if outline:
        outlines_id = add(b"")
        first = len(objects) + 1
        ids = list(range(first, first + len(outline)))
        for index, (name, page) in enumerate(outline):
            links = b""
            if index:
                links += b" /Prev %d 0 R" % ids[index - 1]
            if index + 1 < len(ids):
                links += b" /Next %d 0 R" % ids[index + 1]
            add(b"<< /Title (%s) /Parent %d 0 R /Dest [%d 0 R /Fit]%s >>" % (
                _escape(name).encode("latin-1"), outlines_id, page_ids[page], links))
        objects[outlines_id - 1] = b"<< /Type /Outlines /First %d 0 R /Last %d 0 R /Count %d >>" % (
            ids[0], ids[-1], len(ids))
        extra = b" /Outlines %d 0 R" % outlines_id
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R%s >>" % (pages_id, extra)
    info = b""
    if title or author:
        fields = b"".join(b" /%s (%s)" % (key, _escape(value).encode("latin-1"))
                          for key, value in ((b"Title", title), (b"Author", author)) if value)
        info = b" /Info %d 0 R" % add(b"<<%s >>" % fields)

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, info, xref)
    return bytes(out)
