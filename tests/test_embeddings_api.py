"""Embeddings through the official `openai` and `ollama` SDKs: the in-process model and
embedding models of OpenAI-compatible and Ollama backends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import ollama
import openai
import pytest
import trio

from proxy.infra.embedder import LocalEmbedder
from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend
from tests.fakes.ollama_backend import _LOAD_DURATION_NS
from tests.fakes.script import embed_text
from tests.fakes.server import Exchange, Request
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_embeddings_usage import SlowEmbeddings

PASSWORD = "How do I reset my password?"
FORGOT = "I forgot my password and need to recover my account"
CAT = "The cat sat on the mat"


@dataclass
class Setup:
    url: str
    client: openai.AsyncOpenAI
    ollama: ollama.AsyncClient
    openai_fake: OpenAIBackend
    ollama_fake: OllamaBackend


@pytest.fixture(scope="module")
def reference() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder()
    embedder.load()
    yield embedder


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    oa, ol, an = OpenAIBackend(), OllamaBackend(), AnthropicBackend()
    async with oa.serve() as oa_server, ol.serve() as ol_server, an.serve() as an_server:
        async with running_gateway(
            backend("oa", oa_server.url, default=True),
            backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
            backend("an", an_server.url, kind="anthropic", prefixes=("claude",)),
            aliases={"text-embedding-3-small": "all-minilm-l6-v2"},
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            async with ollama.AsyncClient(host=url) as ollama_client:
                yield Setup(url, client, ollama_client, oa, ol)
            await client.close()


def vectors_of(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


# -- OpenAI ----------------------------------------------------------------------------------------


async def test_openai_sdk_default_base64_matches_the_model(setup: Setup, reference: LocalEmbedder) -> None:
    texts = [PASSWORD, FORGOT, CAT]
    response = await setup.client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vectors = vectors_of(response)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, reference.embed_sync(texts).vectors, atol=1e-6)
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.model == "all-minilm-l6-v2"
    expected_tokens = reference.embed_sync(texts).total_tokens
    assert response.usage.prompt_tokens == response.usage.total_tokens == expected_tokens
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.3


async def test_float_encoding_and_a_single_string(setup: Setup, reference: LocalEmbedder) -> None:
    response = await setup.client.embeddings.create(model="all-minilm", input=PASSWORD, encoding_format="float")
    assert len(response.data) == 1
    np.testing.assert_allclose(vectors_of(response)[0], reference.embed_sync([PASSWORD]).vectors[0], atol=1e-6)
    async with httpx.AsyncClient() as http:
        raw = await http.post(f"{setup.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"})
    body = raw.json()
    assert raw.status_code == 200 and raw.headers["x-embedding-backend"] == "local"
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert isinstance(body["data"][0]["embedding"][0], float) and len(body["data"][0]["embedding"]) == 384
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # [CLS] hi [SEP]


async def test_an_alias_reaches_the_local_model(setup: Setup, reference: LocalEmbedder) -> None:
    response = await setup.client.embeddings.create(model="text-embedding-3-small", input=[CAT])
    np.testing.assert_allclose(vectors_of(response)[0], reference.embed_sync([CAT]).vectors[0], atol=1e-6)
    assert setup.openai_fake.requests == []


async def test_dimensions(setup: Setup) -> None:
    ok = await setup.client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=384)
    assert len(ok.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as caught:
        await setup.client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=256)
    error = caught.value
    assert error.status_code == 400
    assert "384" in error.message and "dimensions" in error.message
    assert isinstance(error.body, dict) and error.body.get("param") == "dimensions"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "all-minilm-l6-v2", "input": [1, 2, 3]}, "input"),  # token ids: text only here
        ({"model": "all-minilm-l6-v2", "input": []}, "input"),
        ({"model": "all-minilm-l6-v2"}, "input"),
        ({"model": "all-minilm-l6-v2", "input": ["a", 1]}, "input"),
        ({"model": "all-minilm-l6-v2", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "all-minilm-l6-v2", "input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a"}, "model"),
        ({"model": "all-minilm-l6-v2", "input": ["x"] * 2049}, "input"),
        ({"model": "claude-3", "input": "a"}, "model"),  # an Anthropic backend has no embeddings
    ],
)
async def test_bad_requests_are_400_naming_the_field(setup: Setup, payload: dict[str, object], param: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{setup.url}/v1/embeddings", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_an_empty_string_is_refused_as_openai_does(setup: Setup) -> None:
    for payload, param in [("", "input"), (["a", ""], "input[1]")]:
        with pytest.raises(openai.BadRequestError) as caught:
            await setup.client.embeddings.create(model="all-minilm-l6-v2", input=payload)
        assert caught.value.status_code == 400
        assert isinstance(caught.value.body, dict) and caught.value.body.get("param") == param
        assert "non-empty string" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        await setup.client.embeddings.create(model="bge-m3", input=[""])
    assert setup.openai_fake.requests == []
    # Ollama embeds nothing for an empty input, without complaint.
    assert (await setup.ollama.embed(model="all-minilm", input="")).embeddings == []


@pytest.mark.parametrize("model", ["all-minilm-l6-v2", "nomic-embed-text"])  # local; an Ollama backend
async def test_token_arrays_for_a_text_only_model_say_how_langchain_sends_text(setup: Setup, model: str) -> None:
    # LangChain's OpenAIEmbeddings sends tiktoken ids (`check_embedding_ctx_length`, on by
    # default): its user must learn which switch makes it send text.
    with pytest.raises(openai.BadRequestError) as caught:
        await setup.client.embeddings.create(model=model, input=[[9906, 1917], [15339]])
    assert caught.value.status_code == 400
    assert caught.value.body.get("param") == "input"  # type: ignore[union-attr]
    assert "check_embedding_ctx_length=False" in caught.value.message


async def test_long_input_is_truncated_and_says_so(setup: Setup) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{setup.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["word " * 400, "short"]}
        )
    assert response.status_code == 200
    assert response.headers["x-embeddings-truncated"] == "1"
    assert response.json()["usage"]["prompt_tokens"] == 256 + 3


async def test_backend_models_are_routed_and_token_arrays_pass_through(setup: Setup) -> None:
    response = await setup.client.embeddings.create(model="bge-m3", input=["alpha beta", "gamma"])
    np.testing.assert_allclose(vectors_of(response)[1], embed_text("gamma", 384), atol=1e-6)
    assert response.model == "bge-m3"
    sent = setup.openai_fake.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.json == {"model": "bge-m3", "input": ["alpha beta", "gamma"], "encoding_format": "float"}

    # The client's other fields reach the backend as sent (vLLM reads `truncate_prompt_tokens`).
    await setup.client.embeddings.create(
        model="bge-m3", input="alpha", user="user-7", extra_body={"truncate_prompt_tokens": 64}
    )
    assert setup.openai_fake.requests[-1].json == {
        "model": "bge-m3", "input": ["alpha"], "encoding_format": "float", "user": "user-7", "truncate_prompt_tokens": 64,
    }

    tokens = await setup.client.embeddings.create(model="bge-m3", input=[[1, 2], [3]], dimensions=8)
    assert len(tokens.data) == 2 and len(tokens.data[0].embedding) == 8
    assert setup.openai_fake.requests[-1].json["input"] == [[1, 2], [3]]


async def test_concurrent_callers_each_get_their_own_vectors(setup: Setup, reference: LocalEmbedder) -> None:
    texts = [f"Question {i}: how do I {verb} my account?" for i, verb in enumerate(["open", "close", "merge"] * 4)]
    results: dict[int, np.ndarray] = {}

    async def one(i: int) -> None:
        response = await setup.client.embeddings.create(model="all-minilm-l6-v2", input=texts[i])
        results[i] = vectors_of(response)[0]

    async with trio.open_nursery() as nursery:
        for i in range(len(texts)):
            nursery.start_soon(one, i)
    expected = reference.embed_sync(texts).vectors
    for i in range(len(texts)):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-6)


async def test_the_local_model_is_listed(setup: Setup) -> None:
    models = await setup.client.models.list()
    local = [m for m in models.data if m.id == "all-minilm-l6-v2"]
    assert len(local) == 1 and local[0].owned_by == "llm-proxy"
    assert local[0].model_extra is not None and local[0].model_extra["backend"] == "local"
    # An alias of it is served here too, not by the default backend its name would route to.
    (alias,) = [m for m in models.data if m.id == "text-embedding-3-small"]
    assert alias.model_extra is not None and alias.model_extra["backend"] == "local"
    assert alias.owned_by == "llm-proxy"
    tags = await setup.ollama.list()
    entry = next(m for m in tags.models if m.model == "all-minilm-l6-v2")
    assert entry.details is not None and entry.details.family == "bert"


# -- Ollama ----------------------------------------------------------------------------------------


async def test_ollama_embed(setup: Setup, reference: LocalEmbedder) -> None:
    response = await setup.ollama.embed(model="all-minilm", input=[PASSWORD, CAT])
    vectors = np.array(response.embeddings, dtype=np.float32)
    np.testing.assert_allclose(vectors, reference.embed_sync([PASSWORD, CAT]).vectors, atol=1e-6)
    assert response.model == "all-minilm"
    assert response.prompt_eval_count == reference.embed_sync([PASSWORD, CAT]).total_tokens
    assert response.total_duration is not None and response.total_duration > 0
    assert response.load_duration is not None and 0 <= response.load_duration <= response.total_duration

    single = await setup.ollama.embed(model="all-minilm:latest", input=CAT)
    np.testing.assert_allclose(single.embeddings[0], vectors[1], atol=1e-6)
    empty = await setup.ollama.embed(model="all-minilm", input=[])
    assert empty.embeddings == []


async def test_ollama_dimensions_shorten_any_model_as_ollama_does(setup: Setup, reference: LocalEmbedder) -> None:
    # Ollama's /api/embed keeps a vector's first `dimensions` values, made a unit vector again,
    # for any model (a number past the model's width: the whole vector), where an OpenAI
    # server refuses `dimensions` for a model not trained for it.
    full = reference.embed_sync([PASSWORD]).vectors[0]
    head = full[:128] / np.linalg.norm(full[:128])
    local = await setup.ollama.embed(model="all-minilm", input=PASSWORD, dimensions=128)
    np.testing.assert_allclose(local.embeddings[0], head, atol=1e-6)
    wide = await setup.ollama.embed(model="all-minilm", input=PASSWORD, dimensions=1024)
    np.testing.assert_allclose(wide.embeddings[0], full, atol=1e-6)
    async with httpx.AsyncClient() as http:  # 0: Go's unset value, as Ollama reads it
        unset = await http.post(f"{setup.url}/api/embed", json={"model": "all-minilm", "input": PASSWORD, "dimensions": 0})
    assert unset.status_code == 200
    np.testing.assert_allclose(unset.json()["embeddings"][0], full, atol=1e-6)

    backend = await setup.ollama.embed(model="bge-m3", input=["one two", "three"], dimensions=8)
    assert "dimensions" not in setup.openai_fake.requests[-1].json  # the full vectors, shortened here
    for vector, text in zip(backend.embeddings, ["one two", "three"], strict=True):
        expected = np.array(embed_text(text, 384)[:8])
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    # An Ollama backend shortens them itself; an OpenAI client keeps OpenAI's rules.
    await setup.ollama.embed(model="nomic-embed-text", input="one", dimensions=8)
    assert setup.ollama_fake.requests[-1].json["dimensions"] == 8
    with pytest.raises(openai.BadRequestError):
        await setup.client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=128)


async def test_ollama_truncate_false_refuses_long_input(setup: Setup) -> None:
    assert len((await setup.ollama.embed(model="all-minilm", input="word " * 400)).embeddings[0]) == 384
    with pytest.raises(ollama.ResponseError) as caught:
        await setup.ollama.embed(model="all-minilm", input="word " * 400, truncate=False)
    assert caught.value.status_code == 400
    assert "context length" in caught.value.error


async def test_ollama_legacy_embeddings(setup: Setup, reference: LocalEmbedder) -> None:
    response = await setup.ollama.embeddings(model="all-minilm", prompt=FORGOT)
    np.testing.assert_allclose(response.embedding, reference.embed_sync([FORGOT]).vectors[0], atol=1e-6)


async def test_ollama_backend_embedding_model(setup: Setup) -> None:
    response = await setup.ollama.embed(model="nomic-embed-text", input=["one two", "three"])
    np.testing.assert_allclose(response.embeddings[0], embed_text("one two", 384), atol=1e-6)
    # The time Ollama spent loading the model, as it said (it was 0, whatever Ollama said).
    assert response.load_duration == _LOAD_DURATION_NS and response.total_duration >= _LOAD_DURATION_NS
    sent = setup.ollama_fake.requests[-1]
    assert sent.path == "/api/embed" and sent.json == {"model": "nomic-embed-text", "input": ["one two", "three"]}
    legacy = await setup.ollama.embeddings(model="nomic-embed-text", prompt="three")
    np.testing.assert_allclose(legacy.embedding, embed_text("three", 384), atol=1e-6)


async def test_ollama_legacy_embeddings_on_an_ollama_backend_are_its_raw_vector(setup: Setup) -> None:
    # Ollama's legacy endpoint answers with the model's raw vector, /api/embed normalises it:
    # a legacy client must get through the gateway what it gets from Ollama directly.
    setup.ollama_fake.legacy_embedding_scale = 3.0
    legacy = await setup.ollama.embeddings(model="nomic-embed-text", prompt="three", options={"num_ctx": 512})
    np.testing.assert_allclose(legacy.embedding, np.array(embed_text("three", 384)) * 3.0, atol=1e-5)
    sent = setup.ollama_fake.requests[-1]
    assert sent.path == "/api/embeddings"
    assert sent.json == {"model": "nomic-embed-text", "prompt": "three", "options": {"num_ctx": 512}}
    # /api/embed stays normalised, and other backends keep their one embeddings API.
    modern = await setup.ollama.embed(model="nomic-embed-text", input="three")
    np.testing.assert_allclose(modern.embeddings[0], embed_text("three", 384), atol=1e-6)
    await setup.ollama.embeddings(model="bge-m3", prompt="three")
    assert setup.openai_fake.requests[-1].path == "/v1/embeddings"


async def test_ollama_options_and_keep_alive_reach_an_ollama_backend_only(setup: Setup) -> None:
    # `options.num_ctx` changes where Ollama truncates; `keep_alive: 0` unloads the model.
    options = {"num_ctx": 512}
    await setup.ollama.embed(model="nomic-embed-text", input=["one two"], options=options, keep_alive=0)
    assert setup.ollama_fake.requests[-1].json == {
        "model": "nomic-embed-text", "input": ["one two"], "options": options, "keep_alive": 0,
    }
    await setup.ollama.embeddings(model="nomic-embed-text", prompt="three", options=options, keep_alive="10m")
    sent = setup.ollama_fake.requests[-1].json
    assert sent["options"] == options and sent["keep_alive"] == "10m"

    # An OpenAI-compatible server refuses fields it does not know: they stay behind.
    await setup.ollama.embed(model="bge-m3", input="one", options=options, keep_alive=0)
    assert setup.openai_fake.requests[-1].json == {"model": "bge-m3", "input": ["one"], "encoding_format": "float"}
    # The local model has no use for them; an OpenAI client's extras are not Ollama's.
    local = await setup.ollama.embed(model="all-minilm", input="one", options=options, keep_alive=0)
    assert len(local.embeddings[0]) == 384
    await setup.client.embeddings.create(model="nomic-embed-text", input="one", user="user-7")
    assert setup.ollama_fake.requests[-1].json == {"model": "nomic-embed-text", "input": ["one"]}


async def test_an_ollama_embed_without_input_loads_or_unloads_the_model_as_ollama_does(setup: Setup) -> None:
    """How Ollama users keep an embedding model loaded (`/api/generate` refuses one): an embed
    call with no input and `keep_alive: -1`. The gateway answered it itself, so the model
    never loaded, and `keep_alive: 0` never unloaded it."""
    preloaded = await setup.ollama.embed(model="nomic-embed-text", input=[], keep_alive=-1)
    assert preloaded.embeddings == []
    assert setup.ollama_fake.requests[-1].json == {"model": "nomic-embed-text", "input": [], "keep_alive": -1}
    assert [m.model for m in (await setup.ollama.ps()).models] == ["nomic-embed-text:latest"]
    await setup.ollama.embed(model="nomic-embed-text", keep_alive=0)
    assert (await setup.ollama.ps()).models == []
    legacy = await setup.ollama.embeddings(model="nomic-embed-text", keep_alive="10m")
    assert legacy.embedding == []
    assert setup.ollama_fake.requests[-1].path == "/api/embeddings"
    assert [m.model for m in (await setup.ollama.ps()).models] == ["nomic-embed-text:latest"]
    # A model no backend has is Ollama's 404, input or not.
    setup.ollama_fake.models = ["nomic-embed-text"]
    with pytest.raises(ollama.ResponseError) as missing:
        await setup.ollama.embed(model="nomic-missing", input=[])
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    # An OpenAI-compatible backend has no model to load: nothing is sent.
    seen = len(setup.openai_fake.requests)
    assert (await setup.ollama.embed(model="bge-m3", input=[])).embeddings == []
    assert len(setup.openai_fake.requests) == seen


async def test_ollama_errors_are_ollama_shaped(setup: Setup) -> None:
    async with httpx.AsyncClient() as http:
        bad = await http.post(f"{setup.url}/api/embed", json={"model": "all-minilm", "input": [1, 2]})
        missing = await http.post(f"{setup.url}/api/embed", json={"input": "x"})
    assert bad.status_code == 400 and bad.json() == {"error": "invalid input type"}
    assert missing.status_code == 400 and missing.json() == {"error": "model is required"}


async def test_absurd_dimensions_are_refused_before_any_backend(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await setup.client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=70_000_000)
    assert caught.value.body.get("param") == "dimensions"  # type: ignore[union-attr]


# -- an input longer than the model's window ----------------------------------------------------------

VLLM_EMBEDDING_TOO_LONG = (
    "This model's maximum context length is 512 tokens. However, you requested 900 tokens in the input for "
    "embedding generation. Please reduce the length of the input."
)
OLLAMA_EMBEDDING_TOO_LONG = "the input length exceeds the context length"


class _TooLongVLLM(OpenAIBackend):
    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        await exchange.respond_json(400, {"object": "error", "message": VLLM_EMBEDDING_TOO_LONG,
                                          "type": "BadRequestError", "param": None, "code": 400})


class _TooLongOllama(OllamaBackend):
    async def _embed(self, request: Request, exchange: Exchange, *, legacy: bool) -> None:
        await exchange.respond_json(400, {"error": OLLAMA_EMBEDDING_TOO_LONG})


async def test_an_input_too_long_for_the_model_is_context_length_exceeded_on_input() -> None:
    vllm, ol = _TooLongVLLM(), _TooLongOllama()
    async with vllm.serve() as vllm_server, ol.serve() as ol_server, running_gateway(
        backend("vllm", vllm_server.url, default=True),
        backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model, message in (("bge-m3", VLLM_EMBEDDING_TOO_LONG), ("nomic-embed-text", OLLAMA_EMBEDDING_TOO_LONG)):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.embeddings.create(model=model, input="word " * 400)
            assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input"), model
            assert message in caught.value.message
        await client.close()
        async with ollama.AsyncClient(host=url) as native:
            with pytest.raises(ollama.ResponseError) as refused:
                await native.embed(model="nomic-embed-text", input="word " * 400)
        assert refused.value.status_code == 400 and refused.value.error == OLLAMA_EMBEDDING_TOO_LONG


async def test_ollamas_truncate_holds_before_the_gateway_has_listed_vllms_window() -> None:
    """The first embed of a long text after a restart was vLLM's 400 (the gateway did not know
    the window to cut it to yet); the same call a moment later, once something had listed the
    models, was cut and answered."""
    from tests.test_responses_truncation import WINDOW, WindowedVLLM

    class Refusing(WindowedVLLM):
        async def _embeddings(self, request: Request, exchange: Exchange) -> None:
            body = request.json()
            if "truncate_prompt_tokens" not in body and len(body["input"][0]) // self.chars_per_token > WINDOW:
                await exchange.respond_json(400, {"object": "error", "message": VLLM_EMBEDDING_TOO_LONG,
                                                  "type": "BadRequestError", "param": None, "code": 400})
                return
            await super()._embeddings(request, exchange)

    fake = Refusing()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, prefixes=("qwen",))) as url:
        async with ollama.AsyncClient(host=url) as client:
            first = await client.embed(model="qwen3-8b", input="word " * (WINDOW * 2))
            assert len(first.embeddings) == 1
            assert fake.requests[-1].json["truncate_prompt_tokens"] == WINDOW
            with pytest.raises(ollama.ResponseError) as refused:  # as Ollama: an error, not a cut
                await client.embed(model="qwen3-8b", input="word " * (WINDOW * 2), truncate=False)
            assert refused.value.status_code == 400


async def test_an_embeddings_request_left_by_its_client_is_logged_with_the_backend_it_was_sent_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its line said `backend: ""`: an operator could not tell which server was embedding."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    slow = SlowEmbeddings()
    async with slow.serve() as server, running_gateway(
        backend("oa", server.url, default=True), aliases={"embedder": "bge-m3"}, access_log=True
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def embedding() -> bool:
            return any(r.path == "/v1/embeddings" for r in slow.requests)

        async def ask() -> None:
            await client.embeddings.create(input="x", model="embedder")

        with trio.move_on_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await eventually(embedding)  # the backend has it: the client hangs up now
                nursery.cancel_scope.cancel()
        await client.close()

        async def logged_line() -> bool:
            return any(r.name == REQUEST_LOGGER for r in caplog.records)

        await eventually(logged_line)
    [line] = [r.__dict__ for r in caplog.records if r.name == REQUEST_LOGGER]
    logged = {name: line[name] for name in ("kind", "model", "backend", "upstream_model", "status", "cancelled")}
    assert logged == {"kind": "embeddings", "model": "embedder", "backend": "oa", "upstream_model": "bge-m3",
                      "status": 499, "cancelled": True}


async def test_every_embeddings_request_has_its_request_log_line_without_its_input(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator following a failing RAG client by its request id found nothing: chats,
    completions and reranks each had their line, embeddings none."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    secret = "the quarterly numbers nobody may read"
    oa = OpenAIBackend()
    async with oa.serve() as server, running_gateway(backend("oa", server.url, default=True), access_log=True) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        local = await client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=secret)
        routed = await client.embeddings.with_raw_response.create(model="bge-m3", input=[secret, "x"])
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="bge-m3", input="")
        await client.close()
    lines = {line["request_id"]: line for line in (r.__dict__ for r in caplog.records if r.name == REQUEST_LOGGER)}
    first, second = lines[local.headers["x-request-id"]], lines[routed.headers["x-request-id"]]
    assert (first["kind"], first["model"], first["backend"], first["status"]) == ("embeddings", "all-minilm-l6-v2", "local", 200)
    assert (second["kind"], second["model"], second["backend"], second["status"]) == ("embeddings", "bge-m3", "oa", 200)
    assert first["prompt_tokens"] and second["prompt_tokens"]
    refused = [line for line in lines.values() if line["status"] == 400]
    assert len(refused) == 1 and refused[0]["kind"] == "embeddings" and refused[0]["error"]
    assert len(lines) == 3
    assert secret not in "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


class _BrokenVLLM(OpenAIBackend):
    """A model whose output overflowed: NaN, and a value past float32's range."""

    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        await exchange.respond(200, b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[NaN,0.5]},'
                                    b'{"object":"embedding","index":1,"embedding":[1e39,0.5]}],'
                                    b'"usage":{"prompt_tokens":2,"total_tokens":2}}')


