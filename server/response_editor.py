"""Wrapping an ASGI `send`: a steering header on every response, edits to JSON bodies, usage.

A 200 JSON response is held until complete, handed to an async edit function and sent with a
new Content-Length. Other responses (streams, errors) pass through as they come, with the
header added; server-sent events are read on the way for the response id and `usage`.
The response id and usage are read at the top level or, as the Responses API and the
Anthropic Messages API nest them, inside `response` or `message`; usage counts either
`prompt_tokens`/`completion_tokens` or `input_tokens`/`output_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from server.asgi_io import Message, Send, dump_json, header_map, set_header
from server.errors import clip

# The longest error message a client gets (client input in it is clipped where inserted).
MAX_ERROR_MESSAGE = 1000

JsonEdit = Callable[[Any], Awaitable[Any]]


def bounded_error(data: Any) -> Any:
    """An error answer whose `error.message` is clipped (vLLM's own messages echo client input,
    a 60 kB model name for one); `data` itself when nothing needs clipping."""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or clip(message, MAX_ERROR_MESSAGE) == message:
        return data
    return {**data, "error": {**error, "message": clip(message, MAX_ERROR_MESSAGE)}}


def _model_field(name: str) -> bytes:
    """`"model":"NAME"` as vLLM's pydantic JSON writes it (no spaces, JSON escapes)."""
    return b'"model":' + json.dumps(name, ensure_ascii=False).encode("utf-8")


class ResponseEditor:
    """A `send` for the wrapped app; records status, response id and usage."""

    def __init__(self, send: Send, header: tuple[str, str] | None, edit_json: JsonEdit | None,
                 rename_model: tuple[str, str] | None = None,
                 on_status: Callable[[int], None] | None = None):
        self._send = send
        # Called with the status as soon as the wrapped app starts its answer.
        self._on_status = on_status
        self._header = header
        self._edit_json = edit_json
        # (name vLLM answers with, name to show): streamed events get `model` renamed.
        self._rename = None if rename_model is None else (
            _model_field(rename_model[0]), _model_field(rename_model[1]))
        self._out_tail = b""
        self._start: Message | None = None
        self._held: list[bytes] | None = None
        self._sse_tail = b""
        self.status: int | None = None
        self.response_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.streamed = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._on_start(message)
        elif message["type"] == "http.response.body" and self._held is not None:
            self._held.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_edited()
        else:
            if message["type"] == "http.response.body" and self.streamed:
                self._read_events(message.get("body", b""))
                if self._rename is not None:
                    message = self._renamed(message)
            await self._send(message)

    def _renamed(self, message: Message) -> Message:
        """The event-stream chunk with `"model":"<vLLM's name>"` replaced in complete lines; an
        incomplete last line is held until its end arrives (or the stream ends)."""
        assert self._rename is not None
        data = self._out_tail + message.get("body", b"")
        more = message.get("more_body", False)
        cut = data.rfind(b"\n") + 1 if more else len(data)
        ready, self._out_tail = data[:cut], data[cut:]
        old, new = self._rename
        return {**message, "body": ready.replace(old, new)}

    async def _on_start(self, message: Message) -> None:
        self.status = int(message["status"])
        if self._on_status is not None:
            self._on_status(self.status)
        headers = list(message.get("headers", []))
        if self._header is not None:
            headers = set_header(headers, *self._header)
        message = {**message, "headers": headers}
        content_type = header_map(headers).get("content-type", "")
        self.streamed = content_type.startswith("text/event-stream")
        is_json = content_type.startswith("application/json")
        if is_json and (self.status >= 400 or (self.status == 200 and self._edit_json)):
            self._start = message
            self._held = []
            return
        await self._send(message)

    async def _send_edited(self) -> None:
        assert self._start is not None and self._held is not None
        raw = b"".join(self._held)
        self._held = None
        body = raw
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if data is not None and self.status is not None and self.status >= 400:
            body = dump_json(bounded_error(data)) if bounded_error(data) is not data else raw
        elif data is not None:
            self._note(data)
            assert self._edit_json is not None
            body = dump_json(await self._edit_json(data))
        headers = set_header(list(self._start["headers"]), "content-length", str(len(body)))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _note(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        for holder in (data, data.get("response"), data.get("message")):
            if not isinstance(holder, dict):
                continue
            if self.response_id is None and isinstance(holder.get("id"), str):
                self.response_id = holder["id"]
            if isinstance(holder.get("usage"), dict):
                self.usage = holder["usage"]

    def _read_events(self, chunk: bytes) -> None:
        lines = (self._sse_tail + chunk).split(b"\n")
        self._sse_tail = lines.pop()
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            if self.response_id is None or b'"usage":{' in line or b'"usage": {' in line:
                try:
                    self._note(json.loads(line[6:]))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue

    def token_counts(self) -> tuple[int | None, int | None]:
        return token_counts(self.usage)


def token_counts(usage: Any) -> tuple[int | None, int | None]:
    """(prompt, generated) tokens of a `usage` block (OpenAI, Responses or Anthropic names)."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if type(prompt) is int else None,
            completion if type(completion) is int else None)
