"""PDF documents in RAG workspaces: uploaded (multipart or base64 JSON) and ingested from the
command line, answered from with the page in `x-rag-sources`, and refused with the reason
when they cannot be read (encrypted, scanned, corrupt, over the limits). Real PostgreSQL,
the real ONNX embedder, the gateway as the suite runs it."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import trio
from pypdf import PdfReader, PdfWriter

from proxy.cli import main
from proxy.config import ConfigError, RagSettings, load_settings
from proxy.infra.chunking import UnsupportedDocument
from proxy.infra.pdf import PdfLimits, extract_pdf
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway
from tests.pdf_files import make_pdf

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

GUIDE_PAGES = [
    ["Welcome to the Acme Widget guide.", "This guide explains the product for new owners."],
    ["Unpacking: remove the widget from its box and keep the foam inserts for transport."],
    ["Calibration: hold the blue button for seven seconds until the lamp blinks green.",
     "The widget then measures the room temperature and stores the offset."],
    ["Cleaning: wipe the housing with a dry cloth; never use solvents on the display."],
    ["Warranty: the widget is covered for two years from the date of purchase."],
]


def guide_pdf(**options: object) -> bytes:
    return make_pdf(GUIDE_PAGES, title="Acme Widget Guide", author="Acme Docs Team", **options)  # type: ignore[arg-type]


def encrypted(data: bytes, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def test_a_question_is_answered_from_page_3_with_the_page_in_the_sources(pg_database_url: str) -> None:
    fake = OpenAIBackend()
    fake.set_script(Script(tokens=["Hold the blue button [1]."]))
    async with fake.serve() as served, running_gateway(
        backend("oa", served.url, default=True), database_url=pg_database_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=120) as http:
        upload = await http.post("/v1/workspaces/manuals/documents",
                                 files={"file": ("guide.pdf", guide_pdf(), "application/pdf")},
                                 data={"metadata": '{"team": "support"}'})
        assert upload.status_code == 201, upload.text
        assert upload.json()["data"][0]["chunks"] == 5  # a chunk per page: none spans two
        again = await http.post("/v1/workspaces/manuals/documents",
                                files={"file": ("guide.pdf", guide_pdf(), "application/pdf")},
                                data={"metadata": '{"team": "support"}'})
        assert again.status_code == 200 and again.json()["data"][0]["status"] == "unchanged"
        listed = (await http.get("/v1/workspaces/manuals/documents")).json()["data"]
        assert [(d["source"], d["media_type"]) for d in listed] == [("guide.pdf", "application/pdf")]
        assert listed[0]["metadata"] == {"team": "support", "title": "Acme Widget Guide",
                                         "author": "Acme Docs Team", "pages": 5}

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="qwen3-8b", extra_headers={"x-workspace": "manuals"},
            messages=[{"role": "user", "content": "How do I calibrate the widget?"}],
        )
        sources = json.loads(raw.headers["x-rag-sources"])
        assert sources[0]["source"] == "guide.pdf" and sources[0]["heading"] == "p. 3", sources
        system = fake.requests[-1].json["messages"][0]["content"]
        assert "hold the blue button for seven seconds" in system

        # JSON with the bytes in base64; the outline (bookmarks) names the pages' sections.
        bookmarked = guide_pdf(outline=[("Getting started", 0), ("Calibration", 2), ("Care", 3)])
        sent = await http.post("/v1/workspaces/manuals/documents", json={
            "source": "guide-v2.pdf", "format": "pdf", "content_base64": base64.b64encode(bookmarked).decode()})
        assert sent.status_code == 201, sent.text
        found = (await http.post("/v1/workspaces/manuals/search",
                                 json={"query": "Is there a warranty?", "top_k": 4})).json()["data"]
        headings = {(p["source"], p["heading"]) for p in found}
        assert ("guide-v2.pdf", "Care > p. 5") in headings and ("guide.pdf", "p. 5") in headings
        # Any file's bytes may come that way: text is decoded as an upload's would be.
        notes = await http.post("/v1/workspaces/manuals/documents", json={
            "source": "notes.md", "content_base64": base64.b64encode("# Notes\n\nShips in spring.".encode("utf-16")).decode()})
        assert notes.status_code == 201 and notes.json()["data"][0]["chunks"] == 1
        not_base64 = await http.post("/v1/workspaces/manuals/documents", json={"content_base64": "%%%", "format": "pdf"})
        assert not_base64.status_code == 400 and not_base64.json()["error"]["param"] == "body.content_base64"


async def test_base64_in_lines_or_as_a_data_url_is_a_files_bytes(pg_database_url: str) -> None:
    """What `base64 manual.pdf` prints (76-character lines) and OpenAI's `file_data` (a `data:`
    URL, whose media type says PDF without a file name) are ingested like plain base64."""
    wrapped = base64.encodebytes(guide_pdf()).decode()
    assert "\n" in wrapped
    data_url = "data:application/pdf;base64," + base64.b64encode(make_pdf(GUIDE_PAGES)).decode()
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=120) as http:
        sent = await http.post("/v1/workspaces/lines/documents", json={"documents": [
            {"source": "wrapped.pdf", "content_base64": wrapped}, {"source": "manual", "content_base64": data_url},
        ]})
        assert sent.status_code == 201, sent.text
        assert [(d["source"], d["chunks"]) for d in sent.json()["data"]] == [("wrapped.pdf", 5), ("manual", 5)]
        listed = (await http.get("/v1/workspaces/lines/documents")).json()["data"]
        assert {d["source"]: d["media_type"] for d in listed} == {"wrapped.pdf": "application/pdf", "manual": "application/pdf"}
        not_base64 = await http.post("/v1/workspaces/lines/documents", json={"content_base64": "data:application/pdf,%PDF"})
        assert not_base64.status_code == 400 and not_base64.json()["error"]["param"] == "body.content_base64"


async def test_a_fonts_broken_unicode_map_does_not_fail_the_upload(pg_database_url: str) -> None:
    """Math fonts often map a glyph to half of a UTF-16 pair (pypdf then gives surrogates, which
    UTF-8 cannot hold): a pair split over two glyphs is the character it makes, a lone half goes,
    and the PDF is ingested rather than a 500."""
    math = make_pdf([["Let XY be the sum, and Z the rest of the widget budget."]], title="Proof Q",
                    to_unicode={"X": "D835", "Y": "DC00", "Z": "D835", "Q": "DC01"})
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=120) as http:
        sent = await http.post("/v1/workspaces/maths/documents", files={"file": ("math.pdf", math, "application/pdf")})
        assert sent.status_code == 201, sent.text
        found = (await http.post("/v1/workspaces/maths/search", json={"query": "widget budget"})).json()["data"]
        assert "Let \U0001d400 be the sum" in found[0]["content"]
    (page,) = extract_pdf(math, "math.pdf", PdfLimits()).pages
    assert page.text == "Let \U0001d400 be the sum, and  the rest of the widget budget."


async def test_unreadable_pdfs_are_refused_with_the_reason(pg_database_url: str) -> None:
    too_long = make_pdf([[f"Page {n} of a long report."] for n in range(1, 13)])
    cases = [
        ("locked.pdf", encrypted(guide_pdf(), "secret"), "encrypted"),
        ("scan.pdf", make_pdf([[], []]), "needs OCR"),
        ("broken.pdf", guide_pdf()[:400], "corrupt"),
        ("garbage.pdf", b"%PDF-1.7\nthis is no PDF at all", "corrupt"),
        ("report.pdf", too_long, "12 pages; PDFs are limited to 10"),
    ]
    settings = RagSettings(pdf_max_pages=10)
    async with running_gateway(database_url=pg_database_url, rag=settings) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        for name, data, reason in cases:
            refused = await http.post("/v1/workspaces/w/documents", files={"file": (name, data, "application/pdf")})
            assert refused.status_code == 400, (name, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "unsupported_document" and reason in error["message"] and name in error["message"]
        # The same over JSON; a PDF sent as text is pointed at `content_base64`.
        refused = await http.post("/v1/workspaces/w/documents", json={
            "source": "scan.pdf", "content_base64": base64.b64encode(make_pdf([[]])).decode()})
        assert refused.status_code == 400 and "needs OCR" in refused.json()["error"]["message"]
        as_text = await http.post("/v1/workspaces/w/documents", json={"content": "%PDF-1.4 ...", "format": "pdf"})
        assert as_text.status_code == 400 and "content_base64" in as_text.json()["error"]["message"]
        assert (await http.get("/v1/workspaces/w/documents")).status_code == 404  # nothing was written

        # Encrypted only against changes (an empty user password) opens like any PDF.
        opened = await http.post("/v1/workspaces/w/documents",
                                 files={"file": ("open.pdf", encrypted(guide_pdf(), ""), "application/pdf")})
        assert opened.status_code == 201, opened.text

    bytes_limit = RagSettings(pdf_max_bytes=1000)
    async with running_gateway(database_url=pg_database_url, rag=bytes_limit) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        refused = await http.post("/v1/workspaces/w/documents", files={"file": ("big.pdf", guide_pdf(), "application/pdf")})
        assert refused.status_code == 400 and "limited to 1,000 bytes" in refused.json()["error"]["message"]


def test_an_abandoned_or_slow_extraction_stops_between_pages() -> None:
    """The worker thread checks the caller's stop event and its deadline before every page."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(UnsupportedDocument, match="abandoned"):
        extract_pdf(guide_pdf(), "guide.pdf", PdfLimits(), stop)
    with pytest.raises(UnsupportedDocument, match="took more than"):
        extract_pdf(guide_pdf(), "guide.pdf", PdfLimits(timeout_seconds=-1))


