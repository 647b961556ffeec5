"""`refuse_private_media_urls`: media URLs a backend would fetch itself.

vLLM downloads a chat's `image_url` (and `video_url`, `audio_url`) from inside the network it
runs in (for a chat, a token count, a multimodal embedding or rerank; and as an Anthropic
`kind` backend, its `/v1/messages` image's `source.url`): a client's `http://169.254.169.254/...` or `http://10.0.0.5:9200/...` is a request
from the GPU host to a place the client cannot reach. With the setting on, a URL whose host is
an address that is not global (private, loopback, link-local, shared, reserved), or a name
resolving to one, is a 400 before the backend is called. The name is resolved here, not
where the backend resolves it, and may resolve elsewhere a moment later: vLLM's own
`--allowed-media-domains` is the stronger fix.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import idna
import trio
from trio.lowlevel import RunVar

from proxy.domain.chat import ChatRequest, ImagePart, OpaquePart
from proxy.domain.errors import ErrorKind, GatewayError

_RESOLVE_SECONDS = 5.0
_MEDIA_PARTS = ("image_url", "video_url", "audio_url")  # the keys of vLLM's URL parts
_SCHEMES = ("http", "https")


def _media_urls(request: ChatRequest, backend: str) -> Iterator[tuple[str, str]]:
    """(field, URL) of each media URL in `request` that a `backend` ("openai", "anthropic")
    kind of backend is sent, `data:` URLs left out (nothing to fetch). The field is named where
    the client put it, in its dialect (a part made by the gateway, or read back from the
    journal, by its place in the chat). A part of another dialect is not sent to the backend."""
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                if part.url[:5].lower() != "data:":
                    yield part.at or f"messages[{i}].content[{j}].image_url.url", part.url
            elif not isinstance(part, OpaquePart) or part.dialect != backend:
                continue
            elif backend == "openai":
                yield from _part_url(part.data, part.at or f"messages[{i}].content[{j}]")
            elif backend == "anthropic":
                yield from _source_url(part.data, part.at or f"messages[{i}].content[{j}]")
        # A client's parts with fields the domain does not keep go to a backend of its
        # dialect as sent.
        sent = message.extra.get("content") if request.dialect == backend else None
        if isinstance(sent, list):
            urls = _part_url if backend == "openai" else _source_url
            for j, raw in enumerate(sent):
                if isinstance(raw, dict):
                    yield from urls(raw, f"messages[{i}].content[{j}]")


def _source_url(block: dict[str, Any], at: str) -> Iterator[tuple[str, str]]:
    """(field, URL) of each Anthropic block given by URL (an image, a `document`'s PDF:
    `{"source": {"type": "url", "url": …}}`) in `block`, itself or nested in it (a `document`
    whose source is `content` holds blocks of its own)."""
    for item, where in _dicts(block, at):
        source = item.get("source")
        url = source.get("url") if isinstance(source, dict) and source.get("type") == "url" else None
        if isinstance(url, str) and url[:5].lower() != "data:":
            yield f"{where}.source.url", url


def _part_url(part: dict[str, Any], at: str) -> Iterator[tuple[str, str]]:
    """(field, URL) of each media URL of a part at `at` (`{"type": "video_url", "video_url":
    {"url": …}}`, the URL alone also taken), unless inline. Read by key, whatever the part's
    `type`: vLLM reads a part with no `type` or with a `uuid` (even a `text` one) by which of
    these keys it has, and a chat's `input_image` by its `image_url`."""
    for kind in _MEDIA_PARTS:
        if kind in part:
            inner = part[kind]
            url = inner.get("url") if isinstance(inner, dict) else inner
            if isinstance(url, str) and url[:5].lower() != "data:":
                yield (f"{at}.{kind}.url" if isinstance(inner, dict) else f"{at}.{kind}"), url


def _parts_urls(value: Any, at: str) -> Iterator[tuple[str, str]]:
    """(field, URL) of every media part anywhere in `value` (JSON a client sent)."""
    for item, where in _dicts(value, at):
        yield from _part_url(item, where)


