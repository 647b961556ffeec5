"""`llm-proxy ingest WS PATH...`: documents into a RAG workspace, straight into the database.

Files are taken as given; directories are walked (hidden entries skipped) for the formats
the gateway reads: Markdown, plain text, HTML and PDF. A document's source is its path relative
to the directory named on the command line, prefixed with that directory's name
(`docs/guide/install.md`), or the file's name for a file named directly, so running the
command again from anywhere finds the same documents: unchanged ones are skipped, changed
ones replaced. Two files that would be the same document (`a/guide.pdf` and `b/guide.pdf`
named directly) are not: the first is ingested, the other fails, rather than replace it.

A path that does not exist (or is neither a file nor a directory), and a directory holding no
file of those formats, is a bad argument: each one is named and nothing is ingested, before the
database is started, so that a script with a mistyped path (or the wrong directory, or one of
`.docx` files) fails at once rather than ingesting the rest, or nothing, and looking done.

Progress goes to stderr: a bar redrawn in place on a terminal, one line per document
otherwise. Exit status: 0 when every document was ingested (or unchanged), 1 when some
failed, 2 for bad arguments (a missing path, or a directory with nothing to ingest, included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from proxy.config import MAX_THREADS, Settings
from proxy.domain.errors import GatewayError
from proxy.infra.aio import asyncio_bridge
from proxy.infra.chunking import (
    INGESTIBLE_EXTENSIONS,
    UnsupportedDocument,
    decode_text,
    detect_format,
)
from proxy.infra.embedder import LocalEmbedder
from proxy.infra.migrations import migrate
from proxy.infra.postgres import DatabaseError, open_database
from proxy.infra.rag_store import RagStore
from proxy.services.rag import WORKSPACE_NAME, DocumentInput, Prepared, RagService


def add_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    ingest = commands.add_parser("ingest", help="add documents (Markdown, text, HTML, PDF) to a RAG workspace")
    common(ingest)
    ingest.add_argument("workspace", metavar="WS", help="the workspace (created if missing)")
    ingest.add_argument("paths", metavar="PATH", nargs="+", type=Path, help="files and directories")
    ingest.add_argument("--language", help="full-text search language of a new or empty workspace (default english); "
                        "one indexed in another language is refused")
    ingest.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="ONNX threads for embedding (default: up to 4 cores)")


@dataclass(slots=True)
class _File:
    path: Path
    source: str


def check_arguments(args: argparse.Namespace, err: TextIO | None = None) -> int:
    """2 (each reason said on `err`) when the arguments are wrong, 0 otherwise: run before the
    database is started, and again by `run`."""
    err = err or sys.stderr
    if not WORKSPACE_NAME.match(args.workspace):
        print(f"llm-proxy: invalid workspace name {args.workspace!r} (1-64 of A-Z a-z 0-9 . _ -)", file=err)
        return 2
    if not 1 <= args.threads <= MAX_THREADS:
        print(f"llm-proxy: --threads must be from 1 to {MAX_THREADS}, got {args.threads}", file=err)
        return 2
    missing = [path for path in args.paths if not (path.is_dir() or path.is_file())]
    for path in missing:
        why = "not a file or directory" if os.path.lexists(path) else "no such file or directory"
        print(f"llm-proxy: {path}: {why}", file=err)
    # A directory with nothing to ingest is as wrong as a missing one: walked until its first
    # document, which one that holds any finds at once.
    empty = [path for path in args.paths if path.is_dir() and next(_documents_under(path), None) is None]
    for path in empty:
        print(f"llm-proxy: {path}: no document to ingest in this directory (looked for "
              f"{' '.join(sorted(INGESTIBLE_EXTENSIONS))}; hidden entries skipped)", file=err)
    if missing or empty:
        reasons = [f"{len(missing)} not found"] if missing else []
        reasons += [f"{len(empty)} with nothing to ingest"] if empty else []
        print(f"llm-proxy: nothing ingested: of {len(args.paths)} path{'' if len(args.paths) == 1 else 's'}, "
              f"{' and '.join(reasons)}", file=err)
        return 2
    return 0


def _documents_under(root: Path) -> Iterator[tuple[Path, Path]]:
    """(file, its path relative to `root`) of each file `ingest` takes from directory `root`,
    in no particular order."""
    for entry in root.rglob("*"):
        relative = entry.relative_to(root)
        if (
            entry.suffix.lower() in INGESTIBLE_EXTENSIONS and entry.is_file()
            and not any(part.startswith(".") for part in relative.parts)
        ):
            yield entry, relative


def collect(paths: list[Path]) -> tuple[list[_File], list[tuple[str, str]]]:
    """The files to ingest (every path exists: `check_arguments`) and (path, reason) for files
    that would be the same document as one before them (a file named twice is taken once)."""
    files: list[_File] = []
    clashes: list[tuple[str, str]] = []
    taken: dict[str, Path] = {}

    def take(path: Path, source: str) -> None:
        first = taken.setdefault(source, path)
        if first is path:
            files.append(_File(path, source))
        elif first.resolve() != path.resolve():
            clashes.append((str(path), f"would replace {first}, the same document `{source}`: ingest their directories"))

    for path in paths:
        if path.is_dir():
            root = path.resolve()
            for entry, relative in sorted(_documents_under(root)):
                take(entry, f"{root.name}/{relative.as_posix()}")
        elif path.is_file():
            take(path, path.name)
    return files, clashes


class _Progress:
    """A progress bar on a terminal; plain lines otherwise."""

    def __init__(self, out: TextIO, total_chunks: int, total_files: int) -> None:
        self._out = out
        self._tty = out.isatty()
        self._chunks = 0
        self._total = max(1, total_chunks)
        self._files = 0
        self._total_files = total_files
        self._current = ""

    def file(self, source: str) -> None:
        self._current = source
        self._draw()

    def chunks(self, count: int) -> None:
        self._chunks += count
        self._draw()

    def done(self, source: str, status: str, detail: str) -> None:
        self._files += 1
        if self._tty:
            self._out.write("\r\033[K")
        self._out.write(f"{status:>9}  {source}  {detail}\n")
        self._draw()

    def _draw(self) -> None:
        if not self._tty:
            return
        width = 30
        filled = int(width * min(self._chunks, self._total) / self._total)
        bar = "#" * filled + "." * (width - filled)
        name = self._current if len(self._current) <= 40 else "…" + self._current[-39:]
        self._out.write(f"\r\033[K[{bar}] {self._chunks}/{self._total} chunks  "
                        f"{self._files}/{self._total_files} files  {name}")
        self._out.flush()

    def close(self) -> None:
        if self._tty:
            self._out.write("\r\033[K")
        self._out.flush()


def run(args: argparse.Namespace, settings: Settings, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    if status := check_arguments(args, err):
        return status
    if not settings.database_url:
        print("llm-proxy: no database: set DATABASE_URL or enable the embedded one", file=err)
        return 2
    files, clashes = collect(args.paths)
    for source, reason in clashes:
        print(f"{'failed':>9}  {source}  ({reason})", file=err)
    try:
        status = trio.run(_ingest, args, settings, settings.database_url, files, err)
        return max(status, 1) if clashes and status != 2 else status
    except DatabaseError as error:
        print(f"llm-proxy: database error: {error}", file=err)
        return 1
    except GatewayError as error:
        print(f"llm-proxy: {error.message}", file=err)
        return 1


async def _ingest(
    args: argparse.Namespace, settings: Settings, url: str, files: list[_File], err: TextIO
) -> int:
    started = time.perf_counter()
    statuses: Counter[str] = Counter()
    async with asyncio_bridge(), open_database(url, max_size=2) as db:
        await migrate(db)
        if args.language is not None and not await RagStore(db).language_exists(args.language):
            print(f"llm-proxy: --language {args.language!r} is not a PostgreSQL text search configuration", file=err)
            return 2
        async with LocalEmbedder.open(intra_op_threads=args.threads) as opened:
            rag = RagService(settings.rag, lambda: db, opened)
            documents: list[tuple[_File, Prepared]] = []
            for item in files:
                try:
                    data = await trio.Path(item.path).read_bytes()
                    fmt = detect_format(item.path.name, None, data)
                    if fmt == "pdf":
                        document = DocumentInput("", fmt, item.source, data=data)
                    else:
                        document = DocumentInput(decode_text(data, item.source), fmt, item.source)
                    prepared = await rag.prepare(document)
                except (UnsupportedDocument, OSError) as error:
                    statuses["failed"] += 1
                    print(f"{'failed':>9}  {item.source}  {error}", file=err)
                    continue
                documents.append((item, prepared))
            progress = _Progress(err, sum(len(chunks) for _, (_, _, chunks) in documents), len(documents))
            try:
                for item, prepared in documents:
                    count = len(prepared[2])
                    progress.file(item.source)
                    try:
                        (result,) = await rag.ingest_prepared(args.workspace, [prepared], progress=progress.chunks,
                                                              language=args.language)
                    except GatewayError as error:
                        if error.code in ("database_error", "database_unavailable", "language_locked"):
                            raise  # every other document would fail the same way
                        statuses["failed"] += 1
                        progress.done(item.source, "failed", error.message)
                        continue
                    statuses[result.status] += 1
                    progress.done(item.source, result.status, f"({count} chunk{'' if count == 1 else 's'})")
            finally:
                progress.close()
    summary = ", ".join(f"{statuses[s]} {s}" for s in ("created", "updated", "unchanged", "failed") if statuses[s])
    total = sum(statuses.values())
    print(f"{args.workspace}: {total} document{'' if total == 1 else 's'}: {summary or 'nothing to do'} "
          f"({time.perf_counter() - started:.1f} s)", file=err)
    return 1 if statuses["failed"] else 0