def pages_being_read() -> list[int]:
    """The page index each thread running `extract_pdf` (in this process) is at."""
    seen = []
    for frame in sys._current_frames().values():
        current: object = frame
        while current is not None:
            code = current.f_code  # type: ignore[attr-defined]
            if code.co_name == "extract_pdf" and code.co_filename.endswith("pdf.py"):
                seen.append(int(current.f_locals.get("index", -1)))  # type: ignore[attr-defined]
                break
            current = current.f_back  # type: ignore[attr-defined]
    return seen


async def test_a_client_that_leaves_stops_the_extraction(pg_database_url: str) -> None:
    """The worker thread reading a long PDF stops at its next page once the client has gone:
    it never gets near the end (watched through its frame, not timed)."""
    pages = 1200
    pdf = make_pdf([[f"Line {i} of page {p}, with enough words to take a moment to read." for i in range(40)]
                    for p in range(pages)])
    async with running_gateway(database_url=pg_database_url, rag=RagSettings(pdf_max_pages=pages)) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: http.post("/v1/workspaces/w/documents",
                                                 files={"file": ("long.pdf", pdf, "application/pdf")}))
            left_at = max(await watch_extraction(until_started=True))
            nursery.cancel_scope.cancel()  # the client hangs up
        highest = max(await watch_extraction(until_started=False), default=left_at)
        assert left_at < pages // 4 and highest < pages // 2, (left_at, highest)
        assert (await http.get("/v1/workspaces/w")).status_code == 404  # nothing was stored


