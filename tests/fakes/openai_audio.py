"""OpenAI's audio API as vLLM (Whisper) and speaches / Kokoro-FastAPI answer it, for the
fake OpenAI-compatible backend.

``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` parse the multipart form
they get (with the standard library's MIME parser, not the gateway's code) and answer in
the ``response_format`` asked (json with vLLM's duration usage, text, srt, vtt,
verbose_json) or, with ``stream=true``, vLLM's ``transcription.chunk`` SSE. The transcript
names the file's size and name, so a test sees the file arrived whole.
``POST /v1/audio/speech`` streams "audio": ``Script.content`` pieces as raw bytes, one
chunk each, paced and stalled by the script.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import Call, json_bytes
from .script import Plan, Script, make_plan
from .server import Exchange, Request

if TYPE_CHECKING:
    from .openai_backend import OpenAIBackend

__all__ = ["FormField", "parse_form", "run_speech", "run_speech_to_text"]

_FORMATS = {"json", "text", "srt", "vtt", "verbose_json"}
# The strings pydantic reads as true in a form's boolean field (vLLM's, speaches' requests).
_PYDANTIC_TRUE = {b"1", b"on", b"t", b"true", b"y", b"yes"}
_AUDIO_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "opus": "audio/ogg", "flac": "audio/flac", "pcm": "audio/pcm"}


@dataclass(frozen=True)
class FormField:
    value: bytes
    filename: str | None
    content_type: str | None


def parse_form(content_type: str | None, body: bytes) -> dict[str, FormField] | None:
    """A multipart/form-data body's fields by name; None if it is not one."""
    if content_type is None or not content_type.lower().startswith("multipart/form-data"):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    fields: dict[str, FormField] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields.setdefault(name, FormField(
            payload if isinstance(payload, bytes) else b"", part.get_filename(),
            part.get_content_type() if part.get("content-type") else None,
        ))
    return fields


