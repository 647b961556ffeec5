"""OpenAI's audio API (`/v1/audio/transcriptions`, `/translations`, `/speech`) relayed to a
fake vLLM-Whisper / speaches-style backend that parses the multipart form it gets: routing,
the form relayed as sent, every answer format, streams unbuffered, errors, hang-ups, the
request log and a key's scope."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import (
    Exchange,
    OpenAIBackend,
    RecordedRequest,
    Request,
    Script,
    Usage,
    serve_fake,
)
from tests.fakes.openai_audio import FormField, parse_form
from tests.fakes.script import DEFAULT_TOKENS
from tests.harness import backend, relay_gateway, running_gateway
from tests.test_auth_helpers import bearer, eventually, gateway, new_key, sql, wait_for_key
from tests.test_metrics import total

pytest_plugins = ["tests.infra_servers"]

# Not a real WAV, and not UTF-8: the bytes must arrive as they were, CRLFs and all.
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\r\n--not-a-boundary\r\n\xff\xfe\x00" * 50
TRANSCRIPT = f"Transcribed {len(AUDIO)} bytes of speech.wav"


@dataclass
class Setup:
    fake: OpenAIBackend
    url: str
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = OpenAIBackend()
    async with (
        relay_gateway(fake, {"whisper": "openai/whisper-large-v3"}) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield Setup(fake, url, client, http)
        await client.close()


def sent_form(fake: OpenAIBackend, path: str) -> tuple[RecordedRequest, dict[str, FormField]]:
    [sent] = [r for r in fake.requests if r.path == path]
    form = parse_form(sent.headers.get("content-type"), sent.body)
    assert form is not None
    return sent, form


async def test_a_transcription_reaches_the_backend_as_sent_with_its_upstream_model(setup: Setup) -> None:
    answer = await setup.client.audio.transcriptions.create(
        model="whisper", file=("speech.wav", AUDIO, "audio/wav"), language="en", temperature=0.0,
    )
    assert answer.text == TRANSCRIPT
    sent, form = sent_form(setup.fake, "/v1/audio/transcriptions")
    assert form["model"].value == b"openai/whisper-large-v3"  # the alias, resolved
    assert form["file"] == FormField(AUDIO, "speech.wav", "audio/wav")
    assert form["language"].value == b"en" and form["temperature"].value == b"0.0"
    assert "traceparent" in sent.headers


async def test_the_form_is_relayed_byte_for_byte_but_for_the_model(setup: Setup) -> None:
    boundary = b"----odd;boundary"
    body = b"".join([
        b"--", boundary, b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n",
        b"Content-Type: audio/wav\r\n\r\n", AUDIO, b"\r\n",
        b"--", boundary, b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n",
        b"--", boundary, b"\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n",
        b"--", boundary, b"--\r\n",
    ])
    response = await setup.http.post(
        "/v1/audio/transcriptions", content=body,
        headers={"content-type": 'multipart/form-data; boundary="' + boundary.decode() + '"'},
    )
    assert response.status_code == 200, response.text
    [sent] = [r for r in setup.fake.requests if r.path == "/v1/audio/transcriptions"]
    assert sent.body == body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nopenai/whisper-large-v3\r\n")
    assert sent.headers["content-type"] == 'multipart/form-data; boundary="----odd;boundary"'


@pytest.mark.parametrize(
    ("response_format", "content_type", "expected"),
    [
        ("text", "text/plain", f"{TRANSCRIPT}\n"),
        ("srt", "text/plain", f"1\n00:00:00,000 --> 00:00:03,000\n{TRANSCRIPT}\n\n"),
        ("vtt", "text/plain", f"WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n{TRANSCRIPT}\n\n"),
    ],
)
async def test_text_formats_come_back_as_the_backend_wrote_them(
    setup: Setup, response_format: str, content_type: str, expected: str,
) -> None:
    raw = await setup.client.audio.transcriptions.with_raw_response.create(
        model="whisper", file=("speech.wav", AUDIO), response_format=response_format,  # type: ignore[arg-type]
    )
    assert raw.headers["content-type"].startswith(content_type)
    assert raw.content == expected.encode()


async def test_verbose_json_carries_its_segments(setup: Setup) -> None:
    answer = await setup.client.audio.transcriptions.create(
        model="whisper", file=("speech.wav", AUDIO), response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    assert answer.text == TRANSCRIPT and answer.duration == 3.0
    assert answer.segments is not None and answer.segments[0].end == 3.0
    _, form = sent_form(setup.fake, "/v1/audio/transcriptions")
    assert form["timestamp_granularities[]"].value == b"segment"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, for no reason it gives
async def test_a_translation(setup: Setup) -> None:
    answer = await setup.client.audio.translations.create(model="whisper", file=("speech.wav", AUDIO))
    assert answer.text == f"Translated {len(AUDIO)} bytes of speech.wav"
    _, form = sent_form(setup.fake, "/v1/audio/translations")
    assert form["model"].value == b"openai/whisper-large-v3"


@pytest.mark.parametrize("flag", ["true", "t", "Y", "on", "1"])  # what vLLM's pydantic reads as true
async def test_a_streamed_transcription_arrives_as_the_backend_sends_it(setup: Setup, flag: str) -> None:
    # Two chunks, then the backend goes quiet: a gateway that buffered would show nothing.
    setup.fake.set_script(Script(stall_after=2))
    form = {"model": "whisper", "stream": flag}
    with trio.fail_after(5):
        async with setup.http.stream(
            "POST", "/v1/audio/transcriptions", data=form, files={"file": ("speech.wav", AUDIO)},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            seen = b""
            async for data in response.aiter_bytes():
                seen += data
                if seen.count(b"data: ") == 2:
                    break
    chunks = [json.loads(line[6:]) for line in seen.decode().splitlines() if line.startswith("data: ")]
    assert [c["object"] for c in chunks] == ["transcription.chunk"] * 2
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Transcribed " + str(len(AUDIO))
    await setup.fake.wait_disconnect(2.0)  # and the client's leaving reached the backend


async def test_a_stream_a_server_answers_whole_keeps_its_content_type() -> None:
    # A server that cannot stream a format (or at all) answers `stream=true` whole: not SSE.
    async def whole(request: Request, exchange: Exchange) -> None:
        await exchange.respond_json(200, {"text": "hello", "usage": {"type": "duration", "seconds": 1}})

    async with (
        serve_fake(whole) as server,
        running_gateway(backend("speaches", server.url, default=True)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        response = await http.post(
            "/v1/audio/transcriptions", data={"model": "whisper", "stream": "true"}, files={"file": ("a.wav", AUDIO)},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"text": "hello", "usage": {"type": "duration", "seconds": 1}}


async def test_a_streamed_transcriptions_usage_is_counted(setup: Setup) -> None:
    stream = await setup.client.audio.transcriptions.create(
        model="whisper", file=("speech.wav", AUDIO), stream=True, extra_body={"stream_include_usage": True},
    )
    events = [event.model_dump() async for event in stream]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"]) == TRANSCRIPT
    assert events[-1]["usage"] == {"prompt_tokens": 1500, "completion_tokens": 5, "total_tokens": 1505}

    async def counted() -> str | None:
        text = (await setup.http.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", kind="transcription") else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_prompt_tokens_total", kind="transcription") == 1500
    assert total(text, "llm_proxy_completion_tokens_total") == len(TRANSCRIPT.split(" "))


async def test_a_transcriptions_token_usage_is_counted(setup: Setup) -> None:
    # OpenAI's gpt-4o-transcribe counts `input_tokens`/`output_tokens`, as its Responses API does.
    setup.fake.set_script(Script(usage=Usage(120, 9)))
    answer = await setup.client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("speech.wav", AUDIO))
    assert answer.text == TRANSCRIPT

    async def counted() -> str | None:
        text = (await setup.http.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", kind="transcription") else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_prompt_tokens_total", kind="transcription") == 120
    assert total(text, "llm_proxy_completion_tokens_total") == 9


async def test_speech_streams_audio_as_it_is_made(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["ID3-frame-1|", "frame-2|", "frame-3|"], stall_after=2))
    with trio.fail_after(5):
        async with setup.client.audio.speech.with_streaming_response.create(
            model="kokoro", voice="af_heart", input="Hello there.", response_format="mp3",
        ) as response:
            assert response.headers["content-type"] == "audio/mpeg"
            heard = b""
            async for data in response.iter_bytes():
                heard += data
                if heard == b"ID3-frame-1|frame-2|":
                    break  # while the backend has still not finished
    [sent] = [r for r in setup.fake.requests if r.path == "/v1/audio/speech"]
    assert sent.json == {"model": "kokoro", "voice": "af_heart", "input": "Hello there.", "response_format": "mp3"}
    await setup.fake.wait_disconnect(2.0)


async def test_speech_cut_short_by_its_backend_is_cut_short_for_the_client(setup: Setup) -> None:
    # An error appended to the audio would be taken for audio: the break is the answer.
    setup.fake.set_script(Script(tokens=["frame-1|", "frame-2|", "frame-3|"], fail_after=1, fail_mode="close"))
    heard = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with setup.http.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "input": "Hi."}) as response:
            assert response.status_code == 200
            async for data in response.aiter_bytes():
                heard += data
    assert heard == b"frame-1|"
    assert (await setup.http.get("/health")).status_code == 200  # the gateway itself is fine


async def test_speech_whole_with_its_content_type(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["RIFF", "\x00WAVE"]))
    response = await setup.client.audio.speech.create(model="kokoro", voice="af", input="Hi.", response_format="wav")
    assert response.content == b"RIFF\x00WAVE"
    assert response.response.headers["content-type"] == "audio/wav"


async def test_speech_as_events_is_relayed_and_its_usage_counted(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["aa", "bb"], usage=Usage(7, 30)))
    response = await setup.http.post(
        "/v1/audio/speech", json={"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Hi.", "stream_format": "sse"},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["speech.audio.done"]

    async def counted() -> str | None:
        text = (await setup.http.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", kind="speech") else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_prompt_tokens_total", kind="speech") == 7
    assert total(text, "llm_proxy_completion_tokens_total") == 30


async def test_an_audio_upload_has_its_own_limit_not_a_chats() -> None:
    """OpenAI takes audio files up to 25 MB, past a chat's 16 MiB `max_body_bytes`: an upload's
    file is held to exactly `max_audio_bytes` instead (its form's other fields aside), and the
    413 names that limit, whether the body was too large to read or only its file too large."""
    fake = OpenAIBackend()
    limit = 300_000
    exact = (AUDIO + bytes(limit))[:limit]
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), max_body_bytes=1024, max_audio_bytes=limit
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        await client.audio.transcriptions.create(model="whisper", file=("speech.wav", exact), prompt="p" * 10_000)
        refusals = []
        for over in (exact + b"\0", exact + bytes(200_000)):
            with pytest.raises(openai.APIStatusError) as refused:
                await client.audio.transcriptions.create(model="whisper", file=("speech.wav", over))
            refusals.append(refused.value)
        await client.close()
    for refusal in refusals:
        assert refusal.status_code == 413 and refusal.code == "file_too_large" and refusal.param == "file"
        assert f"{limit} bytes (`max_audio_bytes`)" in refusal.message
    [relayed] = [r for r in fake.requests if r.path.startswith("/v1/audio")]
    assert exact in relayed.body


async def test_a_client_that_leaves_during_speech_closes_the_backend_request(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["chunk-1", "chunk-2"], stall_after=1))
    async with setup.http.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "voice": "a", "input": "x" * 40}) as response:
        assert await response.aiter_bytes().__anext__() == b"chunk-1"
    disconnect = await setup.fake.wait_disconnect(2.0)
    assert disconnect.headers_sent

    async def counted() -> str | None:
        text = (await setup.http.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", kind="speech", outcome="cancelled") else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_prompt_tokens_total", kind="speech") == 10  # its input, estimated


async def test_the_request_log_line_says_what_was_heard(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = OpenAIBackend()
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, default=True), aliases={"whisper": "whisper-v3"}, access_log=True) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.audio.transcriptions.create(model="whisper", file=("speech.wav", AUDIO))
        await client.close()
    [line] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    logged = {name: getattr(line, name, None) for name in ("kind", "model", "upstream_model", "status", "audio_seconds")}
    assert logged == {"kind": "transcription", "model": "whisper", "upstream_model": "whisper-v3", "status": 200, "audio_seconds": 3.0}


async def test_a_refused_upload_is_logged_with_its_model(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = OpenAIBackend()
    async with (
        fake.serve() as server,
        running_gateway(
            backend("vllm", server.url, default=True), backend("ollama", "http://127.0.0.1:9", kind="ollama", prefixes=("llama",)),
            access_log=True,
        ) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await http.post("/v1/audio/transcriptions", data={"model": "llama3.2"}, files={"file": ("a.wav", AUDIO)})
        assert refused.status_code == 400
    [line] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    logged = {name: getattr(line, name, None) for name in ("kind", "model", "status")}
    assert logged == {"kind": "transcription", "model": "llama3.2", "status": 400}


@pytest.mark.parametrize(
    ("form", "files", "param"),
    [
        ({}, {"file": ("speech.wav", AUDIO)}, "model"),
        ({"model": " "}, {"file": ("speech.wav", AUDIO)}, "model"),
        ({"model": "whisper"}, {"other": ("speech.wav", AUDIO)}, "file"),
    ],
)
async def test_a_form_missing_a_field_is_a_400_naming_it(
    setup: Setup, form: dict[str, str], files: dict[str, tuple[str, bytes]], param: str,
) -> None:
    response = await setup.http.post("/v1/audio/transcriptions", data=form, files=files)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and f"`{param}`" in error["message"]
    assert not [r for r in setup.fake.requests if r.path.startswith("/v1/audio")]


async def test_a_form_naming_two_models_is_refused(setup: Setup) -> None:
    # Routed and scope-checked by the first, a Starlette server (vLLM, speaches) would run the last.
    response = await setup.http.post(
        "/v1/audio/transcriptions", data={"model": ["whisper", "secret-model"]}, files={"file": ("speech.wav", AUDIO)},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert not [r for r in setup.fake.requests if r.path.startswith("/v1/audio")]


def _form(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    """A multipart body of `parts`, each its Content-Disposition's parameters and its value."""
    return b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + value + b"\r\n"
        for disposition, value in parts
    ) + f"--{boundary}--\r\n".encode()


