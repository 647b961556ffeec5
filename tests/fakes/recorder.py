"""What a fake backend saw: requests, generations, client disconnects, plus waits on them.

Times are ``time.monotonic()`` so a test can compare them with its own clock reads.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .server import Request

__all__ = ["Disconnect", "Generation", "Outcome", "RecordedRequest", "Recorder"]

Outcome = Literal["running", "completed", "cancelled", "failed"]


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-cased names; repeated headers joined with ", "."""
    body: bytes
    json: Any
    """The parsed body, or None when it was empty or not JSON."""
    received_at: float

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict):
            model = self.json.get("model")
            return model if isinstance(model, str) else None
        return None

    @classmethod
    def of(cls, request: Request) -> RecordedRequest:
        headers: dict[str, str] = {}
        for key, value in request.headers:
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            parsed = request.json()
        except ValueError:
            parsed = None
        return cls(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=headers,
            body=request.body,
            json=parsed,
            received_at=request.received_at,
        )


@dataclass(slots=True)
class Generation:
    """One model run (a chat, generate or messages call), streaming or not."""

    request: RecordedRequest
    model: str
    stream: bool
    started_at: float
    frames_sent: int = 0
    ended_at: float | None = None
    outcome: Outcome = "running"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A client that closed its connection while its request was being served."""

    path: str
    model: str | None
    at: float
    frames_sent: int
    """Frames of the response already written (0 if it was still before the body)."""
    headers_sent: bool
    request: RecordedRequest


class Recorder:
    """Keeps the last ``history`` records (all of them when None) and live counters."""

    def __init__(self, history: int | None = None) -> None:
        self._history = history
        self.requests: deque[RecordedRequest] = deque(maxlen=history)
        self.generations: deque[Generation] = deque(maxlen=history)
        self.disconnects: deque[Disconnect] = deque(maxlen=history)
        self._unclaimed: deque[Disconnect] = deque(maxlen=history)
        self._changed = trio.Event()
        self.requests_total = 0
        self.active = 0
        self.active_streams = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.disconnects_total = 0

    # -- recording (called by the backends) -------------------------------------------

    def record_request(self, request: Request) -> RecordedRequest:
        recorded = RecordedRequest.of(request)
        self.requests.append(recorded)
        self.requests_total += 1
        self._notify()
        return recorded

    def begin(self, request: RecordedRequest, model: str, *, stream: bool) -> Generation:
        generation = Generation(request, model, stream, started_at=time.monotonic())
        self.generations.append(generation)
        self.active += 1
        if stream:
            self.active_streams += 1
        self._notify()
        return generation

    def end(self, generation: Generation, outcome: Outcome) -> None:
        if generation.outcome != "running":
            return
        generation.outcome = outcome
        generation.ended_at = time.monotonic()
        self.active -= 1
        if generation.stream:
            self.active_streams -= 1
        if outcome == "completed":
            self.completed += 1
        elif outcome == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        self._notify()

    def record_disconnect(
        self,
        request: RecordedRequest,
        *,
        at: float,
        frames_sent: int,
        headers_sent: bool,
    ) -> Disconnect:
        disconnect = Disconnect(
            path=request.path,
            model=request.model,
            at=at,
            frames_sent=frames_sent,
            headers_sent=headers_sent,
            request=request,
        )
        self.disconnects.append(disconnect)
        self._unclaimed.append(disconnect)
        self.disconnects_total += 1
        self._notify()
        return disconnect

    def reset(self) -> None:
        """Forget the records and the finished counters (live counters stay true)."""
        self.requests.clear()
        self.generations.clear()
        self.disconnects.clear()
        self._unclaimed.clear()
        self.requests_total = self.completed = self.cancelled = self.failed = 0
        self.disconnects_total = 0
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- waiting (called by tests) ----------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; raises ``trio.TooSlowError`` after ``within`` seconds."""
        with trio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    async def wait_disconnect(self, within: float = 5.0) -> Disconnect:
        """The oldest disconnect not yet returned by this method, waiting for one if needed."""
        await self.wait_for(lambda: bool(self._unclaimed), within)
        return self._unclaimed.popleft()

    async def wait_requests(self, count: int, within: float = 5.0) -> None:
        """Wait until ``count`` requests have arrived in total."""
        await self.wait_for(lambda: self.requests_total >= count, within)

    async def wait_active_streams(self, count: int, within: float = 5.0) -> None:
        await self.wait_for(lambda: self.active_streams >= count, within)

    async def wait_idle(self, within: float = 5.0) -> None:
        """Wait until no generation is running."""
        await self.wait_for(lambda: self.active == 0, within)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests_total,
            "active": self.active,
            "active_streams": self.active_streams,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "disconnects": self.disconnects_total,
            "recent_disconnects": [
                {
                    "path": d.path,
                    "model": d.model,
                    "at": d.at,
                    "frames_sent": d.frames_sent,
                    "headers_sent": d.headers_sent,
                }
                for d in list(self.disconnects)[-20:]
            ],
        }
