"""Contract 3, locked names fail closed.

`tiny-safe` on the two completion APIs always runs `safety` (captured routing: the activated
experts in every computed row, the deactivated ones never), answers with `model: tiny-safe`
(also in every streamed chunk) and the header `x-steermoe-steering: profile=safety; ...`.
Any attempt to change its steering is 403; the name on a route that does not steer is 403 or
404 (tokenizer routes count on the base model); a name that merely looks like it is 404 (vLLM's
unknown model), never an unsteered 200. The other steerable APIs: test_other_apis.py.
"""

from __future__ import annotations

import json

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("selection", [{}, {"steering_profile": "safety"},
                                       {"vllm_xargs": {"steering_profile": "safety"}}],
                         ids=["implicit", "explicit", "explicit-xargs"])
def test_locked_endpoint_runs_safety(http, path, selection):
    body = h.body_for(path, h.LOCKED, capture_routing=True, **selection)
    response = http.post(path, json=body, headers=h.auth())
    assert response.status_code == 200, response.text[:300]
    h.assert_header_names(response, "safety", h.LOCKED)
    payload = response.json()
    assert h.follows(payload["routing"], *h.SAFETY), payload["routing"]
    assert payload["model"] == h.LOCKED, \
        f"the answer of {h.LOCKED!r} names model {payload['model']!r}"
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
def test_locked_endpoint_streams_name_it_in_every_chunk(http, path):
    body = h.body_for(path, h.LOCKED, max_tokens=4, stream=True,
                      stream_options={"include_usage": True})
    with http.stream("POST", path, json=body, headers=h.auth()) as response:
        text = response.read().decode()
    assert response.status_code == 200, text[:300]
    h.assert_header_names(response, "safety", h.LOCKED)
    chunks = h.sse_chunks(text)
    assert chunks, text[:300]
    models = {chunk.get("model") for chunk in chunks}
    assert models == {h.LOCKED}, f"streamed chunks name {models}"
    h.assert_still_serving(http)


OVERRIDES = {
    "profile-null": {"steering_profile": None},
    "profile-concise": {"steering_profile": "concise"},
    "profile-unsafe": {"steering_profile": "unsafe"},
    "profile-missing": {"steering_profile": "no-such-profile"},
    "xargs-null": {"vllm_xargs": {"steering_profile": None}},
    "xargs-concise": {"vllm_xargs": {"steering_profile": "concise"}},
    "xargs-unsafe": {"vllm_xargs": {"steering_profile": "unsafe"}},
    "inline": {"steering": {"activate": {"0": [3]}}},
    "inline-xargs": {"vllm_xargs": {"steering": json.dumps({"activate": {"0": [3]}})}},
}
# Top level and vllm_xargs disagree: a 400 (the request is malformed) or a 403.
CONFLICTS = {
    "top-safety-xargs-concise": {"steering_profile": "safety",
                                 "vllm_xargs": {"steering_profile": "concise"}},
    "top-null-xargs-safety": {"steering_profile": None,
                              "vllm_xargs": {"steering_profile": "safety"}},
    "top-concise-xargs-safety": {"steering_profile": "concise",
                                 "vllm_xargs": {"steering_profile": "safety"}},
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("override", [*OVERRIDES, *CONFLICTS])
def test_locked_endpoint_refuses_any_other_steering(http, path, override):
    extra = OVERRIDES.get(override) or CONFLICTS[override]
    body = h.body_for(path, h.LOCKED, capture_routing=True, **extra)
    response = http.post(path, json=body, headers=h.auth())
    if response.status_code == 200:
        assert h.follows(response.json()["routing"], *h.SAFETY), \
            "SECURITY: the locked endpoint answered without its profile"
    h.assert_openai_error(response, 403 if override in OVERRIDES else (400, 403))
    h.assert_still_serving(http)


CHAT = [{"role": "user", "content": "hi"}]
# Routes that generate without steering, or render: the locked name is refused (403) or
# unknown (404). The steerable APIs (Responses, Messages, chat batches, /invocations) run it
# with its profile: test_other_apis.py. /tokenize, /detokenize and /v1/messages/count_tokens
# count on the base model (test_locked_name_on_tokenizer_routes).
OTHER_ROUTES = {
    "/v1/embeddings": {"input": "hi"},
    "/pooling": {"input": "hi"},
    "/inference/v1/generate": {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}},
    "/generative_scoring": {"query": "hi", "items": ["a"]},
    "/v1/chat/completions/render": {"messages": CHAT},
    "/v1/completions/render": {"prompt": "hi"},
}


