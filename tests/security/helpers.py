"""What the adversarial tests share: the server's names and secrets, the profiles' expert sets,
request bodies, the checks every refusal must pass, a raw HTTP/1.1 client and the
"still serving" check that ends every attack.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.server.routing_checks import follows  # noqa: F401  (re-exported for the tests)

API_KEY = "sec-client-key-4d1f"
ADMIN_TOKEN = "sec-admin-token-9b2e"
BASE = "tiny-base"  # --served-model-name of the unlocked model (no path in any answer)
LOCKED = "tiny-safe"  # --endpoint tiny-safe=safety
STEERING_HEADER = "x-steermoe-steering"
MAX_BODY = 64 * 1024
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
# The other steerable APIs (issue 15): the same rules, each with its own error shape.
OTHER_STEERABLE_PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch",
                         "/invocations")
STEERABLE_PATHS = (*COMPLETION_PATHS, *OTHER_STEERABLE_PATHS)
# Errors in Anthropic's shape: {"type": "error", "error": {"type", "message"}}.
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")

LAYERS = range(4)  # the tiny Mixtral: 4 MoE layers, 8 experts, top-2
SAFETY = ({layer: [5] for layer in LAYERS}, {layer: [0, 1] for layer in LAYERS})
CONCISE = ({layer: [2] for layer in LAYERS}, {layer: [6, 7] for layer in LAYERS})
UNSAFE = ({layer: [3] for layer in LAYERS}, {})
PROFILE_SETS = {"safety": SAFETY, "concise": CONCISE, "unsafe": UNSAFE}

PROMPT = "Water boils at 100 degrees Celsius at sea level and freezes at"

# docs/security.md: "error messages are at most 1,000 characters" (plus a "..." mark).
MAX_MESSAGE = 1003

# Never in an answer: a Python traceback or a filesystem path of the server's machine.
LEAK_MARKERS = ("Traceback", 'File "', "site-packages", "/root", "/tmp/")


# ---- request bodies ------------------------------------------------------------------------


def auth(key: str | None = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def admin(token: str | None = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def chat_body(model: str = BASE, content: str = PROMPT, max_tokens: int = 2,
              **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def completion_body(model: str = BASE, prompt: str = PROMPT, max_tokens: int = 2,
                    **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            **extra}


def body_for(path: str, model: str = BASE, **extra: Any) -> dict[str, Any]:
    """A valid body for one of the steerable APIs (one sequence, so routing can be captured)."""
    if path in ("/v1/chat/completions", "/invocations"):
        return chat_body(model, **extra)
    if path == "/v1/responses":
        return {"model": model, "input": PROMPT, "max_output_tokens": 2, "temperature": 0,
                **extra}
    if path == "/v1/messages":
        return {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 2, **extra}
    if path == "/v1/chat/completions/batch":
        return {"model": model, "messages": [[{"role": "user", "content": PROMPT}]],
                "max_tokens": 2, "temperature": 0, **extra}
    return completion_body(model, **extra)


def profile_document(model: dict[str, Any], name: str, activate: dict[int, list[int]],
                     deactivate: dict[int, list[int]] | None = None, **extra: Any
                     ) -> dict[str, Any]:
    return {"format": "steermoe-profile/1", "name": name, "model": model,
            "activate": {str(k): v for k, v in activate.items()},
            "deactivate": {str(k): v for k, v in (deactivate or {}).items()}, **extra}


# ---- checks --------------------------------------------------------------------------------


def assert_clean(text: str | bytes, *also: str) -> None:
    """No traceback and no filesystem path (nor any of `also`) in an answer."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for marker in (*LEAK_MARKERS, *also):
        if marker and marker in text:
            at = text.index(marker)
            around = text[max(0, at - 80):at + 120]
            raise AssertionError(f"the answer leaks {marker!r}: ...{around!r}")


def _check_error_payload(status: int, payload: Any, text: str) -> dict[str, Any]:
    assert isinstance(payload, dict) and set(payload) == {"error"}, \
        f"not the OpenAI error shape: {text[:400]!r}"
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, \
        f"not the OpenAI error shape: {text[:400]!r}"
    assert isinstance(error["message"], str) and error["message"], error
    assert len(error["message"]) <= MAX_MESSAGE, (
        f"an error message of {len(error['message'])} characters (docs/security.md: at most "
        f"1,000): {error['message'][:120]!r}..."
    )
    assert isinstance(error["type"], str) and error["type"], error
    assert type(error["code"]) is int and error["code"] == status, \
        f"error.code {error['code']!r} is not the HTTP status {status}"
    return error


