"""Every rule of the completion APIs, on the other steerable APIs (issue 15): the Responses API,
the Anthropic Messages API, chat batches and SageMaker `/invocations`.

- the locked name always runs `safety` (captured routing) and answers under its own name,
  streamed events included; any other steering on it is 403 in the API's error shape;
- a name that merely looks locked is vLLM's unknown model (404), never an unsteered 200;
- duplicated Content-Type / Authorization headers, non-JSON bodies, non-object `vllm_xargs`,
  reserved (`steermoe*`) keys: refused in the API's shape before vLLM reads anything;
- steering in places the steering layer does not read never runs (the engine front end refuses
  unmarked steering): the answer is an error or unsteered, never `unsafe`;
- a missing API key is 401 in the API's shape (vLLM does not guard /invocations);
- a stored response created on the locked name cannot be continued under another name, and a
  stored response's id cannot be reused to rewrite its steering.
"""

from __future__ import annotations

import json

import pytest

from tests.security import helpers as h
from tests.security.test_locked_endpoints import CONFLICTS, LOOKALIKES, OVERRIDES

pytestmark = pytest.mark.engine

APIS = h.OTHER_STEERABLE_PATHS
STREAMING = ("/v1/responses", "/v1/messages")


def post(http, path: str, body: dict, **kwargs):
    return http.post(path, json=body, headers=h.auth(), **kwargs)


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("selection", [{}, {"steering_profile": "safety"},
                                       {"vllm_xargs": {"steering_profile": "safety"}}],
                         ids=["implicit", "explicit", "explicit-xargs"])
def test_locked_endpoint_runs_safety(http, path, selection):
    response = post(http, path, h.body_for(path, h.LOCKED, capture_routing=True, **selection))
    assert response.status_code == 200, response.text[:300]
    h.assert_header_names(response, "safety", h.LOCKED)
    payload = response.json()
    assert h.follows(payload["routing"], *h.SAFETY), payload["routing"]
    assert payload["model"] == h.LOCKED
    assert payload["steering"]["locked"] is True
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", STREAMING)
def test_locked_streams_name_it_in_every_event(http, path):
    body = h.body_for(path, h.LOCKED, stream=True)
    with http.stream("POST", path, json=body, headers=h.auth()) as response:
        text = response.read().decode()
    assert response.status_code == 200, text[:300]
    h.assert_header_names(response, "safety", h.LOCKED)
    named = []
    for event in h.sse_chunks(text):
        for holder in (event, event.get("response"), event.get("message")):
            if isinstance(holder, dict) and "model" in holder:
                named.append(holder["model"])
    assert named and set(named) == {h.LOCKED}, named
    assert f'"model":"{h.BASE}"' not in text
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("override", [*OVERRIDES, *CONFLICTS])
def test_locked_endpoint_refuses_any_other_steering(http, path, override):
    extra = OVERRIDES.get(override) or CONFLICTS[override]
    response = post(http, path, h.body_for(path, h.LOCKED, capture_routing=True, **extra))
    if response.status_code == 200:
        assert h.follows(response.json()["routing"], *h.SAFETY), \
            "SECURITY: the locked endpoint answered without its profile"
    h.assert_api_error(path, response, 403 if override in OVERRIDES else (400, 403))
    assert h.steering_of(response) == "none"
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("variant", ["upper", "trailing-space", "cyrillic-i", "trailing-nul",
                                     "zero-width-space"])
def test_lookalike_names_are_unknown_models(http, path, variant):
    """404 from vLLM. On /invocations vLLM ignores the body's `model` (SageMaker picks an
    adapter by the X-Amzn-SageMaker-Adapter-Identifier header, absent: the base model), so
    there a lookalike runs as the base model and says so, unsteered, like any other name."""
    for extra in ({}, {"steering_profile": None}):
        body = h.body_for(path, LOOKALIKES[variant], capture_routing=True, **extra)
        response = post(http, path, body)
        if response.status_code == 200:
            header = h.steering_of(response) or ""
            payload = response.json()
            assert path == "/invocations", f"{LOOKALIKES[variant]!r} got a 200 on {path}"
            assert header == "none" and payload["model"] == h.BASE, (header, payload["model"])
            h.assert_unsteered_routing(payload["routing"])
            continue
        assert response.status_code in (400, 404), response.text[:300]
        h.assert_clean(response.text)
    h.assert_still_serving(http)


ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def test_invocations_adapter_header_cannot_unlock(http):
    """The SageMaker adapter header replaces the body's `model` after the steering layer: a
    locked name there is unknown to vLLM (404); a locked name in the body keeps its profile
    whatever the header says."""
    body = h.body_for("/invocations", h.BASE, capture_routing=True)
    response = http.post("/invocations", json=body,
                         headers={**h.auth(), ADAPTER_HEADER: h.LOCKED})
    h.assert_openai_error(response, 404)
    for header in (h.BASE, "", "anything"):
        body = h.body_for("/invocations", h.LOCKED, capture_routing=True)
        response = http.post("/invocations", json=body, headers={**h.auth(),
                                                                 ADAPTER_HEADER: header})
        if response.status_code != 200:
            h.assert_openai_error(response, (400, 404))
            continue
        assert h.follows(response.json()["routing"], *h.SAFETY), \
            "SECURITY: the locked name ran without its profile on /invocations"
    h.assert_still_serving(http)


