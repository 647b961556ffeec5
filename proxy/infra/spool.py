"""What the database has not taken yet, kept in files of the data directory: usage batches
(`spool/usage/`) and, with NATS down too, the completion log's outbox (`spool/outbox/`).

Each process has its own file, `<writer>.json` (a JSON list), rewritten whole (a temporary
file renamed over it) while the database cannot take what it holds, and removed once it has.
While the process lives it holds an exclusive lock on `<writer>.lock`; a file whose lock can
be taken was left by a process that is gone (stopped, killed, crashed) and is adopted by a
live one. Replaying is safe: usage batches carry their writer and number, and a batch is
applied once (see `KeysStore.record_usage`); log rows are upserts.

The directory is per database (a hash of its URL): a spool holds ids of that database.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.infra.keys_store import UsageDelta

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UsageBatch:
    """Usage batch `seq` of `writer`. `sent`: a write of it was attempted, so it may have
    been applied: it is written again only as it is, never merged with more."""

    writer: str
    seq: int
    deltas: dict[int, UsageDelta]
    sent: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "writer": self.writer,
            "seq": self.seq,
            "deltas": {
                str(key): [
                    d.requests, d.errors, d.prompt_tokens, d.completion_tokens, d.admissions, d.tokens, d.budget,
                    d.released, d.released_from, d.budget_at,
                ]
                for key, d in self.deltas.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageBatch:
        deltas = {int(key): _delta(values) for key, values in data["deltas"].items()}
        return cls(str(data["writer"]), int(data["seq"]), deltas, sent=True)


def _delta(values: list[Any]) -> UsageDelta:
    """A delta as `to_json` wrote it (or an earlier gateway: without the budget reservations'
    last three fields, or without the time of its budget usage, then counted when written)."""
    delta = UsageDelta(*(int(n) for n in values[:8]))
    if len(values) > 8 and values[8] is not None:
        delta.released_from = float(values[8])
    if len(values) > 9 and values[9] is not None:
        delta.budget_at = float(values[9])
    return delta


def spool_directory(data_dir: Path, database_url: str, kind: str = "usage") -> Path:
    return data_dir / "spool" / kind / hashlib.sha256(database_url.encode()).hexdigest()[:16]


async def open_spool(spool: Spool, what: str) -> list[tuple[list[dict[str, Any]], Path]] | None:
    """Open `spool` and take what processes gone left in its directory (see `Spool.adopt`);
    None, logged, when the directory cannot be used (the caller then keeps no spool)."""
    try:
        await trio.to_thread.run_sync(spool.open)
        return await trio.to_thread.run_sync(spool.adopt)
    except OSError as error:
        log.error("%s spool %s unavailable: %s", what, spool.directory, error)
        return None


class Spool:
    """One process's spool file and its lock (blocking file I/O: call from a thread)."""

    def __init__(self, directory: Path, writer: str) -> None:
        self.directory = directory
        self.writer = writer
        self._path = directory / f"{writer}.json"
        self._lock: int | None = None
        self.saved = False  # the file holds items
        self._text = ""  # what it holds
        # Writers of processes gone that spooled nothing, whose files `adopt` removed.
        self.vacated: list[str] = []

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = _locked(self.directory / f"{self.writer}.lock")
        if self._lock is None:  # cannot happen: the writer id is this process's own
            raise OSError(f"usage spool {self.writer} is locked by another process")

    def close(self) -> None:
        if self._lock is not None:
            if not self.saved:
                with contextlib.suppress(OSError):
                    (self.directory / f"{self.writer}.lock").unlink()
            os.close(self._lock)
            self._lock = None

    def save(self, items: list[dict[str, Any]]) -> None:
        """Make the file say `items` (none: remove it), durably."""
        if not items:
            if self.saved:
                self._path.unlink(missing_ok=True)
                self.saved = False
            return
        text = json.dumps(items, default=str)
        if self.saved and text == self._text:
            return  # retried every few seconds during an outage, mostly with nothing new
        temporary = self._path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._path)
        self.saved = True
        self._text = text

    def adopt(self) -> list[tuple[list[dict[str, Any]], Path]]:
        """The items of every spool whose process is gone, each with its file (pass it to
        `release` once they are in this process's own file)."""
        found: list[tuple[list[dict[str, Any]], Path]] = []
        for lock_path in self.directory.glob("*.lock"):
            gone = lock_path.stem != self.writer and not lock_path.with_suffix(".json").exists()
            if gone and self.release(lock_path.with_suffix(".json")):  # a killed process's, with nothing spooled
                self.vacated.append(lock_path.stem)
        for path in sorted(self.directory.glob("*.json")):
            writer = path.stem
            if writer == self.writer:
                continue
            lock_path = self.directory / f"{writer}.lock"
            lock = _locked(lock_path)
            if lock is None:
                continue  # its process is alive
            os.close(lock)  # flock is per open file: taken again, and kept, by `release`
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                    raise ValueError("not a list of objects")
            except FileNotFoundError:
                continue  # another process adopted it meanwhile
            except ValueError as error:
                log.error("unreadable spool %s left as it is: %s", path, error)
                continue
            found.append((items, path))
        return found

    def release(self, path: Path) -> bool:
        """Remove an adopted spool (its batches are in this process's file now); False if
        its process is alive after all."""
        lock_path = path.with_suffix(".lock")
        lock = _locked(lock_path)
        if lock is None:
            return False
        try:
            path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(lock)
        return True


def _locked(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock; None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
