"""Property-based fuzzing of completion bodies against the live server (hypothesis).

Bodies mix a valid chat or text completion with random steering: `steering_profile` from
{safety, concise, unsafe, missing, 200-character junk, null, integers, lists}, inline
`steering`, `capture_routing` of random types, `vllm_xargs` of random JSON types (objects with
steering, reserved and ordinary keys; lists of pairs; strings; numbers; ...), `model` of
{tiny-base, tiny-safe, junk}, `stream` true or false, and random extra keys.

The oracle is the contract's policy, computed here from the body (`expected`):
- never a 5xx;
- a 2xx only if the policy allows exactly what was asked (clients never get `unsafe`, inline
  steering is never allowed on this server, `tiny-safe` always runs `safety` and refuses any
  other choice), and then `x-steermoe-steering` names the expected profile (or `none`) and a
  captured routing follows it;
- a body the policy allows without doubt gets a 2xx;
- every 4xx is in the OpenAI error shape, without traceback or path.

Settings: derandomize (reproducible in CI), no example database (nothing written into the
tree), FUZZ_EXAMPLES examples (env STEERMOE_FUZZ_EXAMPLES overrides), max_tokens 2.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.security import helpers as h

pytestmark = pytest.mark.engine

FUZZ_EXAMPLES = int(os.environ.get("STEERMOE_FUZZ_EXAMPLES", "500"))

MISSING: Any = object()
STEERING_KEYS = ("steering_profile", "steering", "capture_routing")
RESERVED_KEYS = ("steermoe", "steermoe_capture_id", "steermoe_auth")
CLIENT_PROFILES = ("safety", "concise")
JUNK_MODELS = ("junk-model", "tiny-safe-2", "TINY-SAFE", "tiny-base ", "")


# ---- the oracle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    verdict: str  # "allow", "refuse" or "either" (the contract leaves the case open)
    profile: str | None = None  # what a 2xx must be steered with (None: unsteered)
    capture: bool = False
    why: str = ""


def refuse(why: str) -> Expected:
    return Expected("refuse", why=why)


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def expected(body: dict[str, Any]) -> Expected:
    """What the contract says this body gets on this server."""
    open_case = []
    xargs = body.get("vllm_xargs", MISSING)
    nested: dict[str, Any] = {}
    if xargs is not MISSING:
        if not isinstance(xargs, dict):
            return refuse("vllm_xargs is not an object")
        if any(key in xargs for key in RESERVED_KEYS):
            return refuse("reserved vllm_xargs key")
        nested = {key: xargs[key] for key in STEERING_KEYS if key in xargs}
    values: dict[str, Any] = {}
    for key in STEERING_KEYS:
        top, inner = body.get(key, MISSING), nested.get(key, MISSING)
        if top is not MISSING and inner is not MISSING and not _same_json(top, inner):
            if top != inner:
                return refuse(f"{key} differs between the top level and vllm_xargs")
            open_case.append(f"{key}: equal in Python, not in JSON")
        values[key] = top if top is not MISSING else inner
    model = body.get("model")
    if model == "":
        model = h.BASE  # vLLM's default model; the contract says nothing about it
        open_case.append("empty model name")
    elif model not in (h.BASE, h.LOCKED):
        return refuse("unknown model")
    if values["steering"] is not MISSING:
        return refuse("inline steering is not enabled")
    capture = values["capture_routing"]
    if capture is MISSING or capture is False or (type(capture) is int and capture == 0):
        wants_capture = False
    elif capture is True or (type(capture) is int and capture == 1):
        wants_capture = True
    elif capture is None:
        wants_capture = False
        open_case.append("capture_routing null")
    else:
        return refuse("capture_routing is not a boolean")
    if wants_capture and body.get("stream"):
        return refuse("capture with streaming")
    name = values["steering_profile"]
    if model == h.LOCKED:
        if name is MISSING or name == "safety":
            profile = "safety"
        else:
            return refuse("another steering on the locked endpoint")
    elif name is MISSING or name is None:
        profile = None
    elif isinstance(name, str) and name in CLIENT_PROFILES:
        profile = name
    else:
        return refuse(f"profile {name!r:.40} is not selectable")
    verdict = "either" if open_case else "allow"
    return Expected(verdict, profile, wants_capture, "; ".join(open_case))


# ---- strategies -----------------------------------------------------------------------------


def maybe(strategy: st.SearchStrategy, absent_in_10: int) -> st.SearchStrategy:
    """MISSING with probability about absent_in_10/10, else a value of `strategy`."""
    return st.integers(0, 9).flatmap(
        lambda n: st.just(MISSING) if n < absent_in_10 else strategy)


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=10),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)
junk_name = st.text(alphabet=string.ascii_letters + string.digits + "-._/ \\\u00e9",
                    min_size=200, max_size=200)
profile_values = st.integers(0, 9).flatmap(lambda n: (
    st.sampled_from(["safety", "concise", "unsafe", "missing"]) if n < 6 else st.one_of(
        st.just("x" * 200), junk_name, st.none(), st.integers(-5, 10**12),
        st.lists(st.sampled_from(["safety", "concise", "unsafe"]), max_size=3),
    )))
inline_values = st.one_of(
    st.just({}), st.just({"activate": {"0": [5]}}), st.just({"activate": {"3": []}}),
    st.just(json.dumps({"activate": {"0": [3]}})), st.just("{}"),
    json_any.filter(lambda value: value is not None),
)
capture_values = st.one_of(
    st.booleans(), st.none(), st.sampled_from([0, 1, 2, -1]),
    st.sampled_from(["true", "1", "", "yes"]), st.sampled_from([0.5, 1e300, -2.5]),
    st.lists(st.booleans(), max_size=2), st.just({}),
)
xargs_plain_values = st.one_of(
    st.text(max_size=8), st.integers(-1000, 1000), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.lists(st.one_of(st.text(max_size=4), st.integers(0, 9)), max_size=3),
)
xargs_clean = st.fixed_dictionaries({}, optional={
    "steering_profile": profile_values, "capture_routing": capture_values,
    "x_extra": xargs_plain_values,
})
pair_lists = st.lists(
    st.tuples(st.sampled_from([*STEERING_KEYS, "x_extra"]),
              st.one_of(profile_values, capture_values)).map(list),
    min_size=1, max_size=2,
)
xargs_values = st.integers(0, 9).flatmap(lambda n: (
    xargs_clean if n < 4 else
    st.tuples(xargs_clean, st.sampled_from(RESERVED_KEYS), st.text(max_size=6)).map(
        lambda t: {**t[0], t[1]: t[2]}) if n == 4 else
    st.tuples(xargs_clean, inline_values).map(lambda t: {**t[0], "steering": t[1]})
    if n == 5 else
    pair_lists if n < 8 else
    st.one_of(
        st.text(max_size=20), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(), st.lists(json_any, max_size=3),
    )))
prompts = st.one_of(st.sampled_from([h.PROMPT, "Hello", "def f(x):", "1 2 3"]),
                    st.text(alphabet=string.printable, min_size=1, max_size=40))
extra_keys = st.dictionaries(
    st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=6).map(lambda s: f"x_{s}"),
    json_any, max_size=2,
)


@st.composite
def requests(draw) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(h.COMPLETION_PATHS))
    model = draw(st.integers(0, 9).flatmap(
        lambda n: st.just(h.BASE) if n < 4 else st.just(h.LOCKED) if n < 8
        else st.sampled_from(JUNK_MODELS)))
    body = h.body_for(path, model, max_tokens=2)
    if path == "/v1/chat/completions":
        body["messages"][0]["content"] = draw(prompts)
    else:
        body["prompt"] = draw(prompts)
    stream = draw(st.sampled_from([MISSING, False, True]))
    if stream is not MISSING:
        body["stream"] = stream
    for key, strategy, absent in (("steering_profile", profile_values, 5),
                                  ("steering", inline_values, 9),
                                  ("capture_routing", capture_values, 5),
                                  ("vllm_xargs", xargs_values, 6)):
        value = draw(maybe(strategy, absent))
        if value is not MISSING:
            body[key] = value
    body.update(draw(extra_keys))
    return path, body


# ---- the property ---------------------------------------------------------------------------


def check(http, path: str, body: dict[str, Any]) -> None:
    want = expected(body)
    note(f"expected: {want}")
    response = http.post(path, json=body, headers=h.auth())
    note(f"answer: {response.status_code} {h.steering_of(response)!r} {response.text[:300]!r}")
    event(f"expected {want.verdict}, answered {response.status_code}")
    assert response.status_code < 500, f"a {response.status_code} for a client body"
    if response.status_code >= 400:
        assert want.verdict != "allow", f"refused though the policy allows it ({want})"
        h.assert_openai_error(response, response.status_code)
        return
    assert 200 <= response.status_code < 300, response.status_code
    assert want.verdict != "refuse", f"SECURITY: answered though the policy refuses: {want.why}"
    h.assert_header_names(response, want.profile,
                          h.LOCKED if want.profile == "safety" and body["model"] == h.LOCKED
                          else None)
    if body.get("stream"):
        chunks = h.sse_chunks(response.text)
        assert chunks, response.text[:300]
        return
    payload = response.json()
    h.assert_never_unsafe(payload)
    if want.capture:
        routing = payload.get("routing")
        assert routing is not None, "capture_routing was asked for but no routing came back"
        if want.profile is None:
            h.assert_unsteered_routing(routing)
        else:
            assert h.follows(routing, *h.PROFILE_SETS[want.profile]), want


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(case=requests())
def test_fuzzed_bodies_follow_the_policy(http, case):
    path, body = case
    check(http, path, body)


def test_server_is_healthy_after_fuzzing(http):
    h.assert_still_serving(http)


# ---- the oracle itself (no server needed beyond the fixture) --------------------------------


@pytest.mark.parametrize(("body", "verdict", "profile"), [
    ({"model": h.BASE}, "allow", None),
    ({"model": h.LOCKED}, "allow", "safety"),
    ({"model": h.LOCKED, "steering_profile": None}, "refuse", None),
    ({"model": h.BASE, "steering_profile": "unsafe"}, "refuse", None),
    ({"model": h.BASE, "vllm_xargs": {"steering_profile": "concise"}}, "allow", "concise"),
    ({"model": h.BASE, "vllm_xargs": [["steering_profile", "concise"]]}, "refuse", None),
    ({"model": h.BASE, "steering": {}}, "refuse", None),
    ({"model": h.BASE, "capture_routing": True, "stream": True}, "refuse", None),
    ({"model": h.BASE, "capture_routing": True, "vllm_xargs": {"capture_routing": 1}},
     "either", None),
    ({"model": "junk"}, "refuse", None),
])
def test_oracle(body, verdict, profile):
    want = expected(body)
    assert want.verdict == verdict, want
    if verdict != "refuse":
        assert want.profile == profile
