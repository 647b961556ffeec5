"""Clients at the edges of HTTP itself (framing, HTTP/2, methods), on raw sockets as they
send them: each is answered, and none can end another's request."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import httpx
import hypercorn.protocol
import pytest
import trio
from hypercorn.protocol.h2 import H2Protocol

from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class _H2Client:
    """HTTP/2 with prior knowledge (h2c), frame by frame: what a client sends and when is
    the test's to choose (an SDK's client sends a body as fast as the window allows)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.status: dict[int, int] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def request(self, path: str, headers: list[tuple[str, str]], body: bytes | None) -> int:
        """Send a request's headers and `body` (None: the body is still to come)."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gw"), *headers])
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=True)
        await self.flush()
        return stream_id

    async def until(self, stream_id: int | None, *, ended: bool = True) -> None:
        """Read frames until stream `stream_id` has ended (not `ended`: has sent some of its
        body); None: until the gateway closes the connection."""
        def done() -> bool:
            return stream_id is not None and stream_id in (self.ended if ended else self.body)

        while not done():
            data = await self.stream.receive_some(65536)
            assert data, "the gateway closed the connection"
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.body[event.stream_id] = self.body.get(event.stream_id, b"") + event.data
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended.add(event.stream_id)
            await self.flush()


async def test_an_http2_body_refused_before_it_was_read_ends_neither_the_gateway_nor_its_connection() -> None:
    """A request refused before its body was read (here a 413 from its declared length; a 401
    without a key is the same) while the client goes on sending that body over HTTP/2: each
    late DATA frame was a KeyError in hypercorn, which ended the whole gateway (one
    unauthenticated POST of a few hundred kB stopped every client's requests) or, while
    another request was running on the connection, hung that connection for good."""
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(40)], pace=0.02))
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True), max_body_bytes=100_000) as url:
        host, port = url.removeprefix("http://").split(":")
        for beside_a_stream in (False, True):
            async with await trio.open_tcp_stream(host, int(port)) as connection:
                client = _H2Client(connection)
                with trio.fail_after(30):
                    if beside_a_stream:
                        streamed = await client.request("/v1/chat/completions", [], json.dumps({**CHAT, "stream": True}).encode())
                        await client.until(streamed, ended=False)
                    await _refused_then_sent(client)
                    if beside_a_stream:
                        await client.until(streamed)
                        assert client.status[streamed] == 200 and client.body[streamed].rstrip().endswith(b"data: [DONE]")
                    again = await client.request("/v1/chat/completions", [], json.dumps(CHAT).encode())
                    await client.until(again)
                    assert client.status[again] == 200, client.body[again]
        async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:
            assert (await fresh.get("/v1/models")).status_code == 200


async def _refused_then_sent(client: _H2Client) -> None:
    """A request refused from its head, whose body the client sends on, as it may."""
    refused = await client.request("/v1/chat/completions", [("content-length", "400000")], None)
    await client.until(refused)
    assert client.status[refused] == 413
    assert json.loads(client.body[refused])["error"]["code"] == "request_too_large"
    window, frame = client.h2.local_flow_control_window(refused), client.h2.max_outbound_frame_size
    for _ in range(window // frame):
        client.h2.send_data(refused, b"x" * frame)
    await client.flush()


async def test_a_connection_the_http_server_fails_on_ends_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever hypercorn fails on in one connection (here its own HTTP/2, unmended: the
    failure above) ends that connection only; it ended the server."""
    monkeypatch.setattr(hypercorn.protocol, "H2Protocol", H2Protocol)
    async with running_gateway(max_body_bytes=100_000) as url:
        host, port = url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as connection:
            client = _H2Client(connection)
            with trio.fail_after(30), pytest.raises(AssertionError, match="closed the connection"):
                await _refused_then_sent(client)
                await client.until(None)
        async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:
            assert (await fresh.get("/health")).status_code == 200


async def _exchange(url: str, request: bytes) -> bytes:
    """What the gateway answers `request` on a connection of its own, to the connection's end."""
    host, port = url.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_a_refusal_before_the_body_was_read_tells_the_client_the_connection_closes() -> None:
    """Quart's routes refuse before reading the body (an unknown path, a wrong method, and,
    with keys, a 401 or 429): the server then closes the connection, but the answer did not
    say so, and a client sending its next request on it (httpx's pool) got no answer:
    "Server disconnected without sending a response". The front door's refusals said so."""
    async with running_gateway() as url:
        for head in (
            b"POST /v1/nothing HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000000\r\n\r\n",
            b"PUT /v1/embeddings HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000000\r\n\r\n",
            b"PUT /v1/embeddings HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"PUT /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000000\r\n\r\n",  # the front door
        ):
            answer = await _exchange(url, head + b"{\"input\": \"")
            status, _, rest = answer.partition(b"\r\n")
            assert status in (b"HTTP/1.1 404 ", b"HTTP/1.1 405 "), answer
            assert b"\r\nconnection: close\r\n" in rest.split(b"\r\n\r\n")[0].lower() + b"\r\n", (head, answer)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(5):
                refused = await client.post("/v1/nothing", content=b"x" * 2_000_000)
                assert refused.status_code == 404
                assert (await client.get("/v1/models")).status_code == 200  # on the client's pooled connection
            # A request whose body was read keeps its connection, as does one without a body.
            invalid = await client.post("/v1/embeddings", content=b"{")
            assert invalid.status_code == 400 and "connection" not in invalid.headers
            assert "connection" not in (await client.get("/v1/models")).headers


async def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_its_connection_closed() -> None:
    """Framed two ways (request smuggling: a proxy in front reads the body by one header, the
    gateway read it by the other), such a request was answered and its connection kept, so
    what the gateway took for a next request on it was answered too. RFC 9112 §6.1: close."""
    fake = OpenAIBackend(default=Script())
    chat = json.dumps(CHAT).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chat), chat)
    smuggled = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n"
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as url:
        for path, error in (
            ("/v1/chat/completions", b'"code":"ambiguous_request_length"'),  # the front door
            ("/v1/embeddings", b'"code":"ambiguous_request_length"'),  # Quart
            ("/v1/messages", b'"type":"invalid_request_error","message":"The request has both'),  # Anthropic's shape
        ):
            answer = await _exchange(
                url,
                b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n%s%s"
                % (path.encode(), chunked, smuggled),
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nconnection: close" in head.lower(), answer
            assert error in body and b"HTTP/1.1" not in body, answer  # one answer: nothing smuggled


async def test_a_refusal_that_closes_the_connection_is_whole_though_a_request_follows_it() -> None:
    """A refusal that closes the connection (a body left unread, one too large); with the
    client's next request already sent behind it (pipelined), h11 found "data when expecting
    EOF" and hypercorn closed the connection under the answer going out: the client got
    nothing, or a head without its body."""
    body = json.dumps({"model": "m", "input": "x" * 100}).encode()
    async with running_gateway(max_body_bytes=50) as url:
        for request, status in (
            (b"PUT /v1/chat/completions", b"405"),  # the front door leaves the body unread
            (b"POST /v1/chat/completions", b"413"),
            (b"POST /v1/embeddings", b"413"),  # Quart
        ):
            for _ in range(3):
                answer = await _exchange(
                    url, b"%s HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n%sGET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n"
                    % (request, len(body), body),
                )
                head, _, rest = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 %s " % status) and b"\r\nconnection: close" in head.lower(), answer
                assert json.loads(rest)["error"]["message"], answer


async def test_head_is_answered_wherever_get_is() -> None:
    """`curl -I`, uptime checks and caches ask HEAD: Quart's routes answered it as their GET,
    the front door's (stored chat completions, responses, streams) with a 405."""
    async with running_gateway() as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for path in ("/v1/chat/completions", "/v1/chat/completions/chatcmpl-1", "/v1/responses/resp_1", "/v1/models"):
            got, head = await client.get(path), await client.head(path)
            assert head.status_code == got.status_code != 405, (path, head.status_code, got.text)
            assert head.content == b"" and head.headers["content-length"] == got.headers["content-length"], path
            assert head.headers["content-type"] == got.headers["content-type"], path
        wrong = await client.put("/v1/chat/completions/chatcmpl-1")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, GET, HEAD, POST"


async def test_expect_100_continue_is_answered_once_the_request_has_passed_its_guard() -> None:
    """curl sends `Expect: 100-continue` with a body past 1 MB and waits for `100 Continue`
    before sending it. hypercorn sent it as it read the head, so a request refused anyway
    (its declared length too large, a foreign Host, a key missing) had its whole upload sent
    for nothing. A request that passes gets it, and its answer."""
    fake = OpenAIBackend(default=Script())
    chat = json.dumps(CHAT).encode()
    embed = json.dumps({"model": "all-minilm-l6-v2", "input": "hi"}).encode()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True), max_body_bytes=10_000) as url:
        host, port = url.removeprefix("http://").split(":")
        for head, status in (
            (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 20000\r\n", b"413"),
            (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw.example.com\r\ncontent-length: 2\r\n", b"403"),
            (b"POST /v1/embeddings HTTP/1.1\r\nhost: gw.example.com\r\ncontent-length: 2\r\n", b"403"),  # Quart
        ):
            answer = await _exchange(url, head + b"expect: 100-continue\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 %s " % status), answer
            assert b"\r\nconnection: close" in answer.partition(b"\r\n\r\n")[0].lower(), answer
        for path, body in ((b"/v1/chat/completions", chat), (b"/v1/embeddings", embed)):
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(
                    b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\nexpect: 100-continue\r\n\r\n" % (path, len(body))
                )
                with trio.fail_after(10):
                    interim = await stream.receive_some(65536)
                    assert interim.startswith(b"HTTP/1.1 100 "), interim
                    await stream.send_all(body)
                    answer = await stream.receive_some(65536)
                assert answer.startswith(b"HTTP/1.1 200 "), answer


async def test_bytes_that_are_not_an_http_request_get_an_error_that_says_why() -> None:
    """hypercorn's 400 and 501 for what h11 cannot read had an empty body: "400" and nothing
    to go on. Now an error in OpenAI's shape (the path, and so the dialect, may be unread)."""
    async with running_gateway() as url:
        for request, status, says in (
            (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", 400, "Content-Length"),
            (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "Host"),
            (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "Transfer-Encoding"),
        ):
            head, _, body = (await _exchange(url, request)).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status) and b"content-type: application/json" in head.lower(), head
            error = json.loads(body)["error"]
            assert error["code"] == "malformed_http_request" and says in error["message"], error
