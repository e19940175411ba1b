"""`expert_profiles.schema`: the steermoe-profile/1 format and the ExpertSteering sets."""

from __future__ import annotations

import copy
import json
import math

import pytest
from pydantic import ValidationError

from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import (
    EMPTY_STEERING_ERROR,
    EMPTY_STEERING_MESSAGE,
    MAX_EPS,
    MAX_SOURCE_DEPTH,
    PROFILE_FORMAT,
    ExpertSteering,
    ProfileMismatchError,
    SteeringProfile,
    _ranges,
    describe_validation_error,
    is_profile_name,
)

OLMOE = {"architecture": "OlmoeForCausalLM", "num_layers": 16, "num_experts": 64, "top_k": 8}
OLMOE_SHAPE = ModelShape("OlmoeForCausalLM", 16, 64, 8)


def profile_data(**overrides) -> dict:
    data = {
        "format": PROFILE_FORMAT,
        "name": "safety",
        "model": dict(OLMOE),
        "activate": {"3": [12, 40]},
        "deactivate": {"5": [7]},
        "eps": 0.01,
        "description": "test profile",
        "tags": ["lowers-safety"],
        "source": {"method": "risk-difference", "pairs": 128},
    }
    data.update(overrides)
    return data


def steering(**kwargs) -> ExpertSteering:
    return ExpertSteering.model_validate(kwargs)


# ---- ExpertSteering: parsing of the sets ---------------------------------------------------


def test_layer_keys_are_parsed_to_int_and_experts_sorted():
    s = steering(activate={"3": [40, 12]}, deactivate={"10": [7, 1]})
    assert s.activate == {3: [12, 40]}
    assert s.deactivate == {10: [1, 7]}
    assert all(isinstance(k, int) for k in s.activate)


def test_int_keys_are_accepted_too():
    assert steering(activate={3: [1]}).activate == {3: [1]}


def test_missing_sets_default_to_empty():
    # Steering with no expert at all is refused (see the tests of empty steering below), so
    # each set is left out beside a non-empty other.
    s = steering(deactivate={"1": [2]})
    assert s.activate == {} and s.eps is None
    assert not s.is_empty()
    assert steering(activate={"1": [2]}, deactivate=None).deactivate == {}
    assert steering(activate=None, deactivate={"1": [2]}).activate == {}


def test_empty_expert_lists_are_dropped():
    s = steering(activate={"3": [], "1": [2]}, deactivate={"4": []})
    assert s.activate == {1: [2]} and s.deactivate == {}


def test_not_empty_with_only_deactivate():
    assert not steering(deactivate={"1": [2]}).is_empty()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": [1]}, "layer key 'x' is not a decimal layer index"),
        ({"3.5": [1]}, "layer key '3.5' is not a decimal layer index"),
        ({"-1": [1]}, "layer key '-1' is not a decimal layer index"),
        ({"3": [1, 1]}, "layer 3: an expert is listed twice"),
        ({"3": [-2]}, "layer 3: negative expert index"),
        ({"3": [1.0]}, "layer 3: experts must be a list of integers"),
        ({"3": ["1"]}, "layer 3: experts must be a list of integers"),
        ({"3": [True]}, "layer 3: experts must be a list of integers"),
        ({"3": 1}, "layer 3: experts must be a list of integers"),
        ({"3": None}, "layer 3: experts must be a list of integers"),
        ([1, 2], "must be an object mapping layer index to a list of expert indices"),
        ("3", "must be an object mapping layer index to a list of expert indices"),
    ],
)
@pytest.mark.parametrize("kind", ["activate", "deactivate"])
def test_bad_sets_are_refused_with_a_clear_message(kind, value, message):
    with pytest.raises(ValidationError) as info:
        steering(**{kind: value})
    assert message in str(info.value)
    assert info.value.errors()[0]["loc"] == (kind,)


def test_overlap_between_activate_and_deactivate_is_refused():
    with pytest.raises(ValidationError, match=r"layer 3: experts \[2, 5\] are both activated"):
        steering(activate={"3": [5, 1, 2]}, deactivate={"3": [2, 5, 9]})


def test_same_expert_in_different_layers_is_not_an_overlap():
    s = steering(activate={"3": [5]}, deactivate={"4": [5]})
    assert s.activate == {3: [5]} and s.deactivate == {4: [5]}


