"""Contracts 4 and 5: what one request leaves in the engine never reaches another's steering.

4. Forged prefix-cache salt: a steered request's salt is `<client salt>|steermoe:<digest>`.
   An unsteered request that sends exactly that salt must not share KV blocks with the
   steered one, in either order. Captured routing tells: prompt rows served from the prefix
   cache are -1, so a steered answer must have none (its prompt was never seen with its
   steering) and must follow its profile.
5. Request-id reuse: with vLLM's request-id randomisation off, an unsteered request that
   reuses the X-Request-Id of a locked-endpoint request gets exactly the tokens of an
   unsteered request with a fresh id (greedy) and the header `none`; and the other way round.
"""

from __future__ import annotations

import uuid

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine


def long_prompt(tag: str) -> str:
    """A prompt of several 32-token blocks whose first block is unique to `tag`."""
    return f"{tag} {uuid.uuid4().hex} " + " ".join(f"word{i}" for i in range(60))


def safety_digest(http) -> str:
    probe = http.post("/v1/completions", json=h.completion_body(h.LOCKED, max_tokens=1),
                      headers=h.auth())
    assert probe.status_code == 200, probe.text[:300]
    parts = dict(part.split("=", 1) for part in h.steering_of(probe).split("; ") if "=" in part)
    digest = parts["digest"]
    listed = http.get("/v1/steering/profiles/safety", headers=h.auth())
    if listed.status_code == 200 and listed.json().get("digest"):
        assert listed.json()["digest"] == digest
    return digest


def test_prefix_caching_is_on_and_observable(security_server, http):
    """The control of contract 4: the same unsteered prompt twice is served from the cache."""
    assert "enable_prefix_caching=True" in security_server.log_text()
    prompt = long_prompt("control")
    body = h.completion_body(prompt=prompt, capture_routing=True)
    first = http.post("/v1/completions", json=body, headers=h.auth())
    second = http.post("/v1/completions", json=body, headers=h.auth())
    assert first.status_code == second.status_code == 200, second.text[:300]
    assert h.prompt_rows_from_cache(first.json()["routing"]) == 0
    assert h.prompt_rows_from_cache(second.json()["routing"]) >= 32


def _forge(http, prompt: str, digest: str, capture: bool):
    body = h.completion_body(prompt=prompt, cache_salt=f"|steermoe:{digest}",
                             capture_routing=capture)
    response = http.post("/v1/completions", json=body, headers=h.auth())
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        h.assert_openai_error(response, 400)
    else:
        h.assert_header_names(response, None)
    return response


def test_forged_salt_does_not_feed_a_steered_request(http):
    digest = safety_digest(http)
    prompt = long_prompt("forged-first")
    _forge(http, prompt, digest, capture=False)
    steered = http.post("/v1/completions",
                        json=h.completion_body(h.LOCKED, prompt=prompt, capture_routing=True),
                        headers=h.auth())
    assert steered.status_code == 200, steered.text[:300]
    routing = steered.json()["routing"]
    cached = h.prompt_rows_from_cache(routing)
    assert cached == 0, (
        f"SECURITY: {cached} prompt rows of the {h.LOCKED} request came from KV blocks an "
        "unsteered request wrote under a forged cache_salt"
    )
    assert h.follows(routing, *h.SAFETY)
    h.assert_still_serving(http)


def test_forged_salt_does_not_read_a_steered_request(http):
    digest = safety_digest(http)
    prompt = long_prompt("steered-first")
    steered = http.post("/v1/completions",
                        json=h.completion_body(h.LOCKED, prompt=prompt, capture_routing=True),
                        headers=h.auth())
    assert steered.status_code == 200, steered.text[:300]
    forged = _forge(http, prompt, digest, capture=True)
    if forged.status_code == 200:
        routing = forged.json()["routing"]
        cached = h.prompt_rows_from_cache(routing)
        assert cached == 0, (
            f"SECURITY: an unsteered request with a forged cache_salt read {cached} prompt "
            f"rows from KV blocks of the {h.LOCKED} request"
        )
        h.assert_unsteered_routing(routing)
    h.assert_still_serving(http)


# ---- request ids ----------------------------------------------------------------------------

SHORT_PROMPT = "The quick brown fox"  # under one KV block: nothing is served from the cache


def greedy(http, model: str, request_id: str | None, path: str = "/v1/completions"):
    headers = {**h.auth(), **({"X-Request-Id": request_id} if request_id else {})}
    body = h.body_for(path, model, max_tokens=8, **(
        {"prompt": SHORT_PROMPT} if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": SHORT_PROMPT}]}))
    response = http.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text[:300]
    choice = response.json()["choices"][0]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    return response, text


@pytest.fixture
def fixed_ids(security_server):
    if security_server.request_id_switch is None:
        pytest.skip("this vLLM has no switch to keep client request ids")
    return security_server


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
def test_reused_request_id_does_not_carry_steering_to_an_unsteered_request(fixed_ids, http,
                                                                           path):
    _, fresh_base = greedy(http, h.BASE, None, path)
    _, fresh_safe = greedy(http, h.LOCKED, None, path)
    assert fresh_base != fresh_safe, "the profile does not change these tokens: no oracle"
    request_id = f"sec-reuse-{uuid.uuid4().hex[:8]}"
    locked, locked_text = greedy(http, h.LOCKED, request_id, path)
    h.assert_header_names(locked, "safety", h.LOCKED)
    assert locked_text == fresh_safe
    again, again_text = greedy(http, h.BASE, request_id, path)
    h.assert_header_names(again, None)
    assert again_text == fresh_base, (
        f"SECURITY: the unsteered request reusing X-Request-Id {request_id!r} produced "
        f"{again_text!r} (steered: {fresh_safe!r}, unsteered: {fresh_base!r})"
    )
    h.assert_still_serving(http)


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
def test_reused_request_id_does_not_drop_the_locked_profile(fixed_ids, http, path):
    _, fresh_safe = greedy(http, h.LOCKED, None, path)
    request_id = f"sec-reuse-{uuid.uuid4().hex[:8]}"
    base, _ = greedy(http, h.BASE, request_id, path)
    h.assert_header_names(base, None)
    locked, locked_text = greedy(http, h.LOCKED, request_id, path)
    h.assert_header_names(locked, "safety", h.LOCKED)
    assert locked_text == fresh_safe, (
        f"SECURITY: {h.LOCKED} reusing X-Request-Id {request_id!r} produced {locked_text!r}, "
        f"not its profile's {fresh_safe!r}"
    )
    h.assert_still_serving(http)
