"""Steering fields in vLLM's `vllm_xargs` form, as the plugin's front end reads them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from expert_profiles import request_steering as rs
from expert_profiles.model_shape import ModelShape

SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))


def test_the_resolver_reads_the_wire_forms():
    wire = {"steering": rs.inline_to_wire({"activate": {"1": [2]}}), "capture_routing": 1}
    resolved = rs.resolve_request(wire, SHAPE, rs.ProfileCache(None), 0.01)
    assert resolved is not None and resolved.activate == {1: [2]}
    assert rs.wants_capture(wire) is True
    assert rs.wants_capture({"capture_routing": 0}) is False
    with pytest.raises(rs.SteeringRequestError):
        rs.wants_capture({"capture_routing": 5})
    with pytest.raises(rs.SteeringRequestError, match="JSON text"):
        rs.resolve_request({"steering": "{"}, SHAPE, rs.ProfileCache(None), 0.01)


def _front_end():
    from vllm_patches.vllm_compat.frontend_hooks import FrontendSteering

    front = FrontendSteering.__new__(FrontendSteering)
    front.served_shape = lambda: (SHAPE, None)
    front.profiles = rs.ProfileCache(None)
    front.eps = 0.01
    return front


def test_front_end_resolves_the_wire_form():
    params = SimpleNamespace(extra_args={"steering": rs.inline_to_wire(
        {"activate": {"1": [2]}}), "capture_routing": 1})
    request = SimpleNamespace(sampling_params=params, request_id="r-1", cache_salt=None)
    _front_end().apply(request)
    assert params.extra_args["steermoe"]["activate"] == {"1": [2]}
    assert params.extra_args["steermoe_capture_id"] == "r-1"
    assert request.cache_salt.startswith("steermoe:")


@pytest.mark.parametrize("forged", [{"steermoe": "boom"}, {"steermoe": {"activate": {"1": [0]},
                                    "deactivate": {}, "eps": 0.01, "label": "x", "digest": "d"}},
                                    {"steermoe_capture_id": "someone-else"}])
def test_client_supplied_reserved_keys_never_reach_the_engine(forged):
    params = SimpleNamespace(extra_args={**forged, "other": 1})
    request = SimpleNamespace(sampling_params=params, request_id="r-2", cache_salt=None)
    _front_end().apply(request)
    assert params.extra_args == {"other": 1}
    assert request.cache_salt is None


KEY = "k" * 64


def _marked_request(monkeypatch, resolved, capture=False, **edit):
    from server.request_body import with_steering

    monkeypatch.setenv(rs.SERVER_KEY_ENV, KEY)
    body = with_steering({"model": "m"}, "calm", None, capture, rs.server_key(), resolved)
    xargs = {**body["vllm_xargs"], **edit}
    params = SimpleNamespace(extra_args=xargs)
    return params, SimpleNamespace(sampling_params=params, request_id="r-3", cache_salt=None)


def test_the_engine_runs_exactly_the_sets_the_steering_layer_resolved(monkeypatch):
    """No second read of the profile file: a profile rewritten or deleted between the policy's
    check and the engine cannot change what runs (the front end has no profile directory)."""
    resolved = rs.ResolvedSteering("profile:calm", "d1", {1: [2]}, {3: [0]}, 0.02)
    params, request = _marked_request(monkeypatch, resolved, capture=True)
    assert "steering_profile" not in params.extra_args
    _front_end().apply(request)
    assert rs.ResolvedSteering.from_extra_args(params.extra_args["steermoe"]) == resolved
    assert params.extra_args["steermoe_capture_id"] == "r-3"
    assert request.cache_salt == rs.salted(None, "d1")


@pytest.mark.parametrize("edit", [
    {"steermoe": rs.resolved_to_wire(rs.ResolvedSteering("x", "d1", {1: [5]}, {}, 0.02))},
    {"steermoe_auth": "0" * 64},
    {"capture_routing": 1},
    {"steering_profile": "unsafe"},
])
def test_tampered_or_unmarked_steering_is_refused_under_steermoe_serve(monkeypatch, edit):
    resolved = rs.ResolvedSteering("profile:calm", "d1", {1: [2]}, {}, 0.02)
    params, request = _marked_request(monkeypatch, resolved, **edit)
    with pytest.raises(rs.SteeringRequestError) as info:
        _front_end().apply(request)
    assert info.value.status == 403


@pytest.mark.parametrize("forged", [{"steering_profile": "calm"}, {"capture_routing": True},
                                    {"steering": '{"activate": {"1": [2]}}'}])
def test_raw_steering_fields_are_refused_under_steermoe_serve(monkeypatch, forged):
    monkeypatch.setenv(rs.SERVER_KEY_ENV, KEY)
    params = SimpleNamespace(extra_args=forged)
    request = SimpleNamespace(sampling_params=params, request_id="r-4", cache_salt=None)
    with pytest.raises(rs.SteeringRequestError, match="only through the steering layer"):
        _front_end().apply(request)


def test_marked_steering_the_engine_cannot_apply_is_refused(monkeypatch):
    resolved = rs.ResolvedSteering("inline", "d2", {1: [99]}, {}, 0.01)
    params, request = _marked_request(monkeypatch, resolved)
    with pytest.raises(rs.SteeringRequestError, match="cannot be applied"):
        _front_end().apply(request)
