"""ASGI middlewares guarding the feature service, outermost first:

* `HostCheck`: 400 unless the ``Host`` header names this server (127.0.0.1:PORT, localhost:PORT, the
  bound address): a web page whose domain was rebound to 127.0.0.1 (DNS rebinding) cannot reach it.
* `TokenCheck`: 401 unless the request carries the token (``Authorization: Bearer TOKEN``, or
  ``?token=TOKEN`` for the browser page), compared in constant time; on when a token is set
  (``fdino serve`` requires one to bind a non-loopback address).
* `BodyLimit`: 413 for request bodies over the upload limit (declared or streamed).
* `Admission`: the bounded request queue (503 + ``Retry-After`` when ``max_queue`` uploads are
  already in progress) and the per-request timeout (408 while the body is still arriving, 504 after).

Every refusal is JSON ``{"error", "status"}`` like the service's other errors.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, "status": status, **extra}


async def send_json(send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = (), **extra) -> None:
    body = json.dumps(error_body(status, message, **extra)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: resolved by the OS, may be public
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> list[str] | None:
    """``Host`` header values accepted by a server bound to ``host:port``: the loopback names and the
    bound address with the port, plus ``extra`` names (with or without a port). None (any host) for a
    wildcard bind (0.0.0.0, ::) without ``extra``: its names are unknown, the token protects it."""
    extra = list(extra)
    if is_wildcard(host) and not extra:
        return None
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    names = [*LOOPBACK_NAMES, *([] if is_wildcard(host) else [bound])]
    return [f"{n}:{port}".lower() for n in names] + [e.lower() for e in extra]


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


class HostCheck:
    """400 for requests whose ``Host`` is not in ``allowed`` (``name:port`` exactly, or ``name`` on any port)."""

    def __init__(self, app, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {a.lower() for a in allowed}

    def ok(self, host: str) -> bool:
        if host in self.allowed:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan (the service has no websocket routes)
            await self.app(scope, receive, send)
            return
        host = (_header(scope, b"host") or b"").decode("latin-1").lower()
        if not self.ok(host):
            await send_json(
                send,
                400,
                f"invalid Host header {host!r}: this server answers only to {sorted(self.allowed)} "
                "(a guard against DNS rebinding; fdino serve --allow-host NAME adds a name)",
            )
            return
        await self.app(scope, receive, send)


class TokenCheck:
    """401 for requests without ``token`` (Bearer header or ``token`` query parameter)."""

    def __init__(self, app, token: str) -> None:
        if not token:
            raise ValueError("TokenCheck needs a non-empty token")
        self.app, self.token = app, token.encode()

    def given(self, scope) -> bytes:
        auth = _header(scope, b"authorization") or b""
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "token":
                return value.encode("latin-1", "replace")
        return b""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan (the service has no websocket routes)
            await self.app(scope, receive, send)
            return
        if not hmac.compare_digest(self.given(scope), self.token):
            await send_json(
                send,
                401,
                "missing or wrong token: send 'Authorization: Bearer TOKEN', or open /?token=TOKEN in the "
                "browser (the token fdino serve was started with)",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int, upload_limit: int | None = None) -> None:
        self.app, self.max_bytes = app, int(max_bytes)
        self.upload_limit = int(upload_limit if upload_limit is not None else max_bytes)

    async def _reply_413(self, send, size: str) -> None:
        message = (
            f"upload too large: a request body of {size}; uploads are limited to "
            f"{self.upload_limit} bytes ({self.upload_limit / 2**20:.1f} MiB)"
        )
        await send_json(send, 413, message, headers=[(b"connection", b"close")])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reply_413(send, f"{int(declared)} bytes")
            return
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:  # whatever the app answers after the overflow, the client gets the 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._reply_413(send, f"more than {state['received'] - 1} bytes")
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not state["started"]:
                await self._reply_413(send, f"more than {self.max_bytes} bytes")


class _TooLarge(Exception):
    """The request body passed the upload limit while streaming (answered with 413)."""


class Admission:
    """Bounded queue and timeout for the upload endpoints (``paths``, POST).

    At most ``max_queue`` such requests are in progress (reading the body, waiting to decode, waiting
    for a forward); the next one gets 503 with ``Retry-After: retry_after`` before its body is read.
    A request running longer than ``timeout`` seconds is cancelled: 408 if its body had not arrived
    yet (a slow client), 504 otherwise."""

    def __init__(self, app, *, paths: Iterable[str], max_queue: int, timeout: float, retry_after: int = 1) -> None:
        self.app, self.paths = app, frozenset(paths)
        self.max_queue, self.timeout, self.retry_after = int(max_queue), float(timeout), int(retry_after)
        self.active = 0
        """Upload requests in progress now (the event loop's thread only)."""
        self.refused = 0
        """Requests answered 503 because the queue was full."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_queue:
            self.refused += 1
            await send_json(
                send,
                503,
                f"server busy: {self.active} uploads are in progress, the most it queues (ServiceConfig.max_queue, "
                f"fdino serve --max-queue); retry after {self.retry_after} s",
                headers=[(b"retry-after", str(self.retry_after).encode())],
            )
            return
        state = {"started": False, "body_done": False}

        async def tracked_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        self.active += 1
        try:
            await asyncio.wait_for(self.app(scope, tracked_receive, tracked_send), self.timeout)
        except asyncio.TimeoutError:  # (TimeoutError from 3.11)
            if not state["started"]:
                status, what = (504, "processing") if state["body_done"] else (408, "receiving the upload")
                await send_json(
                    send,
                    status,
                    f"request timed out after {self.timeout:g} s while {what} (ServiceConfig.request_timeout, "
                    "fdino serve --request-timeout)",
                    headers=[(b"connection", b"close")],
                )
        finally:
            self.active -= 1


__all__ = [
    "Admission",
    "BodyLimit",
    "HostCheck",
    "LOOPBACK_NAMES",
    "TokenCheck",
    "allowed_hosts",
    "error_body",
    "is_loopback",
    "is_wildcard",
    "send_json",
]