def test_two_spellings_of_one_layer_are_not_silently_dropped():
    try:
        s = steering(activate={"3": [1], "03": [2]})
    except ValidationError:
        return  # refusing is fine
    assert s.activate == {3: [1, 2]}  # merging is fine too; dropping [1] is not


@pytest.mark.parametrize("eps", [0.0, -0.01, MAX_EPS + 0.001, math.inf, math.nan])
def test_eps_out_of_range_is_refused(eps):
    with pytest.raises(ValidationError, match="eps"):
        steering(activate={"1": [1]}, eps=eps)


@pytest.mark.parametrize("eps", [1e-6, 0.01, 1.0, MAX_EPS])
def test_eps_in_range_is_kept(eps):
    assert steering(activate={"1": [1]}, eps=eps).eps == eps


def test_extra_fields_are_refused():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        steering(activate={"1": [1]}, bogus=1)


# ---- ExpertSteering.check_shape ------------------------------------------------------------


def test_check_shape_accepts_sets_that_fit():
    steering(activate={"15": [0, 63]}, deactivate={"0": list(range(10))}).check_shape(OLMOE_SHAPE)


@pytest.mark.parametrize("kind", ["activate", "deactivate"])
def test_check_shape_refuses_a_layer_past_the_last(kind):
    with pytest.raises(ProfileMismatchError) as info:
        steering(**{kind: {"16": [1]}}).check_shape(OLMOE_SHAPE)
    assert str(info.value) == f"{kind}: layer 16 does not exist (the model has 16 decoder layers)"


@pytest.mark.parametrize("kind", ["activate", "deactivate"])
def test_check_shape_refuses_an_expert_past_the_last(kind):
    with pytest.raises(ProfileMismatchError) as info:
        steering(**{kind: {"2": [1, 64, 70]}}).check_shape(OLMOE_SHAPE)
    assert str(info.value) == (
        f"{kind}: layer 2 names experts [64, 70], the model has 64 experts per layer"
    )


def test_check_shape_top_k_limit_on_activate():
    shape = ModelShape("M", 4, 16, 2)
    steering(activate={"1": [3, 4]}).check_shape(shape)
    with pytest.raises(ProfileMismatchError) as info:
        steering(activate={"1": [3, 4, 5]}).check_shape(shape)
    assert str(info.value) == (
        "activate: layer 1 activates 3 experts, more than the model's top-k of 2"
    )


def test_check_shape_no_top_k_limit_on_deactivate():
    steering(deactivate={"1": [0, 1, 2, 3, 4]}).check_shape(ModelShape("M", 4, 16, 2))


@pytest.mark.parametrize("kind", ["activate", "deactivate"])
def test_check_shape_refuses_a_layer_without_moe_block(kind):
    shape = ModelShape("DeepseekV3ForCausalLM", 8, 16, 2, moe_layers=(3, 4, 5, 7))
    steering(**{kind: {"3": [1], "7": [2]}}).check_shape(shape)
    with pytest.raises(ProfileMismatchError) as info:
        steering(**{kind: {"6": [1]}}).check_shape(shape)
    assert str(info.value) == (f"{kind}: decoder layer 6 has no MoE block (MoE layers: 3-5, 7)")


def test_check_shape_layer_bound_checked_before_moe_layers():
    shape = ModelShape("M", 4, 16, 2, moe_layers=(1, 3))
    with pytest.raises(ProfileMismatchError, match="layer 9 does not exist"):
        steering(activate={"9": [1]}).check_shape(shape)


def test_check_shape_without_moe_layers_means_every_layer():
    steering(activate={"0": [1]}).check_shape(ModelShape("M", 4, 16, 2, moe_layers=()))


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([], "none"),
        ([4], "4"),
        ([1, 2, 3], "1-3"),
        ([0, 2, 4], "0, 2, 4"),
        ([1, 2, 3, 5, 7, 8], "1-3, 5, 7-8"),
    ],
)
def test_ranges(values, text):
    assert _ranges(values) == text


# ---- digest ----------------------------------------------------------------------------------


def test_digest_is_stable():
    # A fixed value: the digest names KV-cache salts and table slots, so it must not drift
    # between processes or releases without intent.
    s = steering(activate={"3": [40, 12]}, deactivate={"5": [7]})
    assert s.digest(0.01) == "d31f562d083c1008"
    assert len(s.digest(0.01)) == 16
    assert s.digest(0.01) == s.digest(0.01)