def _dicts(value: Any, at: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Every object in `value` (JSON a client sent) with its path, walked without recursion:
    a client's nesting is as deep as it likes."""
    stack: list[tuple[Any, str]] = [(value, at)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            yield item, where
            stack.extend((inner, f"{where}.{key}") for key, inner in reversed(item.items()) if isinstance(inner, (dict, list)))
        elif isinstance(item, list):
            stack.extend((inner, f"{where}[{k}]") for k, inner in reversed(list(enumerate(item))) if isinstance(inner, (dict, list)))


def _refusal(field: str, why: str) -> GatewayError:
    return GatewayError(
        ErrorKind.INVALID_REQUEST,
        f"`{field}` {why}: this gateway refuses media URLs its backend would fetch from inside its own "
        "network (`refuse_private_media_urls`). Send the media inline as a base64 `data:` URL.",
        param=field,
        code="media_url_not_allowed",
    )


# IPv6 ranges whose last 32 bits are an IPv4 address a packet may end up at: NAT64's
# well-known prefix (an IPv6-only cluster's gateway translates it, private destinations too),
# IPv4-compatible and IPv4-translated addresses.
_CARRY_IPV4 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# NAT64 for local use only: its addresses lead inside, whatever they carry.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _global(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        carried = ip.ipv4_mapped or ip.sixtofour
        if carried is None and any(ip in network for network in _CARRY_IPV4):
            carried = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if carried is not None:
            ip = carried
    return ip.is_global and not ip.is_multicast


# A client's names are looked up in threads of their own: a name whose DNS never answers
# holds its thread long after its check has given up on it, and must not hold those the rest
# of the gateway shares (its backends' names, its spools, its large writes).
_RESOLVER_THREADS = 8
_RESOLVERS: RunVar[trio.CapacityLimiter] = RunVar("media_url_resolvers")


async def _resolve(host: str) -> list[Any]:
    """`getaddrinfo` for `host` (a name) in one of the media checks' own threads."""
    try:
        limiter = _RESOLVERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(_RESOLVER_THREADS)
        _RESOLVERS.set(limiter)
    # What an HTTP client connects to (trio's, aiohttp's through yarl): IDNA 2008, where the
    # stdlib's IDNA 2003 can name another host (`faß.de`).
    name = host.encode("ascii") if host.isascii() else idna.encode(host, uts46=True)
    return await trio.to_thread.run_sync(
        partial(socket.getaddrinfo, name, None, type=socket.SOCK_STREAM), abandon_on_cancel=True, limiter=limiter,
    )


async def check_media_urls(request: ChatRequest, backend: str = "openai") -> None:
    """GatewayError 400 naming the first media URL of `request` sent to a `backend` kind of
    backend that points inside the network."""
    checked: set[str] = set()
    for field, url in _media_urls(request, backend):
        if url not in checked:  # a part sent as is is also the domain's part: resolved once
            checked.add(url)
            await _check(field, url)


async def check_relayed_media_urls(data: dict[str, Any], fields: Iterable[str]) -> None:
    """The same for a call relayed as sent (rerank, an embedding's fields besides `input`): the
    media parts anywhere in its `fields` (vLLM's multimodal rerank takes `query` and `documents`
    as parts, or `{"content": [parts]}`; its multimodal embeddings, chat `messages`)."""
    for name in fields:
        if isinstance(data.get(name), (dict, list)):
            for field, url in _parts_urls(data[name], name):
                await _check(field, url)


async def _check(field: str, url: str) -> None:
    """GatewayError 400 naming `field` if `url` points inside the network."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        raise _refusal(field, "is not a valid URL") from None
    if parts.scheme.lower() not in _SCHEMES or not host:
        raise _refusal(field, "is not an http(s) or data: URL")
    if "\\" in parts.netloc:  # parsers disagree about where such a host ends
        raise _refusal(field, "is not a valid URL")
    try:
        addresses = [_global(host)]
    except ValueError:  # a name (or an address in a form only the resolver reads: 2130706433)
        addresses = []
        with trio.move_on_after(_RESOLVE_SECONDS):
            try:
                found = await _resolve(host)
            except (OSError, UnicodeError):  # an IDNA error is a UnicodeError
                found = []
            addresses = [_global(str(info[4][0])) for info in found]
        if not addresses:
            raise _refusal(field, f"names host `{host}`, which cannot be resolved") from None
    if not all(addresses):
        raise _refusal(field, f"points at a private, loopback or link-local address (host `{host}`)")