_FILE = ('name="file"; filename="a.wav"', b"RIFF")
_SMUGGLED = {
    # The gateway once read the first `boundary=` it saw, inside `xboundary=`: an inner form
    # naming another model, hidden in a field of the one the backend reads.
    "boundary inside another parameter": (
        "multipart/form-data; xboundary=in; boundary=out",
        _form("out", ('name="prompt"', _form("in", ('name="model"', b"tiny"), _FILE)), ('name="model"', b"whisper"), _FILE),
    ),
    "a boundary given twice": (
        "multipart/form-data; boundary=in; boundary=out",
        _form("out", ('name="prompt"', _form("in", ('name="model"', b"tiny"), _FILE)), ('name="model"', b"whisper"), _FILE),
    ),
    "a name inside a quoted parameter": (
        "multipart/form-data; boundary=b",
        _form("b", ('x="; name=model; y"; name="prompt"', b"tiny"), ('y="; name=zzz; "; name="model"', b"whisper"), _FILE),
    ),
    "a part named twice": (
        "multipart/form-data; boundary=b",
        _form("b", ('name="model"', b"tiny"), ('name="prompt"; name="model"', b"whisper"), _FILE),
    ),
    "a part with two dispositions": (
        "multipart/form-data; boundary=b",
        _form("b", ('name="model"', b"tiny"), ('name="prompt"\r\nContent-Disposition: form-data; name="model"', b"whisper"), _FILE),
    ),
    "an extended name (RFC 2231: no name to python-multipart, `model` to Go's mime)": (
        "multipart/form-data; boundary=b",
        _form("b", ("name*=UTF-8''model", b"tiny"), ('name="model"', b"whisper"), _FILE),
    ),
    "a name in continuations (RFC 2231: `model` to Go's mime)": (
        "multipart/form-data; boundary=b",
        _form("b", ('name*0="mo"; name*1="del"', b"tiny"), ('name="model"', b"whisper"), _FILE),
    ),
    "a delimiter padded (data to python-multipart, a delimiter to Go)": (
        "multipart/form-data; boundary=b",
        _form("b", ('name="prompt"', b"x\r\n--b \r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny"), ('name="model"', b"whisper"), _FILE),
    ),
}