def test_digest_ignores_spelling_and_order():
    a = steering(activate={"3": [40, 12], "10": [1]}, deactivate={"5": [7]})
    b = steering(deactivate={5: [7]}, activate={10: [1], 3: [12, 40]})
    assert a.digest(0.01) == b.digest(0.01)


def test_digest_ignores_empty_lists():
    a = steering(activate={"3": [1]})
    b = steering(activate={"3": [1], "4": []}, deactivate={"2": []})
    assert a.digest(0.01) == b.digest(0.01)


@pytest.mark.parametrize(
    "other",
    [
        {"activate": {"3": [12, 41]}, "deactivate": {"5": [7]}},
        {"activate": {"4": [12, 40]}, "deactivate": {"5": [7]}},
        {"activate": {"3": [12, 40]}, "deactivate": {"5": [8]}},
        {"activate": {"3": [12, 40]}},
        {"activate": {"3": [12]}, "deactivate": {"5": [7]}},
        {"deactivate": {"3": [12, 40], "5": [7]}},
        {"activate": {"3": [12, 40], "5": [7]}},
        {"activate": {"3": [12, 40]}, "deactivate": {"5": [7]}, "eps": 0.02},
    ],
)
def test_digest_changes_with_what_the_engine_applies(other):
    base = steering(activate={"3": [12, 40]}, deactivate={"5": [7]})
    assert steering(**other).digest(0.01) != base.digest(0.01)


def test_digest_uses_effective_eps():
    implicit = steering(activate={"3": [1]})
    explicit = steering(activate={"3": [1]}, eps=0.01)
    assert implicit.digest(0.01) == explicit.digest(0.01)
    assert implicit.digest(0.02) != implicit.digest(0.01)
    # An explicit eps wins over the default, so the default no longer matters.
    assert explicit.digest(0.02) == explicit.digest(0.01)
    assert implicit.digest(0.02) == steering(activate={"3": [1]}, eps=0.02).digest(0.01)


def test_profile_digest_depends_only_on_sets_and_eps():
    p = SteeringProfile.model_validate(profile_data())
    q = SteeringProfile.model_validate(
        profile_data(name="other", description="x", tags=[], source={})
    )
    s = steering(activate={"3": [12, 40]}, deactivate={"5": [7]}, eps=0.01)
    assert p.digest(0.5) == q.digest(0.5) == s.digest(0.5)


# ---- SteeringProfile -------------------------------------------------------------------------


def test_profile_loads():
    p = SteeringProfile.model_validate(profile_data())
    assert p.name == "safety"
    assert p.format == PROFILE_FORMAT
    assert p.model.architecture == "OlmoeForCausalLM"
    assert p.activate == {3: [12, 40]} and p.deactivate == {5: [7]}
    assert p.eps == 0.01
    assert p.tags == ["lowers-safety"]
    assert isinstance(p, ExpertSteering)


def test_profile_minimal():
    # The least a profile may be: a name, its model and one expert (empty ones are refused).
    p = SteeringProfile.model_validate({"name": "m", "model": OLMOE, "deactivate": {"1": [2]}})
    assert p.format == PROFILE_FORMAT
    assert p.activate == {} and p.eps is None
    assert p.description == "" and p.tags == [] and p.source == {}


@pytest.mark.parametrize(
    "name",
    ["a", "safety", "Safety-2.v1_x", "0", "a" * 64, "x.json"],
)
def test_good_names(name):
    assert SteeringProfile.model_validate(profile_data(name=name)).name == name
    assert is_profile_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "..",
        ".",
        ".hidden",
        "a/b",
        "a\\b",
        "/abs",
        "-x",
        "_x",
        "a b",
        "a\n",
        "a\x00",
        "a" * 65,
        "é",
        "x:y",
    ],
)
def test_bad_names_are_refused(name):
    with pytest.raises(ValidationError) as info:
        SteeringProfile.model_validate(profile_data(name=name))
    assert info.value.errors()[0]["loc"] == ("name",)
    assert not is_profile_name(name)


@pytest.mark.parametrize("name", [None, 3, b"safety", ["safety"]])
def test_a_profile_name_is_a_string(name):
    assert not is_profile_name(name)


def test_name_is_required():
    data = profile_data()
    del data["name"]
    with pytest.raises(ValidationError, match="name"):
        SteeringProfile.model_validate(data)


def test_other_format_is_refused():
    with pytest.raises(ValidationError, match="format"):
        SteeringProfile.model_validate(profile_data(format="steermoe-profile/2"))


