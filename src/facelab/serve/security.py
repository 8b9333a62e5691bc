"""API keys, wrong-key throttling, same-origin checks, the request-size limit and the
header-read timeout.

Keys come from the environment variable `FACELAB_API_KEYS` or a key file, one `ROLE:KEY` per
entry (comma-separated in the variable, one a line in the file); `#` at the start of an entry
or after a blank starts a comment, so a key may contain `#` (but no blank). ROLE is `ro`
(embed, verify, identify, list identities) or `rw` (also enroll and delete). Clients send the
key as `X-API-Key: KEY` or `Authorization: Bearer KEY`; keys are compared in constant time,
and a client sending wrong keys too often is refused for a while (`FailureLimiter`).

Browsers send cookies-free form posts across sites without asking (no CORS preflight), and a
DNS-rebinding page talks to 127.0.0.1 under its own host name: `SameOrigin` refuses requests
whose `Host` is not one the server answers to, and state-changing requests that a page of
another origin made (`Origin`, `Referer`, `Sec-Fetch-Site`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ENV_VAR = "FACELAB_API_KEYS"
ROLES = ("ro", "rw")
MIN_KEY_LENGTH = 16


class KeyConfigError(ValueError):
    """The key configuration cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ApiKeys:
    """role of each key; empty means no key is configured."""

    roles: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, entries: list[str], source: str) -> ApiKeys:
        roles = []
        for n, entry in enumerate(entries, start=1):
            entry = re.split(r"(?:^|\s)#", entry, maxsplit=1)[0].strip()
            if not entry:
                continue
            role, sep, key = entry.partition(":")
            if not sep or role.strip() not in ROLES:
                raise KeyConfigError(
                    f"{source}: entry {n} is not ROLE:KEY with ROLE one of {ROLES}"
                )
            key = key.strip()
            if any(c.isspace() for c in key):
                raise KeyConfigError(
                    f"{source}: entry {n}: a key cannot contain blanks (a comment starts "
                    "with a blank and #)"
                )
            if len(key) < MIN_KEY_LENGTH:
                raise KeyConfigError(
                    f"{source}: entry {n}: keys must be at least {MIN_KEY_LENGTH} characters "
                    f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            roles.append((key, role.strip()))
        return cls(tuple(roles))

    @classmethod
    def load(cls, keys_file: str | Path | None = None) -> ApiKeys:
        """Keys from `keys_file` if given, else from the environment variable (maybe none)."""
        if keys_file is not None:
            path = Path(keys_file)
            try:
                mode = path.stat().st_mode
                text = path.read_text()
            except OSError as exc:
                raise KeyConfigError(f"{path}: cannot read the key file ({exc.strerror})") from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("%s: key file is readable by others; chmod 600 it", path)
            return cls.parse(text.splitlines(), str(path))
        return cls.parse(os.environ.get(ENV_VAR, "").split(","), ENV_VAR)

    def role(self, key: str | None) -> str | None:
        """The role of `key`, or None when it is not a configured key."""
        found = None
        for known, role in self.roles:  # no early exit: the time taken does not reveal which
            if key is not None and hmac.compare_digest(known.encode(), key.encode()):
                found = role
        return found


@dataclass
class FailureLimiter:
    """Wrong keys per client address: after `limit` failures within `window` seconds the
    client is refused (429) until the oldest of them is `window` seconds old. Thread-safe."""

    limit: int = 10
    window: float = 60.0
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < self.window]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            return recent[0] + self.window - now if len(recent) >= self.limit else 0.0

    def fail(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # many addresses: forget the idle ones
                self._failures.clear()
            self._failures.setdefault(client, []).append(time.monotonic())


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def host_name(netloc: str) -> str:
    """`host` of `host:port` (IPv6 in brackets kept), lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[: netloc.find("]") + 1]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def cross_site_reason(method: str, headers: dict[str, str]) -> str | None:
    """Why a request was made by a page of another origin (None when it was not): only
    state-changing methods are checked, and only browsers send these headers, so command-line
    clients pass."""
    if method not in UNSAFE_METHODS:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site}"
    own = headers.get("host", "").strip().lower()
    origin = headers.get("origin")
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc.lower() != own:
            return f"Origin {origin}"
        return None
    referer = headers.get("referer")
    if referer is not None and urlsplit(referer).netloc.lower() != own:
        return f"Referer {urlsplit(referer).netloc}"
    return None


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a request announcing a body over `max_bytes` (Content-Length) gets 413
    before any of it is read; a streamed body is counted where it is read
    (`inputs.read_body`)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
            length = headers.get("content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                detail = f"request body over {self.max_bytes} bytes"
                await send_json(send, 413, "payload_too_large", detail)
                return
        await self.app(scope, receive, send)


class SameOrigin:
    """ASGI middleware: 421 for a `Host` outside `hosts` (when given: loopback names plus the
    configured ones; DNS rebinding), 403 for a state-changing request from another origin."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], hosts: tuple[str, ...]
    ) -> None:
        self.app = app
        self.hosts = {host_name(h) for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            host = host_name(headers.get("host", ""))
            if self.hosts and host not in self.hosts:
                detail = f"this server does not answer to host {host!r}"
                await send_json(send, 421, "wrong_host", detail)
                return
            reason = cross_site_reason(scope["method"], headers)
            if reason is not None:
                detail = f"cross-origin request refused ({reason})"
                await send_json(send, 403, "cross_origin", detail)
                return
        await self.app(scope, receive, send)


async def send_json(send: Send, status: int, error: str, detail: str) -> None:
    """A whole JSON error response, from middleware (before any route ran)."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send a request's headers within
    `header_timeout` seconds of connecting or of the previous response (uvicorn waits forever:
    a few hundred silent connections would hold the server)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _expire(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no request in time")
            self.transport.close()

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
