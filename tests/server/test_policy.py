"""`server.policy`: locked endpoints, client-selectable profiles, operator flags."""

from __future__ import annotations

import pytest

from expert_profiles.request_steering import ProfileCache, RequestedSteering
from server.config import ServerConfig
from server.errors import SteeringHTTPError
from server.policy import SteeringDecision, SteeringPolicy
from tests.server.server_process import write_profile

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
INLINE = {"activate": {"1": [2]}}


@pytest.fixture
def profiles(tmp_path):
    write_profile(tmp_path, "safety", MODEL, {1: [5]})
    write_profile(tmp_path, "concise", MODEL, {1: [2]})
    write_profile(tmp_path, "unsafe", MODEL, {1: [3]}, tags=["lowers-safety"])
    return tmp_path


def policy(profiles, **options) -> SteeringPolicy:
    config = ServerConfig(profiles_dir=str(profiles), base_names=("m",),
                          endpoints={"m-safe": "safety"}, **options)
    return SteeringPolicy(config, ProfileCache(profiles))


def ask(**fields) -> RequestedSteering:
    if "profile" in fields:
        fields["profile_given"] = True
    return RequestedSteering(**fields)


def status_of(policy_, model, requested) -> int:
    with pytest.raises(SteeringHTTPError) as caught:
        policy_.decide(model, requested)
    return caught.value.status


def test_unsteered_and_profile_requests(profiles):
    rules = policy(profiles)
    assert rules.decide("m", ask()) == SteeringDecision("m")
    assert rules.decide(None, ask()).endpoint == "m"
    decision = rules.decide("m", ask(profile="concise"))
    assert decision.profile == "concise" and decision.label == "concise" and decision.steered
    assert rules.decide("m", ask(profile=None)).label == "none"


def test_default_policy_hides_lowers_safety_profiles(profiles):
    rules = policy(profiles)
    assert status_of(rules, "m", ask(profile="unsafe")) == 403
    assert status_of(rules, "m", ask(profile="missing")) == 404
    assert status_of(rules, "m", ask(profile="../etc")) == 400


def test_operator_names_the_client_profiles(profiles):
    rules = policy(profiles, client_profiles=("unsafe",))
    assert rules.decide("m", ask(profile="unsafe")).profile == "unsafe"
    assert status_of(rules, "m", ask(profile="concise")) == 403
    assert status_of(policy(profiles, client_profiles=()), "m", ask(profile="safety")) == 403


def test_locked_endpoint(profiles):
    rules = policy(profiles, client_profiles=())
    decision = rules.decide("m-safe", ask())
    assert decision == SteeringDecision("m-safe", locked=True, profile="safety")
    assert rules.decide("m-safe", ask(profile="safety")).profile == "safety"
    for requested in (ask(profile="concise"), ask(profile=None), ask(inline=INLINE)):
        assert status_of(rules, "m-safe", requested) == 403


def test_inline_and_capture_need_the_operator(profiles):
    assert status_of(policy(profiles), "m", ask(inline=INLINE)) == 403
    assert status_of(policy(profiles), "m", ask(capture=True)) == 403
    rules = policy(profiles, allow_inline_steering=True, allow_routing_capture=True)
    decision = rules.decide("m", ask(inline=INLINE, capture=True))
    assert decision.inline == INLINE and decision.capture and decision.label == "inline"
    assert rules.decide("m-safe", ask(capture=True)).capture


def test_who_reads_what(profiles):
    rules = policy(profiles, client_profiles=("concise",))
    cache = ProfileCache(profiles)
    assert rules.client_may_read(cache.get("safety"))  # behind a locked endpoint
    assert rules.client_may_read(cache.get("concise"))
    assert not rules.client_may_read(cache.get("unsafe"))
    assert rules.endpoints_of("safety") == ["m-safe"]


def test_a_composition_needs_every_part_selectable(profiles):
    rules = policy(profiles)
    decision = rules.decide("m", ask(profile="safety+concise"))
    assert decision.profile == "concise+safety" and decision.label == "composed"
    assert [p.name for p in decision.loaded] == ["concise", "safety"]
    assert status_of(rules, "m", ask(profile="concise+unsafe")) == 403  # lowers-safety part
    assert status_of(rules, "m", ask(profile="concise+missing")) == 404


def composed_policy(profiles, **options) -> SteeringPolicy:
    config = ServerConfig(profiles_dir=str(profiles), base_names=("m",),
                          endpoints={"m-safe": "safety", "m-both": "concise+safety"},
                          endpoint_client_profiles={"m-safe": ("concise",)}, **options)
    return SteeringPolicy(config, ProfileCache(profiles))


def test_a_locked_endpoint_takes_only_the_allowed_additions(profiles):
    rules = composed_policy(profiles, client_profiles=())
    assert rules.decide("m-safe", ask()).profile == "safety"
    added = rules.decide("m-safe", ask(profile="concise"))
    assert added == SteeringDecision("m-safe", locked=True, profile="concise+safety")
    assert rules.decide("m-safe", ask(profile="safety+concise")).profile == "concise+safety"
    with pytest.raises(SteeringHTTPError) as caught:
        rules.decide("m-safe", ask(profile="unsafe"))
    assert caught.value.status == 403
    assert "cannot select profile 'unsafe' on it (it may add 'concise')" in caught.value.message
    for requested in (ask(profile=None), ask(profile="concise+unsafe"), ask(inline=INLINE)):
        assert status_of(rules, "m-safe", requested) == 403


def test_a_locked_composition(profiles):
    rules = composed_policy(profiles)
    assert rules.decide("m-both", ask()).profile == "concise+safety"
    assert rules.decide("m-both", ask(profile="safety")).profile == "concise+safety"
    assert status_of(rules, "m-both", ask(profile="unsafe")) == 403
    assert rules.endpoints_of("concise") == ["m-safe", "m-both"]
    assert rules.endpoints_of("safety") == ["m-safe", "m-both"]
    assert rules.endpoints_of("unsafe") == []