@pytest.mark.parametrize("where", ["top", "model"])
def test_profile_extra_fields_are_refused(where):
    data = profile_data()
    if where == "top":
        data["unknown"] = 1
    else:
        data["model"]["unknown"] = 1
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SteeringProfile.model_validate(data)


@pytest.mark.parametrize("field", ["num_layers", "num_experts", "top_k"])
@pytest.mark.parametrize("value", [0, -1])
def test_profile_model_sizes_must_be_positive(field, value):
    data = profile_data()
    data["model"][field] = value
    with pytest.raises(ValidationError, match=field):
        SteeringProfile.model_validate(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"activate": {"16": [1]}}, "activate: layer 16 does not exist"),
        ({"deactivate": {"2": [64]}}, "deactivate: layer 2 names experts [64]"),
        ({"activate": {"2": list(range(9))}}, "more than the model's top-k of 8"),
        ({"activate": {"2": [1]}, "deactivate": {"2": [1]}}, "both activated and deactivated"),
    ],
)
def test_profile_must_fit_its_own_model(overrides, message):
    with pytest.raises(ValidationError) as info:
        SteeringProfile.model_validate(profile_data(**overrides))
    assert message in str(info.value)


def test_check_model_accepts_the_same_model():
    SteeringProfile.model_validate(profile_data()).check_model(OLMOE_SHAPE)


@pytest.mark.parametrize(
    "served",
    [
        ModelShape("MixtralForCausalLM", 16, 64, 8),
        ModelShape("OlmoeForCausalLM", 24, 64, 8),
        ModelShape("OlmoeForCausalLM", 16, 128, 8),
        ModelShape("OlmoeForCausalLM", 16, 64, 4),
    ],
)
def test_check_model_refuses_another_model(served):
    p = SteeringProfile.model_validate(profile_data())
    with pytest.raises(ProfileMismatchError) as info:
        p.check_model(served)
    assert str(info.value) == (
        "profile 'safety' is for OlmoeForCausalLM (16 layers, 64 experts, top-8), "
        f"but the served model is {served.architecture} ({served.num_layers} layers, "
        f"{served.num_experts} experts, top-{served.top_k})"
    )


def test_check_model_refuses_a_layer_without_moe_block():
    p = SteeringProfile.model_validate(profile_data(activate={"0": [1]}, deactivate={}))
    served = ModelShape("OlmoeForCausalLM", 16, 64, 8, moe_layers=tuple(range(1, 16)))
    with pytest.raises(ProfileMismatchError, match="decoder layer 0 has no MoE block"):
        p.check_model(served)
    # The same profile without the dense layer fits.
    SteeringProfile.model_validate(profile_data()).check_model(served)


def test_moe_layers_do_not_take_part_in_model_identity():
    p = SteeringProfile.model_validate(profile_data())
    p.check_model(ModelShape("OlmoeForCausalLM", 16, 64, 8, moe_layers=tuple(range(16))))


# ---- to_json ---------------------------------------------------------------------------------


def test_to_json_round_trip():
    p = SteeringProfile.model_validate(profile_data())
    text = p.to_json()
    assert text.endswith("\n")
    again = SteeringProfile.model_validate_json(text)
    assert again == p
    assert again.digest(0.01) == p.digest(0.01)
    data = json.loads(text)
    assert data["format"] == PROFILE_FORMAT
    assert data["activate"] == {"3": [12, 40]}
    assert data["deactivate"] == {"5": [7]}
    assert data["model"] == OLMOE
    assert data["name"] == "safety" and data["eps"] == 0.01


def test_to_json_leaves_out_unset_eps():
    p = SteeringProfile.model_validate(profile_data(eps=None))
    data = json.loads(p.to_json())
    assert "eps" not in data
    assert SteeringProfile.model_validate(data) == p


def test_to_json_is_a_fixed_point():
    p = SteeringProfile.model_validate(profile_data(activate={"10": [3, 1], "2": [5]}))
    text = p.to_json()
    assert SteeringProfile.model_validate_json(text).to_json() == text


def test_validation_does_not_mutate_input():
    data = profile_data(activate={"3": [40, 12]})
    before = copy.deepcopy(data)
    SteeringProfile.model_validate(data)
    assert data == before


def test_deactivating_so_many_that_top_k_cannot_be_filled_is_refused():
    s = steering(deactivate={"1": list(range(7))})
    with pytest.raises(ProfileMismatchError, match="at least top-k"):
        s.check_shape(ModelShape("X", 4, 8, 2))


