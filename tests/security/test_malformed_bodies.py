"""Contract 6 (bodies), no 500s: what Python's JSON parser chokes on is a 400 in the OpenAI
error shape, on the completion APIs and on the admin PUT; too large is 413; a 200 kB profile
name is refused with a short message.

A body nested 100000 deep is 200 kB, over this server's 64 KiB limit, so it is a 413; 30000
deep (60 kB) reaches the parser.
"""

from __future__ import annotations

import json

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

DEEP = 30_000
BIG_INT = "9" * 5000


def completion_prefix() -> bytes:
    return json.dumps(h.completion_body())[:-1].encode()


def chat_prefix() -> bytes:
    return json.dumps(h.chat_body())[:-1].encode()


def with_field(prefix: bytes, raw_value: bytes) -> bytes:
    return prefix + b', "x_field": ' + raw_value + b"}"


def with_steering(prefix: bytes, raw_value: bytes) -> bytes:
    return prefix + b', "steering_profile": ' + raw_value + b"}"


def with_xargs(prefix: bytes, raw_value: bytes) -> bytes:
    return prefix + b', "vllm_xargs": {"x_extra": ' + raw_value + b"}}"


def deep_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


BODIES = {
    "deep-list-body": lambda p: deep_list(DEEP),
    "deep-object-body": lambda p: deep_object(DEEP // 3),
    "deep-list-field": lambda p: with_field(p, deep_list(DEEP)),
    "deep-list-steering": lambda p: with_steering(p, deep_list(DEEP)),
    "deep-list-xargs": lambda p: with_xargs(p, deep_list(DEEP)),
    "big-int-max-tokens": lambda p: p.replace(b'"max_tokens": 2', b'"max_tokens": ' +
                                              BIG_INT.encode()) + b"}",
    "big-int-field": lambda p: with_field(p, BIG_INT.encode()),
    "big-int-steering": lambda p: with_steering(p, BIG_INT.encode()),
    "big-int-xargs": lambda p: with_xargs(p, BIG_INT.encode()),
    "big-negative-int": lambda p: with_field(p, b"-" + BIG_INT.encode()),
    "invalid-utf8-value": lambda p: with_field(p, b'"\xff\xfe\xc3"'),
    "invalid-utf8-body": lambda p: b"\xff\xfe" + p + b"}",
    "overlong-utf8": lambda p: with_field(p, b'"\xc0\xaf"'),
    "lone-surrogate-escape": lambda p: with_steering(p, b'"\\ud800"'),
    "null": lambda p: b"null",
    "empty-list": lambda p: b"[]",
    "string": lambda p: b'"x"',
    "number": lambda p: b"1",
    "true": lambda p: b"true",
    "empty": lambda p: b"",
    "truncated": lambda p: p,
    "trailing-garbage": lambda p: p + b"} {}",
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("variant", list(BODIES))
def test_malformed_completion_bodies_get_400(http, security_server, path, variant):
    prefix = chat_prefix() if path == "/v1/chat/completions" else completion_prefix()
    body = BODIES[variant](prefix)
    assert len(body) <= h.MAX_BODY, len(body)
    response = http.post(path, content=body,
                         headers={"content-type": "application/json", **h.auth()})
    h.assert_openai_error(response, 400, *security_server.secret_markers())
    h.assert_still_serving(http)


@pytest.mark.parametrize("variant", [name for name in BODIES if name != "big-int-max-tokens"])
def test_malformed_admin_put_bodies_get_400(http, security_server, variant):
    prefix = json.dumps(h.profile_document(security_server.model, "malformed", {1: [4]}))[:-1]
    body = BODIES[variant](prefix.encode())
    response = http.put("/v1/steering/profiles/malformed", content=body,
                        headers={"content-type": "application/json", **h.admin()})
    h.assert_openai_error(response, 400, *security_server.secret_markers())
    assert not (security_server.profiles / "malformed.json").exists()
    h.assert_still_serving(http)


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("POST", "/v1/completions", h.auth()),
    ("POST", "/v1/chat/completions", h.auth()),
    ("PUT", "/v1/steering/profiles/deep", h.admin()),
])
def test_100000_deep_nesting_is_too_large(http, method, path, headers):
    response = http.request(method, path, content=deep_list(100_000),
                            headers={"content-type": "application/json", **headers})
    h.assert_openai_error(response, 413)
    h.assert_still_serving(http)


def test_long_profile_name_in_a_body_gets_a_short_answer(http):
    name = "a" * 60_000  # the longest that fits the 64 KiB body limit
    for path in h.COMPLETION_PATHS:
        for where in ("top", "vllm_xargs"):
            extra = {"steering_profile": name}
            body = h.body_for(path, **(extra if where == "top" else {"vllm_xargs": extra}))
            response = http.post(path, json=body, headers=h.auth())
            error = h.assert_openai_error(response, (400, 404))
            assert len(error["message"]) < 300, len(error["message"])
            assert len(response.content) < 1000, len(response.content)
    big = http.post("/v1/completions", json=h.completion_body(steering_profile="a" * 200_000),
                    headers=h.auth())
    h.assert_openai_error(big, 413)
    h.assert_still_serving(http)


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE"])
def test_200kb_profile_name_in_the_path_gets_a_short_answer(security_server, http, method):
    target = b"/v1/steering/profiles/" + b"a" * 200_000
    response = h.raw_request(security_server.base_url, method, target,
                             [(b"Authorization", f"Bearer {h.ADMIN_TOKEN}".encode()),
                              (b"Content-Type", b"application/json")],
                             b"{}" if method == b"PUT" else b"")
    assert response.status in (400, 404, 414, 431), (response.status, response.text[:300])
    if response.header("content-type") and "json" in response.header("content-type")[0]:
        error = h.assert_raw_openai_error(response, response.status)
        assert len(error["message"]) < 300, len(error["message"])
    else:
        assert len(response.body) < 300, len(response.body)
    h.assert_still_serving(http)


def test_20kb_profile_name_in_the_path_gets_a_short_answer(http):
    """Under the HTTP parser's limit, so the steering layer answers."""
    name = "a" * 20_000
    for method, headers in (("GET", h.auth()), ("GET", h.admin()), ("PUT", h.admin()),
                            ("DELETE", h.admin())):
        response = http.request(method, f"/v1/steering/profiles/{name}", headers=headers,
                                json={} if method == "PUT" else None)
        error = h.assert_openai_error(response, (400, 404))
        assert len(error["message"]) < 300, (method, len(error["message"]))
    h.assert_still_serving(http)