async def test_pdfs_are_read_two_at_a_time(pg_database_url: str) -> None:
    """Extraction holds the GIL: four uploads at once get two reading threads, not four, so
    the event loop (every other stream) keeps its share. (Scans that take a while to find
    without text: refused once read, nothing to embed.)"""
    pdf = make_pdf([[]] * 200, busywork=300)
    most = 0
    async with running_gateway(database_url=pg_database_url) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as http, trio.open_nursery() as nursery:
        statuses: list[int] = []

        async def upload(n: int) -> None:
            response = await http.post("/v1/workspaces/w/documents",
                                       files={"file": (f"r{n}.pdf", pdf, "application/pdf")})
            statuses.append(response.status_code)

        for n in range(4):
            nursery.start_soon(upload, n)
        with trio.fail_after(120):
            while len(statuses) < 4:
                most = max(most, len(pages_being_read()))
                await trio.sleep(0.002)
    assert statuses == [400] * 4 and most == 2


async def watch_extraction(*, until_started: bool) -> list[int]:
    """Polls the extraction threads' page indexes until one runs (`until_started`) or none
    does; returns every index seen."""
    seen: list[int] = []
    with trio.fail_after(60):
        while True:
            reading = pages_being_read()
            seen.extend(reading)
            if bool(reading) == until_started:
                return seen
            await trio.sleep(0.002)