@pytest.mark.parametrize("route", list(OTHER_ROUTES))
def test_locked_name_on_other_routes_never_generates(http, route):
    response = http.post(route, json={"model": h.LOCKED, **OTHER_ROUTES[route]},
                         headers=h.auth())
    assert response.status_code in (403, 404), \
        f"{route} with model {h.LOCKED!r}: {response.status_code} {response.text[:300]!r}"
    if response.status_code == 403:
        h.assert_openai_error(response, 403)
    h.assert_clean(response.text)
    h.assert_still_serving(http)


@pytest.mark.parametrize(("route", "body"), [
    ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]}),
    ("/v1/messages/count_tokens", {"messages": CHAT}),
])
def test_locked_name_on_tokenizer_routes(http, route, body):
    """Nothing is generated there: the locked name counts on the base model."""
    response = http.post(route, json={"model": h.LOCKED, **body}, headers=h.auth())
    assert response.status_code == 200, response.text[:300]
    steered = http.post(route, json={"model": h.LOCKED, "steering_profile": "concise", **body},
                        headers=h.auth())
    h.assert_api_error(route, steered, 400)
    h.assert_still_serving(http)


def test_locked_name_on_transcriptions_as_multipart(http):
    response = http.post("/v1/audio/transcriptions", headers=h.auth(),
                         data={"model": h.LOCKED, "steering_profile": "concise"},
                         files={"file": ("a.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav")})
    assert response.status_code in (403, 404), response.text[:300]
    h.assert_clean(response.text)
    h.assert_still_serving(http)


LOOKALIKES = {
    "upper": "TINY-SAFE",
    "title": "Tiny-Safe",
    "trailing-space": "tiny-safe ",
    "leading-space": " tiny-safe",
    "trailing-nul": "tiny-safe\u0000",
    "trailing-newline": "tiny-safe\n",
    "trailing-slash": "tiny-safe/",
    "cyrillic-i": "t\u0456ny-safe",
    "fullwidth": "\uff54\uff49\uff4e\uff59\uff0d\uff53\uff41\uff46\uff45",
    "unicode-hyphen": "tiny\u2010safe",
    "zero-width-space": "tiny-safe\u200b",
    "combining-mark": "tiny-safe\u0301",
    "base-with-suffix": "tiny-base\u0000tiny-safe",
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("variant", list(LOOKALIKES))
def test_lookalike_names_are_unknown_models(http, path, variant):
    for extra in ({}, {"steering_profile": None}):
        body = h.body_for(path, LOOKALIKES[variant], capture_routing=True, **extra)
        response = http.post(path, json=body, headers=h.auth())
        if response.status_code == 200:
            header = h.steering_of(response) or ""
            assert header.startswith("profile=safety;") and h.follows(
                response.json()["routing"], *h.SAFETY
            ), f"SECURITY: {LOOKALIKES[variant]!r} got an unsteered 200 ({header!r})"
        h.assert_openai_error(response, 404)
    h.assert_still_serving(http)


@pytest.mark.parametrize("target", [
    b"/v1/completions/", b"/v1/completions?x=1", b"//v1/completions", b"/v1//completions",
    b"/v1/./completions", b"/v1/x/../completions", b"/V1/completions", b"/v1/completions%2F",
    b"/v1/%63ompletions",
])
def test_path_variants_never_give_an_unsteered_locked_answer(security_server, http, target):
    for extra in ({}, {"steering_profile": None}):
        body = json.dumps(h.completion_body(h.LOCKED, capture_routing=True, **extra)).encode()
        response = h.raw_request(
            security_server.base_url, b"POST", target,
            [(b"Content-Type", b"application/json"),
             (b"Authorization", f"Bearer {h.API_KEY}".encode())], body,
        )
        if 200 <= response.status < 300:
            header = (response.header(h.STEERING_HEADER) or [""])[0]
            payload = response.json()
            assert header.startswith("profile=safety;") and h.follows(
                payload["routing"], *h.SAFETY
            ), f"SECURITY: {target!r} ran {h.LOCKED} without its profile ({header!r})"
            assert extra == {}, f"{target!r}: steering_profile null was accepted on {h.LOCKED}"
        else:
            assert 300 <= response.status < 500, (target, response.status, response.text[:300])
        h.assert_clean(response.body)
    h.assert_still_serving(http)
