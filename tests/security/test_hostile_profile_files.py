"""Contract 6 (files), no hangs and no 500s without the OpenAI shape: the profile directory
holds a FIFO (`fifo.json`), a symlink to /dev/zero (`zero.json`), a 2 MiB file (`huge.json`)
and a broken one (`broken.json`). Requests naming them, the listings, the reload and /metrics
answer within 10 s, in the OpenAI error shape where they fail, without any path.

A read blocked on the FIFO stalls the whole server; the session's watchdog then releases it
and the test fails (see conftest).
"""

from __future__ import annotations

import httpx
import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

WITHIN_S = 10.0


def timed(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    try:
        return http.request(method, path, timeout=WITHIN_S, **kwargs)
    except httpx.TimeoutException:
        raise AssertionError(f"{method} {path} did not answer within {WITHIN_S:.0f} s") from None


@pytest.mark.parametrize("name", ["fifo", "zero", "huge", "broken"])
@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
def test_requests_naming_hostile_files_answer_quickly(http, security_server, path, name):
    for extra in ({"steering_profile": name}, {"vllm_xargs": {"steering_profile": name}}):
        response = timed(http, "POST", path, json=h.body_for(path, **extra), headers=h.auth())
        assert 400 <= response.status_code < 600, response.text[:300]
        h.assert_openai_error(response, response.status_code, *security_server.secret_markers(),
                              "/dev/zero")
    h.assert_still_serving(http)


@pytest.mark.parametrize("name", ["fifo", "zero", "huge", "broken"])
@pytest.mark.parametrize("who", ["client", "admin"])
def test_reading_a_hostile_profile_answers_quickly(http, security_server, name, who):
    headers = h.auth() if who == "client" else h.admin()
    response = timed(http, "GET", f"/v1/steering/profiles/{name}", headers=headers)
    assert 400 <= response.status_code < 600, response.text[:300]
    h.assert_openai_error(response, response.status_code, *security_server.secret_markers(),
                          "/dev/zero")
    h.assert_still_serving(http)


@pytest.mark.parametrize("who", ["client", "admin"])
def test_profile_listing_answers_quickly(http, security_server, who):
    headers = h.auth() if who == "client" else h.admin()
    response = timed(http, "GET", "/v1/steering/profiles", headers=headers)
    assert response.status_code == 200, response.text[:300]
    listing = response.json()
    names = {entry["id"] for entry in listing["data"]}
    assert {"safety", "concise"} <= names
    assert not names & {"fifo", "zero", "huge", "broken", "empty"}
    if who == "admin":
        assert {"fifo.json", "zero.json", "huge.json", "broken.json"} <= set(listing["errors"])
    h.assert_clean(response.text, *security_server.secret_markers(), "/dev/zero")
    h.assert_still_serving(http)


def test_reload_and_metrics_answer_quickly(http, security_server):
    reload = timed(http, "POST", "/v1/steering/profiles:reload", headers=h.admin())
    assert reload.status_code == 200, reload.text[:300]
    h.assert_clean(reload.text, *security_server.secret_markers(), "/dev/zero")
    metrics = timed(http, "GET", "/metrics")
    assert metrics.status_code == 200
    assert "steermoe:profile_load_errors" in metrics.text
    h.assert_still_serving(http)


def test_locked_endpoint_still_works_beside_hostile_files(http):
    response = timed(http, "POST", "/v1/completions",
                     json=h.completion_body(h.LOCKED, capture_routing=True), headers=h.auth())
    assert response.status_code == 200, response.text[:300]
    assert h.follows(response.json()["routing"], *h.SAFETY)