def test_a_sentence_over_a_page_break_stays_on_the_page_where_it_starts() -> None:
    pdf = extract_pdf(make_pdf([["The installer needs the licence key which"], ["comes with the box. Then reboot."]]),
                      "x.pdf", PdfLimits())
    assert [(p.number, p.text) for p in pdf.pages] == [
        (1, "The installer needs the licence key which comes with the box."), (2, "Then reboot.")]


def test_cli_ingests_a_directory_with_a_pdf(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manuals = tmp_path / "manuals"
    manuals.mkdir()
    (manuals / "guide.pdf").write_bytes(guide_pdf())
    (manuals / "notes.md").write_text("# Notes\n\nThe widget ships in spring.")
    monkeypatch.setenv("DATABASE_URL", pg_database_url)

    assert main(["ingest", "manuals", str(manuals)]) == 0
    err = capsys.readouterr().err
    assert "manuals/guide.pdf  (5 chunks)" in err and "2 created" in err
    with psycopg.connect(pg_database_url) as conn:
        rows = conn.execute("SELECT d.source, d.media_type, c.heading FROM rag_documents d "
                            "JOIN rag_chunks c ON c.document_id = d.id ORDER BY d.source, c.ordinal").fetchall()
    assert [r for r in rows if r[0] == "manuals/guide.pdf"] == [
        ("manuals/guide.pdf", "application/pdf", f"p. {n}") for n in range(1, 6)]
    assert main(["ingest", "manuals", str(manuals)]) == 0
    assert "2 unchanged" in capsys.readouterr().err

    (manuals / "scan.pdf").write_bytes(make_pdf([[]]))
    assert main(["ingest", "manuals", str(manuals / "scan.pdf")]) == 1
    assert "needs OCR" in capsys.readouterr().err


def test_cli_does_not_let_two_files_of_one_name_replace_each_other(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-proxy ingest ws $(find . -name '*.pdf')`: files named directly are documents by their
    name, so `a/guide.pdf` and `b/guide.pdf` would be one document, the second replacing the
    first. The second fails, saying so; a file named twice is ingested once."""
    for folder, pages in (("a", GUIDE_PAGES), ("b", [["A different guide altogether."]])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "guide.pdf").write_bytes(make_pdf(pages))
    first, second = tmp_path / "a" / "guide.pdf", tmp_path / "b" / "guide.pdf"
    monkeypatch.setenv("DATABASE_URL", pg_database_url)

    assert main(["ingest", "clash", str(first), str(second), str(first)]) == 1
    err = capsys.readouterr().err
    assert f"failed  {second}  (would replace {first}, the same document `guide.pdf`" in err
    assert "1 document: 1 created" in err and "updated" not in err
    with psycopg.connect(pg_database_url) as conn:
        rows = conn.execute("SELECT d.source, count(*) FROM rag_documents d JOIN rag_workspaces w ON w.id = d.workspace_id "
                            "JOIN rag_chunks c ON c.document_id = d.id WHERE w.name = 'clash' GROUP BY d.source").fetchall()
    assert rows == [("guide.pdf", 5)]  # the first one's five pages


def test_the_pdf_limits_are_configured_in_the_rag_section(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[rag]\npdf_max_pages = 50\npdf_max_bytes = 1048576\npdf_timeout_seconds = 2.5\n")
    rag = load_settings(config, {}).rag
    assert (rag.pdf_max_pages, rag.pdf_max_bytes, rag.pdf_timeout_seconds) == (50, 1048576, 2.5)
    config.write_text("[rag]\npdf_max_pages = 0\n")
    with pytest.raises(ConfigError, match="pdf_max_pages"):
        load_settings(config, {})