@pytest.mark.parametrize("case", list(_SMUGGLED))
async def test_the_backend_runs_the_model_the_gateway_routed_or_nothing(setup: Setup, case: str) -> None:
    """A key's scope and the routing hold for the model the gateway reads; a form that a
    server (Starlette's python-multipart, Go's mime) could read another `model` from is refused,
    never relayed for the backend to run the model it reads."""
    content_type, body = _SMUGGLED[case]
    response = await setup.http.post("/v1/audio/transcriptions", content=body, headers={"content-type": content_type})
    relayed = [r for r in setup.fake.requests if r.path.startswith("/v1/audio")]
    if response.status_code == 400:
        assert response.json()["error"]["type"] == "invalid_request_error" and not relayed
        return
    assert response.status_code == 200, response.text
    _, form = sent_form(setup.fake, "/v1/audio/transcriptions")
    assert form["model"].value == b"openai/whisper-large-v3"  # "whisper", the alias the gateway routed, resolved


async def test_a_body_that_is_not_a_form_is_a_400(setup: Setup) -> None:
    response = await setup.http.post("/v1/audio/translations", json={"model": "whisper", "file": "speech.wav"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file" and "multipart/form-data" in error["message"]
    cut = await setup.http.post(
        "/v1/audio/transcriptions", content=b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisp",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert cut.status_code == 400 and "malformed" in cut.json()["error"]["message"]


async def test_speech_without_input_is_a_400(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await setup.client.audio.speech.create(model="kokoro", voice="af", input="")
    assert refused.value.param == "input"


@pytest.mark.parametrize(("model", "kind"), [("llama3.2", "ollama"), ("claude-sonnet-4", "anthropic")])
async def test_a_model_whose_backend_has_no_audio_api_is_a_400(setup: Setup, model: str, kind: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await setup.client.audio.transcriptions.create(model=model, file=("speech.wav", AUDIO))
    assert refused.value.param == "model" and f"({kind})" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        await setup.client.audio.speech.create(model=model, voice="af", input="Hi.")


async def test_an_unknown_model_is_a_404() -> None:
    fake = OpenAIBackend(models=("whisper-large-v3",))
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, models=("whisper-large-v3",))) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.audio.transcriptions.create(model="no-such-model", file=("speech.wav", AUDIO))
        await client.close()
    assert missing.value.code == "model_not_found"
    assert not [r for r in fake.requests if r.path.startswith("/v1/audio")]


async def test_backend_failures_are_502_503(setup: Setup) -> None:
    setup.fake.set_script(Script(status=503, error_body=b"<html>overloaded</html>"))
    with pytest.raises(openai.APIStatusError) as down:
        await setup.client.audio.transcriptions.create(model="whisper", file=("speech.wav", AUDIO))
    assert down.value.status_code == 503 and "overloaded" in down.value.message
    setup.fake.set_script(Script(fail_after=0, fail_mode="reset"))
    with pytest.raises(openai.APIStatusError) as dropped:
        await setup.client.audio.speech.create(model="kokoro", voice="af", input="Hi.")
    assert dropped.value.status_code == 502


async def test_a_backend_that_cannot_answer_hands_over_to_the_models_stand_in() -> None:
    first, second = OpenAIBackend(models=("whisper-a", "tts-a")), OpenAIBackend(models=("whisper-b", "tts-b"))
    first.set_script(Script(status=503, error_message="loading"))
    async with (
        first.serve() as first_server,
        second.serve() as second_server,
        running_gateway(
            backend("a", first_server.url, models=("whisper-a", "tts-a")),
            backend("b", second_server.url, models=("whisper-b", "tts-b")),
            backend("ollama", "http://127.0.0.1:9", kind="ollama", models=("whisper-ollama",)),
            aliases={"whisper": "whisper-a"},
            fallbacks={"whisper-a": ("whisper-ollama", "whisper-b"), "tts-a": ("tts-b",)},
        ) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        raw = await client.audio.transcriptions.with_raw_response.create(model="whisper", file=("speech.wav", AUDIO))
        assert raw.parse().text == TRANSCRIPT and raw.headers["x-fallback-model"] == "whisper-b"
        _, form = sent_form(second, "/v1/audio/transcriptions")
        assert form["model"].value == b"whisper-b" and form["file"].value == AUDIO
        async with client.audio.speech.with_streaming_response.create(model="tts-a", voice="af", input="Hi.") as speech:
            assert await speech.read() == "".join(DEFAULT_TOKENS).encode()
            assert speech.headers["x-fallback-model"] == "tts-b"
        # A refusal of the request itself is the client's answer, not a stand-in's.
        first.set_script(Script(status=400, error_message="unsupported audio format"))
        with pytest.raises(openai.BadRequestError) as refused:
            await client.audio.transcriptions.create(model="whisper", file=("speech.wav", AUDIO))
        assert "unsupported audio format" in refused.value.message
        await client.close()
    assert len([r for r in second.requests if r.path.startswith("/v1/audio")]) == 2


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, on translations
async def test_a_key_scoped_to_other_models_is_refused(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "audio", "--models", "whisper-*")
        await wait_for_key(url, key)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("speech.wav", AUDIO))
        with pytest.raises(openai.PermissionDeniedError):
            await client.audio.speech.create(model="kokoro", voice="af", input="Hi.")
        answer = await client.audio.transcriptions.create(model="whisper-large-v3", file=("speech.wav", AUDIO))
        assert answer.text == TRANSCRIPT
        await client.close()
        # A key's request rate counts uploads as any request.
        slow = await new_key(pg_database_url, "audio-rpm", "--rpm", "1")
        await wait_for_key(url, slow)
        limited = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=slow, max_retries=0)
        await limited.audio.translations.create(model="whisper-large-v3", file=("speech.wav", AUDIO))
        with pytest.raises(openai.RateLimitError):
            await limited.audio.transcriptions.create(model="whisper-large-v3", file=("speech.wav", AUDIO))
        await limited.close()
        async with httpx.AsyncClient(base_url=url) as http:
            unkeyed = await http.post("/v1/audio/speech", json={"model": "whisper-x", "input": "Hi."})
            assert unkeyed.status_code == 401 and bearer(key)
    assert [r.path for r in fake.requests if r.path.startswith("/v1/audio")] == [
        "/v1/audio/transcriptions", "/v1/audio/translations",
    ]


async def test_a_transcription_whose_usage_counts_seconds_is_charged_the_text_it_returns(
    aio_loop: object, pg_database_url: str, nats_url: str,
) -> None:
    """Whisper's and vLLM's usage is `{"type": "duration", "seconds": N}`: a key's budget
    must still bound its transcriptions, by the text they return."""
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "transcribed-text", "--budget", "20")
        await wait_for_key(url, key)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            answer = await client.audio.transcriptions.create(model="whisper-large-v3", file=("speech.wav", AUDIO))
            assert answer.text == TRANSCRIPT

            async def charged() -> Any:
                found = await sql(
                    pg_database_url, "SELECT sum(u.completion_tokens) FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id"
                    " WHERE k.name = 'transcribed-text'",
                )
                return found[0][0]

            assert await eventually(charged) == -(-len(TRANSCRIPT) // 4)  # about four characters a token

            async def spent() -> bool:
                try:
                    await client.audio.transcriptions.create(model="whisper-large-v3", file=("speech.wav", AUDIO))
                except openai.RateLimitError as error:
                    return error.code == "insufficient_quota"
                return False

            await eventually(spent)