class TranscriptionRendering:
    """A transcript in one of Whisper's formats, or vLLM's stream of it."""

    content_type = "text/event-stream"

    def __init__(self, plan: Plan, script: Script, text: str, response_format: str, include_usage: bool) -> None:
        self.plan = plan
        self.script = script
        self.text = text
        self.format = response_format
        self.include_usage = include_usage
        self.headers = list(script.headers)
        self.whole_content_type = "application/json" if self.format in ("json", "verbose_json") else "text/plain; charset=utf-8"
        self._id = "trsc-" + secrets.token_hex(8)

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {
            "id": self._id, "object": "transcription.chunk", "created": int(time.time()), "model": self.plan.model,
            "choices": [{"delta": delta, "finish_reason": finish, "stop_reason": None}],
        }
        return b"data: " + json_bytes(chunk) + b"\n\n"

    def frames(self) -> Iterator[bytes]:
        words = self.text.split(" ")
        for index, word in enumerate(words):
            last = index == len(words) - 1
            yield self._chunk({"content": (" " if index else "") + word}, "stop" if last else None)
        if self.include_usage:
            usage = {"prompt_tokens": 1500, "completion_tokens": len(words), "total_tokens": 1500 + len(words)}
            yield b"data: " + json_bytes({
                "id": self._id, "object": "transcription.chunk", "created": int(time.time()),
                "model": self.plan.model, "choices": [], "usage": usage,
            }) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def error_frame(self) -> bytes:
        return b"data: " + json_bytes({"error": {"message": "The server had an error.", "type": "server_error"}}) + b"\n\n"

    def keepalive(self) -> bytes:
        return b": keepalive\n\n"

    def full_body(self) -> bytes:
        text = self.text
        if self.format == "text":
            return text.encode() + b"\n"
        if self.format == "srt":
            return f"1\n00:00:00,000 --> 00:00:03,000\n{text}\n\n".encode()
        if self.format == "vtt":
            return f"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n{text}\n\n".encode()
        answer: dict[str, Any] = {"text": text}
        if self.format == "verbose_json":
            answer = {
                "task": "transcribe", "language": "english", "duration": 3.0, "text": text,
                "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": 3.0, "text": text, "tokens": [1, 2, 3],
                              "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.01}],
            }
        if not self.script.omit_usage:
            usage = self.script.usage
            answer["usage"] = {"type": "duration", "seconds": 3} if usage is None else {
                "type": "tokens", "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            }
        return json_bytes(answer)


async def run_speech_to_text(backend: OpenAIBackend, request: Request, exchange: Exchange, call: Call, task: str) -> None:
    """``POST /v1/audio/transcriptions`` or ``/translations`` as vLLM answers them."""
    form = parse_form(request.header("content-type"), request.body)
    if form is None:
        await backend.send_error(exchange, 400, "Expected a multipart/form-data body")
        return
    model = form["model"].value.decode() if "model" in form else ""
    if not model or "file" not in form:
        await backend.send_error(exchange, 400, "Field required: model and file")
        return
    if not backend.model_known(model):
        await backend.send_error(exchange, 404, f"The model `{model}` does not exist.")
        return
    response_format = form["response_format"].value.decode() if "response_format" in form else "json"
    if response_format not in _FORMATS:
        await backend.send_error(exchange, 400, f"Unsupported response_format: {response_format}")
        return
    stream = "stream" in form and form["stream"].value.strip().lower() in _PYDANTIC_TRUE
    include_usage = "stream_include_usage" in form and form["stream_include_usage"].value.strip().lower() in _PYDANTIC_TRUE
    file = form["file"]
    verb = "Transcribed" if task == "transcribe" else "Translated"
    text = f"{verb} {len(file.value)} bytes of {file.filename}"
    script = backend.script_for(model)
    plan = make_plan(script, model=model, prompt_text=text, last_user_text=text, max_tokens=None)
    rendering = TranscriptionRendering(plan, script, text, response_format, include_usage)
    await backend.run_generation(exchange, call, script=script, plan=plan, stream=stream, rendering=rendering)


class SpeechRendering:
    """Audio bytes: the script's content pieces, one chunk each; with ``stream_format:
    "sse"``, OpenAI's ``speech.audio.delta`` events (base64) and a ``speech.audio.done``
    with the usage."""

    def __init__(self, plan: Plan, script: Script, response_format: str, events: bool) -> None:
        self.plan = plan
        self.script = script
        self.events = events
        self.content_type = "text/event-stream" if events else _AUDIO_TYPES.get(response_format, "application/octet-stream")
        self.headers = list(script.headers)

    def frames(self) -> Iterator[bytes]:
        if not self.events:
            for piece in self.plan.content:
                yield piece.encode()
            return
        for piece in self.plan.content:
            delta = {"type": "speech.audio.delta", "audio": base64.b64encode(piece.encode()).decode()}
            yield b"data: " + json_bytes(delta) + b"\n\n"
        usage = self.plan.usage
        done = {"type": "speech.audio.done", "usage": {
            "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }}
        yield b"data: " + json_bytes(done) + b"\n\n"

    def error_frame(self) -> bytes:
        return b""

    def keepalive(self) -> None:
        return None

    def full_body(self) -> bytes:
        return b"".join(self.frames())


async def run_speech(backend: OpenAIBackend, request: Request, exchange: Exchange, call: Call) -> None:
    """``POST /v1/audio/speech`` as speaches / Kokoro-FastAPI answer it: audio, streamed."""
    try:
        body = request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("input"), str):
        await backend.send_error(exchange, 400, "model and input are required")
        return
    model = body["model"]
    if not backend.model_known(model):
        await backend.send_error(exchange, 404, f"The model `{model}` does not exist.")
        return
    script = backend.script_for(model)
    plan = make_plan(script, model=model, prompt_text=body["input"], last_user_text=body["input"], max_tokens=None)
    rendering = SpeechRendering(plan, script, str(body.get("response_format", "mp3")), body.get("stream_format") == "sse")
    await backend.run_generation(exchange, call, script=script, plan=plan, stream=True, rendering=rendering)
