"""`expert_profiles.composition` and its resolution: several profiles applied as one."""

from __future__ import annotations

import pytest

from expert_profiles.composition import (
    CompositionConflictError,
    CompositionError,
    compose,
    composed_name,
    split_names,
)
from expert_profiles.model_shape import ModelShape
from expert_profiles.request_steering import (
    ProfileCache,
    SteeringRequestError,
    resolve_profile,
    resolve_profiles,
    resolve_request,
)
from expert_profiles.schema import SteeringProfile

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))


def profile(name: str, activate=None, deactivate=None, eps=None) -> SteeringProfile:
    return SteeringProfile.model_validate({
        "format": "steermoe-profile/1", "name": name, "model": MODEL,
        "activate": {str(k): v for k, v in (activate or {}).items()},
        "deactivate": {str(k): v for k, v in (deactivate or {}).items()},
        **({"eps": eps} if eps is not None else {}),
    })


@pytest.mark.parametrize(("given", "names"), [
    ("safety", ("safety",)),
    ("safety+concise", ("concise", "safety")),
    (["safety", "concise"], ("concise", "safety")),
    (["b+a", "c"], ("a", "b", "c")),
])
def test_names_are_split_and_sorted(given, names):
    assert split_names(given) == names
    assert composed_name(names) == "+".join(names)


@pytest.mark.parametrize("given", ["", "a+", "+a", "a++b", "a b", "../a", ["a", 1], [], "a+a",
                                   ["a", "a"], "+".join(f"p{i}" for i in range(9)), 7, None])
def test_bad_compositions_are_refused(given):
    with pytest.raises(CompositionError):
        split_names(given)


def test_union_per_layer_and_order_does_not_matter():
    a = profile("a", activate={1: [2]}, deactivate={2: [0]})
    b = profile("b", activate={1: [3]}, deactivate={2: [1], 3: [4]})
    ab, ba = compose([a, b], 0.01), compose([b, a], 0.01)
    assert ab == ba
    assert ab.activate == {1: [2, 3]}
    assert ab.deactivate == {2: [0, 1], 3: [4]}
    digests = {resolve_profiles(pair, SHAPE, 0.01).digest for pair in ([a, b], [b, a])}
    assert len(digests) == 1


def test_a_shared_expert_is_no_conflict():
    a = profile("a", activate={1: [2]})
    b = profile("b", activate={1: [2]}, deactivate={1: [0]})
    assert compose([a, b], 0.01).activate == {1: [2]}


def test_activate_against_deactivate_is_a_conflict_naming_both():
    a = profile("a", activate={1: [2]})
    b = profile("b", deactivate={1: [2, 5]})
    with pytest.raises(CompositionConflictError) as info:
        compose([a, b], 0.01)
    assert str(info.value) == ("profiles 'a' and 'b' conflict: layer 1 experts [2] are "
                               "activated by 'a' and deactivated by 'b'")
    with pytest.raises(SteeringRequestError) as info:
        resolve_profiles([b, a], SHAPE, 0.01)
    assert info.value.status == 409 and info.value.code == "steering_conflict"
    assert "'a+b' cannot be composed" in str(info.value)


def test_a_union_beyond_top_k_is_refused():
    a = profile("a", activate={1: [2]})
    b = profile("b", activate={1: [3]})
    c = profile("c", activate={1: [4]})
    with pytest.raises(SteeringRequestError) as info:
        resolve_profiles([a, b, c], SHAPE, 0.01)
    assert info.value.status == 409 and info.value.code == "steering_conflict"
    assert "activates 3 experts, more than the model's top-k of 2" in str(info.value)


def test_eps_is_the_largest_counting_the_default():
    a = profile("a", activate={1: [2]}, eps=0.05)
    b = profile("b", activate={1: [3]})
    assert compose([a, b], 0.01).eps == 0.05
    assert compose([a, b], 0.2).eps == 0.2
    assert compose([profile("x", activate={1: [2]}), b], 0.2).eps is None
    assert resolve_profiles([a, b], SHAPE, 0.2).eps == 0.2


def test_one_profile_resolves_as_before_and_a_composition_has_its_own_digest():
    a = profile("a", activate={1: [2]})
    b = profile("b", deactivate={2: [3]})
    assert resolve_profiles([a], SHAPE, 0.01) == resolve_profile(a, SHAPE, 0.01)
    composed = resolve_profiles([a, b], SHAPE, 0.01)
    assert composed.label == "profile:a+b"
    assert composed.activate == {1: [2]} and composed.deactivate == {2: [3]}
    assert composed.digest not in {resolve_profile(p, SHAPE, 0.01).digest for p in (a, b)}


def test_a_part_for_another_model_is_409_naming_it():
    other = profile("other", activate={1: [2]})
    other = other.model_copy(update={"model": other.model.model_copy(update={"num_experts": 16})})
    with pytest.raises(SteeringRequestError) as info:
        resolve_profiles([profile("a", activate={2: [1]}), other], SHAPE, 0.01)
    assert info.value.status == 409 and info.value.code == "profile_model_mismatch"
    assert "'other'" in str(info.value)


def test_the_front_end_resolves_a_composition_from_files(tmp_path):
    for item in (profile("a", activate={1: [2]}), profile("b", deactivate={2: [3]})):
        (tmp_path / f"{item.name}.json").write_text(item.model_dump_json(), encoding="utf-8")
    cache = ProfileCache(tmp_path)
    resolved = resolve_request({"steering_profile": "b+a"}, SHAPE, cache, 0.01)
    assert resolved is not None and resolved.label == "profile:a+b"
    with pytest.raises(SteeringRequestError) as info:
        resolve_request({"steering_profile": "a+missing"}, SHAPE, cache, 0.01)
    assert info.value.status == 404