class _BrokenOllama(OllamaBackend):
    async def _embed(self, request: Request, exchange: Exchange, *, legacy: bool) -> None:
        await exchange.respond(200, b'{"model":"nomic-embed-text","embeddings":[[Infinity,0.5],[0.5,0.5]]}')


async def test_a_backends_nan_or_infinity_is_a_502_never_a_vector() -> None:
    """A broken model's NaN made the float answer a 500 ("see the gateway's log") and went
    as is into a base64 answer, which the openai SDK decoded into the client's index."""
    vllm, ol = _BrokenVLLM(), _BrokenOllama()
    async with vllm.serve() as vllm_server, ol.serve() as ol_server, running_gateway(
        backend("vllm", vllm_server.url, default=True),
        backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model in ("bge-m3", "nomic-embed-text"):
            for encoding in ("base64", "float"):
                with pytest.raises(openai.APIStatusError) as caught:
                    await client.embeddings.create(model=model, input=["a", "b"], encoding_format=encoding)
                assert caught.value.status_code == 502, (model, encoding)
                assert "not a finite number" in caught.value.message
        await client.close()
        async with ollama.AsyncClient(host=url) as native:
            for model in ("bge-m3", "nomic-embed-text"):
                with pytest.raises(ollama.ResponseError) as refused:
                    await native.embed(model=model, input=["a", "b"])
                assert refused.value.status_code == 502 and "not a finite number" in refused.value.error


class _Misnumbered(OpenAIBackend):
    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        vector = [0.6, 0.8]
        await exchange.respond_json(200, {"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": vector},
            {"object": "embedding", "index": 0, "embedding": vector[::-1]},
        ], "usage": {"prompt_tokens": 2, "total_tokens": 2}})


async def test_a_backends_repeated_index_is_a_502_not_vectors_paired_with_the_wrong_inputs() -> None:
    fake = _Misnumbered()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.embeddings.create(model="bge-m3", input=["a", "b"])
        await client.close()
    assert caught.value.status_code == 502 and "invalid embeddings response" in caught.value.message
