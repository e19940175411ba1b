"""Small ASGI helpers: bounded body reading, replaying a body, headers, JSON answers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


class ClientDisconnected(Exception):
    """The client went away while its body was being read."""


def header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased header names to values (latin-1, as ASGI sends them)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}


# Headers that decide how a request is read or who sends it: a second copy is refused, since
# the steering layer and vLLM could each read a different one.
SINGLE_HEADERS = (b"content-type", b"authorization", b"content-length", b"transfer-encoding")


def duplicated_header(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first of SINGLE_HEADERS that appears more than once, or None."""
    seen: set[bytes] = set()
    for name, _ in headers:
        key = name.lower()
        if key in SINGLE_HEADERS:
            if key in seen:
                return key.decode("latin-1")
            seen.add(key)
    return None


def route_path(scope: Scope) -> str:
    """The request path without the app's root path or a trailing slash."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(receive: Receive, limit: int, declared: str | None = None) -> bytes:
    """The whole request body; BodyTooLarge beyond `limit` bytes."""
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then hands on to the client's (for disconnects)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def with_body_headers(scope: Scope, body_length: int,
                      extra: dict[bytes, bytes] | None = None) -> Scope:
    """A copy of `scope` whose headers announce a body of `body_length` bytes (plus `extra`)."""
    extra = extra or {}
    drop = {b"content-length", b"transfer-encoding", *extra}
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in drop]
    headers.append((b"content-length", str(body_length).encode()))
    headers.extend(extra.items())
    return {**scope, "headers": headers}


RawHeaders = list[tuple[bytes, bytes]]


def set_header(headers: RawHeaders, name: str, value: str) -> RawHeaders:
    key = name.lower().encode("latin-1")
    kept = [(k, v) for k, v in headers if k.lower() != key]
    kept.append((key, value.encode("latin-1", "replace")))
    return kept


def dump_json(payload: Any) -> bytes:
    """JSON as vLLM's responses write it."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_json(send: Send, status: int, payload: Any,
                    headers: dict[str, str] | None = None) -> None:
    body = dump_json(payload)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for name, value in (headers or {}).items():
        raw = set_header(raw, name, value)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
