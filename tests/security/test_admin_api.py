"""Contracts 8 and 9: the admin API under /v1/steering.

8. Methods other than the served ones, without credentials, are 4xx, and none of them becomes
   a label of `steermoe:admin_operations_total` (a client must not be able to mint series).
9. PUT without or with a wrong token is 401; names with `..`, `%2F`, NUL or 200 kB are 400 or
   404 and touch no file; a valid PUT is usable at once; the locked endpoint's profile cannot
   be deleted (409).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

ODD_METHODS = ("HEAD", "OPTIONS", "PATCH", "PROPFIND", "FOO", "TRACE", "MKCOL", "PURGE",
               "SEARCH", "LOCK")


def admin_series(metrics_text: str) -> list[dict[str, str]]:
    series = []
    for line in metrics_text.splitlines():
        if line.startswith("steermoe:admin_operations_total{"):
            series.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line)))
    return series


@pytest.mark.parametrize("path", ["/v1/steering/profiles", "/v1/steering/profiles/x",
                                  "/v1/steering/profiles/safety", "/v1/steering/endpoints",
                                  "/v1/steering/profiles:reload", "/v1/steering/nowhere"])
def test_odd_methods_are_refused_and_not_counted_by_name(security_server, http, path):
    for method in ODD_METHODS:
        response = h.raw_request(security_server.base_url, method.encode(), path.encode())
        assert 400 <= response.status < 500, (method, path, response.status, response.text[:200])
        if response.body and "json" in ",".join(response.header("content-type")):
            h.assert_raw_openai_error(response, response.status)
        assert not (method == "HEAD" and response.body), "a HEAD answer has a body"
    series = admin_series(http.get("/metrics").text)
    for labels in series:
        for value in labels.values():
            for method in ODD_METHODS:
                assert method.lower() not in value.lower(), \
                    f"client method {method} became a metric label: {labels}"
    h.assert_still_serving(http)


# Methods uvicorn's parser knows (others, like FOO, it refuses itself with a plain-text 400).
KNOWN_METHODS = ("COPY", "MOVE", "PROPPATCH", "UNLOCK", "BIND", "REBIND", "UNBIND", "ACL",
                 "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE",
                 "UNSUBSCRIBE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE")


def test_many_methods_do_not_grow_the_admin_metric(security_server, http):
    before = len(admin_series(http.get("/metrics").text))
    for index, method in enumerate(KNOWN_METHODS):
        for target in (b"/v1/steering/profiles/x", f"/v1/steering/p{index}".encode()):
            response = h.raw_request(security_server.base_url, method.encode(), target)
            assert 400 <= response.status < 500, (method, target, response.status)
    after = admin_series(http.get("/metrics").text)
    assert len(after) <= before + 2, \
        f"{len(after) - before} new admin metric series: {after[before:][:6]}"
    h.assert_still_serving(http)


# ---- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", [None, "Bearer wrong-token", f"Bearer {h.API_KEY}",
                                         "Bearer", f"Basic {h.ADMIN_TOKEN}", h.ADMIN_TOKEN,
                                         f"Bearer {h.ADMIN_TOKEN}x",
                                         f"Bearer {h.ADMIN_TOKEN[:-1]}"],
                         ids=["none", "wrong", "client-key", "scheme-only", "basic", "no-scheme",
                              "longer", "prefix"])
def test_admin_put_needs_the_admin_token(http, security_server, credentials):
    document = h.profile_document(security_server.model, "unauthorised", {1: [4]})
    headers = {"authorization": credentials} if credentials is not None else {}
    for method, path in (("PUT", "/v1/steering/profiles/unauthorised"),
                         ("DELETE", "/v1/steering/profiles/concise"),
                         ("POST", "/v1/steering/profiles:reload")):
        response = http.request(method, path, headers=headers,
                                json=document if method == "PUT" else None)
        h.assert_openai_error(response, 401, h.ADMIN_TOKEN, h.API_KEY)
    assert not (security_server.profiles / "unauthorised.json").exists()
    assert (security_server.profiles / "concise.json").exists()
    h.assert_still_serving(http)


# ---- names in the path ----------------------------------------------------------------------

BAD_TARGETS = [
    b"/v1/steering/profiles/..",
    b"/v1/steering/profiles/../profiles/escape",
    b"/v1/steering/profiles/..%2Fescape",
    b"/v1/steering/profiles/..%2F..%2Fescape",
    b"/v1/steering/profiles/%2E%2E%2Fescape",
    b"/v1/steering/profiles/a%2Fb",
    b"/v1/steering/profiles/%2Fetc%2Fescape",
    b"/v1/steering/profiles/escape%00",
    b"/v1/steering/profiles/esc%00ape",
    b"/v1/steering/profiles/escape%0A",
    b"/v1/steering/profiles/.escape",
    b"/v1/steering/profiles/%C3%A9scape",
    b"/v1/steering/profiles/" + b"e" * 65,
]


def directory_state(security_server) -> dict[str, str]:
    state = {}
    for path in sorted(security_server.root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in (
                "server.log", "audit.jsonl") and path.suffix != ".tmp":
            state[str(path.relative_to(security_server.root))] = hashlib.sha256(
                path.read_bytes()).hexdigest()
    return state


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_bad_profile_names_in_the_path_touch_nothing(security_server, http, target):
    before = directory_state(security_server)
    document = h.profile_document(security_server.model, "escape", {1: [4]})
    body = json.dumps(document).encode()
    for method in (b"PUT", b"GET", b"DELETE"):
        response = h.raw_request(
            security_server.base_url, method, target,
            [(b"Authorization", f"Bearer {h.ADMIN_TOKEN}".encode()),
             (b"Content-Type", b"application/json")], body if method == b"PUT" else b"")
        h.assert_raw_openai_error(response, (400, 404), *security_server.secret_markers())
    assert directory_state(security_server) == before
    assert not list(security_server.root.parent.glob("escape*"))
    h.assert_still_serving(http)


def test_200kb_name_in_the_admin_path_is_refused(security_server, http):
    before = directory_state(security_server)
    response = h.raw_request(security_server.base_url, b"PUT",
                             b"/v1/steering/profiles/" + b"e" * 200_000,
                             [(b"Authorization", f"Bearer {h.ADMIN_TOKEN}".encode()),
                              (b"Content-Type", b"application/json")], b"{}")
    assert response.status in (400, 404, 414, 431), (response.status, response.text[:200])
    assert len(response.body) < 300
    assert directory_state(security_server) == before
    h.assert_still_serving(http)


# ---- what the admin may do ------------------------------------------------------------------


def test_put_profile_is_usable_then_deleted(http, security_server):
    activate, deactivate = {0: [6], 2: [6]}, {1: [5]}
    document = h.profile_document(security_server.model, "sec-added", activate, deactivate)
    created = http.put("/v1/steering/profiles/sec-added", json=document, headers=h.admin())
    assert created.status_code == 201, created.text[:300]
    h.assert_clean(created.text, *security_server.secret_markers())
    for path in h.COMPLETION_PATHS:
        response = http.post(path, json=h.body_for(path, steering_profile="sec-added",
                                                   capture_routing=True), headers=h.auth())
        assert response.status_code == 200, response.text[:300]
        h.assert_header_names(response, "sec-added")
        assert h.follows(response.json()["routing"], activate, deactivate)
    deleted = http.delete("/v1/steering/profiles/sec-added", headers=h.admin())
    assert deleted.status_code == 200, deleted.text[:300]
    gone = http.post("/v1/completions", json=h.completion_body(steering_profile="sec-added"),
                     headers=h.auth())
    h.assert_openai_error(gone, 404)
    h.assert_still_serving(http)


def test_locked_profile_cannot_be_deleted_or_replaced_unnoticed(http, security_server):
    before = (security_server.profiles / "safety.json").read_bytes()
    response = http.delete("/v1/steering/profiles/safety", headers=h.admin())
    h.assert_openai_error(response, 409, *security_server.secret_markers())
    assert (security_server.profiles / "safety.json").read_bytes() == before
    locked = http.post("/v1/completions", json=h.completion_body(h.LOCKED, capture_routing=True),
                       headers=h.auth())
    assert locked.status_code == 200, locked.text[:300]
    assert h.follows(locked.json()["routing"], *h.SAFETY)
    h.assert_still_serving(http)


def test_admin_token_source(security_server, http):
    """The admin token reaches the server the preferred way and never shows in answers."""
    listing = http.get("/v1/steering/profiles", headers=h.admin())
    assert listing.status_code == 200
    assert "errors" in listing.json()
    h.assert_clean(listing.text, h.ADMIN_TOKEN, *security_server.secret_markers())
    endpoints = http.get("/v1/steering/endpoints", headers=h.auth())
    assert endpoints.status_code == 200
    h.assert_clean(endpoints.text, h.ADMIN_TOKEN)
    assert h.ADMIN_TOKEN not in security_server.log_text(), "the admin token is in the log"
