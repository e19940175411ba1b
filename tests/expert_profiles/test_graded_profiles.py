"""Graded steering in profiles and requests: `bias`, `steering_strength`, their digests and
composition, and the engine-side check of both (`steering_table.applicable_problem`)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from expert_profiles.composition import compose
from expert_profiles.model_shape import ModelShape
from expert_profiles.request_steering import (
    ResolvedSteering,
    SteeringRequestError,
    parse_steering_fields,
    resolve_inline,
    resolve_profile,
    resolved_from_wire,
    resolved_to_wire,
    scaled,
)
from expert_profiles.schema import MAX_BIAS, ExpertSteering, ProfileMismatchError, SteeringProfile
from vllm_patches.steering_table import SteeringTable, StepPlan, applicable_problem

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))


def profile(name: str, **sets) -> SteeringProfile:
    return SteeringProfile.model_validate({"name": name, "model": MODEL, **sets})


def test_bias_keys_are_decimal_indices_and_zero_values_are_dropped():
    sets = ExpertSteering.model_validate({"bias": {"1": {"2": 1.5, "3": 0, 4: -2}}})
    assert sets.bias == {1: {2: 1.5, 4: -2.0}}


@pytest.mark.parametrize("bias", [
    {"1": {"2": math.nan}}, {"1": {"2": math.inf}}, {"1": {"2": MAX_BIAS + 1}},
    {"1": {"2": True}}, {"1": {"2": "1"}}, {"1": [2]}, {"x": {"2": 1.0}}, {"1": {"-2": 1.0}},
    {"1": {"02": 1.0}}, [1, 2], {"1": {"2": 10**400}}, {"1": {"2": -(10**400)}},
])
def test_malformed_bias_is_refused(bias):
    with pytest.raises(ValidationError):
        ExpertSteering.model_validate({"bias": bias})


def test_an_expert_cannot_be_switched_and_biased_in_one_layer():
    with pytest.raises(ValidationError, match="switched on or off and also biased"):
        ExpertSteering.model_validate({"activate": {"1": [2]}, "bias": {"1": {"2": 1.0}}})
    ExpertSteering.model_validate({"activate": {"1": [2]}, "bias": {"2": {"2": 1.0}}})


def test_bias_alone_is_steering_and_is_checked_against_the_shape():
    sets = ExpertSteering.model_validate({"bias": {"1": {"7": 1.0}}})
    sets.check_shape(SHAPE)
    with pytest.raises(ProfileMismatchError, match="bias: layer 1 names experts"):
        ExpertSteering.model_validate({"bias": {"1": {"8": 1.0}}}).check_shape(SHAPE)


def test_digest_without_bias_is_unchanged_and_bias_changes_it():
    plain = ExpertSteering.model_validate({"activate": {"1": [2]}})
    biased = ExpertSteering.model_validate({"activate": {"1": [2]}, "bias": {"1": {"3": 0.5}}})
    # The digest of on/off steering predates bias (cache salts of existing profiles hold).
    payload = {"activate": {"1": [2]}, "deactivate": {}, "eps": 0.01}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert plain.digest(0.01) == hashlib.sha256(blob).hexdigest()[:16]
    assert biased.digest(0.01) != plain.digest(0.01)


def test_profile_file_keeps_bias_and_omits_it_when_empty():
    with_bias = profile("g", bias={"2": {"5": -1.25}})
    assert json.loads(with_bias.to_json())["bias"] == {"2": {"5": -1.25}}
    assert SteeringProfile.model_validate_json(with_bias.to_json()) == with_bias
    assert "bias" not in json.loads(profile("p", activate={"1": [2]}).to_json())


def test_composition_adds_biases_and_a_switch_wins_over_a_bias():
    a = profile("a", activate={"1": [2]}, bias={"1": {"3": 1.0}, "2": {"4": 40.0}})
    b = profile("b", bias={"1": {"2": 5.0, "3": 0.5}, "2": {"4": 40.0}})
    sets = compose([a, b], 0.01)
    assert sets.activate == {1: [2]}
    assert sets.bias == {1: {3: 1.5}, 2: {4: MAX_BIAS}}


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (0.5, 0.5), (1, 1.0)])
def test_steering_strength_is_read(value, expected):
    fields = {"steering_profile": "p", "steering_strength": value}
    assert parse_steering_fields(fields).strength == expected


@pytest.mark.parametrize("value", [True, -0.1, 1.5, math.nan, math.inf, 10**400, "0.5", [0.5],
                                   {"x": 1}])
def test_bad_steering_strength_is_refused(value):
    with pytest.raises(SteeringRequestError) as info:
        parse_steering_fields({"steering_profile": "p", "steering_strength": value})
    assert info.value.param == "steering_strength" and info.value.status == 400


def test_steering_strength_needs_steering():
    with pytest.raises(SteeringRequestError, match="give it with"):
        parse_steering_fields({"steering_strength": 0.5})
    assert parse_steering_fields({"steering_strength": None}).strength is None


def test_strength_names_its_own_steering():
    resolved = resolve_profile(profile("p", activate={"1": [2]}), SHAPE, 0.01)
    assert scaled(resolved, None) is resolved and scaled(resolved, 1.0) is resolved
    half = scaled(resolved, 0.5)
    assert half.strength == 0.5 and half.digest != resolved.digest
    assert scaled(resolved, 0.25).digest not in {half.digest, resolved.digest}
    assert resolved_from_wire(resolved_to_wire(half)) == half


def test_resolved_bias_travels_to_the_engine():
    resolved = scaled(resolve_inline({"bias": {"1": {"3": 2.5}}}, SHAPE, 0.01), 0.5)
    again = ResolvedSteering.from_extra_args(json.loads(json.dumps(resolved.to_extra_args())))
    assert again == resolved and again.bias == {1: {3: 2.5}}


@pytest.mark.parametrize(("change", "message"), [
    ({"strength": 1.5}, "strength must be"),
    ({"strength": math.nan}, "strength must be"),
    ({"strength": 10**400}, "strength must be"),
    ({"bias": {1: {2: 10**400}}}, "is not in"),
    ({"bias": {9: {1: 1.0}}}, "bias: layer 9"),
    ({"bias": {1: {8: 1.0}}}, "bias: layer 1: expert 8"),
    ({"bias": {1: {2: math.inf}}}, "is not in"),
    ({"bias": {1: {2: 1.0}}, "activate": {1: [2]}}, "switched and biased"),
    ({"bias": {1: [2]}}, "not a mapping"),
])
def test_the_engine_refuses_graded_steering_it_cannot_apply(change, message):
    steering = ResolvedSteering(**{"label": "inline", "digest": "d", "activate": {},
                                   "deactivate": {}, "eps": 0.01, **change})
    problem = applicable_problem(steering, [0, 1, 2, 3], 8, 2)
    assert problem is not None and message in problem


def test_table_slots_hold_bias_and_strength():
    table = SteeringTable([0, 1, 2, 3], 8, 16, 4, torch.device("cpu"), top_k=2)
    steering = scaled(resolve_inline({"activate": {"1": [2]}, "bias": {"3": {"4": -1.5}}},
                                     SHAPE, 0.01), 0.25)
    table.prepare_step(StepPlan(["r"], np.array([2]), np.array([0])), lambda r: steering)
    slot = int(table.token_profiles[0])
    assert slot != 0 and float(table.strength[slot]) == 0.25
    assert float(table.layer_bias(3)[slot, 4]) == -1.5
    assert int(table.layer_masks(1)[slot, 2]) == 1
    assert float(table.layer_bias(1)[slot].abs().sum()) == 0.0


def test_a_step_reads_the_graded_tables_only_with_a_graded_request():
    table = SteeringTable([0, 1, 2, 3], 8, 16, 4, torch.device("cpu"), top_k=2)
    on_off = resolve_inline({"activate": {"1": [2]}}, SHAPE, 0.01)
    steerings = {"a": on_off, "b": scaled(on_off, 0.5),
                 "c": resolve_inline({"bias": {"1": {"3": 1.0}}}, SHAPE, 0.01)}
    for scheduled, graded in ((["a"], False), (["a", "b"], True), (["c"], True), (["a"], False)):
        plan = StepPlan(scheduled, np.ones(len(scheduled), dtype=np.int64),
                        np.zeros(len(scheduled), dtype=np.int64))
        table.prepare_step(plan, steerings.get)
        assert table.steering_active and table.graded_active is graded, scheduled


def test_profiles_whose_biases_cancel_out_are_a_conflict():
    from expert_profiles.composition import CompositionConflictError
    from expert_profiles.request_steering import resolve_profiles

    up, down = profile("up", bias={"1": {"3": 1.0}}), profile("down", bias={"1": {"3": -1.0}})
    with pytest.raises(CompositionConflictError, match="cancel out"):
        compose([up, down], 0.01)
    with pytest.raises(SteeringRequestError) as info:
        resolve_profiles([up, down], SHAPE, 0.01)
    assert info.value.status == 409 and info.value.code == "steering_conflict"
    kept = compose([up, down, profile("x", bias={"2": {"1": 0.5}})], 0.01)
    assert kept.bias == {2: {1: 0.5}}
