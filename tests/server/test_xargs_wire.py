"""Steering fields in vLLM's `vllm_xargs` form, as the plugin's front end reads them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from expert_profiles.model_shape import ModelShape
from server import xargs_wire
from vllm_patches import request_steering as rs

SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))


def test_the_resolver_reads_the_wire_forms():
    wire = {"steering": xargs_wire.encode_inline({"activate": {"1": [2]}}), "capture_routing": 1}
    resolved = rs.resolve_request(wire, SHAPE, rs.ProfileCache(None), 0.01)
    assert resolved is not None and resolved.activate == {1: [2]}
    assert rs.wants_capture(wire) is True
    assert rs.wants_capture({"capture_routing": 0}) is False
    with pytest.raises(rs.SteeringRequestError):
        rs.wants_capture({"capture_routing": 5})
    with pytest.raises(rs.SteeringRequestError, match="JSON text"):
        rs.resolve_request({"steering": "{"}, SHAPE, rs.ProfileCache(None), 0.01)


def _front_end():
    from vllm_patches.vllm_compat import FrontendSteering

    front = FrontendSteering.__new__(FrontendSteering)
    front.served_shape = lambda: (SHAPE, None)
    front.profiles = rs.ProfileCache(None)
    front.eps = 0.01
    return front


def test_front_end_resolves_the_wire_form():
    params = SimpleNamespace(extra_args={"steering": xargs_wire.encode_inline(
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
