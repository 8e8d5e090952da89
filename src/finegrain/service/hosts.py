"""Host header check: the service answers only requests addressed to a name it is served under.

A key-less server on loopback is reachable from any web page the user opens
through DNS rebinding: the attacker's name first resolves to the attacker,
then to 127.0.0.1, and the browser sends ``Host: attacker.example`` to the
local server. Refusing Host values outside an allow-list (loopback names and
addresses by default) closes that hole; uvicorn does not check Host itself.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

__all__ = ["HostCheck", "host_allowed", "parse_host"]

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def parse_host(value: str) -> str:
    """The host part of a Host header value (port, IPv6 brackets and a trailing dot removed), lower case."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether requests with this Host (already parsed) are answered: loopback, listed, or ``*`` listed."""
    return "*" in allowed or _is_loopback(host) or host in allowed


class HostCheck:
    """ASGI middleware: answer ``421 {"error": "bad_host"}`` to requests whose Host is not allowed."""

    def __init__(self, app, allowed_hosts: Iterable[str] = ()):
        self.app = app
        self.allowed = frozenset(parse_host(h) if h != "*" else h for h in allowed_hosts if h.strip())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        if raw is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding vector
            return await self.app(scope, receive, send)
        host = parse_host(raw.decode("latin-1"))
        if host_allowed(host, self.allowed):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "bad_host", "message": (
            f"this server does not answer requests addressed to {host[:100]!r}; use a loopback address, or start "
            "it with --allowed-host NAME for each name it is reached under")}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
