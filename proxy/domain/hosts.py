"""Which `Host` names the gateway answers while it asks no API key (DNS rebinding).

A page on `http://evil.example:8080` whose name is re-pointed to 127.0.0.1 reads the gateway
as its own origin: same-origin requests carry no `Origin` to refuse, only the attacker's name
in `Host`. A Host that DNS on the public internet cannot produce is always answered: an IP
address (a page can only be served from that address itself), `localhost` and `*.localhost`
(browsers resolve them to loopback themselves), a name without a dot (a container's, a
machine's: resolved locally, from search domains or /etc/hosts), and the bind address's name.
Any other name needs `allowed_hosts` (`*.corp.example` for its subdomains, `*` for any).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def host_name(host: str) -> str:
    """The name or address of a `Host` header value, without its port, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


class HostPolicy:
    """`allowed_hosts` (validated by `proxy.config.allowed_hosts`) and the bind address."""

    __slots__ = ("_any", "_exact", "_suffixes")

    def __init__(self, allowed: Iterable[str], bind_host: str) -> None:
        entries = tuple(entry.lower() for entry in allowed)
        self._any = "*" in entries
        self._exact = frozenset({bind_host.lower().rstrip("."), *(e.rstrip(".") for e in entries if not e.startswith("*."))})
        self._suffixes = tuple(e[1:].rstrip(".") for e in entries if e.startswith("*."))

    def allows(self, host: str | None) -> bool:
        if self._any or not host:  # no Host at all: HTTP/1.0 tools, never a browser
            return True
        name = host_name(host)
        qualified = name.endswith(".")  # `intranet.`: looked up as is, in public DNS too
        name = name.rstrip(".")
        if name in self._exact or name == "localhost" or name.endswith(".localhost"):
            return True
        if "." not in name and not qualified and name:
            return True
        if any(name.endswith(suffix) for suffix in self._suffixes):
            return True
        try:
            ipaddress.ip_address(name.partition("%")[0])  # fe80::1%eth0: a zone id
        except ValueError:
            return False
        return True