AUTH_VALUE = f"Bearer {h.API_KEY}"


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("duplicate", [
    [("content-type", "application/json"), ("content-type", "text/plain")],
    [("content-type", "application/json"), ("content-type", "application/json")],
    [("content-type", "application/json"), ("authorization", "Bearer not-the-key")],
], ids=["content-types", "content-type-twice", "authorizations"])
def test_duplicated_headers_are_refused(http, path, duplicate):
    body = h.body_for(path, h.LOCKED, steering_profile=None, capture_routing=True)
    response = http.post(path, content=json.dumps(body).encode(),
                         headers=[("authorization", AUTH_VALUE), *duplicate])
    h.assert_api_error(path, response, 400)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("media_type", ["text/plain", "multipart/form-data; boundary=x", None])
def test_non_json_bodies_are_refused(http, path, media_type):
    headers = [("authorization", AUTH_VALUE)]
    if media_type is not None:
        headers.append(("content-type", media_type))
    body = h.body_for(path, h.LOCKED, steering_profile=None)
    response = http.post(path, content=json.dumps(body).encode(), headers=headers)
    h.assert_api_error(path, response, 415)
    h.assert_still_serving(http)


FORGED_XARGS = {
    "list-of-pairs": [["steering_profile", "unsafe"]],
    "json-text": json.dumps({"steering_profile": "unsafe"}),
    "resolved": {"steermoe": json.dumps({"label": "x", "digest": "0", "eps": 0.01,
                                         "activate": {"0": [3]}, "deactivate": {}})},
    "mark": {"steering_profile": "unsafe", "steermoe_auth": "0" * 64},
    "capture-id": {"steermoe_capture_id": "chatcmpl-someone-else"},
}


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("model", [h.BASE, h.LOCKED])
@pytest.mark.parametrize("variant", list(FORGED_XARGS))
def test_forged_or_unreadable_vllm_xargs_are_refused(http, path, model, variant):
    body = h.body_for(path, model, vllm_xargs=FORGED_XARGS[variant], capture_routing=True)
    response = post(http, path, body)
    if response.status_code == 200:
        h.assert_never_unsafe(response.json())
    h.assert_api_error(path, response, (400, 403))
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", APIS)
@pytest.mark.parametrize("where", ["extra_args", "sampling_params", "metadata"])
def test_steering_where_the_layer_does_not_read_never_runs(http, path, where):
    """Unmarked steering in other places: vLLM ignores it or the engine refuses it; the
    answer is never steered by it."""
    steering = {"steering_profile": "unsafe", "steermoe_auth": "0" * 64}
    nested = {"extra_args": steering} if where == "sampling_params" else steering
    body = h.body_for(path, h.BASE, capture_routing=True, **{where: nested})
    response = post(http, path, body)
    if response.status_code == 200:
        payload = response.json()
        h.assert_never_unsafe(payload)
        assert h.steering_of(response) == "none" and payload["steering"] is None
        h.assert_unsteered_routing(payload["routing"])
    else:
        h.assert_api_error(path, response, (400, 403))
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", [p for p in APIS if p != "/invocations"])
@pytest.mark.parametrize("key", [None, "Bearer not-the-key", h.API_KEY])
def test_missing_or_wrong_api_key_is_401_in_the_api_shape(http, path, key):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = key
    body = h.body_for(path, h.LOCKED, steering_profile="unsafe")
    response = http.post(path, content=json.dumps(body).encode(), headers=headers)
    h.assert_api_error(path, response, 401, h.API_KEY, h.ADMIN_TOKEN)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", APIS)
def test_profiles_clients_may_not_select_are_refused(http, path):
    for extra in ({"steering_profile": "unsafe"}, {"steering": {"activate": {"0": [3]}}},
                  {"steering_profile": "huge"}):
        response = post(http, path, h.body_for(path, capture_routing=True, **extra))
        if response.status_code == 200:
            h.assert_never_unsafe(response.json())
        h.assert_api_error(path, response, (403, 500))
    h.assert_still_serving(http)


# ---- stateful Responses -----------------------------------------------------------------------


def respond(http, model: str | None, **extra):
    body = h.body_for("/v1/responses", model or h.BASE, **extra)
    if model is None:
        body.pop("model")
    return post(http, "/v1/responses", body)


@pytest.mark.parametrize("extra", [{}, {"steering_profile": None},
                                   {"steering_profile": "concise"},
                                   {"vllm_xargs": {"steering_profile": "unsafe"}}])
@pytest.mark.parametrize("model", [h.BASE, "TINY-SAFE"])
def test_a_locked_response_cannot_be_continued_elsewhere(http, model, extra):
    first = respond(http, h.LOCKED)
    assert first.status_code == 200, first.text[:300]
    response = respond(http, model, previous_response_id=first.json()["id"],
                       capture_routing=True, **extra)
    if response.status_code == 200:
        assert h.follows(response.json()["routing"], *h.SAFETY), \
            "SECURITY: a locked response was continued without its profile"
    h.assert_openai_error(response, (400, 403))
    kept = respond(http, None, previous_response_id=first.json()["id"], capture_routing=True)
    assert kept.status_code == 200, kept.text[:300]
    assert kept.json()["model"] == h.LOCKED
    assert h.follows(kept.json()["routing"], *h.SAFETY)
    h.assert_still_serving(http)


def test_a_stored_response_id_cannot_be_reused(http):
    first = respond(http, h.LOCKED)
    response_id = first.json()["id"]
    reused = respond(http, h.BASE, request_id=response_id, steering_profile=None)
    h.assert_openai_error(reused, 409)
    continued = respond(http, h.BASE, previous_response_id=response_id)
    h.assert_openai_error(continued, 403)
    h.assert_still_serving(http)


@pytest.mark.parametrize("previous", ["resp_unknown", "x" * 5000, ""])
def test_unknown_previous_responses_are_refused(http, previous):
    response = respond(http, h.BASE, previous_response_id=previous)
    h.assert_openai_error(response, 404)
    assert len(response.json()["error"]["message"]) < 200
    h.assert_still_serving(http)
