"""`server.request_body`: reading steering fields and rewriting the body vLLM gets."""

from __future__ import annotations

import json

import pytest

from expert_profiles.request_steering import (
    RequestedSteering,
    SteeringRequestError,
    parse_steering_fields,
    wants_capture,
)
from server.errors import SteeringHTTPError
from server.request_body import (
    capture_problem,
    contains_steering,
    parse_json_object,
    take_steering,
    with_steering,
)

INLINE = {"activate": {"1": [2]}}


def test_top_level_fields_are_taken_off():
    body = {"model": "m", "prompt": "p", "steering_profile": "safety", "capture_routing": True}
    requested, rest = take_steering(body)
    assert requested == RequestedSteering(profile="safety", profile_given=True, capture=True)
    assert rest == {"model": "m", "prompt": "p"}
    assert "steering_profile" in body  # the caller's dict is left alone


def test_vllm_xargs_fields_are_read_and_other_xargs_kept():
    body = {"model": "m", "vllm_xargs": {"steering_profile": "safety", "other": 1}}
    requested, rest = take_steering(body)
    assert requested.profile == "safety"
    assert rest["vllm_xargs"] == {"other": 1}
    _, rest = take_steering({"vllm_xargs": {"steering_profile": "x"}})
    assert "vllm_xargs" not in rest


def test_same_value_twice_is_fine_different_values_are_not():
    body = {"steering_profile": "a", "vllm_xargs": {"steering_profile": "a"}}
    assert take_steering(body)[0].profile == "a"
    with pytest.raises(SteeringHTTPError) as caught:
        take_steering({"steering_profile": "a", "vllm_xargs": {"steering_profile": "b"}})
    assert caught.value.status == 400


def test_explicit_null_profile_is_noted():
    requested, _ = take_steering({"steering_profile": None})
    assert requested.profile is None and requested.profile_given
    assert requested.mentions_steering and not requested.asks_for_steering


def test_inline_from_object_or_json_text():
    assert take_steering({"steering": INLINE})[0].inline == INLINE
    assert take_steering({"vllm_xargs": {"steering": json.dumps(INLINE)}})[0].inline == INLINE


def test_capture_accepts_booleans_and_the_xargs_form():
    assert take_steering({"capture_routing": True})[0].capture
    assert take_steering({"vllm_xargs": {"capture_routing": 1}})[0].capture
    assert not take_steering({"capture_routing": False})[0].capture


@pytest.mark.parametrize("body", [
    {"steering_profile": 3},
    {"steering": "not json"},
    {"steering": [1]},
    {"capture_routing": "yes"},
    {"capture_routing": 2},
    {"steering_profile": "a", "steering": INLINE},
    {"vllm_xargs": {"steermoe": {"activate": {}}}},
    {"vllm_xargs": {"steermoe_capture_id": "x"}},
])
def test_malformed_steering_is_400(body):
    with pytest.raises(SteeringHTTPError) as caught:
        take_steering(body)
    assert caught.value.status == 400


FIELD_CASES = [
    {"steering_profile": "safety"},
    {"steering_profile": None},
    {"steering_profile": 3},
    {"steering": INLINE},
    {"steering": json.dumps(INLINE)},
    {"steering": "null"},
    {"steering": "[" * 5000},
    {"steering": None},
    {"capture_routing": 1},
    {"capture_routing": None},
    {"capture_routing": "1"},
    {"steering_profile": "a", "steering": json.dumps(INLINE)},
    {"steering_profile": 3, "steering": INLINE, "capture_routing": 2},
]


def _outcome(read, fields):
    try:
        return read(fields)
    except SteeringHTTPError as exc:
        return (exc.status, exc.message, exc.param)
    except SteeringRequestError as exc:
        return (exc.status, str(exc), exc.param)


@pytest.mark.parametrize("fields", FIELD_CASES)
def test_the_steering_layer_and_the_engine_front_end_read_fields_alike(fields):
    """One parser: what the layer accepts (top level or in vllm_xargs), the front end reads
    the same way from `extra_args`, and what one refuses, the other refuses alike."""
    engine = _outcome(parse_steering_fields, fields)
    assert _outcome(lambda f: take_steering(f)[0], fields) == engine
    assert _outcome(lambda f: take_steering({"vllm_xargs": f})[0], fields) == engine
    if isinstance(engine, RequestedSteering):
        assert wants_capture(fields) is engine.capture


def test_with_steering_writes_the_xargs_wire_form():
    out = with_steering({"model": "m", "vllm_xargs": {"other": 1}}, None, INLINE, True)
    assert out["vllm_xargs"]["other"] == 1
    assert out["vllm_xargs"]["capture_routing"] == 1
    assert json.loads(out["vllm_xargs"]["steering"]) == INLINE
    assert with_steering({"model": "m"}, "safety", None, False) == {
        "model": "m", "vllm_xargs": {"steering_profile": "safety"}}
    assert with_steering({"model": "m"}, None, None, False) == {"model": "m"}


def test_parse_json_object():
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[1]", b"\xff"):
        with pytest.raises(SteeringHTTPError) as caught:
            parse_json_object(raw)
        assert caught.value.status == 400


@pytest.mark.parametrize(("kind", "body", "ok"), [
    ("chat", {"messages": []}, True),
    ("chat", {"stream": True}, False),
    ("chat", {"n": 2}, False),
    ("chat", {"use_beam_search": True}, False),
    ("completions", {"prompt": "one"}, True),
    ("completions", {"prompt": [1, 2, 3]}, True),
    ("completions", {"prompt": ["one"]}, True),
    ("completions", {"prompt": ["one", "two"]}, False),
    ("completions", {"prompt": [[1], [2]]}, False),
    ("completions", {"best_of": 3}, False),
])
def test_capture_problem(kind, body, ok):
    assert (capture_problem(kind, body) is None) == ok


def test_contains_steering_finds_fields_of_other_apis():
    assert contains_steering({"input": "x", "steering_profile": "a"}) == "steering_profile"
    assert contains_steering({"sampling_params": {"extra_args": {"steermoe": {}}}}) == "steermoe"
    assert contains_steering({"vllm_xargs": {"capture_routing": 1}}) == "capture_routing"
    tools = {"tools": [{"parameters": {"properties": {"steering": {"type": "string"}}}}]}
    assert contains_steering(tools) is None
