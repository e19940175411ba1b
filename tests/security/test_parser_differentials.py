"""Contract 2, parser differentials: where the steering layer and vLLM could read a request
differently, the request is refused, and the refused steering is never applied.

- `vllm_xargs` that is not a JSON object (vLLM would turn a list of pairs into a dict) -> 400;
- steering and reserved keys on every other POST route vLLM 0.32 serves (or would serve) -> 400;
- two Content-Type or two Authorization headers -> 400;
- a Content-Type other than application/json on the completion APIs -> 415 (the steering
  layer answers; vLLM 0.32 itself answers 400);
- a missing or wrong API key -> 401 in the OpenAI error shape (vLLM's own 401 body is
  `{"error": "Unauthorized"}`).

Where a variant does answer 200, its captured routing must not show the `unsafe` profile.
"""

from __future__ import annotations

import json

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

NON_OBJECT_XARGS = {
    "list-of-pairs": [["steering_profile", "unsafe"]],
    "list-of-pairs-capture": [["steering_profile", "unsafe"], ["capture_routing", 1]],
    "flat-list": ["steering_profile", "unsafe"],
    "empty-list": [],
    "string": "steering_profile=unsafe",
    "json-text": json.dumps({"steering_profile": "unsafe"}),
    "int": 7,
    "float": 1.5,
    "true": True,
    "false": False,
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("variant", list(NON_OBJECT_XARGS))
def test_non_object_vllm_xargs_is_refused(http, path, variant):
    body = h.body_for(path, vllm_xargs=NON_OBJECT_XARGS[variant], capture_routing=True)
    response = http.post(path, json=body, headers=h.auth())
    if response.status_code == 200:
        h.assert_never_unsafe(response.json())
    h.assert_openai_error(response, 400)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("xargs", [[["steering_profile", "concise"]],
                                   [["steering_profile", None]], "steering_profile="],
                         ids=["pairs-concise", "pairs-null", "string"])
def test_non_object_vllm_xargs_on_the_locked_endpoint_is_refused(http, path, xargs):
    body = h.body_for(path, h.LOCKED, vllm_xargs=xargs, capture_routing=True)
    response = http.post(path, json=body, headers=h.auth())
    if response.status_code == 200:
        assert h.follows(response.json()["routing"], *h.SAFETY), \
            "SECURITY: the locked endpoint answered without its profile"
    h.assert_openai_error(response, (400, 403))
    h.assert_still_serving(http)


# ---- steering keys on the other routes ------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]
# Routes that do not steer (the steerable APIs: test_other_apis.py).
OTHER_ROUTES = {
    "/v1/responses/render": {"model": h.BASE, "input": "hi"},
    "/v1/messages/count_tokens": {"model": h.BASE, "messages": CHAT},
    "/v1/messages/render": {"model": h.BASE, "messages": CHAT, "max_tokens": 2},
    "/tokenize": {"model": h.BASE, "prompt": "hi"},
    "/detokenize": {"model": h.BASE, "tokens": [1, 2]},
    "/v1/embeddings": {"model": h.BASE, "input": "hi"},
    "/pooling": {"model": h.BASE, "input": "hi"},
    "/v1/chat/completions/render": {"model": h.BASE, "messages": CHAT},
    "/v1/completions/render": {"model": h.BASE, "prompt": "hi"},
    "/generative_scoring": {"model": h.BASE, "query": "hi", "items": ["a"]},
    "/inference/v1/generate": {"model": h.BASE, "token_ids": [1, 2, 3],
                               "sampling_params": {"max_tokens": 2}},
}
STEERING_KEYS = {
    "steering_profile": "concise",
    "steering": {"activate": {"0": [1]}},
    "capture_routing": True,
    "steermoe": "forged",
    "steermoe_capture_id": "forged",
    "steermoe_auth": "forged",
}


def placed(body: dict, where: str, key: str, value: object) -> dict:
    body = json.loads(json.dumps(body))
    if where == "top":
        body[key] = value
    elif where == "sampling_params.extra_args":
        body.setdefault("sampling_params", {})["extra_args"] = {key: value}
    else:
        body[where] = {key: value}
    return body


@pytest.mark.parametrize("key", list(STEERING_KEYS))
@pytest.mark.parametrize("route", list(OTHER_ROUTES))
def test_steering_keys_on_other_routes_are_refused(http, route, key):
    places = ["top", "vllm_xargs", "extra_args"]
    if route == "/inference/v1/generate":
        places.append("sampling_params.extra_args")
    for where in places:
        body = placed(OTHER_ROUTES[route], where, key, STEERING_KEYS[key])
        response = http.post(route, json=body, headers=h.auth())
        error = h.assert_api_error(route, response, 400)
        assert error["type"] == "BadRequestError", (where, error)
    h.assert_still_serving(http)


# ---- duplicated headers ---------------------------------------------------------------------

AUTH_VALUE = f"Bearer {h.API_KEY}"
DUPLICATE_HEADERS = {
    "content-type-json-then-text": [("content-type", "application/json"),
                                    ("content-type", "text/plain")],
    "content-type-text-then-json": [("content-type", "text/plain"),
                                    ("content-type", "application/json")],
    "content-type-json-twice": [("content-type", "application/json"),
                                ("content-type", "application/json")],
}


def _with_auth(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("authorization", AUTH_VALUE), *headers]


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("variant", list(DUPLICATE_HEADERS))
def test_two_content_types_are_refused(http, path, variant):
    body = h.body_for(path, h.LOCKED, steering_profile=None, capture_routing=True)
    response = http.post(path, content=json.dumps(body).encode(),
                         headers=_with_auth(DUPLICATE_HEADERS[variant]))
    h.assert_openai_error(response, 400)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("order", ["valid-first", "invalid-first"])
def test_two_authorization_headers_are_refused(http, path, order):
    pair = [("authorization", AUTH_VALUE), ("authorization", "Bearer not-the-key")]
    if order == "invalid-first":
        pair.reverse()
    body = h.body_for(path, capture_routing=True)
    response = http.post(path, content=json.dumps(body).encode(),
                         headers=[("content-type", "application/json"), *pair])
    h.assert_openai_error(response, 400)
    h.assert_still_serving(http)


@pytest.mark.parametrize("order", ["valid-first", "invalid-first"])
@pytest.mark.parametrize(("method", "path", "token"), [
    ("GET", "/v1/models", h.API_KEY),
    ("GET", "/v1/steering/profiles", h.API_KEY),
    ("PUT", "/v1/steering/profiles/dup-auth", h.ADMIN_TOKEN),
])
def test_two_authorization_headers_are_refused_elsewhere(http, security_server, method, path,
                                                         token, order):
    pair = [("authorization", f"Bearer {token}"), ("authorization", "Bearer not-the-key")]
    if order == "invalid-first":
        pair.reverse()
    document = h.profile_document(security_server.model, "dup-auth", {1: [4]})
    response = http.request(method, path, headers=[("content-type", "application/json"), *pair],
                            content=json.dumps(document).encode() if method == "PUT" else None)
    h.assert_openai_error(response, 400)
    assert not (security_server.profiles / "dup-auth.json").exists()
    h.assert_still_serving(http)


# ---- media types ----------------------------------------------------------------------------

WRONG_MEDIA_TYPES = {
    "text-plain": "text/plain",
    "multipart": "multipart/form-data; boundary=xyz",
    "form-urlencoded": "application/x-www-form-urlencoded",
    "missing": None,
    "json-list": "application/json, text/plain",
    "json-suffix": "application/jsonx",
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("variant", list(WRONG_MEDIA_TYPES))
def test_other_media_types_get_415(http, path, variant):
    media_type = WRONG_MEDIA_TYPES[variant]
    headers = [("authorization", AUTH_VALUE)]
    if media_type is not None:
        headers.append(("content-type", media_type))
    body = h.body_for(path, h.LOCKED, steering_profile=None, capture_routing=True)
    response = http.post(path, content=json.dumps(body).encode(), headers=headers)
    h.assert_openai_error(response, 415)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("media_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_media_type_variants_are_served_and_steered(http, path, media_type):
    """The control for the 415 cases: JSON with parameters or in other case is served."""
    body = h.body_for(path, h.LOCKED, capture_routing=True)
    response = http.post(path, content=json.dumps(body).encode(),
                         headers=[("authorization", AUTH_VALUE), ("content-type", media_type)])
    assert response.status_code == 200, response.text[:300]
    h.assert_header_names(response, "safety", h.LOCKED)
    assert h.follows(response.json()["routing"], *h.SAFETY)


@pytest.mark.parametrize("media_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("route", ["/v1/responses", "/v1/messages", "/tokenize", "/invocations",
                                   "/v1/chat/completions/batch", "/inference/v1/generate",
                                   "/v1/messages/count_tokens"])
def test_other_routes_refuse_non_json_bodies(http, route, media_type):
    """docs/security.md: on other POST routes a non-empty body must be JSON (415), so steering
    cannot travel in a body the steering layer does not read (the steerable APIs included, in
    their own error shape)."""
    base = OTHER_ROUTES.get(route) or h.body_for(route)
    body = placed(base, "vllm_xargs", "steering_profile", "unsafe")
    headers = [("authorization", AUTH_VALUE)]
    if media_type is not None:
        headers.append(("content-type", media_type))
    response = http.post(route, content=json.dumps(body).encode(), headers=headers)
    h.assert_api_error(route, response, 415)
    h.assert_still_serving(http)


# ---- API key --------------------------------------------------------------------------------

BAD_CREDENTIALS = {
    "missing": None,
    "wrong-key": "Bearer not-the-key",
    "scheme-only": "Bearer",
    "basic": "Basic c2VjOmtleQ==",
    "no-scheme": h.API_KEY,
    "key-with-suffix": f"Bearer {h.API_KEY}x",
}


@pytest.mark.parametrize("variant", list(BAD_CREDENTIALS))
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
    ("POST", "/v1/responses"), ("GET", "/v1/steering/profiles"),
    ("GET", "/v1/steering/endpoints"),
])
def test_missing_or_wrong_api_key_gets_401_in_openai_shape(http, method, path, variant):
    headers = {"content-type": "application/json"}
    if BAD_CREDENTIALS[variant] is not None:
        headers["authorization"] = BAD_CREDENTIALS[variant]
    content = None
    if method == "POST":
        body = h.body_for(path) if path in h.COMPLETION_PATHS else {"model": h.BASE, "input": "x"}
        content = json.dumps(body).encode()
    response = http.request(method, path, headers=headers, content=content)
    h.assert_openai_error(response, 401, h.API_KEY, h.ADMIN_TOKEN)
    h.assert_still_serving(http)


