"""Contract 7, bounded echo: a client's model name (100 kB, or with control characters) gets a
4xx (404 from vLLM for an unknown model; 413 past the body limit); the connection is not
dropped; the `x-steermoe-steering` header, if present, is short printable ASCII that never
contains the client's string; no audit line grows past 2 kB.

With `steering_profile` set, the steering layer decides to steer before vLLM finds the model
unknown, so the header is written for a name the client chose: that is the case to watch.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.security import helpers as h

pytestmark = pytest.mark.engine

# The requests of test_audit_lines_stay_short that leave an audit line (all five steer).
AUDITED_REQUESTS = 5

# name -> a part of it that must never come back in a header, the audit log or /metrics
HOSTILE_MODELS = {
    "100kB": ("M" * 100_000, "M" * 64),
    "60kB": ("N" * 60_000, "N" * 64),
    "crlf-header-injection": ("evil\r\nx-injected: 1\r\n\r\nHTTP/1.1 200 OK", "x-injected"),
    "lf-only": ("evil\nx-injected: 2", "x-injected"),
    "nul": ("evilnul\x00tail", "evilnul"),
    "del": ("evildel\x7ftail", "evildel"),
    "c1-controls": ("evilc1\x85\x9btail", "evilc1"),
    "bidi-override": ("evilbidi\u202egnp.exe", "evilbidi"),
    "non-ascii": ("\u00e9vil\u00e9" * 400, "\u00e9vil"),
    "emoji": ("evil\U0001f600" * 10, "evil\U0001f600"),
    "semicolon-fields": ("x; profile=unsafe; digest=0", "profile=unsafe"),
}


def check_header(header: str | None, marker: str) -> None:
    if header is None:
        return
    assert len(header) < 200, f"x-steermoe-steering is {len(header)} characters long"
    assert all(" " <= ch <= "~" for ch in header), f"x-steermoe-steering is not ASCII: {header!r}"
    assert marker not in header, f"x-steermoe-steering echoes the client's model: {header!r}"


@pytest.mark.parametrize("path", h.COMPLETION_PATHS)
@pytest.mark.parametrize("steered", [False, True], ids=["plain", "with-profile"])
@pytest.mark.parametrize("variant", list(HOSTILE_MODELS))
def test_hostile_model_names_get_a_bounded_4xx(http, security_server, path, steered, variant):
    model, marker = HOSTILE_MODELS[variant]
    extra = {"steering_profile": "concise"} if steered else {}
    body = json.dumps(h.body_for(path, model, **extra)).encode()
    response = h.raw_request(security_server.base_url, b"POST", path.encode(),
                             [(b"Content-Type", b"application/json"),
                              (b"Authorization", f"Bearer {h.API_KEY}".encode())], body)
    assert 400 <= response.status < 500, (response.status, response.text[:300])
    if len(body) > h.MAX_BODY:
        assert response.status == 413
    else:
        assert response.status in (400, 404), (response.status, response.text[:300])
    assert not response.header("x-injected"), "SECURITY: a header was injected"
    steering = response.header(h.STEERING_HEADER)
    assert len(steering) <= 1, steering
    check_header(steering[0] if steering else None, marker)
    h.assert_raw_openai_error(response, response.status, *security_server.secret_markers())
    h.assert_still_serving(http)


def test_audit_lines_stay_short(http, security_server):
    """Only this test's own lines are checked, and each of its requests must have left one."""
    written = len(security_server.audit_log.read_bytes().splitlines())
    for variant in ("60kB", "crlf-header-injection", "non-ascii"):
        model, _ = HOSTILE_MODELS[variant]
        http.post("/v1/completions", json=h.completion_body(model, steering_profile="concise"),
                  headers=h.auth())
    http.post("/v1/completions", json=h.completion_body(steering_profile="b" * 60_000),
              headers=h.auth())
    http.post("/v1/completions", json=h.completion_body(h.LOCKED, max_tokens=1),
              headers=h.auth())  # a line is written after each answer: this one comes last
    h.assert_still_serving(http)
    deadline = time.monotonic() + 10
    while True:
        lines = security_server.audit_log.read_bytes().splitlines()[written:]
        if len(lines) >= AUDITED_REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(lines) == AUDITED_REQUESTS, lines
    records = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) for record in records)
    assert sum(record["endpoint"] == h.LOCKED for record in records) == 1, records
    for line in lines:
        assert len(line) < 2048, f"an audit line is {len(line)} bytes: {line[:200]!r}..."


def test_metrics_labels_stay_bounded(http):
    """Beyond the letter of contract 7: client model names do not become metric series (each
    would be a new series, and a long one). Labels other than the served names are few and
    short, and no steermoe line is long."""
    for index, variant in enumerate(("60kB", "crlf-header-injection", "nul", "bidi-override")):
        model, _ = HOSTILE_MODELS[variant]
        for profile in ("concise", f"missing-{index}"):
            http.post("/v1/chat/completions", json=h.chat_body(model, steering_profile=profile),
                      headers=h.auth())
    text = http.get("/metrics").text
    steermoe_lines = [line for line in text.splitlines() if line.startswith("steermoe:")]
    assert steermoe_lines
    unknown: set[str] = set()
    for line in steermoe_lines:
        assert len(line) < 1024, f"a metrics line is {len(line)} characters: {line[:200]}..."
        for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line):
            assert len(value) <= 100, f"label {label} is {len(value)} characters: {line[:200]}"
            if label == "endpoint" and value not in (h.BASE, h.LOCKED):
                unknown.add(value)
    assert len(unknown) <= 2, f"client model names became endpoint labels: {sorted(unknown)}"
    h.assert_still_serving(http)
