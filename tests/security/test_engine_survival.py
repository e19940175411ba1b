"""Contract 1, engine survival: steering that selects nothing never reaches the engine.

Inline steering is not enabled on this server, so every inline form (top level or in
`vllm_xargs`, empty or malformed) is refused with 403 before anything else. A profile file
with empty sets is not loadable (docs/security.md: "500 for a request naming it, listed as a
load error"; the issue's first draft said 400) and an admin PUT of one is 400. After each,
/health is 200 and a benign completion works.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

INLINE_ATTACKS = {
    "inline-empty": {"steering": {}},
    "inline-empty-layer": {"steering": {"activate": {"3": []}}},
    "inline-empty-both": {"steering": {"activate": {}, "deactivate": {}}},
    "xargs-inline-empty-text": {"vllm_xargs": {"steering": "{}"}},
    "xargs-inline-empty-layer-text": {
        "vllm_xargs": {"steering": json.dumps({"activate": {"3": []}})}},
    "xargs-inline-object": {"vllm_xargs": {"steering": {"activate": {"3": []}}}},
    "inline-all-deactivated": {"steering": {"deactivate": {"0": list(range(8))}}},
    "inline-layer-out-of-range": {"steering": {"activate": {"99": [1]}}},
    "inline-negative": {"steering": {"activate": {"-1": [-1]}}},
}


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("model", [h.BASE, h.LOCKED])
@pytest.mark.parametrize("attack", list(INLINE_ATTACKS))
def test_inline_steering_is_refused_before_anything_else(http, path, model, attack):
    body = h.body_for(path, model, capture_routing=True, **INLINE_ATTACKS[attack])
    response = http.post(path, json=body, headers=h.auth())
    if response.status_code == 200:
        h.assert_never_unsafe(response.json())
    h.assert_openai_error(response, 403)
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("where", ["top", "vllm_xargs"])
def test_profile_with_empty_sets_is_refused(http, security_server, path, where):
    selection = {"steering_profile": "empty"}
    extra = selection if where == "top" else {"vllm_xargs": selection}
    response = http.post(path, json=h.body_for(path, capture_routing=True, **extra),
                         headers=h.auth())
    error = h.assert_openai_error(response, 500, *security_server.secret_markers())
    assert "empty.json" in error["message"] and error["param"] == "steering_profile", error
    listing = http.get("/v1/steering/profiles", headers=h.admin())
    assert "empty.json" in listing.json()["errors"]
    h.assert_still_serving(http)


def test_admin_cannot_put_a_profile_with_empty_sets(http, security_server):
    document = h.profile_document(security_server.model, "empty-put", {3: []}, {2: []})
    response = http.put("/v1/steering/profiles/empty-put", json=document, headers=h.admin())
    h.assert_openai_error(response, 400, *security_server.secret_markers())
    assert not (security_server.profiles / "empty-put.json").exists()
    lookup = http.post("/v1/completions", json=h.completion_body(steering_profile="empty-put"),
                       headers=h.auth())
    h.assert_openai_error(lookup, 404)
    h.assert_still_serving(http)


def test_attacks_mixed_with_benign_requests_leave_the_benign_ones_intact(http):
    """Empty and malformed steering sent concurrently with good requests: the good ones are
    answered 200 with their own steering, the bad ones refused, nothing takes the engine down."""
    attacks = [h.chat_body(**extra) for extra in INLINE_ATTACKS.values()]
    attacks += [h.chat_body(h.LOCKED, steering={}), h.chat_body(steering_profile="unsafe")]
    good = [h.chat_body(capture_routing=True), h.chat_body(h.LOCKED, capture_routing=True),
            h.chat_body(steering_profile="concise", capture_routing=True)] * 3
    jobs = [("bad", body) for body in attacks] + [("good", body) for body in good]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7) % len(jobs))]

    def send(job: tuple[str, dict]) -> tuple[str, dict, httpx.Response]:
        kind, body = job
        with httpx.Client(base_url=str(http.base_url), timeout=120) as client:
            return kind, body, client.post("/v1/chat/completions", json=body, headers=h.auth())

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, jobs))
    for kind, body, response in results:
        if kind == "bad":
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            h.assert_openai_error(response, response.status_code)
            continue
        assert response.status_code == 200, (body, response.text[:300])
        routing = response.json()["routing"]
        if body["model"] == h.LOCKED:
            h.assert_header_names(response, "safety", h.LOCKED)
            assert h.follows(routing, *h.SAFETY)
        elif body.get("steering_profile") == "concise":
            h.assert_header_names(response, "concise")
            assert h.follows(routing, *h.CONCISE)
        else:
            h.assert_header_names(response, None)
            h.assert_unsteered_routing(routing)
    h.assert_still_serving(http)