def assert_openai_error(response: httpx.Response, status: int | Collection[int],
                        *also: str) -> dict[str, Any]:
    """`response` has one of `status` and an OpenAI-shaped, leak-free error body."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert response.status_code in statuses, (
        f"expected HTTP {' or '.join(map(str, statuses))}, got {response.status_code}: "
        f"{response.text[:500]!r}"
    )
    try:
        payload = response.json()
    except ValueError:
        raise AssertionError(f"HTTP {response.status_code} answer is not JSON: "
                             f"{response.text[:300]!r}") from None
    error = _check_error_payload(response.status_code, payload, response.text)
    assert_clean(response.text, *also)
    return error


def assert_anthropic_error(response: httpx.Response, status: int | Collection[int],
                           *also: str) -> dict[str, Any]:
    """`response` has one of `status` and an Anthropic-shaped, leak-free error body."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert response.status_code in statuses, (
        f"expected HTTP {' or '.join(map(str, statuses))}, got {response.status_code}: "
        f"{response.text[:500]!r}"
    )
    payload = response.json()
    assert isinstance(payload, dict) and set(payload) == {"type", "error"} \
        and payload["type"] == "error", f"not the Anthropic error shape: {response.text[:400]!r}"
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == {"type", "message"}, error
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= MAX_MESSAGE
    assert isinstance(error["type"], str) and error["type"], error
    assert_clean(response.text, *also)
    return error


def assert_api_error(path: str, response: httpx.Response, status: int | Collection[int],
                     *also: str) -> dict[str, Any]:
    """The error shape of the API at `path`: Anthropic's on /v1/messages, OpenAI's elsewhere."""
    if path in ANTHROPIC_PATHS:
        return assert_anthropic_error(response, status, *also)
    return assert_openai_error(response, status, *also)


def steering_of(response: httpx.Response) -> str | None:
    return response.headers.get(STEERING_HEADER)


def assert_header_names(response: httpx.Response, profile: str | None,
                        endpoint: str | None = None) -> None:
    """The steering header says `profile` (and `endpoint`, if given); None: `none`."""
    header = steering_of(response)
    if profile is None:
        assert header == "none", f"expected an unsteered answer, the header says {header!r}"
        return
    assert header is not None, "no x-steermoe-steering header"
    parts = header.split("; ")
    assert parts[0] == f"profile={profile}", \
        f"header {header!r} does not name profile {profile!r}"
    if endpoint is not None:
        assert f"endpoint={endpoint}" in parts, \
            f"header {header!r} does not name endpoint {endpoint!r}"


def assert_never_unsafe(payload: Any) -> None:
    """A 200 answer: if it carries routing, the `unsafe` profile was not applied."""
    routing = payload.get("routing") if isinstance(payload, dict) else None
    if routing is not None:
        assert not follows(routing, *UNSAFE), \
            "SECURITY: the `unsafe` profile (lowers-safety) was applied to a client request"


def assert_unsteered_routing(routing: dict[str, Any]) -> None:
    for name, sets in PROFILE_SETS.items():
        assert not follows(routing, *sets), f"an unsteered answer's routing follows {name!r}"


def prompt_rows_from_cache(routing: dict[str, Any]) -> int:
    """How many rows of a captured routing are prefix-cache hits (all -1)."""
    return sum(1 for row in routing["expert_ids"] if any(e < 0 for layer in row for e in layer))


def sse_chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a server-sent-events answer (without `[DONE]`)."""
    chunks = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data and data != "[DONE]":
                chunks.append(json.loads(data))
    return chunks


def wait_healthy(http: httpx.Client, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    last: object = None
    while True:
        try:
            response = http.get("/health", timeout=5)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"/health did not answer 200 within {within_s:.0f} s: {last!r}")
        time.sleep(0.5)


def assert_still_serving(http: httpx.Client) -> None:
    """After an attack: /health is 200 and a benign unsteered completion works."""
    wait_healthy(http)
    response = http.post("/v1/chat/completions", json=chat_body(max_tokens=1), headers=auth())
    assert response.status_code == 200, \
        f"a benign request fails after the attack: {response.status_code} {response.text[:300]!r}"
    assert steering_of(response) == "none"
    assert response.json()["choices"][0]["message"] is not None


# ---- raw HTTP/1.1 --------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(base_url: str, method: bytes, target: bytes,
                headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b"",
                content_length: bool = True, timeout: float = 60.0) -> RawResponse:
    """One request written byte by byte (no normalisation) on a fresh connection."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_length and body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return raw_exchange(base_url, b"\r\n".join(lines) + b"\r\n\r\n" + body, timeout)


def raw_exchange(base_url: str, data: bytes, timeout: float = 60.0) -> RawResponse:
    parts = urlsplit(base_url)
    received = []
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received.append(chunk)
        except TimeoutError:
            raise AssertionError(f"no complete answer within {timeout} s") from None
        except ConnectionResetError:
            pass
    raw = b"".join(received)
    assert raw, "the server closed the connection without answering"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return b"".join(out)


def assert_raw_openai_error(response: RawResponse, status: int | Collection[int],
                            *also: str) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert response.status in statuses, (
        f"expected HTTP {' or '.join(map(str, statuses))}, got {response.status}: "
        f"{response.text[:500]!r}"
    )
    try:
        payload = response.json()
    except ValueError:
        raise AssertionError(f"HTTP {response.status} answer is not JSON: "
                             f"{response.text[:300]!r}") from None
    error = _check_error_payload(response.status, payload, response.text)
    assert_clean(response.body, *also)
    return error
