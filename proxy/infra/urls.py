"""URLs as logs, metrics and status pages show them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def without_credentials(url: str) -> str:
    """`url` without the user name, password or token written into it
    (`nats://user:secret@host:4222`, `http://token@host/v1`): what may be shown of it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
