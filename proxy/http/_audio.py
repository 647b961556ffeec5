"""OpenAI's audio API, relayed to the routed backend (see `_relay`).

- `POST /v1/audio/transcriptions`, `/v1/audio/translations`: a multipart upload (vLLM
  serving Whisper, speaches, LocalAI). The `model` field routes it; the backend gets the
  form as sent, its `model` field set to the backend's name for the model. The answer (json,
  text, srt, vtt, verbose_json; vLLM's SSE with `stream=true`) is relayed byte for byte.
- `POST /v1/audio/speech`: JSON in (speaches, Kokoro-FastAPI, vLLM-Omni), audio out,
  streamed to the client as the backend makes it, with its content type.

Ollama and Anthropic have no audio API: their models are refused. A model's stand-ins
(`[fallbacks]`) on backends with the same API answer when its backend cannot, before the
client has had a byte.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.config import Settings
from proxy.dialects._json import Fields, loads_object
from proxy.dialects.multipart import FORM_TRUE, Form, parse_form
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.model_fields import MODEL_FIELDS
from proxy.domain.tokens import estimate_tokens
from proxy.http._exchange import DirectBody
from proxy.http._front import FrontDoor, Incoming
from proxy.http._openapi import _NUM, _OBJ, _STR, _TRACE_HEADERS, Operation, _op, document
from proxy.http._relay import relay
from proxy.services.auth import check_body_models, model_scoped

exchanges = FrontDoor()

_REFUSAL = "The audio API (`{path}`) needs an OpenAI-compatible backend that serves it (vLLM, speaches, LocalAI)"


# An upload's own limit: its file's (`max_audio_bytes`) and room for the form's other fields.
_FORM_FIELDS_BYTES = 64 * 1024


def _upload_limit(settings: Settings) -> int:
    return settings.max_audio_bytes + _FORM_FIELDS_BYTES


def _too_large(settings: Settings) -> GatewayError:
    return GatewayError(
        ErrorKind.REQUEST_TOO_LARGE,
        f"The audio file is too large: the limit is {settings.max_audio_bytes} bytes (`max_audio_bytes`).",
        param="file", code="file_too_large",
    )


@exchanges.route("/v1/audio/transcriptions", kind="transcription", body_limit=_upload_limit, too_large=_too_large)
async def transcriptions(incoming: Incoming) -> DirectBody:
    return _speech_to_text(incoming, "/audio/transcriptions", "transcription")


@exchanges.route("/v1/audio/translations", kind="translation", body_limit=_upload_limit, too_large=_too_large)
async def translations(incoming: Incoming) -> DirectBody:
    return _speech_to_text(incoming, "/audio/translations", "translation")


def _speech_to_text(incoming: Incoming, path: str, kind: str) -> DirectBody:
    content_type = incoming.head.header("content-type")
    form = parse_form(content_type, incoming.body)
    model = (form.text("model") or "").strip()
    if not model:
        raise invalid_request("Missing required parameter `model`.", param="model")
    if "model" in form.repeated:
        # Routed (and its key's scope checked) by one, the backend would read another.
        raise invalid_request("`model` is given more than once.", param="model")
    audio = form.part("file")
    if audio is None:
        raise invalid_request("Missing required parameter `file` (the audio to transcribe).", param="file")
    if audio.end - audio.start > incoming.gateway.settings.max_audio_bytes:
        # The body's limit leaves room for the other fields; the file's own is exact.
        raise _too_large(incoming.gateway.settings)
    if model_scoped():
        _check_form_models(form)
    stream = (form.text("stream") or "").strip().lower() in FORM_TRUE
    assert content_type is not None  # a multipart form has one
    return relay(
        incoming, {}, model, path, kind=kind, stream=stream,
        # The audio cannot be measured without decoding it: its prompt is what is charged
        # should no usage come.
        prompt_tokens=estimate_tokens(len(form.text("prompt") or "")),
        refusal=_REFUSAL.format(path="/v1" + path),
        encode=lambda upstream: form.with_value("model", upstream), content_type=content_type,
        # A stream goes as it comes with the backend's content type: vLLM's is SSE, but a
        # server that cannot stream a format answers it whole, and that must not be
        # labelled SSE.
        passthrough=stream, fallbacks=True,
    )


def _check_form_models(form: Form) -> None:
    """The form's fields that may name other models (`domain.model_fields`), checked as a JSON
    body's are: a field's text is JSON (how LiteLLM reads a list in a form) or else one name;
    one given more than once (`models[]`), each of its values."""
    found: dict[str, list[Any]] = {}
    for name in form.names():
        field = name.removesuffix("[]")
        if field in MODEL_FIELDS:
            found.setdefault(field, []).extend(_json_or_text(text) for text in form.texts(name))
    if not found:
        return
    metadata = found.pop("metadata", [])
    check_body_models({field: values[0] if len(values) == 1 else values for field, values in found.items()})
    for value in metadata:
        check_body_models({"metadata": value})


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


@exchanges.route("/v1/audio/speech", kind="speech")
async def speech(incoming: Incoming) -> DirectBody:
    data = loads_object(incoming.body)
    fields = Fields(data)
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    text = fields.text("input", required=True, nonempty=True)
    assert text is not None
    voice = data.get("voice")
    if voice is not None and not isinstance(voice, str | dict):
        raise fields.fail("voice", "a string or an object")
    fields.text("response_format")
    fields.text("stream_format")
    fields.number("speed", minimum=0)
    return relay(
        incoming, data, model, "/audio/speech", kind="speech", stream=True,
        prompt_tokens=estimate_tokens(len(text)), refusal=_REFUSAL.format(path="/v1/audio/speech"),
        prompt_param="input", passthrough=True, fallbacks=True,
    )


# -- OpenAPI ---------------------------------------------------------------------------------

_FORMATS = {"enum": ["json", "text", "srt", "verbose_json", "vtt"]}
_FORM_BOOL = {"type": "boolean"}


def _speech_to_text_operation(summary: str, language: bool) -> Operation:
    properties: dict[str, object] = {
        "file": {"type": "string", "format": "binary"}, "model": {"type": "string", "minLength": 1},
        "prompt": _STR, "response_format": _FORMATS, "temperature": _NUM,
        "stream": _FORM_BOOL, "stream_include_usage": _FORM_BOOL,
    }
    if language:
        properties["language"] = _STR
        properties["timestamp_granularities[]"] = {"type": "array", "items": {"enum": ["word", "segment"]}}
    operation = _op(
        summary, "OpenAI",
        {"description": "The backend's answer as it wrote it, in the `response_format` asked", "content": {
            "application/json": {"schema": _OBJ}, "text/plain": {"schema": _STR}, "text/event-stream": {"schema": _STR},
        }},
        parameters=_TRACE_HEADERS,
        description="Relayed to the model's OpenAI-compatible backend (vLLM serving Whisper, speaches, LocalAI): "
        "the form as sent, its `model` field set to the backend's name for the model; the answer (json, text, "
        "srt, vtt, verbose_json; with `stream=true` the backend's server-sent events) byte for byte. A model "
        "on an Ollama or Anthropic backend is a 400; the model's `[fallbacks]` answer when its backend cannot.",
    )
    operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "model"], "properties": properties,
    }}}}
    return operation


_SPEECH_REQUEST = {
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1}, "input": {"type": "string", "minLength": 1},
        "voice": {"oneOf": [_STR, _OBJ]}, "instructions": _STR,
        "response_format": {"type": "string", "examples": ["mp3", "opus", "aac", "flac", "wav", "pcm"]},
        "speed": {"type": "number", "minimum": 0}, "stream_format": {"enum": ["audio", "sse"]},
    },
}

document("/v1/audio/transcriptions", "post", _speech_to_text_operation("Transcribe audio (OpenAI)", language=True))
document("/v1/audio/translations", "post", _speech_to_text_operation("Translate audio into English (OpenAI)", language=False))
document("/v1/audio/speech", "post", _op(
    "Speech from text (OpenAI)", "OpenAI",
    {"description": "Audio in the `response_format` asked, streamed as the backend makes it, with its content type",
     "content": {"audio/*": {"schema": {"type": "string", "format": "binary"}}, "text/event-stream": {"schema": _STR}}},
    body=_SPEECH_REQUEST, parameters=_TRACE_HEADERS,
    description="Relayed to the model's OpenAI-compatible backend (speaches, Kokoro-FastAPI, vLLM-Omni): the "
    "body with `model` replaced by the backend's name for it; the audio passed on as it comes (chunked). "
    "A model on an Ollama or Anthropic backend is a 400; the model's `[fallbacks]` answer when its backend cannot.",
))
