"""Relaying an OpenAI-compatible API call to the routed backend as it is: its status, then
its bytes as they come (legacy text completions, rerank). No domain translation, completion
log, caches or fallbacks; the request is guarded, timed, logged, metered and charged like a
chat, and a client that leaves closes the backend connection at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httpx
import trio
from hypercorn.typing import ASGISendCallable

from proxy.dialects import openai
from proxy.dialects._json import dumps
from proxy.dialects._utf8 import ValidBytes
from proxy.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    GatewayError,
    invalid_request,
    is_context_overflow,
)
from proxy.domain.routing import Route
from proxy.domain.tokens import estimate_tokens
from proxy.http._auth import granted_headers, take_reservation
from proxy.http._errors import error_reply
from proxy.http._exchange import SSE_HEADERS, AsgiSink, DirectBody, Headers
from proxy.http._front import Incoming
from proxy.http._head import refuse_routes, request_meta
from proxy.infra.backends._base import (
    BackendClient,
    RelayBackend,
    Served,
    body_text,
    current_served,
    is_html,
    page_not_stream,
    read_limited,
    read_whole,
    status_error,
    timeout_error,
    transport_errors,
)
from proxy.infra.transport import Hangup, current_hangup
from proxy.services._fallback import Fallback, stand_in_may_answer
from proxy.services.auth import check_body_models, current_principal
from proxy.services.chat import (
    SHUTTING_DOWN,
    ChatService,
    ExchangeRecord,
    RequestMeta,
    is_cancellation,
)

log = logging.getLogger("llm_proxy.chat")

# Relayed calls whose answer is text the backend wrote, whatever its usage counts (seconds).
_TRANSCRIBING = frozenset({"transcription", "translation"})
# The usage of a stream is in one of its last chunks: only this much of its end is kept.
_USAGE_TAIL_BYTES = 16384
# A client still there when the server stops is told so, within this long.
_LAST_WORDS_SECONDS = 1.0


def relay(
    incoming: Incoming, data: dict[str, Any], model: str | None, path: str, *,
    kind: str, stream: bool, prompt_tokens: int | None, refusal: str, instead: str = "", prompt_param: str | None = None,
    encode: Callable[[str], bytes] | None = None, content_type: str = "application/json", passthrough: bool = False,
    fallbacks: bool = False,
) -> RelayBody:
    """The client's call `data` for `model`, routed (aliases, key scope) and ready to relay
    to the backend's `path`, recorded as a request of `kind`. `prompt_tokens` is charged
    should the answer carry no usage; None: the call is not metered (tokenizing), its
    tokens neither read nor estimated. `prompt_param` is the field a prompt too long is.
    A model whose backend does not serve `path` is refused with `refusal`. Without `model`
    (vLLM's tokenizer, which serves its one model) the call goes to the default backend,
    its body as sent.

    `encode` makes the body sent (of `content_type`) for the upstream model name, when it
    is not `data` in JSON (a multipart upload). `passthrough`: the answer is streamed with
    the backend's own content type, its bytes untouched as they come (audio; SSE, or a
    whole answer from a server that could not stream it). `fallbacks`: the model's stand-ins
    whose backends serve `path` are tried in turn should its backend fail to answer."""
    gateway = incoming.gateway
    route = gateway.router.resolve(model) if model is not None else _default_route(gateway.router.default_backend)
    check_body_models(data)  # relayed as sent: its fields may name other models for the backend
    backend = gateway.backends[route.backend]
    if not isinstance(backend, RelayBackend) or path not in backend.relays:
        served = f"model `{model}` is served by" if model is not None else "a request without `model` goes to the default"
        raise invalid_request(
            f"{refusal}; {served} backend `{route.backend}` ({backend.config.kind}).{instead}", param="model",
        )
    meta = request_meta(incoming.head)
    refuse_routes(meta, incoming.head.path, "goes straight to the model's backend")
    principal = current_principal.get()
    record = ExchangeRecord(
        trace_id=meta.trace_id, request_id=meta.request_id, model=model or "", backend=route.backend,
        upstream_model=route.upstream_model, stream=stream, dialect="openai",
        api_key_id=principal.id if principal is not None else None, kind=kind, reserved=take_reservation(),
    )
    if encode is None:
        def encode(upstream: str) -> bytes:
            return dumps({**data, "model": upstream} if model is not None else data)
    stand_ins = [
        stand_in for stand_in in gateway.chat.stand_ins(model)
        if isinstance(stand_in.backend, RelayBackend) and path in stand_in.backend.relays
    ] if fallbacks and model is not None else []
    return RelayBody(
        backend, path, encode(route.upstream_model), meta, record, gateway.chat,
        stream=stream, headers=granted_headers(), prompt_tokens=prompt_tokens, prompt_param=prompt_param,
        content_type=content_type, passthrough=passthrough, encode=encode, stand_ins=stand_ins,
    )


def _default_route(default: str | None) -> Route:
    """Where a call that names no model goes: the default backend, for a key that may use
    any model (a key limited to some cannot be told which one that backend serves)."""
    if default is None:
        raise invalid_request(
            "Missing required parameter `model` (this gateway has no default backend for a request "
            "without one).", param="model",
        )
    principal = current_principal.get()
    if principal is not None and principal.models is not None:
        raise invalid_request(
            "Missing required parameter `model` (this API key is limited to some models: name one).", param="model",
        )
    return Route(backend=default, upstream_model="")


class RelayBody(DirectBody):
    """One relayed call: the backend's status, then its bytes as they come."""

    def __init__(
        self,
        backend: RelayBackend,
        path: str,
        body: bytes,
        meta: RequestMeta,
        record: ExchangeRecord,
        chat: ChatService,
        *,
        stream: bool,
        headers: Headers,
        prompt_tokens: int | None,
        prompt_param: str | None = None,
        content_type: str = "application/json",
        passthrough: bool = False,
        encode: Callable[[str], bytes] | None = None,
        stand_ins: list[Fallback] | None = None,
    ) -> None:
        self._backend = backend
        self._path = path
        self._body = body
        self._meta = meta
        self.record = record
        self._chat = chat
        self._stream = stream
        self._headers = headers
        self._prompt_tokens = prompt_tokens  # estimated, for an answer without usage; None: not metered
        self._prompt_param = prompt_param
        self._content_type = content_type
        self._passthrough = passthrough
        self._encode = encode  # the body for another upstream model (a stand-in's)
        self._stand_ins = list(stand_ins or ())
        self._frames = 0  # SSE events relayed: about one token each
        # Audio begun: a failure now cannot be told in-band (an error event would be taken
        # for audio), so the response is left unended and the connection closes on it.
        self._binary = False
        self._hangup = Hangup()
        self._served = Served()
        self.hung_up = False
        self._out: _Writer | None = None

    def hang_up(self) -> None:
        """The client has gone: its backend connection closes now, not once we unwind."""
        self.hung_up = True
        self._hangup.fire()

    async def run(self, send: ASGISendCallable) -> None:
        self._out = _Writer(send, self._headers, self.record)
        token = current_hangup.set(self._hangup)
        served_token = current_served.set(self._served)
        try:
            await self._relay()
        except BaseException as exc:
            if is_cancellation(exc) and not self.hung_up:
                # Cancelled with its client still there: the server is stopping.
                self.record.error = SHUTTING_DOWN.message
                self.record.status = self.record.status or SHUTTING_DOWN.status
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _LAST_WORDS_SECONDS):
                    await self._fail(SHUTTING_DOWN)
            raise
        finally:
            current_hangup.reset(token)
            current_served.reset(served_token)
            record = self.record
            record.replica = self._served.replica
            record.passed_over = self._served.passed_over or None
            # The hang-up closed the backend connection: the relay may have ended on that
            # read's failure before its cancellation came.
            if self.hung_up:
                record.cancelled = True
                record.status = record.status or 499
            metered = self._prompt_tokens is not None
            if metered and record.prompt_tokens is None and record.completion_tokens is None and (self._frames or self.hung_up):
                # A stream without its usage (the client left, or did not ask for it), or an
                # answer its client did not wait for: charged an estimate, or leaving early
                # would be a way around a key's token limit.
                record.prompt_tokens, record.completion_tokens = self._prompt_tokens, self._frames
                record.usage_estimated = True
            record.total_ms = (time.perf_counter() - self._meta.received) * 1000
            self._chat.record_relayed(record)

    async def _relay(self) -> None:
        """The whole relay, as a chat's backend call, under the backend's `total` timeout."""
        config = self._backend.config
        total = config.timeouts.total
        with trio.move_on_after(total if total is not None else math.inf) as scope:
            await self._relay_answer()
        if scope.cancelled_caught:
            await self._fail(timeout_error(config.name, "did not finish", total))

    async def _relay_answer(self) -> None:
        """The call to the model's backend; should that fail to answer before the client has
        had a byte, to its stand-ins in turn."""
        while True:
            error = await self._relay_attempt(may_fall_back=bool(self._stand_ins))
            if error is None:
                return
            if self.hung_up or trio.current_effective_deadline() == -math.inf:
                await self._fail(error)  # the client left, or the server stops: nobody to fall back for
                return
            self._switch_to(self._stand_ins.pop(0), error)

    def _switch_to(self, stand_in: Fallback, error: GatewayError) -> None:
        log.warning(
            "%s: %s; falling back to %s (backend %s)", self._meta.trace_id, error.message, stand_in.model,
            stand_in.route.backend,
        )
        assert self._encode is not None and isinstance(stand_in.backend, RelayBackend)  # as `relay` chose them
        self._backend = stand_in.backend
        self._body = self._encode(stand_in.route.upstream_model)
        self.record.backend = stand_in.route.backend
        self.record.upstream_model = stand_in.route.upstream_model
        self._writer().extra_headers[:] = [(b"x-fallback-model", stand_in.model.encode())]

    async def _relay_attempt(self, *, may_fall_back: bool) -> GatewayError | None:
        """One backend call, relayed; or, when `may_fall_back`, its failure to answer (before
        anything reached the client) returned for a stand-in to make good."""
        config = self._backend.config
        name, timeouts = config.name, config.timeouts
        headers = {"x-request-id": self._meta.request_id, "x-correlation-id": self._meta.correlation_id or self._meta.request_id}
        if self._content_type != "application/json":
            headers["content-type"] = self._content_type
        if self._passthrough:
            headers["accept"] = "*/*"  # audio, in the format asked for
        # As for chats: a stream's first-token clock covers the wait for the response head. A
        # whole answer's head comes with its end: only the total timeout bounds it.
        deadline = trio.current_time() + (timeouts.first_token or math.inf) if self._stream else math.inf
        try:
            with trio.move_on_at(deadline) as head_scope, transport_errors(name):
                response = await self._backend.open_relay(self._path, self._body, headers, stream=self._stream)
            if head_scope.cancelled_caught:
                raise timeout_error(name, "sent no first token", timeouts.first_token)
        except GatewayError as error:
            if may_fall_back and stand_in_may_answer(error):
                return error
            await self._fail(error)
            return None
        try:
            if response.status_code >= 400 and may_fall_back and (failure := await self._failure(response)) is not None:
                return failure
            if response.status_code >= 400:
                await self._relay_error(response, deadline)
            elif self._passthrough:
                await self._relay_passthrough(response, deadline)
            elif self._stream and is_html(response):
                await self._fail(await page_not_stream(self._backend.config.name, response))
            elif self._stream:
                await self._relay_stream(response, deadline)
            else:
                await self._relay_whole(response)
        finally:
            with trio.CancelScope(shield=True):
                await BackendClient.close(response)
        return None

    async def _failure(self, response: httpx.Response) -> GatewayError | None:
        """A backend's error status, when it says the backend could not answer (429, 5xx); None
        for one about the request, which is relayed as for any call. Its body is read only
        then."""
        name = self._backend.config.name
        status, retry_after = response.status_code, response.headers.get("retry-after")
        if not stand_in_may_answer(status_error(name, status, None, retry_after)):
            return None
        try:
            with transport_errors(name):
                body = await read_limited(response)
        except GatewayError as error:
            return error
        return status_error(name, status, openai.error_message_from_body(body) or body_text(body), retry_after)

    async def _relay_error(self, response: httpx.Response, deadline: float) -> None:
        name = self._backend.config.name
        try:
            with trio.move_on_at(deadline) as scope, transport_errors(name):
                body = await read_limited(response)
            if scope.cancelled_caught:
                raise timeout_error(name, "sent no first token", self._backend.config.timeouts.first_token)
        except GatewayError as error:
            await self._fail(error)
            return
        status = response.status_code
        retry_after = response.headers.get("retry-after")
        message = openai.error_message_from_body(body) or body_text(body)
        if status == 400 and is_context_overflow(message):
            # Said in each server's words (vLLM's `code: 400`, llama.cpp's own type): OpenAI's
            # code is what clients act on, as for chats.
            await self._fail(GatewayError(
                ErrorKind.INVALID_REQUEST, message, code=CONTEXT_LENGTH_EXCEEDED, param=self._prompt_param,
            ))
            return
        # The backend refusing the gateway's own credentials is the gateway's fault, never
        # the client's 401/403: those are mapped, as for chats.
        # A validation error printed by Python (vLLM's) is made readable rather than relayed.
        validation = openai.validation_error_from_body(body) is not None
        if status not in (401, 403) and _is_openai_error(body) and not validation:
            headers: Headers = [(b"content-type", b"application/json")]
            if retry_after is not None:
                headers.append((b"retry-after", retry_after.encode("latin-1")))
            self.record.error = openai.error_message_from_body(body) or f"HTTP {status}"
            await self._writer().whole(status, headers, body)
            return
        # A FastAPI validation error (vLLM, TGI, Infinity) is said in its words, with its field.
        param = openai.error_code_and_param_from_body(body)[1]
        await self._fail(status_error(name, status, message, retry_after, param=param))

    async def _relay_whole(self, response: httpx.Response) -> None:
        try:
            with transport_errors(self._backend.config.name):
                body = await read_whole(response, self._backend.config.name)
        except GatewayError as error:
            await self._fail(error)
            return
        try:
            found = _usage_of(body)
        except UnicodeDecodeError:
            # Bytes that are not UTF-8 (llama.cpp's): the answer with U+FFFD for them.
            body = body.decode("utf-8", "replace").encode()
            found = _usage_of(body)
        record = self.record
        if self._prompt_tokens is not None:
            self._note_usage(found)
        if self._prompt_tokens is not None and record.completion_tokens is None and record.kind in _TRANSCRIBING:
            # Whisper's usage counts seconds, not tokens: what the key is charged for is the
            # text it was given (its prompt) and the text it got back.
            if record.prompt_tokens is None:
                record.prompt_tokens = self._prompt_tokens
            record.completion_tokens = estimate_tokens(len(_transcript(body)))
            record.usage_estimated = True
        if self._prompt_tokens is not None and record.prompt_tokens is None and record.completion_tokens is None:
            # An answer without usage (servers differ, rerank most): charged its input.
            record.prompt_tokens, record.completion_tokens = self._prompt_tokens, 0
            record.usage_estimated = True
        content_type = response.headers.get("content-type", "application/json").encode("latin-1")
        await self._writer().whole(response.status_code, [(b"content-type", content_type)], body)

    async def _relay_stream(self, response: httpx.Response, first_deadline: float) -> None:
        """The backend's bytes as they arrive, under the first-token then the idle clock.

        The client's head goes with the first byte: a backend that fails or stays silent
        before it is the client's error status (502, 504), as for chats."""
        config = self._backend.config
        name, idle = config.name, config.timeouts.idle or math.inf
        record = self.record
        chunks = cast(httpx.AsyncByteStream, response.stream).__aiter__()
        tail: deque[bytes] = deque()
        kept = 0
        # llama.cpp has sent bytes that are not UTF-8, which every SDK fails on.
        utf8 = ValidBytes()
        try:
            # One scope for every read: its deadline moves, and is lifted while the client
            # takes a chunk, so a slow client is never mistaken for a silent backend.
            with trio.CancelScope(deadline=first_deadline) as scope, transport_errors(name):
                async for data in chunks:
                    if utf8.held or not data.isascii():
                        data = utf8.mend(data)
                    if not data:
                        continue
                    if record.ttft_ms is None:
                        record.ttft_ms = (time.perf_counter() - self._meta.received) * 1000
                        scope.deadline = math.inf
                        await self._writer().head(response.status_code, list(SSE_HEADERS))
                    self._frames += data.count(b"data:") - data.count(b"data: [DONE]")
                    tail.append(data)
                    kept += len(data)
                    while kept - len(tail[0]) >= _USAGE_TAIL_BYTES:
                        kept -= len(tail.popleft())
                    scope.deadline = math.inf
                    await self._writer().part(data)
                    scope.deadline = trio.current_time() + idle
            if scope.cancelled_caught:
                if record.ttft_ms is None:
                    raise timeout_error(name, "sent no first token", config.timeouts.first_token)
                raise timeout_error(name, "went silent for longer than the idle timeout", config.timeouts.idle)
        except GatewayError as error:
            await self._fail(error)
            return
        if record.ttft_ms is None:  # an empty stream
            await self._writer().head(response.status_code, list(SSE_HEADERS))
        self._note_usage(_stream_usage(b"".join(tail)))
        await self._writer().end(utf8.close())

    async def _relay_passthrough(self, response: httpx.Response, first_deadline: float) -> None:
        """The backend's bytes (audio) as they arrive, with its content type, under the
        first-byte then the idle clock; the head goes with the first bytes. An SSE answer
        (OpenAI's `stream_format: "sse"`) keeps its end, for its usage."""
        config = self._backend.config
        name, idle = config.name, config.timeouts.idle or math.inf
        record = self.record
        content_type = response.headers.get("content-type", "application/octet-stream")
        head: Headers = [
            (b"content-type", content_type.encode("latin-1")), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
        ]
        events = content_type.startswith("text/event-stream")
        chunks = cast(httpx.AsyncByteStream, response.stream).__aiter__()
        tail = b""
        try:
            with trio.CancelScope(deadline=first_deadline) as scope, transport_errors(name):
                async for data in chunks:
                    if not data:
                        continue
                    if record.ttft_ms is None:
                        record.ttft_ms = (time.perf_counter() - self._meta.received) * 1000
                        scope.deadline = math.inf
                        self._binary = not events
                        await self._writer().head(response.status_code, head)
                    if events:
                        tail = (tail + data)[-_USAGE_TAIL_BYTES:]
                        self._frames += data.count(b"data:") - data.count(b"data: [DONE]")
                    scope.deadline = math.inf
                    await self._writer().part(data)
                    scope.deadline = trio.current_time() + idle
            if scope.cancelled_caught:
                if record.ttft_ms is None:
                    raise timeout_error(name, "sent no first byte", config.timeouts.first_token)
                raise timeout_error(name, "went silent for longer than the idle timeout", config.timeouts.idle)
        except GatewayError as error:
            await self._fail(error)
            return
        if record.ttft_ms is None:  # an empty answer
            await self._writer().head(response.status_code, head)
        if events:
            self._note_usage(_stream_usage(tail))
        if record.prompt_tokens is None and record.completion_tokens is None:
            # Audio carries no usage: charged what it read (and an event stream its events).
            record.prompt_tokens, record.completion_tokens = self._prompt_tokens, self._frames
            record.usage_estimated = True
        await self._writer().end()

    def _note_usage(self, found: tuple[dict[str, Any] | None, str | None]) -> None:
        usage, finish = found
        record = self.record
        if usage is not None:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if prompt is None and completion is None:
                # OpenAI's audio usage (`{"type": "tokens", "input_tokens": ...}`), as its
                # Responses API counts.
                prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
            completion = completion if _is_token(completion) else None
            if not _is_token(prompt):
                # Rerank and embedding servers may count only `total_tokens`: all input.
                total = usage.get("total_tokens")
                prompt = cast(int, total) - (completion or 0) if _is_token(total) else None
            record.prompt_tokens = prompt
            record.completion_tokens = completion
            seconds = usage.get("seconds")
            if usage.get("type") == "duration" and isinstance(seconds, int | float) and not isinstance(seconds, bool):
                record.audio_seconds = float(seconds)
        record.finish_reason = finish

    # -- to the client ---------------------------------------------------------------------

    async def _fail(self, error: GatewayError) -> None:
        """`error` in OpenAI's shape: the response, or its last event once it has begun."""
        if self.hung_up:  # the failure is the hang-up's doing, and there is nobody to tell
            return
        self.record.error = self.record.error or error.message
        out = self._writer()
        if out.ended:
            return
        if out.started:
            if not self._binary:
                await out.end(b"data: " + error_reply(error, "openai").body + b"\n\n")
            return
        await out.fail(error)

    def _writer(self) -> _Writer:
        assert self._out is not None  # made by `run`
        return self._out


