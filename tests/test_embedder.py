"""The in-process MiniLM embedder: vector quality, tokenisation, batching, loop friendliness."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources

import numpy as np
import pytest
import trio
import trio.testing
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.embedder import (
    EMBEDDING_DIMENSIONS,
    MAX_INPUT_TOKENS,
    EmbeddingResult,
    LocalEmbedder,
    maxsim,
)

PASSWORD = "How do I reset my password?"
FORGOT = "I forgot my password and need to recover my account"
CAT = "The cat sat on the mat"

# Long enough that one ONNX run takes a noticeable fraction of a second.
LONG = (
    "The customer wrote in on Monday morning to say that the problem started after last "
    "week's update, that they had already tried restarting the application, clearing the "
    "cache and signing in again from a different browser, and that none of it helped. They "
    "attached two screenshots and a log file and asked for a call back before Friday."
)


@pytest.fixture(scope="session")
def loaded() -> Iterator[LocalEmbedder]:
    # Loading the ONNX session takes ~0.5 s, so the tests share one; each test runs its own
    # batcher on it (the `embedder` fixture).
    embedder = LocalEmbedder()
    embedder.load()
    yield embedder


@pytest.fixture
async def embedder(loaded: LocalEmbedder) -> AsyncIterator[LocalEmbedder]:
    async with trio.open_nursery() as nursery:
        await nursery.start(loaded.serve)
        yield loaded
        nursery.cancel_scope.cancel()


def cosine(result: EmbeddingResult, a: int, b: int) -> float:
    return float(result.vectors[a] @ result.vectors[b])


async def test_vectors_are_384_dimensional_and_unit_norm(embedder: LocalEmbedder) -> None:
    result = await embedder.embed([PASSWORD, CAT, "", "😀"])

    assert result.vectors.shape == (4, EMBEDDING_DIMENSIONS) == (4, 384)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


async def test_similar_sentences_score_clearly_higher_than_unrelated(
    embedder: LocalEmbedder,
) -> None:
    texts = [
        PASSWORD,
        FORGOT,
        CAT,
        "A man is playing a guitar.",
        "Someone is strumming an instrument.",
        "A kitten is lying on a rug",
    ]
    result = await embedder.embed(texts)

    similar = [cosine(result, 0, 1), cosine(result, 3, 4), cosine(result, 2, 5)]
    unrelated = [cosine(result, 0, 2), cosine(result, 1, 3), cosine(result, 4, 5)]
    assert min(similar) > 0.5
    assert max(unrelated) < 0.25
    assert min(similar) - max(unrelated) > 0.3


def test_vendored_vocabulary_reproduces_the_model_tokenizer(loaded: LocalEmbedder) -> None:
    # Reference ids produced by the model's own tokenizer.json (padding off).
    vocab_file = resources.files("proxy.infra").joinpath("data", "vocab.txt")
    with resources.as_file(vocab_file) as path:
        tokenizer = BertWordPieceTokenizer(str(path), lowercase=True)
    assert tokenizer.encode(PASSWORD).ids == [101, 2129, 2079, 1045, 25141, 2026, 20786, 1029, 102]
    assert tokenizer.encode("Café naïve — 東京 😀").ids == [
        101,
        7668,
        15743,
        1517,
        1879,
        1755,
        100,
        102,
    ]

    texts = [PASSWORD, "Café naïve — 東京 😀", "", LONG, "antidisestablishmentarianism"]
    result = loaded.embed_sync(texts)
    assert result.token_counts == [len(tokenizer.encode(text).ids) for text in texts]
    assert result.token_counts[0] == 9
    assert result.total_tokens == sum(result.token_counts)


async def test_long_input_is_truncated_at_256_tokens_and_reported(embedder: LocalEmbedder) -> None:
    too_long = "word " * 400  # one token per word, plus [CLS] and [SEP]
    exactly = "word " * (MAX_INPUT_TOKENS - 2)

    result = await embedder.embed([too_long, exactly, PASSWORD])

    assert MAX_INPUT_TOKENS == 256
    assert result.token_counts == [256, 256, 9]
    assert result.truncated == [True, False, False]
    # Only the beginning is embedded: the truncated text embeds like its first 254 words.
    np.testing.assert_allclose(result.vectors[0], result.vectors[1], atol=1e-5)


# Long texts of every shape a cut could get wrong: words, punctuation glued to words, one
# giant word, CJK (a token per character), accents, and a window left unfilled by whitespace.
HUGE_TEXTS = [
    "lorem ipsum dolor " * 200_000,
    "don't-stop: a.b,c;d! " * 50_000,
    "QUJD" * 400_000 + " tail",  # one word: a single [UNK]
    "数据库连接失败\uff0c请稍后再试。" * 20_000,
    "café naïve résumé " * 50_000,
    "start" + " " * 40_000 + "the rest " * 1000,
    # A form feed (a PDF's page break) is no edge: BERT deletes it, joining the words around it.
    "hello " * 230 + "\x00" * 14_530 + "qz" * 45 + "\x0c" + "ab" * 10 + "\x00" * 5000 + " tail",
]


def test_a_huge_text_is_tokenised_from_its_start_only_and_exactly_as_whole(
    loaded: LocalEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokenising megabytes the model cannot see held every caller batched with it for seconds.
    tokenizer = loaded._tokenizer
    assert tokenizer is not None
    whole = [tokenizer.encode(text) for text in HUGE_TEXTS]
    seen: list[int] = []
    original = tokenizer.encode_batch

    def spy(texts: list[str]) -> object:
        seen.extend(len(text) for text in texts)
        return original(texts)

    monkeypatch.setattr(tokenizer, "encode_batch", spy)
    cut = loaded._encode(HUGE_TEXTS)
    assert [e.ids for e in cut] == [e.ids for e in whole]
    assert [bool(e.overflowing) for e in cut] == [bool(e.overflowing) for e in whole]
    # Read whole: only the texts whose start does not fill the window (one giant word, which
    # is a single [UNK]; a mostly blank start; a start that BERT mostly deletes).
    assert sorted(length for length in seen if length > 20_000) == sorted(len(HUGE_TEXTS[i]) for i in (2, 5, 6))


async def test_concurrent_calls_share_onnx_runs_and_match_single_calls(
    embedder: LocalEmbedder,
) -> None:
    texts = [
        f"Question {i}: how do I {verb} my account?"
        for i, verb in enumerate(["open", "close", "reset", "merge"] * 8)
    ]
    alone = [await embedder.embed([text]) for text in texts]

    runs_before = embedder.onnx_runs
    together: dict[int, EmbeddingResult] = {}

    async def call(i: int) -> None:
        together[i] = await embedder.embed([texts[i]])

    async with trio.open_nursery() as nursery:
        for i in range(len(texts)):
            nursery.start_soon(call, i)

    runs = embedder.onnx_runs - runs_before
    assert 1 <= runs <= 4, f"32 concurrent calls took {runs} ONNX runs"
    for i in range(len(texts)):
        np.testing.assert_allclose(together[i].vectors, alone[i].vectors, atol=1e-5)
        assert together[i].token_counts == alone[i].token_counts


async def test_a_multi_text_call_matches_one_by_one_and_sync(embedder: LocalEmbedder) -> None:
    texts = [PASSWORD, LONG, CAT, "word " * 300, FORGOT]
    batched = await embedder.embed(texts)
    synced = embedder.embed_sync(texts)

    for i, text in enumerate(texts):
        single = await embedder.embed([text])
        np.testing.assert_allclose(batched.vectors[i], single.vectors[0], atol=1e-5)
    np.testing.assert_allclose(batched.vectors, synced.vectors, atol=1e-5)


async def test_event_loop_keeps_ticking_during_a_large_batch(embedder: LocalEmbedder) -> None:
    texts = [f"{i}. {LONG}" for i in range(32)]
    gaps: list[float] = []
    finished = trio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not finished.is_set():
            await trio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        runs_before = embedder.onnx_runs
        start = time.perf_counter()
        await embedder.embed(texts)
        elapsed = time.perf_counter() - start
        finished.set()

    runs = embedder.onnx_runs - runs_before
    per_run = elapsed / runs
    # Were inference on the loop, the ticker would only get in between runs, each gap a whole
    # run long. (Bounds are relative to the run time so a busy machine slows both alike; the
    # max gets a looser bound because the OS may deschedule the loop thread now and then.)
    gaps.sort()
    report = f"tick gaps p90 {gaps[len(gaps) * 9 // 10]:.4f}s max {gaps[-1]:.4f}s, one run {per_run:.4f}s"
    assert len(gaps) > 20, report
    assert gaps[len(gaps) * 9 // 10] < per_run / 10, report
    assert gaps[-1] < per_run / 2, report


async def test_maxsim_ranks_the_relevant_passage_first(embedder: LocalEmbedder) -> None:
    query = await embedder.embed_tokens(PASSWORD)
    relevant = await embedder.embed_tokens(
        "To change a forgotten password, open Settings, choose Security and click "
        "'Forgot password'; we email you a link to set a new one."
    )
    irrelevant = await embedder.embed_tokens(
        "The Amazon basin receives more than two metres of rain a year, which supports "
        "dense tropical forest."
    )

    assert query.shape == (7, EMBEDDING_DIMENSIONS)  # 9 tokens minus [CLS] and [SEP]
    np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, atol=1e-5)
    assert maxsim(query, relevant) > maxsim(query, irrelevant) + 0.3
    assert maxsim(query, query) == pytest.approx(1.0, abs=1e-5)
    assert maxsim(query, query[:0]) == 0.0


async def test_a_cancelled_caller_does_not_disturb_the_others(embedder: LocalEmbedder) -> None:
    texts = [PASSWORD, FORGOT, CAT]
    expected = embedder.embed_sync(texts).vectors
    results: dict[int, EmbeddingResult] = {}
    scopes = [trio.CancelScope() for _ in texts]

    async def call(i: int) -> None:
        with scopes[i]:
            results[i] = await embedder.embed([texts[i]])

    async def scenario() -> None:
        results.clear()
        async with trio.open_nursery() as nursery:
            for i in range(len(texts)):
                scopes[i] = trio.CancelScope()
                nursery.start_soon(call, i)
            # Everyone is now either queued behind the bulk call or inside an ONNX run.
            await trio.testing.wait_all_tasks_blocked()
            scopes[1].cancel()
        assert scopes[1].cancelled_caught
        assert 1 not in results
        for i in (0, 2):
            np.testing.assert_allclose(results[i].vectors[0], expected[i], atol=1e-5)

    with trio.fail_after(20):
        # 1. Cancelled while waiting behind a busy batcher.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(embedder.embed, [f"{i}. {LONG}" for i in range(12)])
            await trio.testing.wait_all_tasks_blocked()
            await scenario()
        # 2. Cancelled while the batcher is already working on its batch.
        await scenario()
        # The batcher carries on afterwards.
        again = await embedder.embed([FORGOT])
    np.testing.assert_allclose(again.vectors[0], expected[1], atol=1e-5)


async def test_waiting_callers_fail_cleanly_when_the_embedder_stops(loaded: LocalEmbedder) -> None:
    outcome: list[GatewayError] = []

    async def caller() -> None:
        try:
            await loaded.embed([f"{i}. {LONG}" for i in range(16)])  # several ONNX runs
        except GatewayError as exc:
            outcome.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as outer, trio.open_nursery() as service:
            await service.start(loaded.serve)
            outer.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            service.cancel_scope.cancel()

    assert len(outcome) == 1
    assert outcome[0].kind is ErrorKind.UNAVAILABLE
    with pytest.raises(RuntimeError, match="not running"):
        await loaded.embed([PASSWORD])


async def test_rejects_a_bare_string_and_handles_an_empty_list(embedder: LocalEmbedder) -> None:
    with pytest.raises(TypeError):
        await embedder.embed("not a list")
    empty = await embedder.embed([])
    assert empty.vectors.shape == (0, EMBEDDING_DIMENSIONS)
    assert empty.token_counts == []


async def test_a_text_the_tokenizer_refuses_fails_its_own_call_only(embedder: LocalEmbedder) -> None:
    """A lone surrogate cannot be tokenised: that call fails, the calls batched with it and
    every later call are answered (it once failed them all, forever)."""
    results: dict[str, EmbeddingResult] = {}
    failed: list[GatewayError] = []

    async def call(name: str, text: str) -> None:
        try:
            results[name] = await embedder.embed([text])
        except GatewayError as error:
            failed.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "before", PASSWORD)
        nursery.start_soon(call, "bad", "bad \ud800 text")
        nursery.start_soon(call, "with", CAT)
    assert len(failed) == 1 and set(results) == {"before", "with"}
    with trio.fail_after(5):
        later = await embedder.embed([PASSWORD, CAT])
    np.testing.assert_allclose(later.vectors[0], results["before"].vectors[0], atol=1e-5)
