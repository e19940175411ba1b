"""`GuardSpec`: the scoring part of a guard as a request carries it to the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expert_profiles.guard_spec import MAX_WEIGHTS, GuardSpec
from expert_profiles.request_steering import (
    ResolvedSteering,
    SteeringRequestError,
    guarded,
    resolved_from_wire,
    resolved_to_wire,
)

WEIGHTS = np.random.default_rng(0).normal(size=(48, 128)) * 3


def spec(weights=WEIGHTS) -> GuardSpec:
    return GuardSpec("g", tuple(range(len(weights))), weights, -1.25, 0.4)


def test_the_wire_form_is_exact_and_compact():
    original = spec()
    again = GuardSpec.from_wire(json.loads(json.dumps(original.to_wire())))
    assert again == original and np.array_equal(again.weights, original.weights)
    assert not again.weights.flags.writeable
    as_json = len(json.dumps(WEIGHTS.tolist()))
    assert len(json.dumps(original.to_wire())) < 0.6 * as_json


def test_the_digest_names_every_value():
    base = spec()
    changed = WEIGHTS.copy()
    changed[47, 127] = np.nextafter(changed[47, 127], np.inf)
    assert spec(changed).digest != base.digest
    assert GuardSpec("g", base.moe_layers, WEIGHTS, -1.25, 0.41).digest != base.digest


@pytest.mark.parametrize("change", [
    {"weights": "not base64!"},
    {"shape": [48, 127]},
    {"shape": [0, 128]},
    {"shape": [MAX_WEIGHTS, 2]},
    {"weights": ""},
])
def test_malformed_wire_forms_are_refused(change):
    wire = {**spec().to_wire(), **change}
    with pytest.raises(ValueError):
        GuardSpec.from_wire(wire)
    steering = guarded(ResolvedSteering("inline", "d", {1: [2]}, {}, 0.01), spec())
    text = json.loads(resolved_to_wire(steering))
    text["guard"] = wire
    with pytest.raises(SteeringRequestError, match="malformed"):
        resolved_from_wire(json.dumps(text))


def test_a_guarded_steering_survives_the_wire():
    steering = guarded(ResolvedSteering("inline", "d", {1: [2]}, {}, 0.01), spec())
    assert resolved_from_wire(resolved_to_wire(steering)) == steering
    assert steering.digest != "d" and steering.label == "guard:g"