# ---- duplicate JSON keys: whatever is chosen, steering and answer agree ---------------------


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize(("first", "second"), [
    ('"model": "tiny-safe"', '"model": "tiny-base"'),
    ('"model": "tiny-base"', '"model": "tiny-safe"'),
    ('"steering_profile": "unsafe"', '"steering_profile": "concise"'),
    ('"steering_profile": "concise"', '"steering_profile": "unsafe"'),
])
def test_duplicate_json_keys_are_read_one_way(http, path, first, second):
    body = h.body_for(path, capture_routing=True)
    body.pop("model")
    inner = json.dumps(body)[1:-1]
    raw = "{" + f"{first}, {inner}, {second}" + "}"
    response = http.post(path, content=raw.encode(),
                         headers={"content-type": "application/json", **h.auth()})
    if response.status_code != 200:
        h.assert_openai_error(response, (400, 403))
        h.assert_still_serving(http)
        return
    payload = response.json()
    h.assert_never_unsafe(payload)
    header = h.steering_of(response)
    routing = payload["routing"]
    if header == "none":
        h.assert_unsteered_routing(routing)
    elif header.startswith("profile=safety;"):
        assert h.follows(routing, *h.SAFETY)
    elif header.startswith("profile=concise;"):
        assert h.follows(routing, *h.CONCISE)
    else:
        raise AssertionError(f"unexpected steering header {header!r}")
    if "endpoint=tiny-safe" in header:
        assert header.startswith("profile=safety;")
    h.assert_still_serving(http)
