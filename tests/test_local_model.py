"""The local embedding model as a gateway service: loaded on first use, a broken model file is
a clear 503 (and retried), stopping it fails waiting calls cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.embedder import LocalEmbedder
from proxy.services.embeddings import LocalModel


async def test_loads_on_first_use_and_stops_cleanly() -> None:
    async with trio.open_nursery() as nursery:
        model = LocalModel(nursery)
        assert not model.loaded  # nothing loaded at start: a gateway that never embeds pays nothing
        result = await model.embed(["hello world"])
        assert result.vectors.shape == (1, 384) and model.loaded
        tokens = await model.embed_tokens("hello world")
        assert tokens.shape == (2, 384)
        model.stop()
    # The gateway's nursery could close: the batcher ended with stop().
    with pytest.raises(GatewayError) as caught:
        await model.embed(["again"])
    assert caught.value.kind is ErrorKind.UNAVAILABLE


async def test_a_broken_model_file_is_a_503_not_a_crash(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    async with trio.open_nursery() as nursery:
        model = LocalModel(nursery, model_path=broken)
        for _ in range(2):  # each call tries again, and fails the same clear way
            with pytest.raises(GatewayError) as caught:
                await model.embed(["hello"])
            assert caught.value.kind is ErrorKind.UNAVAILABLE
            assert "could not be loaded" in caught.value.message
        assert not model.loaded
        model.stop()


async def test_one_pass_sentence_and_token_vectors_match_the_two_calls() -> None:
    texts = ["How do I reset my password?", "The cat sat on the mat", "word " * 300, ""]
    async with LocalEmbedder.open() as encoder:
        result, tokens = await encoder.embed_with_tokens(texts)
        sentences = await encoder.embed(texts)
        for i, text in enumerate(texts):
            np.testing.assert_allclose(tokens[i], await encoder.embed_tokens(text), atol=1e-5)
        empty, none = await encoder.embed_with_tokens([])
    np.testing.assert_allclose(result.vectors, sentences.vectors, atol=1e-5)
    assert result.token_counts == sentences.token_counts and result.truncated == [False, False, True, False]
    assert [len(t) for t in tokens] == [7, 6, 254, 0]
    assert empty.vectors.shape == (0, 384) and none == []