# ---- empty steering is refused, inline and as a profile ----------------------------------------

EMPTY_FORMS = [
    {},
    {"activate": {"3": []}},
    {"activate": {}, "deactivate": {}},
    {"activate": None, "deactivate": None},
    {"activate": {"3": [], "4": []}, "deactivate": {"5": []}},
    {"eps": 0.5},
]


def test_empty_steering_message():
    assert EMPTY_STEERING_MESSAGE == (
        "steering selects no experts: give at least one expert to activate, deactivate or bias"
    )


@pytest.mark.parametrize("inline", EMPTY_FORMS)
def test_empty_inline_steering_is_refused(inline):
    with pytest.raises(ValidationError) as info:
        ExpertSteering.model_validate(inline)
    (error,) = info.value.errors()
    assert error["type"] == EMPTY_STEERING_ERROR
    assert error["msg"] == EMPTY_STEERING_MESSAGE
    assert describe_validation_error(info.value, "steering") == (
        "steering: steering selects no experts: give at least one expert to activate, "
        "deactivate or bias"
    )


def test_steering_built_without_arguments_is_refused():
    with pytest.raises(ValidationError, match="steering selects no experts"):
        ExpertSteering()


@pytest.mark.parametrize("sets", EMPTY_FORMS)
def test_empty_profile_is_refused(sets):
    with pytest.raises(ValidationError) as info:
        SteeringProfile.model_validate({"name": "empty", "model": OLMOE, **sets})
    assert describe_validation_error(info.value, "profile") == (
        "profile: steering selects no experts: give at least one expert to activate, "
        "deactivate or bias"
    )
    with pytest.raises(ValidationError, match="steering selects no experts"):
        SteeringProfile(name="empty", model=OLMOE, **sets)


@pytest.mark.parametrize("sets", [{"activate": {"3": [1]}}, {"deactivate": {"3": [1]}},
                                  {"activate": {"3": [1]}, "deactivate": {"4": []}},
                                  {"activate": {"3": []}, "deactivate": {"4": [2]}}])
def test_steering_with_only_activations_or_only_deactivations_is_accepted(sets):
    inline = ExpertSteering.model_validate(sets)
    profile = SteeringProfile.model_validate({"name": "one-sided", "model": OLMOE, **sets})
    assert not inline.is_empty() and not profile.is_empty()
    assert (profile.activate, profile.deactivate) == (inline.activate, inline.deactivate)


def test_field_errors_are_reported_before_the_empty_check():
    with pytest.raises(ValidationError) as info:
        SteeringProfile.model_validate({"name": "bad name", "model": OLMOE})
    assert [e["loc"] for e in info.value.errors()] == [("name",)]


def test_is_empty_still_describes_unvalidated_instances():
    assert ExpertSteering.model_construct(activate={}, deactivate={}, eps=None).is_empty()
    s = steering(activate={"1": [2]})
    s.activate = {}  # assignment is not validated
    assert s.is_empty()


# ---- bounds on what a profile echoes and holds -------------------------------------------------


def test_a_long_layer_key_is_cut_in_the_message():
    with pytest.raises(ValidationError) as info:
        steering(activate={"k" * 5000: [1]})
    message = describe_validation_error(info.value, "steering")
    assert "is not a decimal layer index" in message
    assert len(message) < 200


@pytest.mark.parametrize("key", ["1" * 10, "9" * 5000])
def test_a_layer_key_of_many_digits_is_refused_plainly(key):
    with pytest.raises(ValidationError) as info:
        steering(activate={key: [1]})
    message = describe_validation_error(info.value, "steering")
    assert "is not a decimal layer index" in message
    assert "set_int_max_str_digits" not in message


def nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_source_may_nest_up_to_the_limit_and_still_be_written():
    source = {"x": nested(MAX_SOURCE_DEPTH - 1)}
    p = SteeringProfile.model_validate(profile_data(source=source))
    assert SteeringProfile.model_validate_json(p.to_json()) == p


@pytest.mark.parametrize("depth", [MAX_SOURCE_DEPTH, 300, 900])
def test_source_nesting_too_deep_to_write_back_is_refused(depth):
    with pytest.raises(ValidationError) as info:
        SteeringProfile.model_validate(profile_data(source={"x": nested(depth)}))
    assert describe_validation_error(info.value, "profile") == (
        f"source: Value error, nested more than {MAX_SOURCE_DEPTH} levels deep"
    )