class _Writer(AsgiSink):
    """The response to the client, with the exchange's writer (the head shielded, the length
    of a whole answer given); the status it sends is noted in the request's record."""

    def __init__(self, send: ASGISendCallable, headers: Headers, record: ExchangeRecord) -> None:
        super().__init__(send, headers)
        self._record = record

    async def _start(self, status: int, headers: Headers) -> None:
        self._record.status = status
        await super()._start(status, headers)

    async def head(self, status: int, headers: Headers) -> None:
        await self._start(status, headers)

    async def part(self, data: bytes) -> None:
        await self._body(data)

    async def end(self, data: bytes = b"") -> None:
        await self._end(data)

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        await self._whole(status, headers, body)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_openai_error(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _usage_of(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """A whole answer's `usage` and first choice's `finish_reason`, if it has them; raises
    UnicodeDecodeError for an answer that is not UTF-8."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    usage = data.get("usage")
    choices = data.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    finish = first.get("finish_reason")
    return (usage if isinstance(usage, dict) else None), (finish if isinstance(finish, str) else None)


def _transcript(body: bytes) -> str:
    """The text of a whole transcription or translation: its JSON's `text`, or the answer
    itself in the text formats (`text`, `srt`, `vtt`)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text
    found = data.get("text") if isinstance(data, dict) else None
    return found if isinstance(found, str) else text


_decoder = json.JSONDecoder()


def _stream_usage(tail: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The last non-null `usage` in a stream's last bytes: one search from the end, not a
    parse of every chunk (a usage chunk comes last, or every chunk carries one)."""
    text = tail.decode("utf-8", "replace")
    usage: dict[str, Any] | None = None
    end = len(text)
    for _ in range(8):
        at = text.rfind('"usage"', 0, end)
        if at < 0:
            break
        end = at
        rest = text[at + 7 :].lstrip()
        if not rest.startswith(":"):
            continue
        try:
            value, _ = _decoder.raw_decode(rest[1:].lstrip())
        except ValueError:
            continue
        if isinstance(value, dict):
            usage = value
            break
    finish: str | None = None
    at = text.rfind('"finish_reason"')
    if at >= 0:
        rest = text[at + 15 :].lstrip()
        if rest.startswith(":"):
            try:
                value, _ = _decoder.raw_decode(rest[1:].lstrip())
            except ValueError:
                value = None
            finish = value if isinstance(value, str) else None
    return usage, finish
