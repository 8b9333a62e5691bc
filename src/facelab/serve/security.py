"""API keys and the request-size limit.

Keys come from the environment variable `FACELAB_API_KEYS` or a key file, one `ROLE:KEY` per
entry (comma-separated in the variable, one a line in the file, `#` starts a comment). ROLE is
`ro` (embed, verify, identify, list identities) or `rw` (also enroll and delete). Clients send
the key as `X-API-Key: KEY` or `Authorization: Bearer KEY`; keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            entry = entry.split("#", 1)[0].strip()
            if not entry:
                continue
            role, sep, key = entry.partition(":")
            if not sep or role.strip() not in ROLES:
                raise KeyConfigError(
                    f"{source}: entry {n} is not ROLE:KEY with ROLE one of {ROLES}"
                )
            key = key.strip()
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
                await self._refuse(send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"error": "payload_too_large", "detail": f"request body over {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
